//! Component types, one row per published version.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum ComponentTypes {
    Table,
    TypeId,
    Version,
    Category,
    Spec,
    Builtin,
    Deprecated,
    DeprecationMessage,
    RemoteAddress,
    RemoteTimeoutMs,
    Availability,
    LastCheckedAt,
    LastError,
    CreatedAt,
    CreatedBy,
}

// sea-orm-migration's trait elides the manager's lifetime; spelling it out does not match.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ComponentTypes::Table)
                    .if_not_exists()
                    .col(string_len(ComponentTypes::TypeId, 100))
                    .col(string_len(ComponentTypes::Version, 64))
                    .col(string_len(ComponentTypes::Category, 16))
                    .col(text(ComponentTypes::Spec))
                    .col(boolean(ComponentTypes::Builtin).default(false))
                    .col(boolean(ComponentTypes::Deprecated).default(false))
                    .col(text(ComponentTypes::DeprecationMessage).default(""))
                    .col(string_len_null(ComponentTypes::RemoteAddress, 512))
                    .col(integer(ComponentTypes::RemoteTimeoutMs).default(0))
                    .col(string_len(ComponentTypes::Availability, 16).default(""))
                    .col(timestamp_with_time_zone_null(ComponentTypes::LastCheckedAt))
                    .col(text(ComponentTypes::LastError).default(""))
                    .col(timestamp_with_time_zone(ComponentTypes::CreatedAt))
                    .col(string_len(ComponentTypes::CreatedBy, 64).default(""))
                    .primary_key(Index::create().col(ComponentTypes::TypeId).col(ComponentTypes::Version))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(ComponentTypes::Table).if_exists().to_owned()).await
    }
}
