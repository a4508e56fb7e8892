//! `nodes`: the processes of each design.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "nodes")]
pub(crate) struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) design_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) node_id: String,
    pub(crate) type_id: String,
    pub(crate) type_version: String,
    pub(crate) label: String,
    /// JSON object.
    pub(crate) config: String,
    pub(crate) x: f64,
    pub(crate) y: f64,
    pub(crate) width: f64,
    pub(crate) height: f64,
    /// JSON object.
    pub(crate) style: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub(crate) enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
