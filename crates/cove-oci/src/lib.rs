//! Container images to VM disks: pull an image from an OCI/Docker registry (v2), apply its
//! layers into a directory (whiteouts, opaque directories, owners, modes, xattrs, links) and
//! make the directory an ext4 disk, with no Docker daemon, loop mount or overlay mount.
//!
//! Layers are cached by digest under the cache directory and shared by every template made
//! from them. Registry credentials live only in the memory of a pull.

pub mod disk;
mod pull;
#[cfg(feature = "testing")]
pub mod testing;
pub mod unpack;

pub use cove_proto::image::ImageConfig;
pub use pull::{Credentials, Layer, Progress, PullConfig, PulledImage, Puller};

/// What went wrong with an image. Each variant but `Io` is the user's to fix, and says which
/// request field it concerns ([`OciError::field`]).
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("not an image reference: {0}")]
    Reference(String),
    #[error("image not found: {0}")]
    NotFound(String),
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    #[error("the registry refused the credentials")]
    Unauthorized,
    #[error("the registry wants credentials for this image")]
    CredentialsRequired,
    #[error("{0}")]
    Platform(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("unusable image: {0}")]
    Unusable(String),
    #[error("registry error: {0}")]
    Registry(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

impl OciError {
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        OciError::Io(what.into(), e)
    }

    /// The request field at fault, or `None` for a fault of this host.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            OciError::Unauthorized | OciError::CredentialsRequired => Some("credentials"),
            OciError::Io(..) => None,
            _ => Some("uri"),
        }
    }
}
