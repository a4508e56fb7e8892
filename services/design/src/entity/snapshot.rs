//! `snapshots`: the whole document every `design.snapshot_every` revisions.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "snapshots")]
pub(crate) struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) design_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) revision: i64,
    /// JSON of `model::Document`.
    pub(crate) document: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub(crate) enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
