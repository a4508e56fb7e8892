//! The auth schema's tables.

pub(crate) mod api_key;
pub(crate) mod audit_event;
pub(crate) mod refresh_token;
pub(crate) mod user;
