//! `revisions`: every committed change, as the normalised ops that made it.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "revisions")]
pub(crate) struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) design_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) revision: i64,
    pub(crate) author_id: String,
    pub(crate) created_at: DateTimeUtc,
    /// JSON array of `model::Op`.
    pub(crate) ops: String,
    pub(crate) op_count: i32,
    pub(crate) summary: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub(crate) enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
