//! The executor schema's tables.

pub(crate) mod dead_letter;
pub(crate) mod execution;
pub(crate) mod recording;
