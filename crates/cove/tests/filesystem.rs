//! Real-VM tests of the filesystem endpoints: every call goes through the HTTP API to the guest
//! agent, and its effect is checked from inside the guest with `process/execute`.

mod common;

use std::future::Future;

use bytes::Bytes;
use common::{assert_field, fields, Api, Resp, TestServer};
use futures::FutureExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Runs `body` against a fresh sandbox of a fresh organization, and deletes the sandbox
/// afterwards, also when `body` panics.
async fn with_sandbox<F, Fut>(body: F)
where
    F: FnOnce(Api, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let api = TestServer::shared().new_org(Some(2));
    let id = api.create(json!({})).await;
    let outcome = std::panic::AssertUnwindSafe(body(api.clone(), id.clone())).catch_unwind().await;
    let r = api.delete(&format!("/v1/sandbox/{id}")).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert_eq!(r.status, 204, "deleting {id}: {}", r.text());
}

/// Runs a shell command in the guest; panics unless it exits 0. Returns its stdout.
async fn sh(api: &Api, id: &str, command: &str) -> String {
    let (code, out, err) = api.exec(id, command).await;
    assert_eq!(code, 0, "`{command}` failed: {out}{err}");
    out
}

/// `stat -c '%a %U %G'` of a guest path.
async fn mode_owner(api: &Api, id: &str, path: &str) -> String {
    sh(api, id, &format!("stat -c '%a %U %G' '{path}'")).await.trim().to_string()
}

async fn write_file(api: &Api, id: &str, path: &str, permissions: Option<&str>, data: Vec<u8>) -> Resp {
    let mut query = vec![("path", path)];
    if let Some(p) = permissions {
        query.push(("permissions", p));
    }
    let r = api
        .http
        .post(format!("{}/v1/sandbox/{id}/filesystem/write-file", api.url))
        .query(&query)
        .header("content-type", "application/octet-stream")
        .body(data);
    api.raw(r).await
}

async fn put(api: &Api, id: &str, path: &str, data: &str) {
    let r = write_file(api, id, path, None, data.as_bytes().to_vec()).await;
    assert_eq!(r.status, 204, "write-file {path}: {}", r.text());
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a multipart answer into (part name, file name, bytes).
async fn multipart_parts(r: &Resp) -> Vec<(String, Option<String>, Bytes)> {
    assert!(r.content_type.starts_with("multipart/form-data"), "content-type {:?}", r.content_type);
    let boundary = multer::parse_boundary(&r.content_type).expect("boundary");
    let body = Bytes::from(r.body.clone());
    let stream = futures::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut mp = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    while let Some(field) = mp.next_field().await.expect("multipart field") {
        let name = field.name().unwrap_or_default().to_string();
        let file_name = field.file_name().map(str::to_owned);
        parts.push((name, file_name, field.bytes().await.expect("part bytes")));
    }
    parts
}

/// Names of `ls` items.
fn names(v: &Value) -> Vec<String> {
    v["items"].as_array().expect("items").iter().map(|i| i["name"].as_str().unwrap().to_string()).collect()
}

fn paths(v: &Value) -> Vec<String> {
    v["items"].as_array().expect("items").iter().map(|i| i["path"].as_str().unwrap().to_string()).collect()
}

fn strings(v: &Value) -> Vec<String> {
    v["items"].as_array().expect("items").iter().map(|i| i.as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn write_and_read_files() {
    with_sandbox(write_and_read_files_in).await;
}

async fn write_and_read_files_in(api: Api, id: String) {
    // 5 MiB of random bytes, with NULs for sure.
    let mut data = vec![0u8; 5 << 20];
    rand::Rng::fill(&mut rand::thread_rng(), &mut data[..]);
    for i in (0..data.len()).step_by(4099) {
        data[i] = 0;
    }
    let big = "/home/user/big/data.bin";
    let r = write_file(&api, &id, big, Some("0640"), data.clone()).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let out = sh(&api, &id, &format!("sha256sum {big}; stat -c '%s %a %U %G' {big} /home/user/big")).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("{}  {big}", sha256_hex(&data)), "{out}");
    assert_eq!(lines[1], format!("{} 640 user user", data.len()));
    assert_eq!(lines[2].split_once(' ').unwrap().1, "755 user user", "parent made for the file");

    let r = api.fs(&id, "read-file", json!({ "path": big })).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.content_type, "application/octet-stream");
    assert_eq!(r.body.len(), data.len());
    assert!(r.body == data, "read-file does not give back the bytes written");

    // Byte ranges.
    let r = api.fs(&id, "read-file", json!({ "path": big, "offset": 1000, "limit": 4096 })).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body[..] == data[1000..5096]);
    let tail_from = data.len() as u64 - 10;
    let r = api.fs(&id, "read-file", json!({ "path": big, "offset": tail_from })).await;
    assert!(r.body[..] == data[data.len() - 10..]);
    let r = api.fs(&id, "read-file", json!({ "path": big, "limit": 3 })).await;
    assert!(r.body[..] == data[..3]);
    let r = api.fs(&id, "read-file", json!({ "path": big, "offset": data.len() as u64 + 5 })).await;
    assert_eq!((r.status, r.body.len()), (200, 0), "offset past the end");

    // Lines. A path relative to the home directory works too.
    put(&api, &id, "lines.txt", "l1\nl2\nl3\nl4\nl5\n").await;
    assert_eq!(sh(&api, &id, "cat /home/user/lines.txt").await, "l1\nl2\nl3\nl4\nl5\n");
    let read = |body: Value| {
        let api = api.clone();
        let id = id.clone();
        async move {
            let r = api.fs(&id, "read-file", body).await;
            assert_eq!(r.status, 200, "{}", r.text());
            r.text()
        }
    };
    assert_eq!(read(json!({ "path": "/home/user/lines.txt", "head": 2 })).await, "l1\nl2\n");
    assert_eq!(read(json!({ "path": "/home/user/lines.txt", "tail": 2 })).await, "l4\nl5\n");
    assert_eq!(read(json!({ "path": "lines.txt", "head": 99 })).await, "l1\nl2\nl3\nl4\nl5\n");
    assert_eq!(read(json!({ "path": "lines.txt", "tail": 1 })).await, "l5\n");

    // Overwriting keeps the mode unless one is given; a new file without one is 644.
    assert_eq!(mode_owner(&api, &id, "/home/user/lines.txt").await, "644 user user");
    let r =
        write_file(&api, &id, "/home/user/lines.txt", Some("0755"), b"#!/bin/sh\necho ran\n".to_vec()).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(mode_owner(&api, &id, "/home/user/lines.txt").await, "755 user user");
    assert_eq!(sh(&api, &id, "/home/user/lines.txt").await, "ran\n");
    put(&api, &id, "/home/user/lines.txt", "short").await;
    assert_eq!(
        sh(&api, &id, "cat /home/user/lines.txt; echo; stat -c %a /home/user/lines.txt").await,
        "short\n755\n"
    );
    let r = write_file(&api, &id, "/home/user/empty", None, Vec::new()).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(sh(&api, &id, "stat -c '%s %U' /home/user/empty").await, "0 user\n");

    // write-files: multipart, each part named by its path (sent as is, `name="/a/b"`).
    use reqwest::multipart::{Form, Part};
    let write_files = |form: Form| {
        let api = api.clone();
        let id = id.clone();
        async move {
            let url = format!("{}/v1/sandbox/{id}/filesystem/write-files", api.url);
            api.raw(api.http.post(url).multipart(form)).await
        }
    };
    let bin: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let form = Form::new()
        .percent_encode_noop()
        .part("/home/user/multi/a.txt", Part::text("alpha\n").file_name("a.txt"))
        .part("/home/user/multi/deep/er/b.bin", Part::bytes(bin.clone()).file_name("b.bin"))
        .part("multi/c.txt", Part::text("gamma"));
    let r = write_files(form).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let out = sh(
        &api,
        &id,
        "cd /home/user/multi && cat a.txt c.txt && echo && sha256sum deep/er/b.bin && \
             stat -c '%n %a %U %G' a.txt c.txt deep deep/er deep/er/b.bin",
    )
    .await;
    assert_eq!(
        out,
        format!(
            "alpha\ngamma\n{}  deep/er/b.bin\na.txt 644 user user\nc.txt 644 user user\ndeep 755 user user\n\
                 deep/er 755 user user\ndeep/er/b.bin 644 user user\n",
            sha256_hex(&bin)
        )
    );

    // reqwest's default encoding sends such names as RFC 5987 `name*=utf-8''%2F...`.
    let form = Form::new()
        .part("/home/user/multi/enc oded.txt", Part::text("d").file_name("ignored.txt"))
        .part("multi/e+f.txt", Part::text("e"));
    let r = write_files(form).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let out = sh(&api, &id, "cd /home/user/multi && cat 'enc oded.txt' e+f.txt; ls /home/user").await;
    assert!(out.starts_with("de"), "{out}");
    assert!(!out.contains("ignored.txt"), "written under the file name instead of the part name: {out}");

    // read-files: a multipart answer, one part per path, named by the path.
    let r = api
        .fs(&id, "read-files", json!({ "paths": ["/home/user/multi/a.txt", "multi/deep/er/b.bin", big] }))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let parts = multipart_parts(&r).await;
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0].0, "/home/user/multi/a.txt");
    assert_eq!(parts[0].1.as_deref(), Some("a.txt"));
    assert_eq!(&parts[0].2[..], b"alpha\n");
    assert_eq!(parts[1].0, "multi/deep/er/b.bin");
    assert!(parts[1].2[..] == bin[..]);
    assert_eq!(parts[2].0, big);
    assert_eq!(parts[2].2.len(), data.len());
    assert!(parts[2].2[..] == data[..], "read-files corrupts the big file");
    let r = api
        .fs(&id, "read-files", json!({ "paths": ["/home/user/multi/a.txt", "/home/user/nope.txt"] }))
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("nope.txt"), "{}", r.text());

    // Errors.
    let r = api.fs(&id, "read-file", json!({ "path": "/home/user/absent" })).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.json()["message"].is_string());
    let r = api.fs(&id, "read-file", json!({ "path": "/home/user/multi" })).await;
    assert_eq!(r.status, 400, "reading a directory: {}", r.text());
    let r = api.fs(&id, "read-files", json!({ "paths": ["/home/user/multi"] })).await;
    assert_eq!(r.status, 400, "reading a directory: {}", r.text());
    assert_field(&api.fs(&id, "read-file", json!({ "path": "" })).await, "path");
    assert_field(&api.fs(&id, "read-file", json!({ "path": big, "head": 1, "tail": 1 })).await, "tail");
    assert_field(&api.fs(&id, "read-file", json!({ "path": big, "head": 1, "offset": 1 })).await, "offset");
    assert_field(&api.fs(&id, "read-file", json!({ "path": big, "offset": -1 })).await, "offset");
    assert_field(&api.fs(&id, "read-files", json!({ "paths": [] })).await, "paths");
    assert_field(&api.fs(&id, "read-files", json!({ "paths": ["a", ""] })).await, "paths[1]");
    assert_field(&write_file(&api, &id, "", None, b"x".to_vec()).await, "path");
    // A file where a parent directory should be, or a directory where the file should be.
    let r = write_file(&api, &id, "/home/user/lines.txt/inner", None, b"x".to_vec()).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = write_file(&api, &id, "/home/user/multi", None, b"x".to_vec()).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(sh(&api, &id, "test -d /home/user/multi && cat /home/user/lines.txt").await, "short");
    assert_field(&write_file(&api, &id, "/home/user/x", Some("999"), b"x".to_vec()).await, "permissions");
    let r =
        api.raw(api.http.post(format!("{}/v1/sandbox/{id}/filesystem/write-file", api.url)).body("x")).await;
    assert_field(&r, "path");
    let r = api
        .raw(
            api.http
                .post(format!("{}/v1/sandbox/{id}/filesystem/write-files", api.url))
                .header("content-type", "application/json")
                .body("{}"),
        )
        .await;
    assert_field(&r, "body");
    // A failed write leaves nothing behind.
    assert_eq!(sh(&api, &id, "test -e /home/user/x || echo absent").await, "absent\n");
}

#[tokio::test]
async fn directories_and_paths() {
    with_sandbox(directories_and_paths_in).await;
}

async fn directories_and_paths_in(api: Api, id: String) {
    let w = "/home/user/w";
    let fs = |op: &'static str, body: Value| {
        let api = api.clone();
        let id = id.clone();
        async move { api.fs(&id, op, body).await }
    };
    let ok = |op: &'static str, body: Value, status: u16| {
        // `fs` only borrows, so it is Copy.
        async move {
            let r = fs(op, body.clone()).await;
            assert_eq!(r.status, status, "{op} {body}: {}", r.text());
            r
        }
    };

    // mkdir
    let r = fs("mkdir", json!({ "path": format!("{w}/a/b/c") })).await;
    assert_eq!(r.status, 404, "mkdir without parents: {}", r.text());
    ok("mkdir", json!({ "path": format!("{w}/a/b/c"), "recursive": true, "permissions": "700" }), 204).await;
    assert_eq!(mode_owner(&api, &id, &format!("{w}/a/b/c")).await, "700 user user");
    assert_eq!(mode_owner(&api, &id, &format!("{w}/a")).await, "755 user user");
    ok("mkdir", json!({ "path": format!("{w}/a/b/c"), "recursive": true }), 204).await;
    let r = ok("mkdir", json!({ "path": format!("{w}/a/b/c") }), 409).await;
    assert!(r.json()["message"].is_string());
    ok("mkdir", json!({ "path": format!("{w}/plain") }), 204).await;
    assert_eq!(mode_owner(&api, &id, &format!("{w}/plain")).await, "755 user user");
    assert_field(
        &fs("mkdir", json!({ "path": format!("{w}/m"), "permissions": "rwx" })).await,
        "permissions",
    );

    // A small project.
    put(&api, &id, &format!("{w}/src/main.rs"), "fn main() {\n    println!(\"hello\");\n}\n").await;
    put(&api, &id, &format!("{w}/src/lib.rs"), "pub fn hello() -> &'static str {\n    \"hello\"\n}\n").await;
    put(&api, &id, &format!("{w}/src/util/mod.rs"), "// nothing to see\n").await;
    put(&api, &id, &format!("{w}/README.md"), "# hello project\nsay hello\n").await;
    put(&api, &id, &format!("{w}/node_modules/pkg/index.rs"), "hello from deps\n").await;
    ok("mkdir", json!({ "path": format!("{w}/node_modules/empty") }), 204).await;
    sh(&api, &id, &format!("cd {w} && ln -s src/main.rs link && ln -s /nowhere dangling")).await;

    // ls
    let r = ok("ls", json!({ "path": w }), 200).await;
    let v = r.json();
    assert_eq!(names(&v), ["README.md", "a", "dangling", "link", "node_modules", "plain", "src"]);
    let readme = &v["items"][0];
    assert_eq!(readme["path"], format!("{w}/README.md"));
    assert_eq!((readme["is_dir"].as_bool(), readme["size"].as_u64()), (Some(false), Some(26)));
    assert_eq!(
        (readme["mode"].as_str(), readme["owner"].as_str(), readme["group"].as_str()),
        (Some("644"), Some("user"), Some("user"))
    );
    assert_eq!(readme["is_symlink"], false);
    assert!(readme["mtime"].as_i64().unwrap() > 1_600_000_000);
    let src = v["items"].as_array().unwrap().iter().find(|i| i["name"] == "src").unwrap();
    assert_eq!(src["is_dir"], true);
    let r = ok("ls", json!({ "path": w, "recursive": true, "exclude": ["node_modules", "a"] }), 200).await;
    let listed = paths(&r.json());
    for p in ["README.md", "src", "src/main.rs", "src/util", "src/util/mod.rs", "link"] {
        assert!(listed.contains(&format!("{w}/{p}")), "{p} missing from recursive ls: {listed:?}");
    }
    assert!(
        !listed.iter().any(|p| p.contains("node_modules") || p.starts_with(&format!("{w}/a"))),
        "{listed:?}"
    );
    let r = ok("ls", json!({ "path": w, "recursive": true }), 200).await;
    assert!(paths(&r.json()).contains(&format!("{w}/node_modules/pkg/index.rs")));
    let r = ok("ls", json!({ "path": format!("{w}/src"), "exclude": ["*.rs"] }), 200).await;
    assert_eq!(names(&r.json()), ["util"]);
    ok("ls", json!({ "path": format!("{w}/missing") }), 404).await;
    // Relative paths are taken from the home directory, and answered as clean paths.
    let r = ok("ls", json!({ "path": "./w/src/." }), 200).await;
    assert_eq!(
        paths(&r.json()),
        [format!("{w}/src/lib.rs"), format!("{w}/src/main.rs"), format!("{w}/src/util")]
    );
    assert_field(&fs("ls", json!({ "path": "" })).await, "path");
    assert_field(&fs("ls", json!({ "path": w, "exclude": ["[x"] })).await, "exclude[0]");

    // stat, including a symlink (not followed)
    let r = ok("stat", json!({ "path": format!("{w}/src/main.rs") }), 200).await;
    let v = r.json();
    assert_eq!(
        (v["name"].as_str(), v["size"].as_u64(), v["is_dir"].as_bool()),
        (Some("main.rs"), Some(37), Some(false))
    );
    assert_eq!(v["is_symlink"], false);
    assert!(v.get("link_target").is_none_or(Value::is_null), "{v}");
    let r = ok("stat", json!({ "path": format!("{w}/link") }), 200).await;
    let v = r.json();
    assert_eq!(
        (v["is_symlink"].as_bool(), v["link_target"].as_str()),
        (Some(true), Some("src/main.rs")),
        "{v}"
    );
    assert_eq!(v["is_dir"], false);
    let r = ok("stat", json!({ "path": format!("{w}/dangling") }), 200).await;
    assert_eq!(r.json()["link_target"], "/nowhere");
    let r = ok("stat", json!({ "path": w }), 200).await;
    assert_eq!((r.json()["is_dir"].as_bool(), r.json()["mode"].as_str()), (Some(true), Some("755")));
    ok("stat", json!({ "path": format!("{w}/missing") }), 404).await;

    // exists
    for (p, want) in
        [("src/main.rs", true), ("dangling", true), ("src", true), ("nope", false), ("src/main.rs/x", false)]
    {
        let r = ok("exists", json!({ "path": format!("{w}/{p}") }), 200).await;
        assert_eq!(r.json(), json!({ "exists": want }), "{p}");
    }
    assert_field(&fs("exists", json!({ "path": "" })).await, "path");

    // tree
    let r = ok("tree", json!({ "path": w, "exclude": ["node_modules"] }), 200).await;
    let v = r.json();
    let top = names(&v);
    assert_eq!(top, ["README.md", "a", "dangling", "link", "plain", "src"]);
    let src = v["items"].as_array().unwrap().iter().find(|e| e["name"] == "src").unwrap();
    assert_eq!(src["type"], "directory");
    let util = src["children"].as_array().unwrap().iter().find(|e| e["name"] == "util").unwrap();
    assert_eq!(util["children"][0], json!({ "name": "mod.rs", "type": "file" }));
    let readme = &v["items"][0];
    assert_eq!(readme["type"], "file");
    assert!(readme.get("children").is_none_or(Value::is_null));
    let r = ok("tree", json!({ "path": w, "max_depth": 1 }), 200).await;
    let v = r.json();
    assert_eq!(names(&v).len(), 7);
    assert!(
        v["items"].as_array().unwrap().iter().all(|e| e.get("children").is_none_or(Value::is_null)),
        "{v}"
    );
    let r = ok("tree", json!({ "path": w, "max_depth": 2 }), 200).await;
    let v = r.json();
    let a = v["items"].as_array().unwrap().iter().find(|e| e["name"] == "a").unwrap();
    assert_eq!(a["children"][0]["name"], "b");
    assert!(a["children"][0].get("children").is_none_or(Value::is_null), "max_depth 2 went deeper: {a}");
    ok("tree", json!({ "path": format!("{w}/missing") }), 404).await;

    // glob: a name pattern matches at any depth, a path pattern relative to the base
    let r = ok("glob", json!({ "path": w, "pattern": "*.rs", "exclude": ["node_modules"] }), 200).await;
    let want: Vec<String> =
        ["src/lib.rs", "src/main.rs", "src/util/mod.rs"].iter().map(|p| format!("{w}/{p}")).collect();
    assert_eq!(strings(&r.json()), want);
    let r = ok("glob", json!({ "path": w, "pattern": "src/*.rs" }), 200).await;
    assert_eq!(strings(&r.json()), [format!("{w}/src/lib.rs"), format!("{w}/src/main.rs")]);
    let r = ok("glob", json!({ "path": w, "pattern": "**/*.rs" }), 200).await;
    assert_eq!(strings(&r.json()).len(), 4, "{}", r.text());
    let r = ok("glob", json!({ "path": w, "pattern": "*.md" }), 200).await;
    assert_eq!(strings(&r.json()), [format!("{w}/README.md")]);
    let r = ok("glob", json!({ "path": w, "pattern": "*.none" }), 200).await;
    assert_eq!(r.json(), json!({ "items": [] }));
    assert_field(&fs("glob", json!({ "path": w, "pattern": "[" })).await, "pattern");

    // grep
    let r = ok(
        "grep",
        json!({ "path": w, "pattern": "hello", "include": "*.rs", "exclude": ["node_modules"] }),
        200,
    )
    .await;
    let hits: Vec<(String, u64, String)> = r.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["path"].as_str().unwrap().to_string(),
                m["line"].as_u64().unwrap(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        hits,
        [
            (format!("{w}/src/lib.rs"), 1, "pub fn hello() -> &'static str {".to_string()),
            (format!("{w}/src/lib.rs"), 2, "    \"hello\"".to_string()),
            (format!("{w}/src/main.rs"), 2, "    println!(\"hello\");".to_string()),
        ]
    );
    let r = ok("grep", json!({ "path": w, "pattern": "hello" }), 200).await;
    let files: Vec<String> = r.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["path"].as_str().unwrap().to_string())
        .collect();
    assert!(
        files.contains(&format!("{w}/README.md"))
            && files.contains(&format!("{w}/node_modules/pkg/index.rs")),
        "{files:?}"
    );
    let r = ok("grep", json!({ "path": w, "pattern": "^say \\w+$", "include": "*.md" }), 200).await;
    assert_eq!(
        r.json()["items"],
        json!([{ "path": format!("{w}/README.md"), "line": 2, "content": "say hello" }])
    );
    let r =
        ok("grep", json!({ "path": w, "pattern": "hello", "exclude": ["src", "node_modules", "*.md"] }), 200)
            .await;
    assert_eq!(r.json(), json!({ "items": [] }));
    assert_field(&fs("grep", json!({ "path": w })).await, "pattern");
    assert_field(&fs("grep", json!({ "path": w, "pattern": "x", "include": "[" })).await, "include");

    // move
    ok("move", json!({ "src_path": format!("{w}/README.md"), "dst_path": format!("{w}/docs.md") }), 204)
        .await;
    assert_eq!(
        sh(&api, &id, &format!("test ! -e {w}/README.md && cat {w}/docs.md")).await,
        "# hello project\nsay hello\n"
    );
    put(&api, &id, &format!("{w}/other.md"), "other\n").await;
    let r =
        ok("move", json!({ "src_path": format!("{w}/other.md"), "dst_path": format!("{w}/docs.md") }), 409)
            .await;
    assert!(r.json()["message"].is_string());
    assert_eq!(
        sh(&api, &id, &format!("cat {w}/docs.md {w}/other.md")).await,
        "# hello project\nsay hello\nother\n"
    );
    ok(
        "move",
        json!({ "src_path": format!("{w}/other.md"), "dst_path": format!("{w}/docs.md"), "overwrite": true }),
        204,
    )
    .await;
    assert_eq!(sh(&api, &id, &format!("test ! -e {w}/other.md && cat {w}/docs.md")).await, "other\n");
    ok("move", json!({ "src_path": format!("{w}/plain"), "dst_path": format!("{w}/src/moved") }), 204).await;
    assert_eq!(
        sh(&api, &id, &format!("test -d {w}/src/moved && test ! -e {w}/plain && echo ok")).await,
        "ok\n"
    );
    ok("move", json!({ "src_path": format!("{w}/missing"), "dst_path": format!("{w}/x") }), 404).await;
    assert_field(&fs("move", json!({ "src_path": "", "dst_path": "x" })).await, "src_path");

    // copy
    ok("copy", json!({ "src_path": format!("{w}/src/main.rs"), "dst_path": format!("{w}/main.copy") }), 204)
        .await;
    assert_eq!(sh(&api, &id, &format!("cmp {w}/src/main.rs {w}/main.copy && echo same")).await, "same\n");
    // A copy of a root-owned file belongs to the user.
    ok("copy", json!({ "src_path": "/etc/os-release", "dst_path": format!("{w}/os-release") }), 204).await;
    assert_eq!(mode_owner(&api, &id, &format!("{w}/os-release")).await, "644 user user");
    let r = ok("copy", json!({ "src_path": format!("{w}/src"), "dst_path": format!("{w}/src2") }), 400).await;
    assert!(r.json()["message"].as_str().unwrap().contains("recursive"), "{}", r.text());
    // The guest agent names the field at fault, not just the path.
    assert_field(&r, "recursive");
    ok(
        "copy",
        json!({ "src_path": format!("{w}/src"), "dst_path": format!("{w}/src2"), "recursive": true }),
        204,
    )
    .await;
    assert_eq!(
        sh(&api, &id, &format!("cd {w}/src2 && find . | sort && diff -r {w}/src {w}/src2 && echo same"))
            .await,
        ".\n./lib.rs\n./main.rs\n./moved\n./util\n./util/mod.rs\nsame\n"
    );
    ok("copy", json!({ "src_path": format!("{w}/docs.md"), "dst_path": format!("{w}/main.copy") }), 409)
        .await;
    assert_eq!(
        sh(&api, &id, &format!("cmp {w}/src/main.rs {w}/main.copy && echo unchanged")).await,
        "unchanged\n"
    );
    let (src, dst) = (format!("{w}/docs.md"), format!("{w}/main.copy"));
    ok("copy", json!({ "src_path": src, "dst_path": dst, "overwrite": true }), 204).await;
    assert_eq!(sh(&api, &id, &format!("cat {w}/main.copy")).await, "other\n");
    ok(
        "copy",
        json!({ "src_path": format!("{w}/src"), "dst_path": format!("{w}/src2"), "recursive": true }),
        409,
    )
    .await;
    ok("copy", json!({ "src_path": format!("{w}/missing"), "dst_path": format!("{w}/y") }), 404).await;
    assert_field(&fs("copy", json!({ "src_path": "a", "dst_path": "" })).await, "dst_path");

    // set-permissions
    put(&api, &id, &format!("{w}/perm.txt"), "p").await;
    ok("set-permissions", json!({ "path": format!("{w}/perm.txt"), "mode": "600" }), 204).await;
    assert_eq!(mode_owner(&api, &id, &format!("{w}/perm.txt")).await, "600 user user");
    ok("set-permissions", json!({ "path": format!("{w}/perm.txt"), "owner": "root", "group": "root" }), 204)
        .await;
    assert_eq!(mode_owner(&api, &id, &format!("{w}/perm.txt")).await, "600 root root");
    ok("set-permissions", json!({ "path": format!("{w}/perm.txt"), "group": "user" }), 204).await;
    assert_eq!(mode_owner(&api, &id, &format!("{w}/perm.txt")).await, "600 root user");
    ok("set-permissions", json!({ "path": format!("{w}/perm.txt"), "mode": "0751", "owner": "user" }), 204)
        .await;
    assert_eq!(mode_owner(&api, &id, &format!("{w}/perm.txt")).await, "751 user user");
    ok("set-permissions", json!({ "path": format!("{w}/src2"), "mode": "700" }), 204).await;
    assert_eq!(mode_owner(&api, &id, &format!("{w}/src2")).await, "700 user user");
    ok("set-permissions", json!({ "path": format!("{w}/perm.txt"), "owner": "no-such-user" }), 400).await;
    ok("set-permissions", json!({ "path": format!("{w}/missing"), "mode": "644" }), 404).await;
    assert_field(&fs("set-permissions", json!({ "path": format!("{w}/perm.txt") })).await, "mode");
    assert_field(
        &fs("set-permissions", json!({ "path": format!("{w}/perm.txt"), "mode": "8" })).await,
        "mode",
    );

    // delete
    ok("delete", json!({ "path": format!("{w}/main.copy") }), 204).await;
    ok("delete", json!({ "path": format!("{w}/main.copy") }), 404).await;
    let r = ok("delete", json!({ "path": format!("{w}/src2") }), 400).await;
    assert!(r.json()["message"].as_str().unwrap().contains("recursive"), "{}", r.text());
    ok("delete", json!({ "path": format!("{w}/src2"), "recursive": true }), 204).await;
    ok("delete", json!({ "path": format!("{w}/a/b/c") }), 204).await;
    ok("delete", json!({ "path": format!("{w}/link") }), 204).await;
    let check = format!(
        "test ! -e {w}/src2 && test ! -e {w}/a/b/c && test ! -L {w}/link && \
         test -f {w}/src/main.rs && echo gone"
    );
    assert_eq!(sh(&api, &id, &check).await, "gone\n", "deleting a symlink must not touch its target");
    let r = ok("exists", json!({ "path": format!("{w}/src2") }), 200).await;
    assert_eq!(r.json()["exists"], false);
    assert_field(&fs("delete", json!({ "path": "" })).await, "path");
}

#[tokio::test]
async fn edits_and_request_errors() {
    with_sandbox(edits_and_request_errors_in).await;
}

async fn edits_and_request_errors_in(api: Api, id: String) {
    let f = "/home/user/e/notes.txt";
    put(&api, &id, f, "hello world\nhello again\nkeep\nbye\n").await;
    let r = api
        .fs(
            &id,
            "edit-file",
            json!({ "path": f, "edits": [
                { "find": "hello", "replace": "hi" },
                { "find": "bye\n" },
            ] }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["replacements"], 3);
    let diff = v["diff"].as_str().unwrap();
    assert!(diff.contains(&format!("--- {f}")) && diff.contains(&format!("+++ {f}")), "{diff}");
    assert!(diff.contains("@@ "), "{diff}");
    for line in ["-hello world", "-hello again", "+hi world", "+hi again", "-bye", " keep"] {
        assert!(diff.lines().any(|l| l == line), "{line:?} missing from diff:\n{diff}");
    }
    assert_eq!(sh(&api, &id, &format!("cat {f}")).await, "hi world\nhi again\nkeep\n");
    assert_eq!(mode_owner(&api, &id, f).await, "644 user user");

    // A find that is not there changes nothing.
    let r = api
        .fs(
            &id,
            "edit-file",
            json!({ "path": f, "edits": [{ "find": "keep", "replace": "x" }, { "find": "absent text" }] }),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("absent text"), "{}", r.text());
    assert_eq!(sh(&api, &id, &format!("cat {f}")).await, "hi world\nhi again\nkeep\n");
    let r = api
        .fs(&id, "edit-file", json!({ "path": "/home/user/e/none.txt", "edits": [{ "find": "a" }] }))
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    // `find` is required, and must not be empty.
    let r = api.fs(&id, "edit-file", json!({ "path": f, "edits": [{ "replace": "x" }] })).await;
    let fl = fields(&r);
    assert!(fl.iter().any(|x| x.contains("find")), "{fl:?}");
    assert_field(
        &api.fs(&id, "edit-file", json!({ "path": f, "edits": [{ "find": "" }] })).await,
        "edits[0].find",
    );
    assert_field(&api.fs(&id, "edit-file", json!({ "path": f, "edits": [] })).await, "edits");
    assert_field(&api.fs(&id, "edit-file", json!({ "path": "", "edits": [{ "find": "a" }] })).await, "path");
    assert_field(&api.fs(&id, "edit-file", json!({ "path": f })).await, "edits");

    // edit-files: one replacement over several files, a result per file.
    put(&api, &id, "/home/user/e/a.txt", "colour colour\n").await;
    put(&api, &id, "/home/user/e/b.txt", "no match here\n").await;
    put(&api, &id, "/home/user/e/c.txt", "one colour\n").await;
    let files = ["/home/user/e/a.txt", "/home/user/e/b.txt", "e/c.txt", "/home/user/e/missing.txt"];
    let r = api.fs(&id, "edit-files", json!({ "files": files, "find": "colour", "replace": "color" })).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let items = r.json()["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 4);
    let results: Vec<(&str, bool)> =
        items.iter().map(|i| (i["file"].as_str().unwrap(), i["success"].as_bool().unwrap())).collect();
    assert_eq!(results, [(files[0], true), (files[1], false), (files[2], true), (files[3], false)]);
    assert!(items[1]["error"].is_string() && items[3]["error"].is_string(), "{items:?}");
    assert!(items[0].get("error").is_none_or(Value::is_null));
    assert_eq!(
        sh(&api, &id, "cd /home/user/e && cat a.txt b.txt c.txt").await,
        "color color\nno match here\none color\n"
    );
    assert_field(&api.fs(&id, "edit-files", json!({ "files": [], "find": "a" })).await, "files");
    assert_field(&api.fs(&id, "edit-files", json!({ "files": ["a"], "find": "" })).await, "find");
    assert_field(&api.fs(&id, "edit-files", json!({ "files": ["a"] })).await, "find");

    // Malformed requests name the field at fault.
    assert_field(&api.fs(&id, "stat", json!({ "path": "" })).await, "path");
    assert_field(&api.fs(&id, "stat", json!({})).await, "path");
    assert_field(&api.fs(&id, "stat", json!({ "path": 5 })).await, "path");
    assert_field(&api.fs(&id, "ls", json!({ "path": "/", "recursive": "yes" })).await, "recursive");
    assert_field(&api.fs(&id, "tree", json!({ "path": "/", "max_depth": -1 })).await, "max_depth");
    assert_field(&api.fs(&id, "mkdir", json!({ "path": "\u{0}" })).await, "path");
    let bad_json = api
        .raw(
            api.http
                .post(format!("{}/v1/sandbox/{id}/filesystem/ls", api.url))
                .header("content-type", "application/json")
                .body("{\"path\": "),
        )
        .await;
    assert_field(&bad_json, "body");
    let no_body = api.raw(api.http.post(format!("{}/v1/sandbox/{id}/filesystem/ls", api.url))).await;
    assert_field(&no_body, "body");

    // Unknown sandboxes and operations.
    let r = api.fs("sbx-00000000000000000000", "ls", json!({ "path": "/" })).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.json()["message"].is_string());
    let r = api.fs(&id, "frobnicate", json!({ "path": "/" })).await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = api.get(&format!("/v1/sandbox/{id}/filesystem/ls")).await;
    assert_eq!(r.status, 405, "{}", r.text());
}
