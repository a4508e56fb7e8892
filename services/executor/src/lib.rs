//! csp-executor
