//! Usage records, conversations and their messages.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum UsageRecords {
    Table,
    Id,
    CreatedAt,
    Day,
    Month,
    UserId,
    CallerId,
    DesignId,
    ExecutionId,
    NodeId,
    ConversationId,
    Operation,
    Provider,
    Model,
    PromptTokens,
    CompletionTokens,
    CostUsd,
    Estimated,
    Outcome,
    Error,
    DurationMs,
    FirstTokenMs,
}

#[derive(DeriveIden)]
enum Conversations {
    Table,
    Id,
    OwnerId,
    Title,
    Provider,
    Model,
    SystemPrompt,
    TokenBudget,
    DesignId,
    MessageCount,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum ConversationMessages {
    Table,
    ConversationId,
    Seq,
    Message,
    Tokens,
    CreatedAt,
}

// sea-orm-migration's trait elides the manager's lifetime; spelling it out does not match.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(UsageRecords::Table)
                    .if_not_exists()
                    .col(string_len(UsageRecords::Id, 36).primary_key())
                    .col(timestamp_with_time_zone(UsageRecords::CreatedAt))
                    .col(string_len(UsageRecords::Day, 10))
                    .col(string_len(UsageRecords::Month, 7))
                    .col(string_len(UsageRecords::UserId, 64))
                    .col(string_len(UsageRecords::CallerId, 64))
                    .col(string_len(UsageRecords::DesignId, 64))
                    .col(string_len(UsageRecords::ExecutionId, 64))
                    .col(string_len(UsageRecords::NodeId, 64))
                    .col(string_len(UsageRecords::ConversationId, 64))
                    .col(string_len(UsageRecords::Operation, 16))
                    .col(string_len(UsageRecords::Provider, 64))
                    .col(string_len(UsageRecords::Model, 128))
                    .col(big_integer(UsageRecords::PromptTokens))
                    .col(big_integer(UsageRecords::CompletionTokens))
                    .col(double(UsageRecords::CostUsd))
                    .col(boolean(UsageRecords::Estimated))
                    .col(string_len(UsageRecords::Outcome, 16))
                    .col(string_len(UsageRecords::Error, 32))
                    .col(big_integer(UsageRecords::DurationMs))
                    .col(big_integer_null(UsageRecords::FirstTokenMs))
                    .to_owned(),
            )
            .await?;
        for (name, column) in [
            ("idx_usage_user", UsageRecords::UserId),
            ("idx_usage_design", UsageRecords::DesignId),
            ("idx_usage_execution", UsageRecords::ExecutionId),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(UsageRecords::Table)
                        .col(column)
                        .col(UsageRecords::CreatedAt)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("idx_usage_time")
                    .table(UsageRecords::Table)
                    .col(UsageRecords::CreatedAt)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Conversations::Table)
                    .if_not_exists()
                    .col(string_len(Conversations::Id, 36).primary_key())
                    .col(string_len(Conversations::OwnerId, 64))
                    .col(text(Conversations::Title))
                    .col(string_len(Conversations::Provider, 64))
                    .col(string_len(Conversations::Model, 128))
                    .col(text(Conversations::SystemPrompt))
                    .col(integer(Conversations::TokenBudget))
                    .col(string_len(Conversations::DesignId, 64))
                    .col(integer(Conversations::MessageCount))
                    .col(timestamp_with_time_zone(Conversations::CreatedAt))
                    .col(timestamp_with_time_zone(Conversations::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_conversations_owner")
                    .table(Conversations::Table)
                    .col(Conversations::OwnerId)
                    .col(Conversations::UpdatedAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ConversationMessages::Table)
                    .if_not_exists()
                    .col(string_len(ConversationMessages::ConversationId, 36))
                    .col(integer(ConversationMessages::Seq))
                    .col(text(ConversationMessages::Message))
                    .col(integer(ConversationMessages::Tokens))
                    .col(timestamp_with_time_zone(ConversationMessages::CreatedAt))
                    .primary_key(
                        Index::create()
                            .col(ConversationMessages::ConversationId)
                            .col(ConversationMessages::Seq),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_messages_conversation")
                            .from(ConversationMessages::Table, ConversationMessages::ConversationId)
                            .to(Conversations::Table, Conversations::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            ConversationMessages::Table.into_iden(),
            Conversations::Table.into_iden(),
            UsageRecords::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).if_exists().to_owned()).await?;
        }
        Ok(())
    }
}
