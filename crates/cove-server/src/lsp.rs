//! Language servers. Each endpoint validates its request and forwards it to the guest agent,
//! which runs the server (pyright for Python, typescript-language-server for TypeScript and
//! JavaScript) as the sandbox user and speaks JSON-RPC with it.

use axum::extract::{Path, State};
use axum::response::Response;
use cove_api::lsp::*;
use cove_api::{ErrorResponse, ValidationErrorResponse};
use hyper::Method;

use crate::error::ApiError;
use crate::extract::{OrgId, ValidJson};
use crate::forward::forward_json;
use crate::AppState;

macro_rules! lsp_op {
    ($fn:ident, $op:literal, $req:ty, $desc:literal, ok = ($status:literal, $okdesc:literal $(, $body:ty)?)) => {
        #[utoipa::path(post, path = concat!("/v1/sandbox/{sandboxID}/lsp/", $op), tag = "LSP",
            description = $desc, request_body = $req,
            params(("sandboxID" = String, Path, description = "Sandbox id")),
            responses(
                (status = $status, description = $okdesc $(, body = $body)?),
                (status = 400, description = "Invalid request, no such project or document, or no server for the language in the template", body = ValidationErrorResponse),
                (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
                (status = 404, description = "No such sandbox, or no server started for the language and project", body = ErrorResponse),
                (status = 409, description = "The sandbox is not running, or runs 8 language servers", body = ErrorResponse),
                (status = 502, description = "The language server exited or did not answer", body = ErrorResponse)))]
        pub async fn $fn(
            State(s): State<AppState>,
            OrgId(org): OrgId,
            Path(id): Path<String>,
            ValidJson(req): ValidJson<$req>,
        ) -> Result<Response, ApiError> {
            let path = format!("{}{}", cove_proto::routes::LSP_PREFIX, $op);
            forward_json(&s, &org, &id, Method::POST, &path, Some(&req)).await
        }
    };
}

lsp_op!(
    start,
    "start",
    LspServerRequest,
    "Start the language server of a language for a project (its workspace root) and initialize it; a no-op when \
        it runs already. `python`: pyright; `typescript`, `javascript`: typescript-language-server (one server).",
    ok = (200, "Started", LspSuccessResponse)
);
lsp_op!(
    stop,
    "stop",
    LspServerRequest,
    "Shut the server down (`shutdown`, `exit`) and end its processes.",
    ok = (200, "Stopped", LspSuccessResponse)
);
lsp_op!(
    completions,
    "completions",
    LspCompletionRequest,
    "`textDocument/completion` at a position; the server's JSON-RPC answer as it gave it.",
    ok = (200, "The server's answer", LspJsonRpcResponse)
);
lsp_op!(
    document_symbols,
    "document-symbols",
    LspDocumentRequest,
    "`textDocument/documentSymbol`: the document's functions, classes, variables; the server's answer as it gave it.",
    ok = (200, "The server's answer", LspJsonRpcResponse)
);
lsp_op!(
    did_open,
    "did-open",
    LspDidOpenRequest,
    "`textDocument/didOpen`: the server learns the document (its `text`, or the file's content).",
    ok = (204, "Sent")
);
lsp_op!(did_close, "did-close", LspDocumentRequest, "`textDocument/didClose`.", ok = (204, "Sent"));
