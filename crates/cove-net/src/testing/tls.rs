//! The test root CA, and leaf certificates minted per SNI.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use super::{lock, CA_COMMON_NAME};

fn err(e: impl fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Validity of every certificate: wide, so a guest with an odd clock still accepts them.
fn validity(params: &mut CertificateParams) {
    params.not_before = date_time_ymd(2000, 1, 1);
    params.not_after = date_time_ymd(2099, 12, 31);
}

pub(super) struct Ca {
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").field("common_name", &CA_COMMON_NAME).finish_non_exhaustive()
    }
}

impl Ca {
    /// A fresh root CA (ECDSA P-256) and its certificate, PEM.
    pub(super) fn new() -> io::Result<(Ca, String)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, CA_COMMON_NAME);
        params.distinguished_name.push(DnType::OrganizationName, "Cove tests");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params);
        let pem = params.self_signed(&key).map_err(err)?.pem();
        Ok((Ca { issuer: Issuer::new(params, key), leaves: Mutex::default() }, pem))
    }

    /// The certificate and key for `name` (a DNS name or an IP address), minted once.
    pub(super) fn leaf(&self, name: &str) -> io::Result<Arc<CertifiedKey>> {
        if let Some(leaf) = lock(&self.leaves).get(name) {
            return Ok(leaf.clone());
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::new(vec![name.to_string()]).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der).map_err(err)?;
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let leaf = Arc::new(CertifiedKey::new(chain, signer));
        Ok(lock(&self.leaves).entry(name.to_string()).or_insert(leaf).clone())
    }
}

/// Serves a certificate for the SNI, or for the server's address when there is none.
#[derive(Debug)]
struct Resolver {
    ca: Arc<Ca>,
    ip: Ipv4Addr,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(str::to_ascii_lowercase).unwrap_or_else(|| self.ip.to_string());
        match self.ca.leaf(&name) {
            Ok(leaf) => Some(leaf),
            Err(e) => {
                tracing::warn!(%name, error = %e, "test internet: cannot mint a certificate");
                None
            }
        }
    }
}

/// TLS for the web server on `ip`: any SNI, ALPN h2 and http/1.1.
pub(super) fn acceptor(ca: Arc<Ca>, ip: Ipv4Addr) -> io::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver { ca, ip }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
