//! Mapping of sqlx/SQLite errors onto [`StoreError`].
//!
//! SQLite reports a unique violation by its columns
//! (`UNIQUE constraint failed: users.org_id, users.email`), not by the index
//! name, so [`constraint_name`] turns the columns back into the name the
//! PostgreSQL backend reports for the same rule. Callers can then match on
//! `Conflict { constraint }` without knowing the backend.

use confab_core::StoreError;
use sqlx::error::ErrorKind;

/// Unique rules of the schema whose name does not follow PostgreSQL's default
/// `{table}_{columns}_key` pattern: `(table, columns, name)`.
const NAMED_UNIQUE_RULES: &[(&str, &[&str], &str)] = &[
    ("orgs", &["id"], "orgs_pkey"),
    ("users", &["id"], "users_pkey"),
    ("users", &["org_id", "email"], "users_org_email"),
    ("chats", &["id"], "chats_pkey"),
    ("messages", &["id"], "messages_pkey"),
    ("api_keys", &["id"], "api_keys_pkey"),
    (
        "idempotency_keys",
        &["user_id", "key"],
        "idempotency_keys_pkey",
    ),
];

// Primary result codes (the low byte of an extended code) that mean "the
// database cannot be used right now" rather than "this statement is wrong".
const SQLITE_BUSY: i64 = 5;
const SQLITE_LOCKED: i64 = 6;
const SQLITE_NOMEM: i64 = 7;
const SQLITE_IOERR: i64 = 10;
const SQLITE_FULL: i64 = 13;
const SQLITE_CANTOPEN: i64 = 14;
const SQLITE_PROTOCOL: i64 = 15;

/// The one place sqlx errors become [`StoreError`]s.
///
/// Unique violation → `Conflict` named like PostgreSQL would; foreign-key
/// violation → `NotFound` (the referenced org/user/chat does not exist);
/// busy, locked, I/O and pool errors → `Unavailable`; everything else → `Other`.
pub(crate) fn map_err(err: sqlx::Error) -> StoreError {
    match err {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::PoolTimedOut => {
            StoreError::Unavailable("timed out waiting for a SQLite connection".into())
        }
        sqlx::Error::PoolClosed => StoreError::Unavailable("the SQLite pool is closed".into()),
        sqlx::Error::WorkerCrashed => {
            StoreError::Unavailable("a SQLite connection worker crashed".into())
        }
        sqlx::Error::Io(e) => StoreError::Unavailable(format!("SQLite I/O error: {e}")),
        sqlx::Error::Database(db) => match db.kind() {
            ErrorKind::UniqueViolation => StoreError::Conflict {
                constraint: constraint_name(db.message()),
            },
            ErrorKind::ForeignKeyViolation => StoreError::NotFound,
            _ => {
                let primary = db
                    .code()
                    .and_then(|code| code.parse::<i64>().ok())
                    .map(|code| code & 0xff);
                match primary {
                    Some(
                        SQLITE_BUSY | SQLITE_LOCKED | SQLITE_NOMEM | SQLITE_IOERR | SQLITE_FULL
                        | SQLITE_CANTOPEN | SQLITE_PROTOCOL,
                    ) => StoreError::Unavailable(format!("SQLite: {db}")),
                    _ => StoreError::Other(format!("SQLite: {db}")),
                }
            }
        },
        sqlx::Error::Migrate(e) => match *e {
            sqlx::migrate::MigrateError::Execute(inner) => map_err(inner),
            other => StoreError::Other(format!("migration failed: {other}")),
        },
        other => StoreError::Other(other.to_string()),
    }
}

/// The stable name of the unique rule a SQLite message reports.
///
/// `UNIQUE constraint failed: orgs.slug` → `orgs_slug_key`; a table's id →
/// `{table}_pkey`; rules listed in [`NAMED_UNIQUE_RULES`] → their name; a
/// violated expression index (`index 'name'`) → that name.
pub(crate) fn constraint_name(message: &str) -> String {
    let Some(detail) = message.strip_prefix("UNIQUE constraint failed: ") else {
        return "unknown".to_owned();
    };
    if let Some(index) = detail.strip_prefix("index '") {
        return index.trim_end_matches('\'').to_owned();
    }
    let mut table = "";
    let mut columns = Vec::new();
    for qualified in detail.split(',').map(str::trim) {
        let Some((t, column)) = qualified.split_once('.') else {
            return "unknown".to_owned();
        };
        table = t;
        columns.push(column);
    }
    NAMED_UNIQUE_RULES
        .iter()
        .find(|(t, cols, _)| *t == table && *cols == columns.as_slice())
        .map(|(_, _, name)| (*name).to_owned())
        .unwrap_or_else(|| format!("{table}_{}_key", columns.join("_")))
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
    fn unique_messages_map_to_postgres_names() {
        let cases = [
            ("UNIQUE constraint failed: orgs.slug", "orgs_slug_key"),
            ("UNIQUE constraint failed: orgs.id", "orgs_pkey"),
            (
                "UNIQUE constraint failed: users.org_id, users.email",
                "users_org_email",
            ),
            (
                "UNIQUE constraint failed: api_keys.key_hash",
                "api_keys_key_hash_key",
            ),
            (
                "UNIQUE constraint failed: messages.chat_id, messages.seq",
                "messages_chat_id_seq_key",
            ),
            (
                "UNIQUE constraint failed: idempotency_keys.user_id, idempotency_keys.key",
                "idempotency_keys_pkey",
            ),
            ("UNIQUE constraint failed: index 'by_expr'", "by_expr"),
            ("something else", "unknown"),
        ];
        for (message, name) in cases {
            assert_eq!(constraint_name(message), name, "{message}");
        }
    }
}
