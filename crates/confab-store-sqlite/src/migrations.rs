//! This backend's migrations, embedded in the binary.
//!
//! sqlx's `migrate!()` macro would need the `macros` feature (which compiles
//! the drivers a second time), so the SQL files are embedded with
//! `include_str!` and a [`Migrator`] is built from them at runtime. sqlx then
//! tracks them in `_sqlx_migrations` like the macro would: each is applied
//! exactly once, the first one included, and an applied file that was edited
//! afterwards is refused (checksum mismatch) instead of silently ignored.

use sqlx::SqlStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

/// `(version, description, sql)`, oldest first. The file for an entry is
/// `migrations/{version:04}_{description}.sql`; a unit test checks that the
/// folder and this list agree. Never edit an applied migration: add one.
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "init", include_str!("../migrations/0001_init.sql"))];

/// The migrator for this backend's schema.
pub(crate) fn migrator() -> Migrator {
    Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    SqlStr::from_static(sql),
                    false,
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_file_is_registered_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.ends_with(".sql"))
            .collect();
        files.sort();
        let registered: Vec<String> = MIGRATIONS
            .iter()
            .map(|(version, description, _)| format!("{version:04}_{description}.sql"))
            .collect();
        assert_eq!(files, registered);
        assert!(MIGRATIONS.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn migrator_holds_all_migrations() {
        assert_eq!(migrator().iter().count(), MIGRATIONS.len());
    }
}
