//! The design schema's tables.

pub(crate) mod connection;
pub(crate) mod design;
pub(crate) mod node;
pub(crate) mod revision;
pub(crate) mod share;
pub(crate) mod snapshot;
pub(crate) mod undo_step;
