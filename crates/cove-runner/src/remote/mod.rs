//! The host seam over the wire: a runner on another machine serves its [`crate::SandboxHost`]
//! ([`serve`]), and a control plane uses it as one ([`RemoteHost`]). HTTP/2 on TLS; the runner's
//! self-signed certificate is pinned by its fingerprint, and a shared token goes with every
//! request. See docs/architecture.md, "The host seam".

mod client;
mod server;
pub mod tls;
mod wire;

pub use client::RemoteHost;
pub use server::serve;
pub use tls::Identity;
