//! What replicas need to agree on an execution: a cancel stored with it (honoured by whichever
//! replica runs or later claims it), the last reason a run of it could not start, which replica
//! runs it, and the jobs given up after too many deliveries.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Executions {
    Table,
    CancelRequested,
    LastError,
    Runner,
}

#[derive(DeriveIden)]
enum DeadLetters {
    Table,
    ExecutionId,
    DesignId,
    Job,
    Deliveries,
    LastError,
    DeadAt,
}

// sea-orm-migration's trait elides the manager's lifetime; spelling it out does not match.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite adds one at a time.
        manager
            .alter_table(
                Table::alter()
                    .table(Executions::Table)
                    .add_column(text_null(Executions::CancelRequested))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Executions::Table)
                    .add_column(text_null(Executions::LastError))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Executions::Table)
                    .add_column(string_len(Executions::Runner, 100).default(""))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(DeadLetters::Table)
                    .if_not_exists()
                    .col(string_len(DeadLetters::ExecutionId, 36).primary_key())
                    .col(string_len(DeadLetters::DesignId, 36))
                    .col(string_len(DeadLetters::Job, 64))
                    .col(big_integer(DeadLetters::Deliveries))
                    .col(text(DeadLetters::LastError))
                    .col(timestamp_with_time_zone(DeadLetters::DeadAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_dead_letters_dead_at")
                    .table(DeadLetters::Table)
                    .col(DeadLetters::DeadAt)
                    .col(DeadLetters::ExecutionId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(DeadLetters::Table).if_exists().to_owned()).await?;
        manager
            .alter_table(
                Table::alter().table(Executions::Table).drop_column(Executions::LastError).to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter().table(Executions::Table).drop_column(Executions::CancelRequested).to_owned(),
            )
            .await
    }
}
