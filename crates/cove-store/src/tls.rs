//! TLS to Postgres, with rustls. A URL with `sslmode=require` (or `verify-ca`, `verify-full`)
//! connects over TLS and verifies the server's certificate and name, against the host's roots or,
//! with `sslrootcert=FILE` (PEM), against that file's certificates only. Without `sslmode` (or
//! with `disable`) the connection is plain TCP; `prefer` is refused, since a connection that may
//! silently be plain is not one to rely on.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use crate::db::DbError;

/// How to connect: the URL as tokio-postgres reads it, and TLS settings if any.
pub(crate) struct Target {
    pub url: String,
    pub tls: Option<MakeTls>,
}

/// Reads `sslmode` and `sslrootcert` off a `postgres://` URL (a key=value connection string
/// passes as it is: plain).
pub(crate) fn target(url: &str) -> Result<Target, DbError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(Target { url: url.to_string(), tls: None });
    };
    let (mut mode, mut root) = (None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", m)) => mode = Some(m.to_string()),
            Some(("sslrootcert", f)) => root = Some(f.to_string()),
            _ => kept.push(pair),
        }
    }
    let tls = match mode.as_deref() {
        None | Some("disable") => None,
        Some("require" | "verify-ca" | "verify-full") => Some(MakeTls::new(root.as_deref())?),
        Some(other) => {
            let why = "use disable, or require (the certificate is always verified)";
            return Err(DbError::Other(format!("sslmode={other} is not supported: {why}")));
        }
    };
    if tls.is_none() && root.is_some() {
        return Err(DbError::Other("sslrootcert is given but sslmode is not require".into()));
    }
    if tls.is_some() {
        kept.push("sslmode=require");
    }
    let url = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    Ok(Target { url, tls })
}

#[derive(Clone)]
pub(crate) struct MakeTls(Arc<rustls::ClientConfig>);

impl MakeTls {
    fn new(root_file: Option<&str>) -> Result<MakeTls, DbError> {
        let mut roots = rustls::RootCertStore::empty();
        match root_file {
            Some(file) => {
                let pem = std::fs::read(file)
                    .map_err(|e| DbError::Other(format!("reading sslrootcert {file}: {e}")))?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|e| DbError::Other(format!("sslrootcert {file}: {e}")))?;
                    roots.add(cert).map_err(|e| DbError::Other(format!("sslrootcert {file}: {e}")))?;
                }
                if roots.is_empty() {
                    return Err(DbError::Other(format!("sslrootcert {file} holds no certificate")));
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| DbError::Other(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(MakeTls(Arc::new(config)))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for MakeTls {
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<Connect> {
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        Ok(Connect { connector: tokio_rustls::TlsConnector::from(self.0.clone()), name })
    }
}

pub(crate) struct Connect {
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for Connect {
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move { Ok(Stream(self.connector.connect(self.name, stream).await?)) })
    }
}

pub(crate) struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_says_whether_and_how_to_use_tls() {
        let plain = target("postgres://cove@db:5432/cove").unwrap();
        assert!(plain.tls.is_none());
        assert_eq!(plain.url, "postgres://cove@db:5432/cove");
        let t = target("postgres://cove@db/cove?sslmode=verify-full&connect_timeout=5").unwrap();
        assert!(t.tls.is_some());
        assert_eq!(t.url, "postgres://cove@db/cove?connect_timeout=5&sslmode=require");
        assert!(target("postgres://cove@db/cove?sslmode=prefer").is_err());
        assert!(target("postgres://cove@db/cove?sslrootcert=/x.pem").is_err());
        let missing = target("postgres://cove@db/cove?sslmode=require&sslrootcert=/nonexistent.pem");
        assert!(missing.is_err_and(|e| e.to_string().contains("/nonexistent.pem")));
    }

    /// On the tests' Postgres server (`scripts/test` runs the store's tests on it with its CA in
    /// `COVE_TEST_POSTGRES_CA`): the connection is TLS, and a server whose certificate the
    /// roots do not vouch for is refused.
    #[test]
    fn postgres_over_tls_is_tls_and_verifies_the_server() {
        let (Some(url), Ok(ca)) =
            (crate::testing::fresh_postgres_database().unwrap(), std::env::var("COVE_TEST_POSTGRES_CA"))
        else {
            eprintln!("no Postgres server with TLS for this run (COVE_TEST_POSTGRES, COVE_TEST_POSTGRES_CA)");
            return;
        };
        let store = crate::Store::connect(&format!("{url}?sslmode=require&sslrootcert={ca}")).unwrap();
        let rows = store
            .with(|db| Ok(db.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])?))
            .unwrap();
        assert!(rows[0].get::<bool>(0).unwrap(), "the connection is not TLS");
        assert_eq!(store.org_count().unwrap(), 0);
        for roots in ["sslrootcert=/etc/ssl/certs/ca-certificates.crt", ""] {
            let url = format!("{url}?sslmode=require&{roots}");
            let err =
                crate::Store::connect(url.trim_end_matches('&')).err().expect("an unknown CA is refused");
            assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
        }
    }
}
