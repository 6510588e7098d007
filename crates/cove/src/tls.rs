//! HTTPS for the API and the sandbox domain, when the server is given a certificate (for a
//! public deployment: a wildcard certificate for `*.<sandbox domain>` plus the API's name).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A TLS acceptor for the PEM certificate chain and private key at these paths; ALPN offers
/// HTTP/2 and HTTP/1.1.
pub fn acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    let pem = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
    let pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("parsing {}", key.display()))?
        .with_context(|| format!("{} holds no private key", key.display()))?;
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("the TLS certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` over TLS until `stop` is cancelled. Each connection gets its own task; a
/// failed handshake only ends that connection.
pub async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: axum::Router,
    stop: CancellationToken,
) -> Result<()> {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = listener.accept() => r?,
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                };
            // The client's address reaches the invoke route (X-Forwarded-For).
            let app = app.layer(axum::Extension(axum::extract::ConnectInfo(peer)));
            let service = TowerToHyperService::new(app);
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// Files of `--tls-self-signed`, in `<data dir>/tls`.
pub struct SelfSigned {
    /// The CA certificate clients trust (`SSL_CERT_FILE`, `curl --cacert`, the OS store).
    pub ca_cert: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// A local certificate authority (kept in `dir` across restarts, so that clients trust it
/// once) and a server certificate from it for `names` (DNS names, `*.` wildcards and IP
/// addresses), issued anew at every start so that it always matches the flags.
pub fn self_signed(dir: &Path, names: &[String]) -> Result<SelfSigned> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    use std::os::unix::fs::OpenOptionsExt;

    let write = |path: &Path, body: &str, mode: u32| -> Result<()> {
        let tmp = path.with_extension("tmp");
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        std::io::Write::write_all(&mut f, body.as_bytes())?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files =
        SelfSigned { ca_cert: dir.join("ca.pem"), cert: dir.join("server.pem"), key: dir.join("server.key") };
    let ca_key_path = dir.join("ca.key");
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);

    let ca_params = |key: &KeyPair| -> Result<(CertificateParams, String)> {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "Cove local CA");
        p.distinguished_name.push(DnType::OrganizationName, "Cove");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = now - day;
        p.not_after = now + day * 3650;
        let pem = p.self_signed(key)?.pem();
        Ok((p, pem))
    };
    let existing =
        std::fs::read_to_string(&ca_key_path).ok().zip(std::fs::read_to_string(&files.ca_cert).ok());
    let issuer = match existing {
        Some((key_pem, cert_pem)) => {
            let key =
                KeyPair::from_pem(&key_pem).with_context(|| format!("reading {}", ca_key_path.display()))?;
            Issuer::from_ca_cert_pem(&cert_pem, key)
                .with_context(|| format!("reading {}", files.ca_cert.display()))?
        }
        None => {
            let key = KeyPair::generate()?;
            let (params, pem) = ca_params(&key)?;
            write(&ca_key_path, &key.serialize_pem(), 0o600)?;
            write(&files.ca_cert, &pem, 0o644)?;
            Issuer::new(params, key)
        }
    };

    let mut leaf = CertificateParams::new(names.to_vec()).context("the names of the TLS certificate")?;
    leaf.distinguished_name.push(DnType::CommonName, names.first().map_or("cove", String::as_str));
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now - day;
    leaf.not_after = now + day * 397;
    leaf.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    write(&files.key, &key.serialize_pem(), 0o600)?;
    write(&files.cert, &cert.pem(), 0o644)?;
    Ok(files)
}

/// The names `--tls-self-signed` certifies: the sandbox domain and its wildcard, `localhost`,
/// and the listen address when it is a specific one.
pub fn self_signed_names(sandbox_domain: &str, listen: std::net::SocketAddr) -> Vec<String> {
    let host = match sandbox_domain.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => sandbox_domain,
    };
    let mut names = vec![host.to_string(), format!("*.{host}"), "localhost".to_string()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_keeps_its_ca_and_certifies_the_sandbox_wildcard() {
        let dir = tempfile::tempdir().unwrap();
        let names = self_signed_names("sandbox.example.test:8443", "127.0.0.9:8443".parse().unwrap());
        assert_eq!(names, ["sandbox.example.test", "*.sandbox.example.test", "localhost", "127.0.0.9"]);
        let first = self_signed(dir.path(), &names).unwrap();
        let ca = std::fs::read_to_string(&first.ca_cert).unwrap();
        let leaf = std::fs::read(&first.cert).unwrap();
        // A restart keeps the CA clients trust and issues a new server certificate from it.
        let second = self_signed(dir.path(), &names).unwrap();
        assert_eq!(std::fs::read_to_string(&second.ca_cert).unwrap(), ca);
        assert_ne!(std::fs::read(&second.cert).unwrap(), leaf);
        use std::os::unix::fs::PermissionsExt;
        for key in [dir.path().join("ca.key"), second.key.clone()] {
            assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        }
        acceptor(&second.cert, &second.key).unwrap();

        // The certificate verifies for a sandbox's name under the CA, and not for another.
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut ca.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
        let chain: Vec<_> = rustls_pemfile::certs(&mut std::fs::read(&second.cert).unwrap().as_slice())
            .collect::<Result<_, _>>()
            .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        for (name, ok) in [("sbx-1.sandbox.example.test", true), ("127.0.0.9", true), ("other.test", false)] {
            let name = rustls::pki_types::ServerName::try_from(name).unwrap();
            let verified = rustls::client::danger::ServerCertVerifier::verify_server_cert(
                verifier.as_ref(),
                &chain[0],
                &chain[1..],
                &name,
                &[],
                now,
            );
            assert_eq!(verified.is_ok(), ok, "{name:?}: {verified:?}");
        }
    }
}
