//! The two SQL backends (embedded SQLite, Postgres) behind one small interface: statements
//! with `?1`-style placeholders, values that are NULL, integers or text, and write
//! transactions that exclude every other writer (SQLite's `BEGIN IMMEDIATE`; a transaction-wide
//! advisory lock on Postgres, which also serializes control planes sharing one database).
//!
//! The store's SQL is written once, in the subset both understand: `BIGINT` columns are
//! `INTEGER` in SQLite's spelling (translated for Postgres), comparisons of text are made
//! case-insensitive explicitly with `LOWER`, and uniqueness is the only constraint whose
//! violation is reported as such.

use std::collections::HashMap;

use crate::StoreError;

/// A value bound to a placeholder or read from a column.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Text(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Text(s)
    }
}
impl From<&String> for Value {
    fn from(s: &String) -> Value {
        Value::Text(s.clone())
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}
impl From<u32> for Value {
    fn from(i: u32) -> Value {
        Value::Int(i.into())
    }
}
impl From<u16> for Value {
    fn from(i: u16) -> Value {
        Value::Int(i.into())
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Int(b.into())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// The values of a statement's placeholders, in order: `params![a, b]`.
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$($crate::db::Value::from($v)),*][..] };
}
pub(crate) use params;

/// A column's value read back as a Rust type.
pub(crate) trait FromValue: Sized {
    fn from_value(v: &Value) -> Option<Self>;
}
impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<i64> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}
impl FromValue for u32 {
    fn from_value(v: &Value) -> Option<u32> {
        i64::from_value(v).and_then(|i| u32::try_from(i).ok())
    }
}
impl FromValue for u64 {
    fn from_value(v: &Value) -> Option<u64> {
        i64::from_value(v).and_then(|i| u64::try_from(i).ok())
    }
}
impl FromValue for bool {
    fn from_value(v: &Value) -> Option<bool> {
        i64::from_value(v).map(|i| i != 0)
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> Option<String> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Option<T>> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// One result row.
#[derive(Debug)]
pub(crate) struct Row(Vec<Value>);

impl Row {
    /// Column `i` as a `T`; a missing column or one of another type is corrupt data.
    pub(crate) fn get<T: FromValue>(&self, i: usize) -> Result<T, StoreError> {
        self.0.get(i).and_then(T::from_value).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "column {i} is {:?}, not a {}",
                self.0.get(i),
                std::any::type_name::<T>()
            ))
        })
    }
}

/// A backend's error, its message carrying the whole chain of causes (it has no `source`, so
/// that nothing is said twice where it is printed with them).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{}", chain(.0))]
    Sqlite(rusqlite::Error),
    #[error("{}", chain(.0))]
    Postgres(tokio_postgres::Error),
    #[error("{0}")]
    Other(String),
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> DbError {
        DbError::Sqlite(e)
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> DbError {
        DbError::Postgres(e)
    }
}

/// `e: cause: its cause…`, leaving out a cause whose message is already in the text.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !text.contains(&m) {
            text = format!("{text}: {m}");
        }
        cause = c.source();
    }
    text
}

impl DbError {
    /// A UNIQUE constraint refused the statement.
    pub(crate) fn is_unique_violation(&self) -> bool {
        match self {
            DbError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
                f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            }
            DbError::Postgres(e) => e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
            _ => false,
        }
    }
}

/// A connection to either backend.
pub(crate) enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(Postgres),
}

impl Db {
    pub(crate) fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        match self {
            Db::Sqlite(c) => Ok(c.prepare_cached(sql)?.execute(rusqlite::params_from_iter(params))? as u64),
            Db::Postgres(p) => p.execute(sql, params),
        }
    }

    pub(crate) fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        match self {
            Db::Sqlite(c) => sqlite_query(c, sql, params),
            Db::Postgres(p) => p.query(sql, params),
        }
    }

    /// The first row, if any.
    pub(crate) fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The first row, which must be there (an aggregate's).
    pub(crate) fn query_one(&mut self, sql: &str, params: &[Value]) -> Result<Row, DbError> {
        self.query_opt(sql, params)?.ok_or_else(|| DbError::Other(format!("no row from {sql:?}")))
    }

    /// Starts a transaction that no other writer can interleave with.
    pub(crate) fn begin_write(&mut self) -> Result<(), DbError> {
        match self {
            Db::Sqlite(c) => {
                if !c.is_autocommit() {
                    // Left open by a panic in an earlier transaction.
                    c.execute_batch("ROLLBACK")?;
                }
                c.execute_batch("BEGIN IMMEDIATE")?;
            }
            Db::Postgres(p) => p.begin_write()?,
        }
        Ok(())
    }

    pub(crate) fn commit(&mut self) -> Result<(), DbError> {
        match self {
            Db::Sqlite(c) => c.execute_batch("COMMIT")?,
            Db::Postgres(p) => p.end("COMMIT")?,
        }
        Ok(())
    }

    pub(crate) fn rollback(&mut self) -> Result<(), DbError> {
        match self {
            Db::Sqlite(c) if !c.is_autocommit() => c.execute_batch("ROLLBACK")?,
            Db::Sqlite(_) => {}
            Db::Postgres(p) => p.end("ROLLBACK")?,
        }
        Ok(())
    }

    /// Applies the migrations not applied yet, each in its own transaction.
    pub(crate) fn migrate(&mut self, migrations: &[&str]) -> Result<(), DbError> {
        match self {
            Db::Sqlite(c) => {
                let version: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
                for (i, sql) in migrations.iter().enumerate().skip(version as usize) {
                    let tx = c.transaction()?;
                    tx.execute_batch(sql)?;
                    tx.pragma_update(None, "user_version", (i + 1) as i64)?;
                    tx.commit()?;
                }
            }
            Db::Postgres(p) => {
                // Control planes starting together take turns (the version table too: two
                // concurrent CREATE TABLE IF NOT EXISTS can collide); the first one migrates.
                p.begin_write()?;
                let result = p
                    .batch("CREATE TABLE IF NOT EXISTS cove_schema (version BIGINT NOT NULL)")
                    .and_then(|()| p.migrate(migrations));
                p.end(if result.is_ok() { "COMMIT" } else { "ROLLBACK" })?;
                result?;
            }
        }
        Ok(())
    }
}

/// Key of the Postgres advisory lock write transactions hold ("cove" in ASCII).
const WRITER_LOCK: i64 = 0x636f_7665;

/// SQLite's schema text in Postgres's spelling: 64-bit integers are `BIGINT` there.
fn postgres_ddl(sql: &str) -> String {
    sql.replace("INTEGER", "BIGINT")
}

fn sqlite_query(c: &rusqlite::Connection, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
    let mut stmt = c.prepare_cached(sql)?;
    let n = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut row = Vec::with_capacity(n);
        for i in 0..n {
            row.push(match r.get_ref(i)? {
                rusqlite::types::ValueRef::Null => Value::Null,
                rusqlite::types::ValueRef::Integer(i) => Value::Int(i),
                rusqlite::types::ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                other => return Err(DbError::Other(format!("column {i} has type {:?}", other.data_type()))),
            });
        }
        out.push(Row(row));
    }
    Ok(out)
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

impl tokio_postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use tokio_postgres::types::{IsNull, Type};
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                _ => Err(format!("an integer for a parameter of type {ty}").into()),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
        }
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A Postgres connection used from synchronous code. The connection's I/O runs on a thread of
/// its own (with its own single-threaded runtime), and requests are channel messages to it, so
/// the store's callers need no runtime of their own and may be on any thread, tokio's included.
/// A dropped connection (the server restarted, the network broke) is made again on next use.
pub(crate) struct Postgres {
    target: crate::tls::Target,
    client: Option<tokio_postgres::Client>,
    statements: HashMap<String, tokio_postgres::Statement>,
    /// A transaction is open (and must be ended before the next one begins).
    in_tx: bool,
}

impl Postgres {
    pub(crate) fn connect(url: &str) -> Result<Postgres, DbError> {
        let target = crate::tls::target(url)?;
        let mut p = Postgres { target, client: None, statements: HashMap::new(), in_tx: false };
        p.client()?;
        Ok(p)
    }

    fn client(&mut self) -> Result<&tokio_postgres::Client, DbError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.statements.clear();
            if std::mem::take(&mut self.in_tx) {
                // The transaction went with the connection; its statements must not run
                // outside one on a new connection.
                self.client = None;
                return Err(DbError::Other("the connection to Postgres broke during a transaction".into()));
            }
            self.client = Some(spawn_connection(&self.target.url, self.target.tls.clone())?);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    fn statement(&mut self, sql: &str) -> Result<tokio_postgres::Statement, DbError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let translated = placeholders(sql);
        let client = self.client()?;
        let s = futures::executor::block_on(client.prepare(&translated))?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    fn begin_write(&mut self) -> Result<(), DbError> {
        if self.in_tx {
            // Left open by a panic in an earlier transaction.
            self.end("ROLLBACK")?;
        }
        self.batch("BEGIN")?;
        self.in_tx = true;
        self.execute("SELECT pg_advisory_xact_lock(?1)", &[Value::Int(WRITER_LOCK)])?;
        Ok(())
    }

    /// Ends the open transaction with COMMIT or ROLLBACK.
    fn end(&mut self, how: &str) -> Result<(), DbError> {
        if !std::mem::take(&mut self.in_tx) {
            return Ok(());
        }
        self.batch(how)
    }

    /// The migrations after the recorded version, inside the caller's write transaction.
    fn migrate(&mut self, migrations: &[&str]) -> Result<(), DbError> {
        let version = match self.query("SELECT version FROM cove_schema", &[])?.first() {
            Some(r) => r.get::<i64>(0).map_err(|e| DbError::Other(e.to_string()))?,
            None => 0,
        };
        for (i, sql) in migrations.iter().enumerate().skip(version.max(0) as usize) {
            self.batch(&postgres_ddl(sql))?;
            self.batch("DELETE FROM cove_schema")?;
            self.execute("INSERT INTO cove_schema (version) VALUES (?1)", &[Value::Int(i as i64 + 1)])?;
        }
        Ok(())
    }

    pub(crate) fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        let client = self.client()?;
        Ok(futures::executor::block_on(client.batch_execute(sql))?)
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let stmt = self.statement(sql)?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        let client = self.client()?;
        Ok(futures::executor::block_on(client.execute(&stmt, &refs))?)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        use tokio_postgres::types::Type;
        let stmt = self.statement(sql)?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        let client = self.client()?;
        let rows = futures::executor::block_on(client.query(&stmt, &refs))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let mut row = Vec::with_capacity(r.len());
            for (i, col) in r.columns().iter().enumerate() {
                let v = match *col.type_() {
                    Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Int),
                    Type::INT4 => r.try_get::<_, Option<i32>>(i)?.map(|v| Value::Int(v.into())),
                    Type::INT2 => r.try_get::<_, Option<i16>>(i)?.map(|v| Value::Int(v.into())),
                    Type::BOOL => r.try_get::<_, Option<bool>>(i)?.map(|v| Value::Int(v.into())),
                    Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => {
                        r.try_get::<_, Option<String>>(i)?.map(Value::Text)
                    }
                    ref t => return Err(DbError::Other(format!("column {} has type {t}", col.name()))),
                };
                row.push(v.unwrap_or(Value::Null));
            }
            out.push(Row(row));
        }
        Ok(out)
    }
}

/// `?N` placeholders as Postgres's `$N` (the store's SQL has no `?` inside string literals).
fn placeholders(sql: &str) -> String {
    sql.replace('?', "$")
}

/// Connects, and leaves the connection's I/O to a thread that ends when the client is dropped
/// or the connection breaks.
fn spawn_connection(url: &str, tls: Option<crate::tls::MakeTls>) -> Result<tokio_postgres::Client, DbError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let url = url.to_string();
    std::thread::Builder::new()
        .name("cove-postgres".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(DbError::Other(format!("starting the Postgres I/O thread: {e}"))));
                    return;
                }
            };
            rt.block_on(async move {
                // The connection runs here until it ends; the client goes back to the store.
                async fn run<T: tokio_postgres::tls::TlsStream + Unpin>(
                    connected: Result<
                        (tokio_postgres::Client, tokio_postgres::Connection<tokio_postgres::Socket, T>),
                        tokio_postgres::Error,
                    >,
                    tx: std::sync::mpsc::Sender<Result<tokio_postgres::Client, DbError>>,
                ) {
                    match connected {
                        Ok((client, connection)) => {
                            let _ = tx.send(Ok(client));
                            if let Err(e) = connection.await {
                                tracing::warn!(error = %e, "Postgres connection ended");
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.into()));
                        }
                    }
                }
                match tls {
                    Some(tls) => run(tokio_postgres::connect(&url, tls).await, tx).await,
                    None => run(tokio_postgres::connect(&url, tokio_postgres::NoTls).await, tx).await,
                }
            });
        })
        .map_err(|e| DbError::Other(format!("starting the Postgres I/O thread: {e}")))?;
    rx.recv().map_err(|_| DbError::Other("the Postgres I/O thread ended".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_ddl_are_translated() {
        assert_eq!(placeholders("a = ?1 AND (?2 IS NULL OR b = ?2)"), "a = $1 AND ($2 IS NULL OR b = $2)");
        assert_eq!(postgres_ddl("x INTEGER NOT NULL, y TEXT"), "x BIGINT NOT NULL, y TEXT");
    }

    #[test]
    fn values_convert_both_ways() {
        let row = Row(vec![Value::Int(3), Value::Null, Value::Text("t".into()), Value::Int(-1)]);
        assert_eq!(row.get::<u32>(0).unwrap(), 3);
        assert_eq!(row.get::<Option<String>>(1).unwrap(), None);
        assert_eq!(row.get::<String>(2).unwrap(), "t");
        assert!(row.get::<i64>(2).is_err(), "text is not an integer");
        assert!(row.get::<u64>(3).is_err(), "negative is not unsigned");
        assert!(row.get::<String>(9).is_err(), "no such column");
        assert_eq!(
            params![1u32, None::<String>, "a", true],
            [Value::Int(1), Value::Null, "a".into(), Value::Int(1)]
        );
    }
}
