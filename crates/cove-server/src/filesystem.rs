//! Filesystem endpoints. Each validates its request and forwards it unchanged to the guest
//! agent, which does the work inside the VM; bodies (file contents, multipart) stream through.

use axum::extract::{Path, Query, Request, State};
use axum::http::header;
use axum::response::Response;
use cove_api::filesystem::*;
use cove_api::{ErrorResponse, Validate, ValidationErrorResponse};
use hyper::Method;

use crate::error::ApiError;
use crate::extract::{OrgId, ValidJson};
use crate::forward::{forward, forward_json, stream};
use crate::AppState;

macro_rules! json_op {
    ($fn:ident, $op:literal, $req:ty, $desc:literal, ok = ($status:literal, $okdesc:literal $(, $body:ty)?)) => {
        #[utoipa::path(post, path = concat!("/v1/sandbox/{sandboxID}/filesystem/", $op), tag = "Filesystem",
            description = $desc, request_body = $req,
            params(("sandboxID" = String, Path, description = "Sandbox id")),
            responses(
                (status = $status, description = $okdesc $(, body = $body)?),
                (status = 400, description = "Invalid request", body = ValidationErrorResponse),
                (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
                (status = 404, description = "No such sandbox or path", body = ErrorResponse),
                (status = 409, description = "Sandbox not running, or destination exists", body = ErrorResponse)))]
        pub async fn $fn(
            State(s): State<AppState>,
            OrgId(org): OrgId,
            Path(id): Path<String>,
            ValidJson(req): ValidJson<$req>,
        ) -> Result<Response, ApiError> {
            let path = format!("{}{}", cove_proto::routes::FS_PREFIX, $op);
            forward_json(&s, &org, &id, Method::POST, &path, Some(&req)).await
        }
    };
}

json_op!(ls, "ls", LsRequest, "List a directory.", ok = (200, "Entries", LsResponse));
json_op!(
    stat,
    "stat",
    StatRequest,
    "Metadata of a path (not following a final symlink).",
    ok = (200, "File info", FileInfo)
);
json_op!(mkdir, "mkdir", MkdirRequest, "Create a directory.", ok = (204, "Created"));
json_op!(
    read_file,
    "read-file",
    ReadFileRequest,
    "Read a file's raw bytes: whole, a byte range (offset, limit) or the first/last lines (head, tail).",
    ok = (200, "File bytes (application/octet-stream)")
);
json_op!(
    read_files,
    "read-files",
    ReadFilesRequest,
    "Read several files as multipart/form-data, one part per path.",
    ok = (200, "Multipart body")
);
json_op!(delete, "delete", DeleteRequest, "Delete a file or directory.", ok = (204, "Deleted"));
json_op!(
    set_permissions,
    "set-permissions",
    SetPermissionsRequest,
    "Change mode, owner or group.",
    ok = (204, "Changed")
);
json_op!(
    glob,
    "glob",
    GlobRequest,
    "Paths under a directory matching a glob.",
    ok = (200, "Matching paths", GlobResponse)
);
json_op!(
    grep,
    "grep",
    GrepRequest,
    "Lines matching a pattern in files under a directory.",
    ok = (200, "Matches", GrepResponse)
);
json_op!(
    edit_file,
    "edit-file",
    EditFileRequest,
    "Find-and-replace edits in one file; answers a unified diff.",
    ok = (200, "Diff and count", EditFileResponse)
);
json_op!(
    edit_files,
    "edit-files",
    EditFilesRequest,
    "One find-and-replace across several files.",
    ok = (200, "Per-file results", EditFilesResponse)
);
json_op!(move_path, "move", MoveRequest, "Move or rename.", ok = (204, "Moved"));
json_op!(copy, "copy", CopyRequest, "Copy a file or directory.", ok = (204, "Copied"));
json_op!(exists, "exists", ExistsRequest, "Whether a path exists.", ok = (200, "Answer", ExistsResponse));
json_op!(tree, "tree", TreeRequest, "A directory tree.", ok = (200, "Tree", TreeResponse));

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/filesystem/write-file", tag = "Filesystem",
    description = "Write one file; the body is its raw bytes. Parent directories are created.",
    params(("sandboxID" = String, Path, description = "Sandbox id"), WriteFileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 204, description = "Written"),
        (status = 400, description = "Invalid request", body = ValidationErrorResponse),
        (status = 404, description = "No such sandbox", body = ErrorResponse)))]
pub async fn write_file(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
    query: Result<Query<WriteFileQuery>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|_| ApiError::field("path", "query parameter path is required"))?;
    q.validate().map_err(ApiError::Invalid)?;
    let agent = s.core.agent(&org, &id).await?;
    let uri = format!("{}write-file?{}", cove_proto::routes::FS_PREFIX, req.uri().query().unwrap_or(""));
    forward(agent, Method::POST, uri, None, stream(req.into_body())).await
}

#[utoipa::path(post, path = "/v1/sandbox/{sandboxID}/filesystem/write-files", tag = "Filesystem",
    description = "Write several files from multipart/form-data: each part's name is a path, its body the bytes.",
    params(("sandboxID" = String, Path, description = "Sandbox id")),
    request_body(content = String, content_type = "multipart/form-data"),
    responses(
        (status = 204, description = "Written"),
        (status = 400, description = "Invalid request", body = ValidationErrorResponse),
        (status = 404, description = "No such sandbox", body = ErrorResponse)))]
pub async fn write_files(
    State(s): State<AppState>,
    OrgId(org): OrgId,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let ct = req.headers().get(header::CONTENT_TYPE).cloned();
    let is_multipart =
        ct.as_ref().and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("multipart/form-data"));
    if !is_multipart {
        return Err(ApiError::field("body", "must be multipart/form-data"));
    }
    let agent = s.core.agent(&org, &id).await?;
    let uri = format!("{}write-files", cove_proto::routes::FS_PREFIX);
    forward(agent, Method::POST, uri, ct, stream(req.into_body())).await
}
