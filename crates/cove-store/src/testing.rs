//! Stores for tests: SQLite in memory, or, when `COVE_TEST_POSTGRES` names a Postgres server
//! (`postgres://user@host:port/`, as `scripts/postgres start` prints), a new database of its
//! own on that server, so that one switch runs every store-using test on Postgres.

use crate::{Store, StoreError};

/// The environment variable naming the tests' Postgres server.
pub const POSTGRES_ENV: &str = "COVE_TEST_POSTGRES";

/// A fresh, empty database on the tests' Postgres server and its URL; `None` when the tests
/// run on SQLite.
pub fn fresh_postgres_database() -> Result<Option<String>, StoreError> {
    let Ok(server) = std::env::var(POSTGRES_ENV) else {
        return Ok(None);
    };
    fresh_database_on(&server).map(Some)
}

/// A fresh, empty database on the Postgres server at `server` (`postgres://user@host:port/`);
/// its URL.
pub fn fresh_database_on(server: &str) -> Result<String, StoreError> {
    let server = server.trim_end_matches('/');
    let name = format!("cove_test_{}", hex::encode(rand::random::<[u8; 8]>()));
    let mut admin = crate::db::Postgres::connect(&format!("{server}/postgres"))?;
    admin.batch(&format!("CREATE DATABASE {name}"))?;
    Ok(format!("{server}/{name}"))
}

/// An empty store: on Postgres when `COVE_TEST_POSTGRES` is set, else SQLite in memory.
pub fn store() -> Store {
    match fresh_postgres_database().expect("creating a test database") {
        Some(url) => Store::connect(&url).expect("connecting to the test database"),
        None => Store::open_in_memory().expect("an in-memory store"),
    }
}
