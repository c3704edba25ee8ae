//! What the two SQL stores share that is not SQL: their migrations are
//! embedded in the binary and run through sqlx's migrator.
//!
//! sqlx's `migrate!()` macro would need the `macros` feature (which compiles
//! the drivers a second time), so each store embeds its SQL files with
//! `include_str!` and builds a [`Migrator`] from them at runtime here. sqlx
//! then tracks them in `_sqlx_migrations` like the macro would: each is
//! applied exactly once, the first one included, and an applied file that was
//! edited afterwards is refused (checksum mismatch) instead of silently
//! ignored. On PostgreSQL the migrator holds an advisory lock while it runs,
//! so several instances starting at once apply each migration once.

use std::path::Path;

use sqlx::SqlStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

/// `(version, description, sql)`, oldest first. The file of an entry is
/// `migrations/{version:04}_{description}.sql`. Never edit an applied
/// migration: add one.
pub type EmbeddedMigrations = [(i64, &'static str, &'static str)];

/// The migrator for a store's embedded migrations.
pub fn migrator(migrations: &'static EmbeddedMigrations) -> Migrator {
    Migrator::with_migrations(
        migrations
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

/// For each store's unit tests: the `migrations/` folder and the embedded
/// list agree, in strictly increasing version order.
pub fn check_folder(dir: &Path, migrations: &EmbeddedMigrations) -> Result<(), String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".sql"))
        .collect();
    files.sort();
    let registered: Vec<String> = migrations
        .iter()
        .map(|(version, description, _)| format!("{version:04}_{description}.sql"))
        .collect();
    if files != registered {
        return Err(format!("folder has {files:?}, code embeds {registered:?}"));
    }
    if !migrations.windows(2).all(|w| w[0].0 < w[1].0) {
        return Err("versions are not strictly increasing".into());
    }
    Ok(())
}

/// A pooled connection for work that must not be lost to a moment of
/// contention (a turn's final write, the flusher's batch, start-up): the
/// pool's own `acquire_timeout` is the short wait of request paths, so this
/// asks again while the pool merely timed out, for up to `within` in all.
/// Any other error (pool closed, login refused) is returned at once.
pub async fn patient_acquire<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
    within: std::time::Duration,
) -> Result<sqlx::pool::PoolConnection<DB>, sqlx::Error> {
    let started = std::time::Instant::now();
    loop {
        match pool.acquire().await {
            Err(sqlx::Error::PoolTimedOut) if started.elapsed() < within => continue,
            other => return other,
        }
    }
}
