//! Running in production: the metrics endpoint (validated with a real Prometheus parser),
//! its responsiveness while the loop is blocked, TLS with client certificates against real
//! etcd, password files, the journald log format, and (ignored) the README's measurements.
//!
//! Tools: python3 with `prometheus_client` (pip install prometheus-client, or Debian
//! python3-prometheus-client) and the openssl CLI (Debian openssl). Tests fail, never skip,
//! when one is missing; `make deps` installs them as root.

mod common;

use common::*;
use regex_lite::Regex;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// HTTP and metrics helpers

/// One plain HTTP/1.1 exchange with the metrics endpoint.
struct Http {
    status: u16,
    head: String,
    body: String,
    took: Duration,
}

/// GET `path` on 127.0.0.1:`port` over a fresh connection; None if it cannot connect or the
/// answer is not HTTP. `took` runs from before the connect to the end of the body.
fn try_get(port: u16, path: &str) -> Option<Http> {
    let t = Instant::now();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: etcdmirror-test\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let took = t.elapsed();
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some(Http {
        status,
        head: head.to_string(),
        body: body.to_string(),
        took,
    })
}

#[track_caller]
fn get(port: u16, path: &str) -> Http {
    try_get(port, path).unwrap_or_else(|| panic!("GET {path} on port {port} failed"))
}

/// Start the mirror with the metrics endpoint on a free loopback port: `--port P --listen
/// 127.0.0.1` + `args` + SRC DST. Another process may grab the port between our probe and the
/// mirror's bind; the mirror then exits 2 naming --port and we try another port.
fn start_with_metrics(args: &[&str], src: &str, dst: &str) -> (Mirror, u16) {
    start_with_metrics_env(args, src, dst, &[])
}

fn start_with_metrics_env(
    args: &[&str],
    src: &str,
    dst: &str,
    env: &[(&str, Option<&str>)],
) -> (Mirror, u16) {
    let mut last = String::new();
    for _ in 0..10 {
        let port = free_port();
        let mut all: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--listen".into(),
            "127.0.0.1".into(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        all.push(src.into());
        all.push(dst.into());
        let mut m = Mirror::spawn_env(all, env);
        let ready = poll_until(Duration::from_secs(15), || {
            m.exited().is_some() || m.stderr().contains("serving /metrics")
        });
        match m.exited() {
            Some(2) if m.stderr().contains("--port") => {
                last = m.stderr();
                continue;
            }
            Some(code) => panic!(
                "etcdmirror exited with {code} before serving metrics:\n{}",
                m.stderr()
            ),
            None if ready => return (m, port),
            None => panic!(
                "etcdmirror did not log `serving /metrics` within 15 s:\n{}",
                m.stderr()
            ),
        }
    }
    panic!("no free metrics port after 10 tries; last stderr:\n{last}");
}

/// One parsed sample: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The exposition as the Python `prometheus_client` parser reads it.
struct Parsed {
    /// family name -> type
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Parsed {
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the only sample `name` with these labels; panics if absent or ambiguous.
    #[track_caller]
    fn one(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.find(name, labels);
        assert!(
            found.len() == 1,
            "expected exactly one sample {name}{labels:?}, found {}: {found:?}",
            found.len()
        );
        found[0].value
    }

    #[track_caller]
    fn family(&self, name: &str, kind: &str) {
        assert_eq!(
            self.types.get(name).map(String::as_str),
            Some(kind),
            "metric family {name} should be a {kind}; families: {:?}",
            self.types
        );
    }
}

const PARSER: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type,
                "samples": [[s.name, s.labels, s.value] for s in f.samples]})
print(json.dumps(out))
"#;

/// Parse `text` with Python's prometheus_client; panics (failing the test) if the parser is
/// missing or raises.
#[track_caller]
fn prometheus_parse(text: &str) -> Parsed {
    require_tool("python3", "python3");
    let probe = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .output()
        .expect("run python3");
    assert!(
        probe.status.success(),
        "python3 cannot import prometheus_client; install it with \
         `python3 -m pip install prometheus-client` (Debian: apt-get install \
         python3-prometheus-client; `make deps` as root installs it): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let mut child = Command::new("python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser rejected /metrics: {}\n---- exposition ----\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: Value = serde_json::from_slice(&out.stdout).expect("parser output is JSON");
    let mut parsed = Parsed {
        types: BTreeMap::new(),
        samples: Vec::new(),
    };
    for f in families.as_array().unwrap() {
        parsed.types.insert(
            f["name"].as_str().unwrap().to_string(),
            f["type"].as_str().unwrap().to_string(),
        );
        for s in f["samples"].as_array().unwrap() {
            parsed.samples.push(Sample {
                name: s[0].as_str().unwrap().to_string(),
                labels: s[1]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect(),
                value: s[2].as_f64().unwrap(),
            });
        }
    }
    parsed
}

/// Quick value of an unlabelled sample from the raw text (for tight polling loops).
fn raw_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn scrape_value(port: u16, name: &str) -> Option<f64> {
    try_get(port, "/metrics").and_then(|h| raw_value(&h.body, name))
}

// ---------------------------------------------------------------------------------------
// 1. Metrics

#[test]
fn metrics_parse_with_prometheus_client_and_keep_the_old_names() {
    let p = Pair::start("metrics");
    // loaded by --reload, not replicated as events
    p.src.set("/pre/a", "1");
    p.src.set("/pre/b", "2");
    p.src.set("/ignored/pre", "x");
    let secret = "s3cretMETRICSpw";
    let dst_url = p.dst.url_with_auth("metricsuser", secret);
    let (mut m, port) = start_with_metrics(
        &["--reload", "--src-ignore-keys-regex", "/ignored/.*"],
        &p.src.url,
        &dst_url,
    );
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    assert_eq!(p.dst.get("/replica/pre/a").as_deref(), Some("1"));

    // 6 replicated events (5 sets, 1 delete) and 3 ignored ones
    for i in 1..=5 {
        p.src.set(&format!("/live/k{i}"), &format!("v{i}"));
    }
    p.src.delete("/live/k1", &[]).expect_ok();
    for i in 1..=3 {
        p.src.set(&format!("/ignored/x{i}"), "no");
    }
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    assert_eq!(p.dst.get("/replica/live/k5").as_deref(), Some("v5"));
    assert!(!p.dst.exists("/replica/live/k1"));
    assert!(!p.dst.exists("/replica/ignored/x1"));
    m.wait_for(
        Duration::from_secs(10),
        "etcdmirror_replicated_events_total >= 6",
        || scrape_value(port, "etcdmirror_replicated_events_total").is_some_and(|v| v >= 6.0),
    );

    let h = get(port, "/metrics");
    assert_eq!(h.status, 200, "{}", h.head);
    let head = h.head.to_ascii_lowercase();
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "content type of /metrics: {}",
        h.head
    );
    let text = h.body;
    assert!(
        !text.contains(secret) && !text.contains("metricsuser"),
        "credentials appear in /metrics:\n{text}"
    );
    let pm = prometheus_parse(&text);

    // the old names, with the old types
    pm.family("etcdmirror_replicated_events", "counter");
    assert_eq!(
        pm.one("etcdmirror_replicated_events_total", &[]),
        6.0,
        "replicated events: 5 sets and 1 delete\n{text}"
    );
    pm.family("etcdmirror_lag", "gauge");
    assert_eq!(
        pm.one("etcdmirror_lag", &[]),
        0.0,
        "lag once in sync\n{text}"
    );
    pm.family("etcdmirror_write_latency", "histogram");
    let url = format!("http://127.0.0.1:{}", p.dst.client_port);
    let labels = [("url", url.as_str()), ("prefix", "/replica")];
    let count = pm.one("etcdmirror_write_latency_count", &labels);
    let sum = pm.one("etcdmirror_write_latency_sum", &labels);
    assert_eq!(
        count, 6.0,
        "one latency observation per replicated event\n{text}"
    );
    assert!(sum > 0.0 && sum < 60.0, "write latency sum {sum}");
    let buckets = pm.find("etcdmirror_write_latency_bucket", &labels);
    assert!(buckets.len() >= 2, "too few buckets:\n{text}");
    let mut by_le: Vec<(f64, f64)> = buckets
        .iter()
        .map(|b| (b.labels["le"].parse::<f64>().unwrap(), b.value))
        .collect();
    by_le.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    assert!(
        by_le.windows(2).all(|w| w[0].1 <= w[1].1),
        "histogram buckets are not cumulative: {by_le:?}"
    );
    assert_eq!(
        by_le.last().unwrap(),
        &(f64::INFINITY, count),
        "+Inf bucket must equal _count"
    );
    for b in &buckets {
        assert_eq!(
            b.labels.keys().map(String::as_str).collect::<Vec<_>>(),
            ["le", "prefix", "url"],
            "bucket labels: {b:?}"
        );
    }
    pm.family("etcdmirror_load_time", "summary");
    assert_eq!(
        pm.one("etcdmirror_load_time_count", &[]),
        1.0,
        "one --reload\n{text}"
    );
    let load = pm.one("etcdmirror_load_time_sum", &[]);
    assert!(load > 0.0 && load < 60.0, "load time sum {load}");

    // what on-call needs
    pm.family("etcdmirror_ignored_events", "counter");
    assert_eq!(
        pm.one("etcdmirror_ignored_events_total", &[]),
        3.0,
        "ignored events\n{text}"
    );
    assert_eq!(pm.one("etcdmirror_events_total", &[("action", "set")]), 5.0);
    assert_eq!(
        pm.one("etcdmirror_events_total", &[("action", "delete")]),
        1.0
    );
    for (family, kind) in [
        ("etcdmirror_source_index", "gauge"),
        ("etcdmirror_replicated_index", "gauge"),
        ("etcdmirror_seconds_since_last_watch", "gauge"),
        ("etcdmirror_idle_index_advances", "counter"),
        ("etcdmirror_retries", "counter"),
        ("etcdmirror_build_info", "gauge"),
    ] {
        pm.family(family, kind);
    }
    assert_eq!(
        pm.one(
            "etcdmirror_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // /lag: one integer and a newline
    let lag = get(port, "/lag");
    assert_eq!(lag.status, 200);
    assert!(
        Regex::new(r"^[0-9]+\n$").unwrap().is_match(&lag.body),
        "/lag must be one integer and a newline: {:?}",
        lag.body
    );
    // / : an index of the two
    let index = get(port, "/");
    assert_eq!(index.status, 200);
    assert!(
        index.body.contains("/metrics") && index.body.contains("/lag"),
        "/ should list /metrics and /lag: {:?}",
        index.body
    );
    // unknown paths
    for path in ["/nope", "/metrics/x", "/lagx"] {
        assert_eq!(get(port, path).status, 404, "GET {path}");
    }
    m.assert_alive("after scraping");
    let log = m.stderr();
    assert!(!log.contains(secret), "password in the log:\n{log}");
}

/// The gauges that tell "healthy and idle" from "stuck": lag rises while catching up and
/// falls to 0, the source index seen tracks the source, the watch age stays small while
/// healthy; once the source is gone, retries are counted and the watch age grows.
#[test]
fn oncall_gauges_tell_healthy_from_stuck() {
    let Pair { src, dst } = Pair::start("oncall");
    set_replication_index(&dst, "/replica", src.current_index());
    for i in 0..500 {
        src.set(&format!("/backlog/k{}", i % 50), &i.to_string());
    }
    let target = src.current_index();
    let (mut m, port) = start_with_metrics(&["--retry-timeout", "60"], &src.url, &dst.url);
    let mut max_lag = 0.0f64;
    let mut max_lag_endpoint = 0u64;
    let mut scrapes = 0;
    m.wait_for(Duration::from_secs(60), "backlog replicated", || {
        if let Some(v) = scrape_value(port, "etcdmirror_lag") {
            max_lag = max_lag.max(v);
            scrapes += 1;
        }
        if let Some(l) = try_get(port, "/lag").and_then(|h| h.body.trim().parse::<u64>().ok()) {
            max_lag_endpoint = max_lag_endpoint.max(l);
        }
        replication_index(&dst, "/replica").is_some_and(|i| i >= target)
    });
    println!("catch-up of 500 events: {scrapes} scrapes, max etcdmirror_lag {max_lag}, max /lag {max_lag_endpoint}");
    assert!(
        max_lag > 0.0 && max_lag_endpoint > 0,
        "lag stayed 0 ({scrapes} scrapes) while 500 events were being caught up \
         (etcdmirror_lag max {max_lag}, /lag max {max_lag_endpoint})"
    );

    // healthy and idle: lag 0, indexes at the source's, a recent watch
    let now = src.current_index();
    m.wait_for(
        Duration::from_secs(10),
        "lag 0 and replicated index at the source's",
        || {
            try_get(port, "/metrics").is_some_and(|h| {
                raw_value(&h.body, "etcdmirror_lag") == Some(0.0)
                    && raw_value(&h.body, "etcdmirror_replicated_index")
                        .is_some_and(|v| v >= now as f64)
            })
        },
    );
    let text = get(port, "/metrics").body;
    let pm = prometheus_parse(&text);
    let seen = pm.one("etcdmirror_source_index", &[]);
    let replicated = pm.one("etcdmirror_replicated_index", &[]);
    assert!(
        seen >= now as f64 && replicated >= now as f64 && seen >= replicated,
        "source index seen {seen}, replicated {replicated}, source at {now}\n{text}"
    );
    assert_eq!(get(port, "/lag").body, "0\n");
    let age = pm.one("etcdmirror_seconds_since_last_watch", &[]);
    assert!(
        (0.0..5.0).contains(&age),
        "seconds since the last watch round trip while healthy: {age} (expected 0..5 with \
         the default --watch-timeout 0.5)\n{text}"
    );
    assert_eq!(pm.one("etcdmirror_replicated_events_total", &[]), 500.0);
    let retries_before = pm.one("etcdmirror_retries_total", &[]);

    // stuck: the source is gone; retries are counted, the watch age grows
    drop(src);
    m.wait_log(Duration::from_secs(20), "retrying");
    m.wait_for(
        Duration::from_secs(20),
        "etcdmirror_retries_total to grow and the watch age to pass 2 s",
        || {
            try_get(port, "/metrics").is_some_and(|h| {
                raw_value(&h.body, "etcdmirror_retries_total").is_some_and(|r| r > retries_before)
                    && raw_value(&h.body, "etcdmirror_seconds_since_last_watch")
                        .is_some_and(|a| a > 2.0)
            })
        },
    );
}

// ---------------------------------------------------------------------------------------
// 2. Responsiveness

/// `n` scrapes of /metrics, each on a fresh connection; returns sorted durations in ms.
fn time_scrapes(port: u16, n: usize) -> Vec<f64> {
    let mut ms: Vec<f64> = (0..n)
        .map(|_| {
            let h = get(port, "/metrics");
            assert_eq!(h.status, 200);
            assert!(h.body.contains("etcdmirror_lag "));
            h.took.as_secs_f64() * 1000.0
        })
        .collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ms
}

#[track_caller]
fn assert_fast(what: &str, ms: &[f64]) {
    let median = ms[ms.len() / 2];
    let max = ms[ms.len() - 1];
    println!(
        "/metrics {what}: {} requests, min {:.2} ms, median {median:.2} ms, max {max:.2} ms",
        ms.len(),
        ms[0]
    );
    assert!(
        median < 100.0 && max < 500.0,
        "/metrics {what}: median {median:.1} ms (limit 100), max {max:.1} ms (limit 500): {ms:?}"
    );
}

#[test]
fn metrics_answer_fast_during_long_poll_and_retry_backoff() {
    let Pair { src, dst } = Pair::start("responsive");
    set_replication_index(&dst, "/replica", src.current_index());
    let (mut m, port) = start_with_metrics(
        &["--watch-timeout", "30", "--retry-timeout", "30"],
        &src.url,
        &dst.url,
    );
    src.set("/a", "1");
    m.wait_index(&dst, "/replica", src.current_index());
    // the loop is now in a long poll on the quiet source (up to 30 s)
    let t = Instant::now();
    let ms = time_scrapes(port, 20);
    assert!(t.elapsed() < Duration::from_secs(25));
    assert_fast("during a long poll (--watch-timeout 30)", &ms);
    m.assert_alive("long poll");

    // the source is gone: the loop sleeps between retries (up to 30 s in all)
    drop(src);
    m.wait_log(Duration::from_secs(20), "retrying");
    let ms = time_scrapes(port, 20);
    assert_fast("during a retry backoff (--retry-timeout 30)", &ms);
    m.assert_alive("retry backoff");
    let lag = get(port, "/lag");
    assert_eq!(lag.status, 200);
    assert!(
        lag.took < Duration::from_millis(500),
        "/lag took {:?}",
        lag.took
    );
}

// ---------------------------------------------------------------------------------------
// 3. Busy port

#[test]
fn busy_metrics_port_exits_2_with_one_line_naming_port() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    // nothing listens on these; the bind must fail before any request is tried
    let src = format!("http://127.0.0.1:{}", free_port());
    let dst = format!("http://127.0.0.1:{}", free_port());
    let t = Instant::now();
    let mut m = Mirror::spawn(vec![
        "--port".into(),
        port.to_string(),
        "--listen".into(),
        "127.0.0.1".into(),
        "--retry-timeout".into(),
        "30".into(),
        src,
        dst,
    ]);
    let code = m.wait_exit(Duration::from_secs(10));
    let err = m.stderr();
    assert_eq!(code, 2, "busy port: expected exit 2:\n{err}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr:\n{err}");
    assert!(lines[0].contains("--port"), "should name --port: {err}");
    assert!(
        lines[0].contains(&port.to_string()),
        "should name the address: {err}"
    );
    drop(busy);
}

// ---------------------------------------------------------------------------------------
// 4. TLS

fn s(p: &std::path::Path) -> String {
    TlsFiles::s(p)
}

#[test]
fn tls_source_with_client_certificate_replicates() {
    let pki = TlsFiles::generate("tls-ok");
    let src = Etcd::start_tls("tls-ok-src", &pki);
    assert!(src.url.starts_with("https://"));
    let dst = Etcd::start("tls-ok-dst");
    set_replication_index(&dst, "/replica", src.current_index());
    let (ca, cert, key) = (s(&pki.ca), s(&pki.client_cert), s(&pki.client_key));
    let mut m = Mirror::start(
        &[
            "--src-ca-file",
            &ca,
            "--src-cert-file",
            &cert,
            "--src-key-file",
            &key,
        ],
        &src.url,
        &dst.url,
    );
    src.set("/tls/k", "over tls");
    m.wait_for(Duration::from_secs(30), "/replica/tls/k replicated", || {
        dst.get("/replica/tls/k").as_deref() == Some("over tls")
    });
    src.delete("/tls/k", &[]).expect_ok();
    m.wait_for(Duration::from_secs(30), "/replica/tls/k deleted", || {
        !dst.exists("/replica/tls/k")
    });
}

/// A TLS failure once the source has answered (its certificate rotated to one the mirror
/// does not trust) is retried like any transient fault, then exit 1 so that systemd restarts
/// the mirror; at start the same failure is a configuration error (exit 2, tested below).
#[test]
fn tls_failure_mid_run_is_transient_then_exit_1() {
    let pki = TlsFiles::generate("tls-rotate");
    let other = TlsFiles::generate("tls-rotate-other");
    let mut src = Etcd::start_tls("tls-rotate-src", &pki);
    let dst = Etcd::start("tls-rotate-dst");
    set_replication_index(&dst, "/replica", src.current_index());
    let (ca, cert, key) = (s(&pki.ca), s(&pki.client_cert), s(&pki.client_key));
    let mut m = Mirror::start(
        &[
            "--src-ca-file",
            &ca,
            "--src-cert-file",
            &cert,
            "--src-key-file",
            &key,
            "--retry-timeout",
            "5",
            "--watch-timeout",
            "5",
        ],
        &src.url,
        &dst.url,
    );
    src.set("/tls/k", "before the rotation");
    m.wait_for(Duration::from_secs(30), "/replica/tls/k replicated", || {
        dst.get("/replica/tls/k").as_deref() == Some("before the rotation")
    });
    // The server now presents a certificate from a CA the mirror does not trust.
    fs::copy(&other.server_cert, &pki.server_cert).unwrap();
    fs::copy(&other.server_key, &pki.server_key).unwrap();
    src.respawn();
    let code = m.wait_exit(Duration::from_secs(60));
    let err = m.stderr();
    assert_eq!(code, 1, "{}", tail(&err, 15));
    assert!(err.contains("retrying"), "{}", tail(&err, 15));
}

#[test]
fn tls_both_sides_with_the_common_flags() {
    let pki = TlsFiles::generate("tls-both");
    let src = Etcd::start_tls("tls-both-src", &pki);
    let dst = Etcd::start_tls("tls-both-dst", &pki);
    assert!(dst.url.starts_with("https://"));
    src.set("/pre", "loaded");
    let (ca, cert, key) = (s(&pki.ca), s(&pki.client_cert), s(&pki.client_key));
    let mut m = Mirror::start(
        &[
            "--reload",
            "--ca-file",
            &ca,
            "--cert-file",
            &cert,
            "--key-file",
            &key,
        ],
        &src.url,
        &dst.url,
    );
    m.wait_index(&dst, "/replica", src.current_index());
    assert_eq!(dst.get("/replica/pre").as_deref(), Some("loaded"));
    src.set("/live", "both sides tls");
    m.wait_for(Duration::from_secs(30), "/replica/live replicated", || {
        dst.get("/replica/live").as_deref() == Some("both sides tls")
    });
}

/// Runs a mirror that must be refused at start: exit 2 well before the 30 s retry budget,
/// with a message about TLS or certificates and no retry.
#[track_caller]
fn assert_tls_refused(what: &str, args: &[&str], src: &str, dst: &str) {
    let mut all = vec!["--retry-timeout", "30"];
    all.extend_from_slice(args);
    let t = Instant::now();
    let mut m = Mirror::start(&all, src, dst);
    let code = m.wait_exit(Duration::from_secs(40));
    let took = t.elapsed();
    let err = m.stderr();
    println!(
        "{what}: exit {code} after {took:?}: {}",
        err.lines().last().unwrap_or("")
    );
    assert_eq!(
        code, 2,
        "{what}: expected exit 2 (configuration error):\n{err}"
    );
    assert!(
        took < Duration::from_secs(10),
        "{what}: took {took:?}, looks like a retry loop:\n{err}"
    );
    let lower = err.to_lowercase();
    assert!(
        lower.contains("tls") || lower.contains("certificate"),
        "{what}: the error should mention TLS or the certificate:\n{err}"
    );
    assert!(
        !lower.contains("retrying"),
        "{what}: a TLS configuration error must not be retried:\n{err}"
    );
}

#[test]
fn tls_wrong_ca_or_missing_client_certificate_exits_2_at_start() {
    let pki = TlsFiles::generate("tls-bad");
    make_ca(&pki.dir, "other", "some other CA");
    let other_ca = s(&pki.dir.join("other.pem"));
    let src = Etcd::start_tls("tls-bad-src", &pki);
    let dst = Etcd::start("tls-bad-dst");
    set_replication_index(&dst, "/replica", src.current_index());
    let (ca, cert, key) = (s(&pki.ca), s(&pki.client_cert), s(&pki.client_key));

    assert_tls_refused(
        "wrong CA",
        &[
            "--src-ca-file",
            &other_ca,
            "--src-cert-file",
            &cert,
            "--src-key-file",
            &key,
        ],
        &src.url,
        &dst.url,
    );
    assert_tls_refused(
        "system roots only (no --src-ca-file)",
        &["--src-cert-file", &cert, "--src-key-file", &key],
        &src.url,
        &dst.url,
    );
    assert_tls_refused(
        "no client certificate",
        &["--src-ca-file", &ca],
        &src.url,
        &dst.url,
    );
    // a certificate the server does not trust (signed by another CA)
    make_leaf(
        &pki.dir,
        "other",
        "stranger",
        "stranger",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=clientAuth\n",
    );
    assert_tls_refused(
        "client certificate from an untrusted CA",
        &[
            "--src-ca-file",
            &ca,
            "--src-cert-file",
            &s(&pki.dir.join("stranger.pem")),
            "--src-key-file",
            &s(&pki.dir.join("stranger.key")),
        ],
        &src.url,
        &dst.url,
    );
    // and the right files still work against the same server
    let mut m = Mirror::start(
        &[
            "--src-ca-file",
            &ca,
            "--src-cert-file",
            &cert,
            "--src-key-file",
            &key,
        ],
        &src.url,
        &dst.url,
    );
    src.set("/ok", "1");
    m.wait_for(Duration::from_secs(30), "/replica/ok replicated", || {
        dst.get("/replica/ok").as_deref() == Some("1")
    });
}

// ---------------------------------------------------------------------------------------
// 5. Passwords

#[test]
fn password_files_are_accepted_and_url_passwords_warn() {
    let p = Pair::start("pwfile");
    let dir = Scratch::new("pwfiles");
    let (src_pw, dst_pw) = (dir.path.join("src-pw"), dir.path.join("dst-pw"));
    std::fs::write(&src_pw, "s3cretFILEsrc\n").unwrap();
    std::fs::write(&dst_pw, "s3cretFILEdst").unwrap();
    let mut m = p.mirror_from_now(
        &[
            "-d",
            "--src-user",
            "alice",
            "--src-password-file",
            &s(&src_pw),
            "--dst-user",
            "bob",
            "--dst-password-file",
            &s(&dst_pw),
        ],
        "/replica",
    );
    p.src.set("/pw/a", "1");
    m.wait_synced(
        &p.src,
        "/",
        &p.dst,
        "/replica",
        "/replica",
        "password files",
    );
    m.terminate();
    m.wait_exit(Duration::from_secs(10));
    let out = m.stderr() + &m.stdout();
    assert!(
        out.contains("Replicating key"),
        "no replication logged:\n{out}"
    );
    for secret in ["s3cretFILEsrc", "s3cretFILEdst"] {
        assert!(!out.contains(secret), "{secret} appears in the log:\n{out}");
    }
    assert!(
        !out.contains("password-file"),
        "no password in a URL, so no warning expected:\n{out}"
    );

    // the old form, password in the URLs: works, and warns for each side
    let src = p.src.url_with_auth("alice", "s3cretURLsrc");
    let dst = p.dst.url_with_auth("bob", "s3cretURLdst");
    let mut m = Mirror::start(&[], &src, &dst);
    m.wait_log(Duration::from_secs(10), "--src-password-file");
    m.wait_log(Duration::from_secs(10), "--dst-password-file");
    p.src.set("/pw/b", "2");
    m.wait_synced(&p.src, "/", &p.dst, "/replica", "/replica", "URL passwords");
    m.terminate();
    m.wait_exit(Duration::from_secs(10));
    let out = m.stderr() + &m.stdout();
    let warning = out
        .lines()
        .find(|l| l.contains("--src-password-file"))
        .unwrap();
    assert!(
        warning.contains("WARN"),
        "the URL password notice should be a warning: {warning}"
    );
    for secret in ["s3cretURLsrc", "s3cretURLdst"] {
        assert!(!out.contains(secret), "{secret} appears in the log:\n{out}");
    }
}

#[test]
fn password_file_without_user_or_unreadable_exits_2_naming_the_flag() {
    let dir = Scratch::new("pwbad");
    let pw = dir.path.join("pw");
    std::fs::write(&pw, "s3cretNOUSER\n").unwrap();
    let pw = s(&pw);
    let missing = s(&dir.path.join("missing"));
    let src = format!("http://127.0.0.1:{}", free_port());
    let dst = format!("http://127.0.0.1:{}", free_port());
    let cases: [(&[&str], &str); 4] = [
        (&["--src-password-file", &pw], "--src-password-file"),
        (&["--dst-password-file", &pw], "--dst-password-file"),
        (
            &["--src-user", "u", "--src-password-file", &missing],
            "--src-password-file",
        ),
        (
            &["--dst-user", "u", "--dst-password-file", &missing],
            "--dst-password-file",
        ),
    ];
    for (args, flag) in cases {
        let mut all = vec!["--retry-timeout", "30"];
        all.extend_from_slice(args);
        let t = Instant::now();
        let mut m = Mirror::start(&all, &src, &dst);
        let code = m.wait_exit(Duration::from_secs(10));
        let err = m.stderr();
        assert_eq!(code, 2, "{args:?}: expected exit 2:\n{err}");
        assert!(t.elapsed() < Duration::from_secs(5), "{args:?}: slow exit");
        assert!(err.contains(flag), "{args:?}: should name {flag}:\n{err}");
        assert!(!err.contains("s3cretNOUSER"), "password echoed:\n{err}");
        assert_eq!(
            err.lines().filter(|l| !l.trim().is_empty()).count(),
            1,
            "{args:?}: one line expected:\n{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 6. journald format

/// A run that logs at info (serving), warn (URL password, retries) and error (exit 1): the
/// destination is a port nothing listens on and the retry budget is 1 s.
fn logging_run(env: &[(&str, Option<&str>)]) -> String {
    let src = format!("http://u:s3cretJOURNAL@127.0.0.1:{}", free_port());
    let dst = format!("http://127.0.0.1:{}", free_port());
    let (mut m, _port) = start_with_metrics_env(&["--retry-timeout", "1"], &src, &dst, env);
    let code = m.wait_exit(Duration::from_secs(20));
    let err = m.stderr();
    assert_eq!(code, 1, "expected exit 1 (retries exhausted):\n{err}");
    assert!(!err.contains("s3cretJOURNAL"), "password logged:\n{err}");
    err
}

#[test]
fn journald_format_has_priorities_and_no_timestamps() {
    let timestamp = Regex::new(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}").unwrap();
    let err = logging_run(&[("JOURNAL_STREAM", Some("1:1")), ("RUST_LOG", None)]);
    let lines: Vec<&str> = err.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 4, "too few lines:\n{err}");
    let prio = Regex::new(r"^<([0-7])>").unwrap();
    for l in &lines {
        assert!(prio.is_match(l), "no <N> priority prefix: {l:?}\n{err}");
        assert!(!timestamp.is_match(l), "timestamp under journald: {l:?}");
    }
    let starts = |p: &str| lines.iter().filter(|l| l.starts_with(p)).count();
    assert!(
        starts("<6>") >= 1 && starts("<4>") >= 2 && starts("<3>") >= 1,
        "expected info <6>, warnings <4> and an error <3>:\n{err}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>") && l.contains("--src-password-file")),
        "the URL password warning should be <4>:\n{err}"
    );
    assert!(
        lines.last().unwrap().starts_with("<3>"),
        "the final error should be <3>:\n{err}"
    );

    let err = logging_run(&[("JOURNAL_STREAM", None), ("RUST_LOG", None)]);
    let lines: Vec<&str> = err.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 4, "too few lines:\n{err}");
    for l in &lines {
        assert!(
            timestamp.is_match(l),
            "no timestamp without JOURNAL_STREAM: {l:?}\n{err}"
        );
        assert!(!prio.is_match(l), "syslog prefix without journald: {l:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 7. Measurements for the README (not assertions)

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// Release binary size and resident memory, idle and while replicating 2000 events.
/// `cargo build --release && cargo test --release --test production -- --ignored --nocapture`
/// (ETCDMIRROR_RELEASE_BIN overrides the binary's path).
#[test]
#[ignore]
fn measure_release_size_and_memory() {
    let bin = std::env::var("ETCDMIRROR_RELEASE_BIN")
        .unwrap_or_else(|_| format!("{}/target/release/etcdmirror", env!("CARGO_MANIFEST_DIR")));
    let meta = std::fs::metadata(&bin)
        .unwrap_or_else(|e| panic!("{bin}: {e}; run `cargo build --release` first"));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine: {nproc} CPUs, {cpu}");
    println!(
        "release binary {bin}: {} bytes ({:.2} MiB)",
        meta.len(),
        meta.len() as f64 / 1048576.0
    );

    let p = Pair::start("measure");
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    let scratch = Scratch::new("measure");
    let mut child = Command::new(&bin)
        .args(["--port", "0", &p.src.url, &p.dst.url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(scratch.path.join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    p.src.set("/warmup", "1");
    wait_until(Duration::from_secs(30), "warm-up key replicated", || {
        p.dst.exists("/replica/warmup")
    });
    // idle: sample for 2 s (the quiet watch is renewed every 0.5 s)
    let mut idle = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        idle = idle.max(proc_status_kib(pid, "VmRSS").unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("idle: VmRSS {idle} kB");

    // load: 2000 events from 4 writers, values of 100 bytes
    let t = Instant::now();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let c = Client::new(&p.src.url);
            std::thread::spawn(move || {
                for i in 0..500 {
                    c.set(&format!("/load/w{w}/k{}", i % 100), &"x".repeat(100));
                }
            })
        })
        .collect();
    let mut busy = 0;
    let mut done = false;
    while !done || replication_index(&p.dst, "/replica").unwrap_or(0) < p.src.current_index() {
        busy = busy.max(proc_status_kib(pid, "VmRSS").unwrap());
        done = writers.iter().all(|w| w.is_finished());
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "load did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for w in writers {
        w.join().unwrap();
    }
    let took = t.elapsed().as_secs_f64();
    let hwm = proc_status_kib(pid, "VmHWM").unwrap();
    let after = proc_status_kib(pid, "VmRSS").unwrap();
    println!(
        "load: 2000 events replicated in {took:.1} s ({:.0} events/s); max VmRSS sampled {busy} kB, VmHWM {hwm} kB, VmRSS after {after} kB",
        2000.0 / took
    );
    let _ = child.kill();
    let _ = child.wait();
}
