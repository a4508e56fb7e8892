//! `recordings`: the messages each connection carried, for executions that record them.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "recordings")]
pub(crate) struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) execution_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) connection_id: String,
    /// JSON array.
    pub(crate) messages: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub(crate) enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
