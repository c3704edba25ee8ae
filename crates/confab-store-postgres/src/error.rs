//! Mapping of sqlx/PostgreSQL errors onto [`StoreError`].

use confab_core::StoreError;
use sqlx::error::ErrorKind;

/// SQLSTATEs meaning "the server cannot serve us right now" (worth retrying
/// later) rather than "this statement is wrong".
fn is_unavailable(code: &str) -> bool {
    // Class 08: connection exceptions.
    code.starts_with("08")
        || matches!(
            code,
            // too_many_connections
            "53300"
            // admin_shutdown, crash_shutdown, cannot_connect_now
            | "57P01" | "57P02" | "57P03"
            // object_not_in_prerequisite_state: what connecting to a database
            // that refuses connections (ALLOW_CONNECTIONS false, maintenance)
            // answers; none of confab's statements can raise it otherwise.
            | "55000"
        )
}

/// Whether `err` says the statement's connection is gone (so a fresh one
/// may succeed): I/O errors, and PostgreSQL's connection-exception class
/// (08) and shutdown codes (57P01 admin_shutdown — `pg_terminate_backend`
/// or a fast shutdown —, 57P02 crash_shutdown, 57P03 cannot_connect_now).
pub(crate) fn connection_lost(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P0")),
        _ => false,
    }
}

/// The one place sqlx errors become [`StoreError`]s.
///
/// Unique violation → `Conflict` with the constraint name PostgreSQL reports
/// (`orgs_slug_key`, `users_org_email`, …); foreign-key violation →
/// `NotFound` (the referenced org/user/chat does not exist); connection,
/// protocol, pool and shutdown errors → `Unavailable`; everything else →
/// `Other`.
pub(crate) fn map_err(err: sqlx::Error) -> StoreError {
    match err {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::PoolTimedOut => {
            StoreError::Unavailable("timed out waiting for a PostgreSQL connection".into())
        }
        sqlx::Error::PoolClosed => StoreError::Unavailable("the PostgreSQL pool is closed".into()),
        sqlx::Error::Io(e) => StoreError::Unavailable(format!("PostgreSQL I/O error: {e}")),
        sqlx::Error::Tls(e) => StoreError::Unavailable(format!("PostgreSQL TLS error: {e}")),
        // What came back is not PostgreSQL speaking (a connection closed at
        // once by a proxy whose server is gone, a stream cut mid-message):
        // the database is unreachable, not the request wrong.
        sqlx::Error::Protocol(e) => {
            StoreError::Unavailable(format!("PostgreSQL connection broken: {e}"))
        }
        sqlx::Error::Database(db) => match db.kind() {
            ErrorKind::UniqueViolation => StoreError::Conflict {
                constraint: db.constraint().unwrap_or("unknown").to_owned(),
            },
            ErrorKind::ForeignKeyViolation => StoreError::NotFound,
            _ if db.code().is_some_and(|code| is_unavailable(&code)) => {
                StoreError::Unavailable(format!("PostgreSQL: {db}"))
            }
            _ => StoreError::Other(format!("PostgreSQL: {db}")),
        },
        sqlx::Error::Migrate(e) => match *e {
            sqlx::migrate::MigrateError::Execute(inner) => map_err(inner),
            other => StoreError::Other(format!("migration failed: {other}")),
        },
        other => StoreError::Other(other.to_string()),
    }
}

/// A value read from the database that the domain refuses (e.g. an unknown
/// role): the schema's CHECKs should make this impossible.
pub(crate) fn corrupt(what: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Other(format!("unexpected {what} in the database: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_class_errors_are_unavailable() {
        assert!(is_unavailable("08006"));
        assert!(is_unavailable("57P01"));
        assert!(is_unavailable("53300"));
        assert!(is_unavailable("55000"));
        assert!(!is_unavailable("23505"));
        assert!(!is_unavailable("42P01"));
    }

    #[test]
    fn pool_errors_are_unavailable() {
        assert!(matches!(
            map_err(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            map_err(sqlx::Error::RowNotFound),
            StoreError::NotFound
        ));
    }

    #[test]
    fn a_peer_not_speaking_postgresql_is_unavailable() {
        let closed_at_once =
            sqlx::Error::Protocol("unexpected response from SSLRequest: 0x00".into());
        assert!(matches!(
            map_err(closed_at_once),
            StoreError::Unavailable(_)
        ));
    }
}
