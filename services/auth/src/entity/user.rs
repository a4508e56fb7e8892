//! `users`: people and service accounts.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "users")]
pub(crate) struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) id: String,
    /// NFKC-normalised, as chosen.
    pub(crate) username: String,
    /// NFKC + lower case: what uniqueness and login compare.
    #[sea_orm(unique)]
    pub(crate) username_key: String,
    pub(crate) email: String,
    /// Lower case.
    #[sea_orm(unique)]
    pub(crate) email_key: String,
    pub(crate) display_name: String,
    /// PHC string (argon2id); none for service accounts.
    pub(crate) password_hash: Option<String>,
    /// Comma-separated role names.
    pub(crate) roles: String,
    pub(crate) disabled: bool,
    pub(crate) service_account: bool,
    pub(crate) created_at: DateTimeUtc,
    pub(crate) last_login_at: Option<DateTimeUtc>,
    pub(crate) password_changed_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub(crate) enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
