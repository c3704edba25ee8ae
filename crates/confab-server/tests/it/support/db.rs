//! A fresh, empty database per test: a temporary SQLite file, or a new
//! PostgreSQL database created on the test server and dropped (WITH FORCE)
//! when the `TestDb` is dropped, even if the test panicked.

use sqlx::Connection;
use uuid::Uuid;

/// Which store backend a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

pub struct TestDb {
    pub kind: Db,
    /// Connection URL of the fresh database.
    pub url: String,
    name: String,
}

impl TestDb {
    /// A stand-in that owns nothing (used when a database is moved out).
    pub fn placeholder() -> TestDb {
        TestDb {
            kind: Db::Sqlite,
            url: String::new(),
            name: String::new(),
        }
    }

    /// A SQLite database at `path`, a place the caller owns and cleans up
    /// (e.g. a size-limited tmpfs).
    pub fn sqlite_at(path: &std::path::Path) -> TestDb {
        TestDb {
            kind: Db::Sqlite,
            url: format!("sqlite://{}", path.display()),
            name: String::new(),
        }
    }

    /// The database's name (PostgreSQL) or file stem (SQLite).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Create a fresh, empty (not migrated) database.
    pub async fn new(kind: Db) -> TestDb {
        let name = format!("confab_test_{}", Uuid::new_v4().simple());
        match kind {
            Db::Sqlite => {
                let path = std::env::temp_dir().join(format!("{name}.db"));
                TestDb {
                    kind,
                    url: format!("sqlite://{}", path.display()),
                    name,
                }
            }
            Db::Postgres => {
                let admin = super::postgres_admin_url();
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .unwrap_or_else(|e| {
                        panic!("PostgreSQL is required for the tests ({admin}): {e}")
                    });
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let _ = conn.close().await;
                TestDb {
                    kind,
                    url: with_database(&admin, &name),
                    name,
                }
            }
        }
    }
}

/// Replace the database name in a `postgres://…/name?params` URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let root = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        match self.kind {
            Db::Sqlite => {
                let path = std::env::temp_dir().join(format!("{}.db", self.name));
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Db::Postgres => {
                let name = self.name.clone();
                // Drop runs inside the test's runtime; a blocking drop there
                // would stall it, so the DROP gets a thread and runtime of its own.
                let _ = std::thread::spawn(move || {
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    else {
                        return;
                    };
                    rt.block_on(async move {
                        if let Ok(mut conn) =
                            sqlx::PgConnection::connect(&super::postgres_admin_url()).await
                        {
                            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            )))
                            .execute(&mut conn)
                            .await;
                            let _ = conn.close().await;
                        }
                    });
                })
                .join();
            }
        }
    }
}
