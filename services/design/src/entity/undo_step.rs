//! `undo_steps`: each user's undo and redo history per design (see `undo`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "undo_steps")]
pub(crate) struct Model {
    /// Orders the steps of a stack: the highest is on top.
    #[sea_orm(primary_key)]
    pub(crate) id: i64,
    pub(crate) design_id: String,
    pub(crate) user_id: String,
    /// "undo" or "redo".
    pub(crate) stack: String,
    /// The revision whose edit the step is.
    pub(crate) revision: i64,
    /// JSON of `undo::Step`.
    pub(crate) step: String,
    pub(crate) created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub(crate) enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
