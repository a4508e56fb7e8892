//! Each user's undo and redo history per design.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum UndoSteps {
    Table,
    Id,
    DesignId,
    UserId,
    Stack,
    Revision,
    Step,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Designs {
    Table,
    Id,
}

// sea-orm-migration's trait elides the manager's lifetime; spelling it out does not match.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(UndoSteps::Table)
                    .if_not_exists()
                    .col(big_pk_auto(UndoSteps::Id))
                    .col(string_len(UndoSteps::DesignId, 36))
                    .col(string_len(UndoSteps::UserId, 64))
                    .col(string_len(UndoSteps::Stack, 8))
                    .col(big_integer(UndoSteps::Revision))
                    .col(text(UndoSteps::Step))
                    .col(timestamp_with_time_zone(UndoSteps::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_undo_steps_design")
                            .from(UndoSteps::Table, UndoSteps::DesignId)
                            .to(Designs::Table, Designs::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_undo_steps_stack")
                    .table(UndoSteps::Table)
                    .col(UndoSteps::DesignId)
                    .col(UndoSteps::UserId)
                    .col(UndoSteps::Stack)
                    .col(UndoSteps::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(UndoSteps::Table).if_exists().to_owned()).await
    }
}
