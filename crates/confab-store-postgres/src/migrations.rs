//! This backend's migrations, embedded in the binary (see `confab_store_sql`).

use confab_store_sql::EmbeddedMigrations;
use sqlx::migrate::Migrator;

/// Oldest first; a unit test checks that `migrations/` and this list agree.
/// Never edit an applied migration: add one.
const MIGRATIONS: &EmbeddedMigrations = &[
    (1, "init", include_str!("../migrations/0001_init.sql")),
    (2, "models", include_str!("../migrations/0002_models.sql")),
    (3, "usage", include_str!("../migrations/0003_usage.sql")),
    (
        4,
        "stateless_usage",
        include_str!("../migrations/0004_stateless_usage.sql"),
    ),
    (
        5,
        "stream_events",
        include_str!("../migrations/0005_stream_events.sql"),
    ),
    (
        6,
        "hot_partial_saves",
        include_str!("../migrations/0006_hot_partial_saves.sql"),
    ),
    (
        7,
        "idempotency_claim_reply",
        include_str!("../migrations/0007_idempotency_claim_reply.sql"),
    ),
];

/// The migrator for this backend's schema.
pub(crate) fn migrator() -> Migrator {
    confab_store_sql::migrator(MIGRATIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_file_is_registered_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        confab_store_sql::check_folder(&dir, MIGRATIONS).unwrap();
    }

    #[test]
    fn migrator_holds_all_migrations() {
        assert_eq!(migrator().iter().count(), MIGRATIONS.len());
    }
}
