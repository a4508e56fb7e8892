//! csp-auth
