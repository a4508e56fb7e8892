//! csp-gateway
