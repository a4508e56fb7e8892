//! `designs`: one row per design, with its design-level fields and current revision.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "designs")]
pub(crate) struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) id: String,
    pub(crate) owner_id: String,
    pub(crate) name: String,
    /// Lower case, for name search.
    pub(crate) name_key: String,
    pub(crate) description: String,
    /// JSON object.
    pub(crate) metadata: String,
    /// JSON object.
    pub(crate) canvas: String,
    pub(crate) is_template: bool,
    pub(crate) revision: i64,
    pub(crate) created_at: DateTimeUtc,
    pub(crate) updated_at: DateTimeUtc,
    pub(crate) deleted_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub(crate) enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
