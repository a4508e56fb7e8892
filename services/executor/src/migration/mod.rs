//! Migrations of the executor schema, applied in order by `csp migrate` and at start-up.

use sea_orm_migration::{MigrationTrait, MigratorTrait};

mod m20261125_000001_executions;
mod m20261129_000001_replicas;

/// Every migration of the service, oldest first.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(m20261125_000001_executions::Migration), Box::new(m20261129_000001_replicas::Migration)]
    }
}
