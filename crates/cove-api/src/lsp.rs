//! Language servers in a sandbox: one per language and project, started on request, spoken to
//! over JSON-RPC by the agent. The same types are the guest agent's wire format.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{FieldError, Validate, Violations};

/// Language servers one sandbox may run at once.
pub const MAX_SERVERS: usize = 8;

/// The languages served, and the language server each starts.
pub const LANGUAGES: &[(&str, &str)] = &[
    ("python", "pyright"),
    ("typescript", "typescript-language-server"),
    ("javascript", "typescript-language-server"),
];

/// Which language server, for which project.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LspServerRequest {
    /// `python` (pyright), `typescript` or `javascript` (typescript-language-server).
    pub language_id: String,
    /// The project's directory in the sandbox: the server's workspace root.
    pub path_to_project: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LspSuccessResponse {
    pub success: bool,
}

/// A zero-based position in a document (`character` in UTF-16 code units, as LSP counts).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LspPosition {
    pub line: u32,
    pub character: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct LspCompletionContext {
    /// 1: invoked, 2: a trigger character, 3: re-triggered (default 1).
    #[serde(default)]
    pub trigger_kind: Option<u8>,
    #[serde(default)]
    pub trigger_character: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LspCompletionRequest {
    pub language_id: String,
    pub path_to_project: String,
    /// `file:///absolute/path`.
    pub uri: String,
    pub position: LspPosition,
    #[serde(default)]
    pub context: Option<LspCompletionContext>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LspDocumentRequest {
    pub language_id: String,
    pub path_to_project: String,
    /// `file:///absolute/path`.
    pub uri: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LspDidOpenRequest {
    pub language_id: String,
    pub path_to_project: String,
    /// `file:///absolute/path`.
    pub uri: String,
    /// The document's text; read from the file when omitted.
    #[serde(default)]
    pub text: Option<String>,
    /// Document version (default 1).
    #[serde(default)]
    pub version: Option<i64>,
}

/// The language server's JSON-RPC 2.0 answer, as it gave it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LspJsonRpcResponse {
    pub jsonrpc: String,
    #[serde(default)]
    pub id: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<LspJsonRpcError>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LspJsonRpcError {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

fn check_server(v: &mut Violations, language_id: &str, path: &str) {
    let names: Vec<&str> = LANGUAGES.iter().map(|(l, _)| *l).collect();
    v.check(names.contains(&language_id), "language_id", format!("must be one of {}", names.join(", ")));
    crate::check_path(v, "path_to_project", path);
}

fn check_uri(v: &mut Violations, uri: &str) {
    v.check(
        uri.strip_prefix("file://").is_some_and(|p| p.starts_with('/')) && !uri.contains('\0'),
        "uri",
        "must be a file:///absolute/path URI",
    );
}

impl Validate for LspServerRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_server(&mut v, &self.language_id, &self.path_to_project);
        v.finish()
    }
}

impl Validate for LspCompletionRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_server(&mut v, &self.language_id, &self.path_to_project);
        check_uri(&mut v, &self.uri);
        if let Some(kind) = self.context.as_ref().and_then(|c| c.trigger_kind) {
            v.check((1..=3).contains(&kind), "context.trigger_kind", "must be 1, 2 or 3");
        }
        v.finish()
    }
}

impl Validate for LspDocumentRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_server(&mut v, &self.language_id, &self.path_to_project);
        check_uri(&mut v, &self.uri);
        v.finish()
    }
}

impl Validate for LspDidOpenRequest {
    fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        check_server(&mut v, &self.language_id, &self.path_to_project);
        check_uri(&mut v, &self.uri);
        v.finish()
    }
}

/// The path a `file://` URI names (percent-escapes decoded).
pub fn uri_path(uri: &str) -> Option<String> {
    let raw = uri.strip_prefix("file://")?;
    let mut out = Vec::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|p| p.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_field_at_fault() {
        let bad = LspCompletionRequest {
            language_id: "cobol".into(),
            path_to_project: String::new(),
            uri: "main.py".into(),
            position: LspPosition { line: 0, character: 0 },
            context: Some(LspCompletionContext { trigger_kind: Some(9), trigger_character: None }),
        };
        let fields: Vec<String> = bad.validate().unwrap_err().into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["language_id", "path_to_project", "uri", "context.trigger_kind"]);
        let ok = LspDocumentRequest {
            language_id: "typescript".into(),
            path_to_project: "/p".into(),
            uri: "file:///p/a.ts".into(),
        };
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn file_uris_become_paths() {
        assert_eq!(uri_path("file:///home/user/a%20b.py").as_deref(), Some("/home/user/a b.py"));
        assert_eq!(uri_path("file:///x%2").as_deref(), None);
        assert_eq!(uri_path("http://x/y"), None);
    }
}
