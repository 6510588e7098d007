//! Per-sandbox certificate authority (ECDSA P-256) for the MITM path. The private key never
//! leaves the host; only the certificate is installed in the guest. Leaves are minted on demand
//! for exactly one DNS name (the ClientHello SNI of a transform domain), short-lived, cached.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

/// How many leaf certificates a CA keeps.
const LEAF_CACHE: usize = 256;
/// Leaves are valid for 24 h (backdated 1 h); re-minted after 12 h.
const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
const LEAF_REUSE: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug, thiserror::Error)]
#[error("sandbox CA: {0}")]
pub struct CaError(pub String);

pub struct SandboxCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// One key shared by every leaf of this CA.
    leaf_key: KeyPair,
    leaf_signing: Arc<dyn rustls::sign::SigningKey>,
    cache: Mutex<LeafCache>,
}

#[derive(Default)]
struct LeafCache {
    map: HashMap<String, (Arc<CertifiedKey>, Instant)>,
    order: VecDeque<String>,
}

impl std::fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxCa").finish_non_exhaustive()
    }
}

fn ca_params(sandbox_id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Cove sandbox {sandbox_id} egress CA"));
    dn.push(DnType::OrganizationName, "Cove");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(3650 * 24 * 3600);
    params.serial_number = Some(random_serial());
    params
}

fn random_serial() -> rcgen::SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f;
    rcgen::SerialNumber::from_slice(&b)
}

fn pem_block(pem: &str, label: &str) -> Option<String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)?;
    let stop = pem[start..].find(&end)? + start + end.len();
    Some(format!("{}\n", &pem[start..stop]))
}

impl SandboxCa {
    /// A fresh CA: CN "Cove sandbox <id> egress CA", valid for ~10 years.
    pub fn generate(sandbox_id: &str) -> SandboxCa {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key generation");
        let params = ca_params(sandbox_id);
        let cert = params.self_signed(&key).expect("self-signing the sandbox CA");
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        Self::assemble(cert_pem, cert.der().clone(), key_pem, Issuer::new(params, key))
    }

    fn assemble(
        cert_pem: String,
        cert_der: CertificateDer<'static>,
        key_pem: String,
        issuer: Issuer<'static, KeyPair>,
    ) -> SandboxCa {
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key generation");
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signing =
            rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&der).expect("rustls loads a P-256 key");
        SandboxCa {
            cert_pem,
            cert_der,
            key_pem,
            issuer,
            leaf_key,
            leaf_signing,
            cache: Mutex::new(LeafCache::default()),
        }
    }

    /// The CA certificate (PEM), to install in the guest's trust store.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Certificate and private key (PEM), for the runner to persist (mode 0600).
    pub fn to_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }

    /// Loads what [`SandboxCa::to_pem`] wrote.
    pub fn from_pem(pem: &str) -> Result<SandboxCa, CaError> {
        let cert_pem = pem_block(pem, "CERTIFICATE").ok_or_else(|| CaError("no CERTIFICATE block".into()))?;
        let key_pem = pem_block(pem, "PRIVATE KEY").ok_or_else(|| CaError("no PRIVATE KEY block".into()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError(format!("private key: {e}")))?;
        let cert_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| CaError("no certificate".into()))?
            .map_err(|e| CaError(format!("certificate: {e}")))?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| CaError(format!("certificate: {e}")))?;
        Ok(Self::assemble(cert_pem, cert_der, key_pem, issuer))
    }

    /// A leaf certificate for exactly `name` (SAN = that one DNS name), with the CA in the chain.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let name = name.to_ascii_lowercase();
        {
            let cache = self.cache.lock().expect("leaf cache");
            if let Some((ck, at)) = cache.map.get(&name) {
                if at.elapsed() < LEAF_REUSE {
                    return Ok(ck.clone());
                }
            }
        }
        let mut params = CertificateParams::new(vec![name.clone()])
            .map_err(|e| CaError(format!("leaf for {name}: {e}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.clone());
        params.distinguished_name = dn;
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + LEAF_VALIDITY;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&self.leaf_key, &self.issuer)
            .map_err(|e| CaError(format!("leaf for {name}: {e}")))?;
        let ck = Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            self.leaf_signing.clone(),
        ));
        let mut cache = self.cache.lock().expect("leaf cache");
        if cache.map.insert(name.clone(), (ck.clone(), Instant::now())).is_none() {
            cache.order.push_back(name);
            while cache.order.len() > LEAF_CACHE {
                if let Some(old) = cache.order.pop_front() {
                    cache.map.remove(&old);
                }
            }
        }
        Ok(ck)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn roundtrip_and_leaf_verifies() {
        let ca = SandboxCa::generate("sbx-1");
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!ca.cert_pem().contains("PRIVATE KEY"));
        let pem = ca.to_pem();
        assert!(pem.contains("PRIVATE KEY"));
        let again = SandboxCa::from_pem(&pem).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        assert!(SandboxCa::from_pem("garbage").is_err());

        // A leaf minted by the reloaded CA verifies against the original CA certificate.
        let leaf = again.leaf("API.example.com").unwrap();
        assert!(Arc::ptr_eq(&leaf, &again.leaf("api.example.com").unwrap()), "cached");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
        verifier.verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &name, &[], now).unwrap();
        let other = rustls::pki_types::ServerName::try_from("other.example.com").unwrap();
        assert!(verifier.verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &other, &[], now).is_err());
        let sub = rustls::pki_types::ServerName::try_from("x.api.example.com").unwrap();
        assert!(verifier.verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &sub, &[], now).is_err());
    }
}
