//! csp-ai
