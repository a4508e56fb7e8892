//! Designs, nodes, connections, revisions, snapshots and shares.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Designs {
    Table,
    Id,
    OwnerId,
    Name,
    NameKey,
    Description,
    Metadata,
    Canvas,
    IsTemplate,
    Revision,
    CreatedAt,
    UpdatedAt,
    DeletedAt,
}

#[derive(DeriveIden)]
enum Nodes {
    Table,
    DesignId,
    NodeId,
    TypeId,
    TypeVersion,
    Label,
    Config,
    X,
    Y,
    Width,
    Height,
    Style,
}

#[derive(DeriveIden)]
enum Connections {
    Table,
    DesignId,
    ConnectionId,
    FromNode,
    FromPort,
    ToNode,
    ToPort,
    Capacity,
    Style,
}

#[derive(DeriveIden)]
enum Revisions {
    Table,
    DesignId,
    Revision,
    AuthorId,
    CreatedAt,
    Ops,
    OpCount,
    Summary,
}

#[derive(DeriveIden)]
enum Snapshots {
    Table,
    DesignId,
    Revision,
    Document,
}

#[derive(DeriveIden)]
enum Shares {
    Table,
    DesignId,
    UserId,
    Access,
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
                    .table(Designs::Table)
                    .if_not_exists()
                    .col(string_len(Designs::Id, 36).primary_key())
                    .col(string_len(Designs::OwnerId, 64))
                    .col(text(Designs::Name))
                    .col(text(Designs::NameKey))
                    .col(text(Designs::Description))
                    .col(text(Designs::Metadata))
                    .col(text(Designs::Canvas))
                    .col(boolean(Designs::IsTemplate).default(false))
                    .col(big_integer(Designs::Revision))
                    .col(timestamp_with_time_zone(Designs::CreatedAt))
                    .col(timestamp_with_time_zone(Designs::UpdatedAt))
                    .col(timestamp_with_time_zone_null(Designs::DeletedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_designs_owner")
                    .table(Designs::Table)
                    .col(Designs::OwnerId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_designs_updated")
                    .table(Designs::Table)
                    .col(Designs::UpdatedAt)
                    .col(Designs::Id)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Nodes::Table)
                    .if_not_exists()
                    .col(string_len(Nodes::DesignId, 36))
                    .col(string_len(Nodes::NodeId, 64))
                    .col(string_len(Nodes::TypeId, 100))
                    .col(string_len(Nodes::TypeVersion, 64))
                    .col(text(Nodes::Label))
                    .col(text(Nodes::Config))
                    .col(double(Nodes::X))
                    .col(double(Nodes::Y))
                    .col(double(Nodes::Width))
                    .col(double(Nodes::Height))
                    .col(text(Nodes::Style))
                    .primary_key(Index::create().col(Nodes::DesignId).col(Nodes::NodeId))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_nodes_design")
                            .from(Nodes::Table, Nodes::DesignId)
                            .to(Designs::Table, Designs::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create().name("idx_nodes_type").table(Nodes::Table).col(Nodes::TypeId).to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Connections::Table)
                    .if_not_exists()
                    .col(string_len(Connections::DesignId, 36))
                    .col(string_len(Connections::ConnectionId, 64))
                    .col(string_len(Connections::FromNode, 64))
                    .col(string_len(Connections::FromPort, 32))
                    .col(string_len(Connections::ToNode, 64))
                    .col(string_len(Connections::ToPort, 32))
                    .col(integer(Connections::Capacity))
                    .col(text(Connections::Style))
                    .primary_key(Index::create().col(Connections::DesignId).col(Connections::ConnectionId))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_connections_design")
                            .from(Connections::Table, Connections::DesignId)
                            .to(Designs::Table, Designs::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Revisions::Table)
                    .if_not_exists()
                    .col(string_len(Revisions::DesignId, 36))
                    .col(big_integer(Revisions::Revision))
                    .col(string_len(Revisions::AuthorId, 64))
                    .col(timestamp_with_time_zone(Revisions::CreatedAt))
                    .col(text(Revisions::Ops))
                    .col(integer(Revisions::OpCount))
                    .col(text(Revisions::Summary))
                    .primary_key(Index::create().col(Revisions::DesignId).col(Revisions::Revision))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_revisions_design")
                            .from(Revisions::Table, Revisions::DesignId)
                            .to(Designs::Table, Designs::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Snapshots::Table)
                    .if_not_exists()
                    .col(string_len(Snapshots::DesignId, 36))
                    .col(big_integer(Snapshots::Revision))
                    .col(text(Snapshots::Document))
                    .primary_key(Index::create().col(Snapshots::DesignId).col(Snapshots::Revision))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_snapshots_design")
                            .from(Snapshots::Table, Snapshots::DesignId)
                            .to(Designs::Table, Designs::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Shares::Table)
                    .if_not_exists()
                    .col(string_len(Shares::DesignId, 36))
                    .col(string_len(Shares::UserId, 64))
                    .col(string_len(Shares::Access, 16))
                    .col(timestamp_with_time_zone(Shares::CreatedAt))
                    .primary_key(Index::create().col(Shares::DesignId).col(Shares::UserId))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_shares_design")
                            .from(Shares::Table, Shares::DesignId)
                            .to(Designs::Table, Designs::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create().name("idx_shares_user").table(Shares::Table).col(Shares::UserId).to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Shares::Table.into_iden(),
            Snapshots::Table.into_iden(),
            Revisions::Table.into_iden(),
            Connections::Table.into_iden(),
            Nodes::Table.into_iden(),
            Designs::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).if_exists().to_owned()).await?;
        }
        Ok(())
    }
}
