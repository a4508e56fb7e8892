//! Migrations of the design schema, applied in order by `csp migrate` and at start-up.

use sea_orm_migration::{MigrationTrait, MigratorTrait};

mod m20261124_000001_design_tables;
mod m20261129_000001_undo_steps;

/// Every migration of the service, oldest first.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_design_tables::Migration),
            Box::new(m20261129_000001_undo_steps::Migration),
        ]
    }
}
