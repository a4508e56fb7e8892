//! `dead_letters`: jobs given up after too many deliveries, for admins to look into.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "dead_letters")]
pub(crate) struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) execution_id: String,
    pub(crate) design_id: String,
    /// The job's id in the queue.
    pub(crate) job: String,
    pub(crate) deliveries: i64,
    pub(crate) last_error: String,
    pub(crate) dead_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub(crate) enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
