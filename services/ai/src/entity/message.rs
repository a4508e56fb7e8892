//! `conversation_messages`: a conversation's history, in order.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "conversation_messages")]
pub(crate) struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) conversation_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) seq: i32,
    /// JSON of `model::Message`.
    pub(crate) message: String,
    /// Its tokens as sent (for trimming the history to a budget).
    pub(crate) tokens: i32,
    pub(crate) created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub(crate) enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
