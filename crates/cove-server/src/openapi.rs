//! The OpenAPI document, generated from the handlers' annotations. `docs/openapi.json` is this
//! output, committed; a test fails when they differ.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{filesystem, git, invoke, keys, lsp, process, processes, pty, sandbox, snapshot, ssh, template};

#[derive(OpenApi)]
#[openapi(
    info(title = "Cove API", description = "Self-hostable microVM sandboxes; wire-compatible with Leap0's public API."),
    paths(
        sandbox::create, sandbox::get, sandbox::delete, sandbox::list, sandbox::user_home_dir, sandbox::workdir,
        sandbox::pause, sandbox::resume, sandbox::stop, sandbox::start, sandbox::set_network_policy,
        sandbox::add_mount, sandbox::update_mount, sandbox::delete_mount,
        snapshot::create, snapshot::restore, snapshot::list, snapshot::delete,
        template::upload, template::rename, template::delete, template::get, template::list,
        process::execute,
        processes::start, processes::list, processes::get, processes::delete, processes::stdin,
        processes::signal, processes::output,
        filesystem::ls, filesystem::stat, filesystem::mkdir, filesystem::write_file, filesystem::write_files,
        filesystem::read_file, filesystem::read_files, filesystem::delete, filesystem::set_permissions,
        filesystem::glob, filesystem::grep, filesystem::edit_file, filesystem::edit_files,
        filesystem::move_path, filesystem::copy, filesystem::exists, filesystem::tree,
        git::clone, git::status, git::branches, git::diff_unstaged, git::diff_staged, git::diff, git::reset,
        git::log, git::show, git::create_branch, git::checkout_branch, git::delete_branch, git::add, git::commit,
        git::push, git::pull,
        pty::list, pty::create, pty::get, pty::delete, pty::resize, pty::connect,
        invoke::create_presigned, invoke::delete_presigned,
        lsp::start, lsp::stop, lsp::completions, lsp::document_symbols, lsp::did_open, lsp::did_close,
        ssh::create, ssh::delete, ssh::validate, ssh::regenerate,
        keys::create, keys::list, keys::delete,
    ),
    modifiers(&BearerAuth, &CommonAnswers),
    security(("BearerAuth" = [])),
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "BearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "API key as a Bearer token in `authorization`, or in `leap0-authorization`.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Answers every operation can give, added where its annotation does not list them: 401 (the
/// API key is checked before any handler runs) and, for an operation that takes a body, 400
/// (a missing or malformed body is refused before the handler sees it).
struct CommonAnswers;

impl Modify for CommonAnswers {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let answer = |description: &str, schema: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name(schema))).build(),
                )
                .build()
        };
        for item in doc.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
                &mut item.options,
                &mut item.trace,
            ];
            for op in ops.into_iter().flatten() {
                let responses = &mut op.responses.responses;
                responses
                    .entry("401".into())
                    .or_insert_with(|| answer("Missing or invalid API key", "ErrorResponse").into());
                if op.request_body.is_some() {
                    responses
                        .entry("400".into())
                        .or_insert_with(|| answer("Invalid request", "ValidationErrorResponse").into());
                }
            }
        }
    }
}

/// The document as pretty JSON with a trailing newline.
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let mut s = doc.to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}
