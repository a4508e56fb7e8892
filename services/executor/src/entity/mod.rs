//! The executor schema's tables.

pub(crate) mod execution;
pub(crate) mod recording;
