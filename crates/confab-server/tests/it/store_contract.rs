//! Contract tests of `Store`, run against SQLite and PostgreSQL.
