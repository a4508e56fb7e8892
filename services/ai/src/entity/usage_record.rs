//! `usage_records`: one per request to a provider — what it used, what it cost, whose it was.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "usage_records")]
pub(crate) struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) id: String,
    pub(crate) created_at: DateTimeUtc,
    /// `YYYY-MM-DD` (UTC), for totals per day.
    pub(crate) day: String,
    /// `YYYY-MM` (UTC), for totals per month.
    pub(crate) month: String,
    /// The user the request was for.
    pub(crate) user_id: String,
    /// The service that made it for them, if one did.
    pub(crate) caller_id: String,
    pub(crate) design_id: String,
    pub(crate) execution_id: String,
    pub(crate) node_id: String,
    pub(crate) conversation_id: String,
    /// chat, stream, analyze, code.
    pub(crate) operation: String,
    pub(crate) provider: String,
    pub(crate) model: String,
    pub(crate) prompt_tokens: i64,
    pub(crate) completion_tokens: i64,
    pub(crate) cost_usd: f64,
    /// Whether the token counts were estimated here.
    pub(crate) estimated: bool,
    /// ok, failed, abandoned.
    pub(crate) outcome: String,
    /// The failure's code, when it failed.
    pub(crate) error: String,
    pub(crate) duration_ms: i64,
    /// Time to the first piece of a stream.
    pub(crate) first_token_ms: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub(crate) enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
