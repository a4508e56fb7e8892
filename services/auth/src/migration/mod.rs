//! Migrations of the auth schema, applied in order by `csp migrate` and at start-up.

use csp_store::sea_orm_migration::{MigrationTrait, MigratorTrait};

/// Every migration of the service, oldest first.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        Vec::new()
    }
}
