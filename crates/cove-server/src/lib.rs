//! Cove's control plane: the Leap0-compatible HTTP API over the metadata store and the runner.
//!
//! Handlers (`sandbox`, `process`, `filesystem`) only parse and validate; each calls one
//! action of [`core::Core`]. Errors become HTTP answers in one place, [`error::ApiError`].

pub mod cluster;
pub mod core;
pub mod error;
pub mod extract;
mod filesystem;
mod forward;
mod git;
mod invoke;
mod keys;
mod lsp;
pub mod metrics;
mod openapi;
mod process;
mod processes;
mod pty;
mod sandbox;
pub mod sim;
mod snapshot;
mod ssh;
pub mod sshd;
mod template;

use std::sync::Arc;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use cove_api::ErrorResponse;

pub use crate::core::{Core, CoreConfig, SshEndpoint};
pub use openapi::openapi_json;

#[derive(Clone)]
pub struct AppState {
    pub core: Arc<Core>,
}

pub fn router(core: Arc<Core>) -> Router {
    let fs = |op: &str| format!("/v1/sandbox/{{sandboxID}}/filesystem/{op}");
    let git = |op: &str| format!("/v1/sandbox/{{sandboxID}}/git/{op}");
    let r = Router::new()
        .route("/v1/sandbox", post(sandbox::create))
        .route("/v1/sandbox/", post(sandbox::create))
        .route("/v1/sandbox/{sandboxID}", get(sandbox::get).delete(sandbox::delete))
        .route("/v1/sandbox/{sandboxID}/", get(sandbox::get).delete(sandbox::delete))
        .route("/v1/sandboxes", get(sandbox::list))
        .route("/v1/sandbox/{sandboxID}/pause", post(sandbox::pause))
        .route("/v1/sandbox/{sandboxID}/network-policy", patch(sandbox::set_network_policy))
        .route("/v1/sandbox/{sandboxID}/mounts", post(sandbox::add_mount))
        .route(
            "/v1/sandbox/{sandboxID}/mounts/{mountID}",
            patch(sandbox::update_mount).delete(sandbox::delete_mount),
        )
        .route("/v1/sandbox/{sandboxID}/presigned-url", post(invoke::create_presigned))
        .route("/v1/sandbox/{sandboxID}/presigned-url/{id}", axum::routing::delete(invoke::delete_presigned))
        .route("/v1/sandbox/{sandboxID}/resume", post(sandbox::resume))
        .route("/v1/sandbox/{sandboxID}/stop", post(sandbox::stop))
        .route("/v1/sandbox/{sandboxID}/start", post(sandbox::start))
        .route("/v1/sandbox/{sandboxID}/snapshot/create", post(snapshot::create))
        .route("/v1/snapshot/restore", post(snapshot::restore))
        .route("/v1/snapshot/{snapshotID}", axum::routing::delete(snapshot::delete))
        .route("/v1/snapshots", get(snapshot::list))
        .route("/v1/template", post(template::upload))
        .route(
            "/v1/template/{templateID}",
            get(template::get).patch(template::rename).delete(template::delete),
        )
        .route("/v1/templates", get(template::list))
        .route("/v1/sandbox/{sandboxID}/system/user-home-dir", get(sandbox::user_home_dir))
        .route("/v1/sandbox/{sandboxID}/system/workdir", get(sandbox::workdir))
        .route("/v1/sandbox/{sandboxID}/process/execute", post(process::execute))
        .route("/v1/sandbox/{sandboxID}/process/start", post(processes::start))
        .route("/v1/sandbox/{sandboxID}/processes", get(processes::list))
        .route("/v1/sandbox/{sandboxID}/process/{pid}", get(processes::get).delete(processes::delete))
        .route("/v1/sandbox/{sandboxID}/process/{pid}/stdin", post(processes::stdin))
        .route("/v1/sandbox/{sandboxID}/process/{pid}/signal", post(processes::signal))
        .route("/v1/sandbox/{sandboxID}/process/{pid}/output", get(processes::output))
        .route("/v1/sandbox/{sandboxID}/pty", get(pty::list).post(pty::create))
        .route("/v1/sandbox/{sandboxID}/pty/{sessionID}", get(pty::get).delete(pty::delete))
        .route("/v1/sandbox/{sandboxID}/pty/{sessionID}/resize", post(pty::resize))
        .route("/v1/sandbox/{sandboxID}/pty/{sessionID}/connect", get(pty::connect))
        .route(&fs("ls"), post(filesystem::ls))
        .route(&fs("stat"), post(filesystem::stat))
        .route(&fs("mkdir"), post(filesystem::mkdir))
        .route(&fs("write-file"), post(filesystem::write_file))
        .route(&fs("write-files"), post(filesystem::write_files))
        .route(&fs("read-file"), post(filesystem::read_file))
        .route(&fs("read-files"), post(filesystem::read_files))
        .route(&fs("delete"), post(filesystem::delete))
        .route(&fs("set-permissions"), post(filesystem::set_permissions))
        .route(&fs("glob"), post(filesystem::glob))
        .route(&fs("grep"), post(filesystem::grep))
        .route(&fs("edit-file"), post(filesystem::edit_file))
        .route(&fs("edit-files"), post(filesystem::edit_files))
        .route(&fs("move"), post(filesystem::move_path))
        .route(&fs("copy"), post(filesystem::copy))
        .route(&fs("exists"), post(filesystem::exists))
        .route(&fs("tree"), post(filesystem::tree))
        .route(&git("clone"), post(git::clone))
        .route(&git("status"), post(git::status))
        .route(&git("branches"), post(git::branches))
        .route(&git("diff-unstaged"), post(git::diff_unstaged))
        .route(&git("diff-staged"), post(git::diff_staged))
        .route(&git("diff"), post(git::diff))
        .route(&git("reset"), post(git::reset))
        .route(&git("log"), post(git::log))
        .route(&git("show"), post(git::show))
        .route(&git("create-branch"), post(git::create_branch))
        .route(&git("checkout-branch"), post(git::checkout_branch))
        .route(&git("delete-branch"), post(git::delete_branch))
        .route(&git("add"), post(git::add))
        .route(&git("commit"), post(git::commit))
        .route(&git("push"), post(git::push))
        .route(&git("pull"), post(git::pull))
        .route("/v1/sandbox/{sandboxID}/lsp/start", post(lsp::start))
        .route("/v1/sandbox/{sandboxID}/lsp/stop", post(lsp::stop))
        .route("/v1/sandbox/{sandboxID}/lsp/completions", post(lsp::completions))
        .route("/v1/sandbox/{sandboxID}/lsp/document-symbols", post(lsp::document_symbols))
        .route("/v1/sandbox/{sandboxID}/lsp/did-open", post(lsp::did_open))
        .route("/v1/sandbox/{sandboxID}/lsp/did-close", post(lsp::did_close))
        .route("/v1/sandbox/{sandboxID}/ssh/access", post(ssh::create))
        .route("/v1/sandbox/{sandboxID}/ssh/{sshID}", axum::routing::delete(ssh::delete))
        .route("/v1/sandbox/{sandboxID}/ssh/{sshID}/validate", post(ssh::validate))
        .route("/v1/sandbox/{sandboxID}/ssh/{sshID}/regen", post(ssh::regenerate))
        .route("/v1/keys", get(keys::list).post(keys::create))
        .route("/v1/keys/{keyID}", axum::routing::delete(keys::delete))
        .route("/openapi.json", get(|| async { ([("content-type", "application/json")], openapi_json()) }))
        .route("/healthz", get(|| async { "ok" }))
        .route(cove_runner::remote::lease::PATH, post(cluster::renew_lease));
    let state = AppState { core };
    r.route_layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), invoke::route))
        .with_state(state)
}

async fn not_found(req: Request) -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorResponse { message: format!("no route for {} {}", req.method(), req.uri().path()) }),
    )
}

async fn method_not_allowed(req: Request) -> impl IntoResponse {
    let message = format!("method {} is not allowed on {}", req.method(), req.uri().path());
    (StatusCode::METHOD_NOT_ALLOWED, Json(ErrorResponse { message }))
}

/// Runs background duties: sandbox timeouts (delete, or pause with `auto_pause`).
pub fn spawn_background(core: Arc<Core>, shutdown: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => core.expire().await,
            }
        }
    });
}
