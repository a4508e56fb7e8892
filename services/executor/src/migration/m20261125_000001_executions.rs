//! Executions and the messages they recorded.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Executions {
    Table,
    Id,
    DesignId,
    DesignRevision,
    Status,
    StartedBy,
    CreatedAt,
    StartedAt,
    FinishedAt,
    Inputs,
    Outputs,
    Error,
    Nodes,
    Options,
    Plan,
    Attempt,
    RetryOf,
    RetryFrom,
    PausedAt,
    IdempotencyKey,
}

#[derive(DeriveIden)]
enum Recordings {
    Table,
    ExecutionId,
    ConnectionId,
    Messages,
}

// sea-orm-migration's trait elides the manager's lifetime; spelling it out does not match.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Executions::Table)
                    .if_not_exists()
                    .col(string_len(Executions::Id, 36).primary_key())
                    .col(string_len(Executions::DesignId, 36))
                    .col(big_integer(Executions::DesignRevision))
                    .col(string_len(Executions::Status, 16))
                    .col(string_len(Executions::StartedBy, 64))
                    .col(timestamp_with_time_zone(Executions::CreatedAt))
                    .col(timestamp_with_time_zone_null(Executions::StartedAt))
                    .col(timestamp_with_time_zone_null(Executions::FinishedAt))
                    .col(text(Executions::Inputs))
                    .col(text(Executions::Outputs))
                    .col(text_null(Executions::Error))
                    .col(text(Executions::Nodes))
                    .col(text(Executions::Options))
                    .col(text(Executions::Plan))
                    .col(integer(Executions::Attempt))
                    .col(string_len_null(Executions::RetryOf, 36))
                    .col(string_len_null(Executions::RetryFrom, 200))
                    .col(string_len(Executions::PausedAt, 200))
                    .col(string_len_null(Executions::IdempotencyKey, 200))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_executions_design")
                    .table(Executions::Table)
                    .col(Executions::DesignId)
                    .col(Executions::CreatedAt)
                    .col(Executions::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_executions_idempotency")
                    .table(Executions::Table)
                    .col(Executions::StartedBy)
                    .col(Executions::IdempotencyKey)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Recordings::Table)
                    .if_not_exists()
                    .col(string_len(Recordings::ExecutionId, 36))
                    .col(string_len(Recordings::ConnectionId, 200))
                    .col(text(Recordings::Messages))
                    .primary_key(Index::create().col(Recordings::ExecutionId).col(Recordings::ConnectionId))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_recordings_execution")
                            .from(Recordings::Table, Recordings::ExecutionId)
                            .to(Executions::Table, Executions::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(Recordings::Table).if_exists().to_owned()).await?;
        manager.drop_table(Table::drop().table(Executions::Table).if_exists().to_owned()).await
    }
}
