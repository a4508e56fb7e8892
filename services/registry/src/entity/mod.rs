//! The registry schema's tables.

pub(crate) mod component_type;
