//! csp-collab
