//! csp-design
