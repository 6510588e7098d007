//! The host seam over the wire: a runner on another machine serves its [`crate::SandboxHost`]
//! ([`serve`]), and a control plane uses it as one ([`RemoteHost`]). HTTP/2 on TLS; the runner's
//! self-signed certificate is pinned by its fingerprint, and a shared token goes with every
//! request. See docs/architecture.md, "The host seam".

mod client;
pub mod lease;
mod server;
pub mod tls;
mod wire;

pub use client::RemoteHost;
pub use server::serve;
pub use tls::Identity;

/// `host` served on a loopback port with a new certificate and token, and a [`RemoteHost`] for
/// it: the wire protocol without a second machine (the control-plane tests, `cove bench
/// remote`).
pub async fn over_loopback(
    host: std::sync::Arc<dyn crate::SandboxHost>,
) -> Result<std::sync::Arc<RemoteHost>, crate::RunnerError> {
    let identity = Identity::generate();
    let fingerprint = identity.fingerprint();
    let token = hex::encode(rand::random::<[u8; 16]>());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| crate::RunnerError::io("binding a loopback port", e))?;
    let addr = listener.local_addr().map_err(|e| crate::RunnerError::io("a loopback port", e))?.to_string();
    let served = token.clone();
    tokio::spawn(async move { serve(listener, &identity, host, served).await });
    RemoteHost::connect(&addr, &fingerprint, &token).await
}
