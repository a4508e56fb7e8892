//! The ai schema's tables.

pub(crate) mod conversation;
pub(crate) mod message;
pub(crate) mod usage_record;
