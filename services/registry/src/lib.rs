//! csp-registry
