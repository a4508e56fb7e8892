//! Migrations of the ai schema, applied in order by `csp migrate` and at start-up.

use csp_store::sea_orm_migration::{MigrationTrait, MigratorTrait};

mod m20261129_000001_ai_tables;

/// Every migration of the service, oldest first.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261129_000001_ai_tables::Migration)]
    }
}
