//! Prometheus metrics, in the text exposition format, at `GET /metrics` on a listener of its
//! own (`cove server --metrics-listen`): they describe every organization's sandboxes, so they
//! are not on the API's port.
//!
//! - `cove_sandboxes{state}`: sandboxes by state, read from the store at each scrape.
//! - `cove_http_request_duration_seconds{method,route,status}`: API operations, from request to
//!   response head (a followed stream or a terminal counts until its head), by route template.
//! - `cove_sandbox_operation_seconds{operation,outcome}`: every pause and resume, including those
//!   no API call names (a guest request resuming a paused sandbox, a timeout pausing one).
//! - `cove_image_bytes_total{kind}`: bytes stored by pauses and snapshots, and read by resumes.
//! - `cove_egress_decisions_total{protocol,decision}`: the host's decisions on guest traffic.
//! - `cove_mount_s3_requests_total{kind}`, `cove_mount_bytes_fetched_total`: bucket mounts.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use cove_api::sandbox::SandboxState;
use cove_net::decisions::Decision;

use crate::AppState;

/// Upper bounds of the latency histograms' buckets, seconds.
const BOUNDS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

#[derive(Default, Clone)]
struct Histogram {
    /// Observations at or under each bound (not cumulative; summed when written).
    buckets: [u64; BOUNDS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BOUNDS.iter().position(|b| secs <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += secs;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, n) in BOUNDS.iter().zip(self.buckets) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// What a lifecycle operation stored or read.
#[derive(Debug, Clone, Copy)]
pub enum ImageBytes {
    Pause,
    Snapshot,
    Resume,
}

impl ImageBytes {
    const ALL: [ImageBytes; 3] = [ImageBytes::Pause, ImageBytes::Snapshot, ImageBytes::Resume];
    fn label(self) -> &'static str {
        match self {
            ImageBytes::Pause => "pause_stored",
            ImageBytes::Snapshot => "snapshot_stored",
            ImageBytes::Resume => "resume_read",
        }
    }
}

/// The server's own measurements (the rest is read at scrape time from where it lives).
#[derive(Default)]
pub struct Metrics {
    /// (method, route template, status) → latency.
    http: Mutex<BTreeMap<(String, String, u16), Histogram>>,
    /// (operation, outcome) → latency.
    operations: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    image_bytes: [AtomicU64; ImageBytes::ALL.len()],
}

impl Metrics {
    /// A pause or resume (`operation`) that took `d`.
    pub fn operation(&self, operation: &'static str, ok: bool, d: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        lock(&self.operations).entry((operation, outcome)).or_default().observe(d);
    }

    pub fn image_bytes(&self, kind: ImageBytes, bytes: u64) {
        self.image_bytes[kind as usize].fetch_add(bytes, Ordering::Relaxed);
    }

    fn request(&self, method: &str, route: &str, status: u16, d: Duration) {
        let key = (method.to_string(), route.to_string(), status);
        lock(&self.http).entry(key).or_default().observe(d);
    }

    /// The exposition text; `states` are the store's counts of sandboxes by state.
    pub fn render(&self, states: &[(String, u64)]) -> String {
        let mut out = String::new();
        header(&mut out, "cove_sandboxes", "gauge", "Sandboxes by state.");
        for state in SandboxState::ALL {
            let n = states.iter().find(|(s, _)| s == state.as_str()).map_or(0, |(_, n)| *n);
            let _ = writeln!(out, "cove_sandboxes{{state=\"{}\"}} {n}", state.as_str());
        }

        let name = "cove_http_request_duration_seconds";
        header(&mut out, name, "histogram", "API requests, to the response head, by route template.");
        for ((method, route, status), h) in lock(&self.http).iter() {
            let labels =
                format!("method=\"{}\",route=\"{}\",status=\"{status}\"", escape(method), escape(route));
            h.write(&mut out, name, &labels);
        }

        let name = "cove_sandbox_operation_seconds";
        header(&mut out, name, "histogram", "Pauses and resumes, whatever asked for them.");
        for ((operation, outcome), h) in lock(&self.operations).iter() {
            h.write(&mut out, name, &format!("operation=\"{operation}\",outcome=\"{outcome}\""));
        }

        let name = "cove_image_bytes_total";
        header(
            &mut out,
            name,
            "counter",
            "Bytes of sandbox images stored by pauses and snapshots, read by resumes.",
        );
        for kind in ImageBytes::ALL {
            let n = self.image_bytes[kind as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{kind=\"{}\"}} {n}", kind.label());
        }

        let name = "cove_egress_decisions_total";
        header(
            &mut out,
            name,
            "counter",
            "The host's decisions on guest DNS questions, TLS connections and HTTP requests.",
        );
        for d in Decision::ALL {
            let (protocol, decision) = d.labels();
            let _ = writeln!(out, "{name}{{protocol=\"{protocol}\",decision=\"{decision}\"}} {}", d.count());
        }

        let mounts = cove_mount::process_stats();
        let name = "cove_mount_s3_requests_total";
        header(&mut out, name, "counter", "Requests bucket mounts made to their object stores.");
        for (kind, n) in
            [("list", mounts.list_requests), ("head", mounts.head_requests), ("get", mounts.get_requests)]
        {
            let _ = writeln!(out, "{name}{{kind=\"{kind}\"}} {n}");
        }
        let name = "cove_mount_bytes_fetched_total";
        header(&mut out, name, "counter", "Object bytes bucket mounts fetched.");
        let _ = writeln!(out, "{name} {}", mounts.bytes_fetched);
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the exposition format quotes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Times every routed API request (a route layer: unrouted requests and the invoke route's
/// traffic are not API operations).
pub(crate) async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    let method = req.method().clone();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    if let Some(route) = route {
        s.core.metrics.request(method.as_str(), &route, resp.status().as_u16(), started.elapsed());
    }
    resp
}

/// The metrics listener's router.
pub fn router(core: std::sync::Arc<crate::Core>) -> Router {
    Router::new().route("/metrics", get(scrape)).with_state(AppState { core })
}

async fn scrape(State(s): State<AppState>) -> Response {
    match s.core.store.count_by_state() {
        Ok(states) => {
            ([("content-type", "text/plain; version=0.0.4")], s.core.metrics.render(&states)).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: reading sandbox counts");
            axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labelled() {
        let m = Metrics::default();
        m.request("POST", "/v1/sandbox/{sandboxID}/pause", 201, Duration::from_millis(3));
        m.request("POST", "/v1/sandbox/{sandboxID}/pause", 201, Duration::from_millis(700));
        m.request("POST", "/v1/sandbox/{sandboxID}/pause", 201, Duration::from_secs(400));
        m.operation("resume", true, Duration::from_millis(90));
        m.image_bytes(ImageBytes::Pause, 1234);
        let text = m.render(&[("running".into(), 2)]);
        let labels = r#"method="POST",route="/v1/sandbox/{sandboxID}/pause",status="201""#;
        for line in [
            "cove_sandboxes{state=\"running\"} 2".to_string(),
            "cove_sandboxes{state=\"paused\"} 0".to_string(),
            format!("cove_http_request_duration_seconds_bucket{{{labels},le=\"0.0025\"}} 0"),
            format!("cove_http_request_duration_seconds_bucket{{{labels},le=\"0.005\"}} 1"),
            format!("cove_http_request_duration_seconds_bucket{{{labels},le=\"1\"}} 2"),
            format!("cove_http_request_duration_seconds_bucket{{{labels},le=\"300\"}} 2"),
            format!("cove_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} 3"),
            format!("cove_http_request_duration_seconds_count{{{labels}}} 3"),
            "cove_sandbox_operation_seconds_count{operation=\"resume\",outcome=\"ok\"} 1".to_string(),
            "cove_image_bytes_total{kind=\"pause_stored\"} 1234".to_string(),
            "cove_image_bytes_total{kind=\"resume_read\"} 0".to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // Every sample line belongs to a declared metric family.
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let family =
                ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
            assert!(families.contains(&name) || families.contains(&family), "{l}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
