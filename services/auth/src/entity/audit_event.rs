//! `audit_events`: logins, failures, lockouts, role changes and the like.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_events")]
pub(crate) struct Model {
    /// UUID v7: sorting by id sorts by time.
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) id: String,
    pub(crate) time: DateTimeUtc,
    /// The `AuditEventKind` name without its prefix, e.g. `LOGIN_FAILED`.
    pub(crate) kind: String,
    pub(crate) actor_id: Option<String>,
    pub(crate) subject_id: Option<String>,
    pub(crate) client_address: String,
    /// A JSON object; never secrets.
    pub(crate) details: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub(crate) enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
