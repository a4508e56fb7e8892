//! `component_types`: one row per published version of a type.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "component_types")]
pub(crate) struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) type_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) version: String,
    pub(crate) category: String,
    /// The `csp_components::ComponentSpec`, as JSON.
    pub(crate) spec: String,
    pub(crate) builtin: bool,
    pub(crate) deprecated: bool,
    pub(crate) deprecation_message: String,
    pub(crate) remote_address: Option<String>,
    pub(crate) remote_timeout_ms: i32,
    /// "", "available" or "unavailable".
    pub(crate) availability: String,
    pub(crate) last_checked_at: Option<DateTimeUtc>,
    pub(crate) last_error: String,
    pub(crate) created_at: DateTimeUtc,
    pub(crate) created_by: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub(crate) enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
