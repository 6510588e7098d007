//! Secrets at rest: values users hand over for the host to use (header values to inject, later
//! bucket credentials) are kept in the metadata store sealed with AES-256-GCM under a key that
//! lives beside the database (`secret.key`, 0600), never in it. A copy of the database alone
//! reveals nothing; the key file must be kept with it (and backed up separately).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

/// Marks a sealed value, with the format version.
const PREFIX: &str = "cove-sealed:v1:";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("secret key {0}: {1}")]
    Key(String, std::io::Error),
    #[error("a sealed value could not be opened (wrong key or damaged)")]
    Open,
}

pub struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

impl Sealer {
    /// The key in `path`, made (32 random bytes, 0600) if the file does not exist.
    pub fn open_or_create(path: &Path) -> Result<Sealer, SealError> {
        let err = |e| SealError::Key(path.display().to_string(), e);
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                aws_lc_rs::rand::fill(&mut key).map_err(|_| err(std::io::Error::other("no randomness")))?;
                let tmp = path.with_extension("tmp");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(err)?;
                f.write_all(&key).and_then(|_| f.sync_all()).map_err(err)?;
                // A second server racing on the same data dir keeps the first key.
                std::fs::hard_link(&tmp, path).or_else(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(err(e)),
                })?;
                let _ = std::fs::remove_file(&tmp);
                std::fs::read(path).map_err(err)?
            }
            Err(e) => return Err(err(e)),
        };
        Self::from_bytes(&bytes).ok_or_else(|| err(std::io::Error::other("not a 32-byte key")))
    }

    /// A key that lives only in this process (tests, in-memory stores).
    pub fn ephemeral() -> Sealer {
        let mut key = [0u8; 32];
        aws_lc_rs::rand::fill(&mut key).expect("randomness");
        Self::from_bytes(&key).expect("32-byte key")
    }

    fn from_bytes(bytes: &[u8]) -> Option<Sealer> {
        let key = UnboundKey::new(&AES_256_GCM, bytes).ok()?;
        Some(Sealer { key: LessSafeKey::new(key) })
    }

    /// `cove-sealed:v1:<hex of nonce ‖ ciphertext ‖ tag>`. A random nonce per value.
    pub fn seal(&self, plain: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).expect("randomness");
        let mut buf = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .expect("AES-GCM sealing cannot fail for in-memory data");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        format!("{PREFIX}{}", hex::encode(out))
    }

    pub fn is_sealed(value: &str) -> bool {
        value.starts_with(PREFIX)
    }

    /// The plain value of `sealed`; a value that is not sealed is returned as it is (rows
    /// written before sealing existed).
    pub fn open(&self, sealed: &str) -> Result<String, SealError> {
        let Some(body) = sealed.strip_prefix(PREFIX) else {
            return Ok(sealed.to_string());
        };
        let bytes = hex::decode(body).map_err(|_| SealError::Open)?;
        if bytes.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut buf = rest.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::empty(), &mut buf).map_err(|_| SealError::Open)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_differ_each_time() {
        let s = Sealer::ephemeral();
        let a = s.seal("Bearer sk-123");
        let b = s.seal("Bearer sk-123");
        assert!(Sealer::is_sealed(&a) && a != b, "a fresh nonce per value");
        assert!(!a.contains("sk-123"));
        assert_eq!(s.open(&a).unwrap(), "Bearer sk-123");
        assert_eq!(s.open("plain").unwrap(), "plain");
    }

    #[test]
    fn a_wrong_key_or_a_changed_byte_is_refused() {
        let (s, other) = (Sealer::ephemeral(), Sealer::ephemeral());
        let v = s.seal("secret");
        assert!(other.open(&v).is_err());
        let mut tampered = v.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
        assert!(s.open(&String::from_utf8(tampered).unwrap()).is_err());
    }

    #[test]
    fn the_key_file_is_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let sealed = Sealer::open_or_create(&path).unwrap().seal("x");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Sealer::open_or_create(&path).unwrap().open(&sealed).unwrap(), "x");
    }
}
