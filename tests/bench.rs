//! `make bench`: the performance harness of issues 4 and 10.
//!
//! A test target with `harness = false` that does nothing unless `ETCDMIRROR_BENCH=1` is set
//! (so `cargo test --all-targets` stays fast). `make bench` builds the release binary and runs
//! this with the variable set. It starts its own etcd servers (data dirs on /dev/shm), runs the
//! release binary (`ETCDMIRROR_BIN`, default: the binary cargo built for this profile), prints a
//! table and writes `target/bench/results.json`.
//!
//! Measurements (see the issue for why): the ceiling `raw_put_per_s`; catch-up from the history;
//! sustained rates; replication delay; the same three with the source behind a 15 ms-per-direction
//! TCP proxy; background noise outside the prefix; `--reload` of 100,000 keys; cost (memory, CPU,
//! requests while idle). Into a v3 destination (issue 10), v3 to v3 and v2 to v3 on the same
//! servers' v3 stores: the ceiling `raw_txn_v3_per_s` (serial transactions shaped as the mirror
//! writes an event), catch-up, the highest sustained rate (probes in steps of 0.1 x the ceiling,
//! the best held for 20 s) with where the time went (CPU per process, destination requests per
//! event, the mirror's time in writes), and the delay at 100 writes/s.
//!
//! Knobs (environment, all optional): `ETCDMIRROR_BENCH_ONLY` (comma-separated sections:
//! loopback, distance, far, reload, v3v3, v2v3; `v2` = the first four, `v3` = the last two;
//! default all; `raw_put` always runs), `ETCDMIRROR_BENCH_RATES` (comma-separated writes/s,
//! default 100,300,1000,2000,3000,4000), `ETCDMIRROR_BENCH_STEP_SECS` (8),
//! `ETCDMIRROR_BENCH_NOISE_SECS` (60), `ETCDMIRROR_BENCH_DELAY10_SAMPLES` (200),
//! `ETCDMIRROR_BENCH_RELOAD_KEYS` (100000), `ETCDMIRROR_BENCH_V3_CEILING_SECS` (5),
//! `ETCDMIRROR_BENCH_V3_CATCHUP` (5000 revisions), `ETCDMIRROR_BENCH_V3_START` (0.8 x the
//! ceiling), `ETCDMIRROR_BENCH_V3_PROBE_SECS` (5), `ETCDMIRROR_BENCH_V3_HOLD_SECS` (20),
//! `ETCDMIRROR_BENCH_KEEP_LOGS` (a directory: keep every mirror's stderr there; `RUST_LOG`,
//! e.g. `etcdmirror=debug`, reaches the mirror).

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::proxy::Proxy;
use common::v3::{b64, prefix_end, unb64, V3};
use common::{index_key, replication_index, status_code, tail, Client, Etcd, Scratch};

const SRC_PREFIX: &str = "/bench";
const DST_PREFIX: &str = "/replica";
/// etcd v2 keeps the last 1000 events of the whole store.
const WINDOW: u64 = 1000;
/// One-way delay of the distance proxy.
const PROXY_DELAY: Duration = Duration::from_millis(15);
/// One-way delay of the far proxy (a source in another region).
const FAR_DELAY: Duration = Duration::from_millis(60);

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn main() {
    if std::env::var("ETCDMIRROR_BENCH").map_or(true, |v| v.is_empty() || v == "0") {
        println!("bench: skipped; run `make bench` (sets ETCDMIRROR_BENCH=1)");
        return;
    }
    Bench::new().run();
}

// ---------------------------------------------------------------------------------------------
// /proc probes

fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ": state is field 3, utime field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

// ---------------------------------------------------------------------------------------------
// The mirror process

/// A running etcdmirror (the binary under test); stderr goes to a file. SIGKILLed on drop.
struct Proc {
    child: Child,
    exit: Option<i32>,
    stderr_path: PathBuf,
    _scratch: Scratch,
}

impl Proc {
    fn spawn(bin: &Path, args: &[String]) -> Proc {
        let scratch = Scratch::new("bench-mirror");
        let stderr_path = scratch.path.join("stderr");
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        Proc {
            child,
            exit: None,
            stderr_path,
            _scratch: scratch,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<i32> {
        if self.exit.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exit = Some(status_code(st));
            }
        }
        self.exit
    }

    fn alive(&mut self) -> bool {
        self.exited().is_none()
    }

    /// Wait until stderr contains `needle`; Err(description) if the process exits or on timeout.
    fn wait_log(&mut self, timeout: Duration, needle: &str) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            if self.stderr().contains(needle) {
                return Ok(start.elapsed());
            }
            if let Some(code) = self.exited() {
                return Err(format!(
                    "etcdmirror exited with {code} before {needle:?}; stderr tail:\n{}",
                    tail(&self.stderr(), 15)
                ));
            }
            if start.elapsed() > timeout {
                return Err(format!("no {needle:?} within {timeout:?}"));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then SIGKILL if it is still running after 5 s.
    fn stop(&mut self) {
        if self.alive() {
            common::send_signal(self.pid(), "TERM");
            let start = Instant::now();
            while self.alive() && start.elapsed() < Duration::from_secs(5) {
                thread::sleep(Duration::from_millis(10));
            }
            if self.alive() {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.exit = Some(137);
            }
        }
    }

    fn rss_kb(&self) -> Option<u64> {
        proc_status_kb(self.pid(), "VmRSS")
    }

    fn hwm_kb(&self) -> Option<u64> {
        proc_status_kb(self.pid(), "VmHWM")
    }

    fn cpu(&self) -> Option<u64> {
        cpu_ticks(self.pid())
    }

    /// Where the mirror serves /metrics, from its log (the v3 runs give it a loopback port).
    fn metrics_url(&self) -> Option<String> {
        let log = self.stderr();
        let rest = log.split("serving /metrics and /lag on ").nth(1)?;
        Some(rest.split_whitespace().next()?.to_string())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // ETCDMIRROR_BENCH_KEEP_LOGS=DIR keeps every mirror's stderr as DIR/mirror-PID.log.
        if let Some(dir) = std::env::var_os("ETCDMIRROR_BENCH_KEEP_LOGS").filter(|d| !d.is_empty())
        {
            let dir = PathBuf::from(dir);
            let _ = fs::create_dir_all(&dir);
            let _ = fs::copy(
                &self.stderr_path,
                dir.join(format!("mirror-{}.log", self.pid())),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load generators and probes

/// Shared state of a writer: the highest source index it has written.
#[derive(Default)]
struct WriteLog {
    last_index: AtomicU64,
}

/// Open-loop writer: ticket i is due at start + i/rate; `threads` threads take tickets in
/// order and PUT `key(i)`. Stops at start + dur (tickets not yet sent are dropped). Returns
/// (writes, elapsed seconds). `done(i, t)` is called with the instant each PUT's response came.
fn rate_write(
    c: &Client,
    rate: f64,
    dur: Duration,
    threads: usize,
    key: &(dyn Fn(u64) -> String + Sync),
    log: &WriteLog,
    done: Option<&(dyn Fn(u64, Instant) + Sync)>,
) -> (u64, f64) {
    rate_run(rate, dur, threads, &|i| v2_put(c, &key(i), i), log, done)
}

/// A v2 PUT of `v{i}` at `key` by a writer; the source index it made.
fn v2_put(c: &Client, key: &str, i: u64) -> u64 {
    let r = c.put(key, &[("value", &format!("v{i}"))]);
    assert!(r.ok(), "writer PUT failed: {} {}", r.status, r.body);
    r.modified_index().max(r.index)
}

/// The open-loop writer of `rate_write` with any write: `put(i)` writes ticket i and returns
/// the source index (v2) or revision (v3) it made.
fn rate_run(
    rate: f64,
    dur: Duration,
    threads: usize,
    put: &(dyn Fn(u64) -> u64 + Sync),
    log: &WriteLog,
    done: Option<&(dyn Fn(u64, Instant) + Sync)>,
) -> (u64, f64) {
    let next = AtomicU64::new(0);
    let count = AtomicU64::new(0);
    let start = Instant::now();
    let end = start + dur;
    thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if due >= end {
                    break;
                }
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if due > now {
                    thread::sleep(due - now);
                }
                let index = put(i);
                let t = Instant::now();
                log.last_index.fetch_max(index, Ordering::SeqCst);
                count.fetch_add(1, Ordering::SeqCst);
                if let Some(f) = done {
                    f(i, t);
                }
            });
        }
    });
    (count.into_inner(), start.elapsed().as_secs_f64())
}

/// Write `n` keys as fast as `threads` clients can. Returns seconds taken.
fn burst_write(
    c: &Client,
    n: u64,
    threads: usize,
    key: &(dyn Fn(u64) -> String + Sync),
    log: &WriteLog,
) -> f64 {
    burst_run(
        n,
        threads,
        &|i| {
            let r = c.put(&key(i), &[("value", &format!("value-{i}"))]);
            assert!(r.ok(), "writer PUT failed: {} {}", r.status, r.body);
            r.modified_index().max(r.index)
        },
        log,
    )
}

/// `burst_write` with any write: `put(i)` returns the source index or revision it made.
fn burst_run(n: u64, threads: usize, put: &(dyn Fn(u64) -> u64 + Sync), log: &WriteLog) -> f64 {
    let next = AtomicU64::new(0);
    let start = Instant::now();
    thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    break;
                }
                log.last_index.fetch_max(put(i), Ordering::SeqCst);
            });
        }
    });
    start.elapsed().as_secs_f64()
}

/// One keep-alive HTTP/1.1 connection with no URL or JSON work: each request goes out in one
/// write, each answer is read by its Content-Length. The ceilings use it, so that they measure
/// the destination rather than the client.
struct RawHttp {
    conn: TcpStream,
    buf: Vec<u8>,
}

impl RawHttp {
    fn connect(port: u16) -> RawHttp {
        let conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        conn.set_nodelay(true).unwrap();
        RawHttp {
            conn,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Send one request; the answer's head (lower case) and body. Panics unless it is 2xx.
    fn request(&mut self, method: &str, path: &str, ctype: &str, body: &str) -> (String, &[u8]) {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.conn.write_all(req.as_bytes()).unwrap();
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        // Read the head, then Content-Length bytes of body.
        let (head, head_end, len) = loop {
            let k = self.conn.read(&mut chunk).unwrap();
            assert!(k > 0, "etcd closed the connection");
            self.buf.extend_from_slice(&chunk[..k]);
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..p]).to_ascii_lowercase();
                assert!(
                    head.starts_with("http/1.1 20"),
                    "minimal {method} {path} failed: {head}"
                );
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .expect("etcd sends Content-Length");
                break (head, p + 4, len);
            }
        };
        while self.buf.len() < head_end + len {
            let k = self.conn.read(&mut chunk).unwrap();
            assert!(k > 0, "etcd closed the connection");
            self.buf.extend_from_slice(&chunk[..k]);
        }
        (head, &self.buf[head_end..head_end + len])
    }
}

/// Sequential keep-alive PUTs for `dur` with a hand-written HTTP/1.1 client on one connection
/// (no URL or JSON work), so that the figure measures the destination rather than the client.
fn minimal_puts(port: u16, dur: Duration) -> (u64, f64) {
    let mut conn = RawHttp::connect(port);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        conn.request(
            "PUT",
            &format!("/v2/keys/raw/m{}", n % 1000),
            "application/x-www-form-urlencoded",
            &format!("value=v{n}"),
        );
        n += 1;
    }
    (n, start.elapsed().as_secs_f64())
}

/// The replication index on the destination, 0 when absent.
fn repl(dst: &Client) -> u64 {
    replication_index(dst, DST_PREFIX).unwrap_or(0)
}

/// The source's current X-Etcd-Index, from a cheap 404.
fn head(c: &Client) -> u64 {
    c.get_raw("/__bench_no_such_key", &[]).index
}

/// A watch on the destination: long-polls `prefix` with waitIndex from a separate thread and
/// records the arrival instant of every key (by name) until `stop` is set.
fn dst_watcher(
    base: String,
    prefix: String,
    from: u64,
    stop: Arc<AtomicBool>,
    arrivals: Arc<Mutex<HashMap<String, Instant>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_millis(1000)))
                .build(),
        );
        let mut next = from;
        while !stop.load(Ordering::SeqCst) {
            let url = format!("{base}/v2/keys{prefix}?wait=true&recursive=true&waitIndex={next}");
            let Ok(mut r) = agent.get(&url).call() else {
                continue; // poll timeout: re-register from the same index
            };
            let hdr_index: u64 = r
                .headers()
                .get("X-Etcd-Index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let Ok(text) = r.body_mut().read_to_string() else {
                continue;
            };
            let t = Instant::now();
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if v.get("errorCode").and_then(Value::as_u64) == Some(401) {
                eprintln!("bench: destination watcher fell out of the history; skipping ahead");
                next = hdr_index + 1;
                continue;
            }
            if let Some(k) = v["node"]["key"].as_str() {
                arrivals.lock().unwrap().entry(k.to_string()).or_insert(t);
            }
            if let Some(mi) = v["node"]["modifiedIndex"].as_u64() {
                next = mi + 1;
            }
        }
    })
}

/// Delays from each write's response to its arrival on the destination (ms, sorted), for
/// the writes whose key (`key(i)`) arrived.
fn delays(
    sent: &[Option<Instant>],
    arrivals: &HashMap<String, Instant>,
    key: impl Fn(usize) -> String,
) -> Vec<f64> {
    let mut d: Vec<f64> = Vec::new();
    for (i, s) in sent.iter().enumerate() {
        if let (Some(s), Some(a)) = (s, arrivals.get(&key(i))) {
            let ms = if *a >= *s {
                (*a - *s).as_secs_f64() * 1000.0
            } else {
                -((*s - *a).as_secs_f64() * 1000.0)
            };
            d.push(ms);
        }
    }
    d.sort_by(|a, b| a.partial_cmp(b).unwrap());
    d
}

/// The delay row's JSON for results.json.
fn delay_json(mode: &str, rate: Value, count: u64, wait: Value, d: &[f64], method: &str) -> Value {
    json!({
        "measurement": "delay",
        "mode": mode,
        "writes_per_s": rate,
        "writes": count,
        "samples": d.len(),
        "missing_after_wait": count - d.len() as u64,
        "wait_seconds": wait,
        "p50_ms": r3(percentile(d, 0.5)),
        "p99_ms": r3(percentile(d, 0.99)),
        "max_ms": r3(d.last().copied().unwrap_or(f64::NAN)),
        "min_ms": d.first().copied().map(r3),
        "method": method,
    })
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let k = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[k - 1]
}

fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------------------------
// The benchmark

struct Row {
    name: String,
    value: String,
    ratio: Option<f64>,
    note: String,
}

/// Where the mirror reads the source from.
struct Mode {
    /// "loopback", "distance" (15 ms each way) or "far" (60 ms each way).
    name: &'static str,
    src_url: String,
    proxy: Option<Proxy>,
    /// How long a run may take to catch up after the writer stops before it is restarted.
    drain: Duration,
}

struct Bench {
    /// A private copy of the binary under test (cargo may rebuild the original meanwhile).
    bin: PathBuf,
    bin_origin: PathBuf,
    _bin_dir: Scratch,
    src: Etcd,
    dst: Etcd,
    raw: f64,
    tck: f64,
    rows: Vec<Row>,
    results: Vec<Value>,
    odd: Vec<String>,
    t0: Instant,
    rates: Vec<f64>,
    step: Duration,
    /// The sections to run (`ETCDMIRROR_BENCH_ONLY`).
    only: Vec<&'static str>,
    /// The v3 gateways of `src` and `dst` (their v3 stores are apart from the v2 ones).
    src3: V3,
    dst3: V3,
    /// The v3 ceiling: serial transactions per second into the destination alone.
    raw_txn: f64,
    /// Reads of the v3 index by the bench, to tell them from the mirror's requests.
    dst_reads: AtomicU64,
}

/// Every section `ETCDMIRROR_BENCH_ONLY` can name; `v2` stands for the first four, `v3` for
/// the last two. The v2 ceiling (`raw_put`) always runs.
const SECTIONS: [&str; 6] = ["loopback", "distance", "far", "reload", "v3v3", "v2v3"];

fn only_sections() -> Vec<&'static str> {
    let Some(list) = std::env::var("ETCDMIRROR_BENCH_ONLY")
        .ok()
        .filter(|v| !v.trim().is_empty())
    else {
        return SECTIONS.to_vec();
    };
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let names: &[&'static str] = match name {
            "v2" => &SECTIONS[..4],
            "v3" => &SECTIONS[4..],
            n => match SECTIONS.iter().find(|s| **s == n) {
                Some(s) => std::slice::from_ref(s),
                None => panic!(
                    "ETCDMIRROR_BENCH_ONLY: unknown section {n:?}; known: v2, v3, {}",
                    SECTIONS.join(", ")
                ),
            },
        };
        for n in names {
            if !out.contains(n) {
                out.push(*n);
            }
        }
    }
    out
}

fn locate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ETCDMIRROR_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_etcdmirror"));
    if built.components().any(|c| c.as_os_str() == "release") {
        return built;
    }
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/etcdmirror");
    eprintln!(
        "bench: warning: not a release build ({}); using {}",
        built.display(),
        release.display()
    );
    release
}

fn results_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench/results.json")
}

impl Bench {
    fn new() -> Bench {
        let bin = locate_bin();
        assert!(
            bin.is_file(),
            "{} not found: run `make bench` (or set ETCDMIRROR_BIN)",
            bin.display()
        );
        let rates = std::env::var("ETCDMIRROR_BENCH_RATES")
            .ok()
            .map(|s| {
                s.split(',')
                    .filter_map(|x| x.trim().parse::<f64>().ok())
                    .collect::<Vec<_>>()
            })
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| vec![100.0, 300.0, 1000.0, 2000.0, 3000.0, 4000.0]);
        let bin_dir = Scratch::new("bench-bin");
        let copy = bin_dir.path.join("etcdmirror");
        fs::copy(&bin, &copy).expect("copy the binary under test");
        let t0 = Instant::now();
        let src = Etcd::start("bench-src");
        let dst = Etcd::start("bench-dst");
        let (src3, dst3) = (V3::new(&src.url), V3::new(&dst.url));
        Bench {
            bin: copy,
            bin_origin: bin,
            _bin_dir: bin_dir,
            src,
            dst,
            raw: 0.0,
            tck: clk_tck(),
            rows: Vec::new(),
            results: Vec::new(),
            odd: Vec::new(),
            t0,
            rates,
            step: Duration::from_secs_f64(env_num("ETCDMIRROR_BENCH_STEP_SECS", 8.0)),
            only: only_sections(),
            src3,
            dst3,
            raw_txn: 0.0,
            dst_reads: AtomicU64::new(0),
        }
    }

    fn say(&self, what: &str) {
        println!("[{:6.1} s] {what}", self.t0.elapsed().as_secs_f64());
        let _ = std::io::stdout().flush();
    }

    fn row(&mut self, name: &str, value: String, ratio: Option<f64>, note: String) {
        println!(
            "    {name:<44} {value:>22} {:>8}  {note}",
            ratio.map(|r| format!("{r:.3}x")).unwrap_or_default()
        );
        self.rows.push(Row {
            name: name.to_string(),
            value,
            ratio,
            note,
        });
    }

    fn ratio(&self, per_s: f64) -> Option<f64> {
        (self.raw > 0.0).then(|| r3(per_s / self.raw))
    }

    fn mirror_args(&self, src_url: &str, reload: bool) -> Vec<String> {
        let mut a: Vec<String> = [
            "--port",
            "0",
            "--src-prefix",
            SRC_PREFIX,
            "--dst-prefix",
            DST_PREFIX,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if reload {
            a.push("--reload".into());
        }
        a.push(src_url.to_string());
        a.push(self.dst.url.clone());
        a
    }

    /// Start the mirror with --reload and wait for "Starting replication at".
    fn start_reload(&self, mode: &Mode) -> Proc {
        let mut m = Proc::spawn(&self.bin, &self.mirror_args(&mode.src_url, true));
        if let Err(e) = m.wait_log(Duration::from_secs(60), "Starting replication at") {
            panic!("bench: mirror --reload did not start: {e}");
        }
        m
    }

    fn machine(&self) -> Value {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let mem_kb = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1).map(String::from))
            })
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let out = |cmd: &str, arg: &str| {
            Command::new(cmd)
                .arg(arg)
                .output()
                .ok()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string()
                })
                .unwrap_or_default()
        };
        json!({
            "nproc": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "cpu_model": model,
            "mem_total_mb": mem_kb / 1024,
            "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "etcd_version": out("etcd", "--version"),
            "etcd_data_dir": "/dev/shm (tmpfs: fsync is nearly free, so absolute numbers are optimistic compared with disks)",
            "mirror_binary": self.bin_origin.display().to_string(),
            "mirror_version": out(&self.bin.display().to_string(), "--version"),
            "proxy_one_way_delay_ms": PROXY_DELAY.as_millis() as u64,
        })
    }

    fn run(mut self) {
        let machine = self.machine();
        println!("etcdmirror benchmark");
        println!(
            "  machine: {} x {}, etcd {}, binary {} ({})",
            machine["nproc"],
            machine["cpu_model"].as_str().unwrap_or(""),
            machine["etcd_version"].as_str().unwrap_or(""),
            machine["mirror_binary"].as_str().unwrap_or(""),
            machine["mirror_version"].as_str().unwrap_or("")
        );
        println!(
            "  etcd source {} and destination {}; data dirs on /dev/shm (tmpfs, RAM: fsync is \
             nearly free, absolute numbers are optimistic compared with disks)",
            self.src.url, self.dst.url
        );

        if self.only != SECTIONS {
            println!(
                "  sections (ETCDMIRROR_BENCH_ONLY): {}",
                self.only.join(",")
            );
        }

        self.raw_put();

        // Loopback: the mirror talks to the source directly.
        if self.only.contains(&"loopback") {
            let loopback = Mode {
                name: "loopback",
                src_url: self.src.url.clone(),
                proxy: None,
                drain: Duration::from_secs(3),
            };
            self.say("starting the mirror (--reload on an empty pair)");
            let mut m = self.start_reload(&loopback);
            self.mode_runs(&loopback, &mut m);
            m.stop();
        }

        let upstream: SocketAddr = format!("127.0.0.1:{}", self.src.client_port)
            .parse()
            .unwrap();
        if self.only.contains(&"distance") {
            self.distance(upstream);
        }
        if self.only.contains(&"far") {
            self.far(upstream);
        }
        if self.only.contains(&"reload") {
            self.reload();
        }
        if self.only.contains(&"v3v3") || self.only.contains(&"v2v3") {
            self.v3_all();
        }
        self.summary(&machine);
    }

    /// The source behind the 15 ms proxy: the mode runs, noise and the idle cost.
    fn distance(&mut self, upstream: SocketAddr) {
        let proxy = Proxy::start(upstream, PROXY_DELAY);
        let distance = Mode {
            name: "distance",
            src_url: proxy.url(),
            proxy: Some(proxy),
            drain: Duration::from_secs(3),
        };
        self.say(&format!(
            "distance: source behind a TCP proxy on {} adding {} ms each way ({} ms round trip)",
            distance.src_url,
            PROXY_DELAY.as_millis(),
            2 * PROXY_DELAY.as_millis()
        ));
        let mut m = self.start_reload(&distance);
        self.mode_runs(&distance, &mut m);
        self.noise(&distance, &mut m);
        self.idle_cost(&distance, &mut m);
        m.stop();
    }

    /// The source 60 ms away each way: the mode runs and noise.
    fn far(&mut self, upstream: SocketAddr) {
        let far_proxy = Proxy::start(upstream, FAR_DELAY);
        let far = Mode {
            name: "far",
            src_url: far_proxy.url(),
            proxy: Some(far_proxy),
            drain: Duration::from_secs(5),
        };
        self.say(&format!(
            "far: source behind a TCP proxy on {} adding {} ms each way ({} ms round trip)",
            far.src_url,
            FAR_DELAY.as_millis(),
            2 * FAR_DELAY.as_millis()
        ));
        let mut m = self.start_reload(&far);
        self.mode_runs(&far, &mut m);
        self.noise(&far, &mut m);
        m.stop();
    }

    /// The table of every row, the notes, and results.json.
    fn summary(&self, machine: &Value) {
        let total = self.t0.elapsed().as_secs_f64();
        println!();
        println!(
            "machine: {} x {}, etcd {}; etcd data dirs on /dev/shm (tmpfs); distance = {} ms \
             each way through the harness's TCP proxy",
            machine["nproc"],
            machine["cpu_model"].as_str().unwrap_or(""),
            machine["etcd_version"]
                .as_str()
                .unwrap_or("")
                .trim_start_matches("etcd Version: "),
            PROXY_DELAY.as_millis()
        );
        println!(
            "{:<46} {:>22} {:>8}  notes",
            "measurement", "value", "x raw"
        );
        println!("{}", "-".repeat(110));
        for r in &self.rows {
            println!(
                "{:<46} {:>22} {:>8}  {}",
                r.name,
                r.value,
                r.ratio.map(|x| format!("{x:.3}")).unwrap_or_default(),
                r.note
            );
        }
        println!("{}", "-".repeat(110));
        println!("total bench time {total:.0} s");
        if !self.odd.is_empty() {
            println!("\nnotes:");
            for o in &self.odd {
                println!("- {o}");
            }
        }
        let doc = json!({
            "machine": machine,
            "total_seconds": r1(total),
            "sections": self.only,
            "measurements": self.results,
            "notes": self.odd,
        });
        let path = results_path();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
        println!("wrote {}", path.display());
    }

    /// Measurement 1: sequential keep-alive PUTs by one client into the destination alone, 3 s.
    fn raw_put(&mut self) {
        self.say("raw_put: one client, sequential keep-alive PUTs into the destination, 3 s each");
        let c = Client::new(&self.dst.url);
        for i in 0..200 {
            c.set(&format!("/raw/warm{}", i % 50), "w");
        }
        // The ceiling: a minimal client, so the figure is the destination's, not the client's.
        let (n, secs) = minimal_puts(self.dst.client_port, Duration::from_secs(3));
        self.raw = n as f64 / secs;
        // Reference: the tests' Client (ureq agent with a global timeout, JSON parsed).
        let start = Instant::now();
        let mut n2 = 0u64;
        while start.elapsed() < Duration::from_secs(3) {
            c.set(&format!("/raw/k{}", n2 % 1000), &format!("v{n2}"));
            n2 += 1;
        }
        let secs2 = start.elapsed().as_secs_f64();
        let raw2 = n2 as f64 / secs2;
        self.results.push(json!({
            "measurement": "raw_put",
            "raw_put_per_s": r1(self.raw),
            "puts": n,
            "seconds": r3(secs),
            "target": "destination alone, one client, sequential, keep-alive",
            "client": "hand-written HTTP/1.1 on one TcpStream (request in one write, \
                       Content-Length body read, no JSON parsing)",
            "ureq_client_put_per_s": r1(raw2),
            "ureq_client": "the tests' Client: ureq 3 agent with timeout_global, body parsed \
                            with serde_json (3 s); for reference, ratios use raw_put_per_s",
        }));
        self.row(
            "raw_put_per_s (dst alone, 1 minimal client)",
            format!("{:.0} /s", self.raw),
            Some(1.0),
            format!("{n} PUTs in {secs:.1} s; hand-written HTTP/1.1, one connection"),
        );
        self.row(
            "  same via ureq + serde_json (reference)",
            format!("{raw2:.0} /s"),
            self.ratio(raw2),
            format!("{n2} PUTs in {secs2:.1} s; the tests' Client (ureq, timeout_global)"),
        );
    }

    /// Catch-up, sustained rates and delays for one mode; `m` is a running mirror.
    fn mode_runs(&mut self, mode: &Mode, m: &mut Proc) {
        self.catchup(mode, m);
        for rate in self.rates.clone() {
            self.sustained(mode, m, rate);
        }
        self.sustained_summary(mode);
        let n10 = env_num("ETCDMIRROR_BENCH_DELAY10_SAMPLES", 200u64);
        self.delay(mode, m, 10.0, n10);
        self.delay(mode, m, 100.0, 500);
    }

    /// The highest rate at which the mirror kept up, from this mode's sustained runs.
    fn sustained_summary(&mut self, mode: &Mode) {
        let best = self
            .results
            .iter()
            .filter(|r| {
                r["measurement"] == "sustained" && r["mode"] == mode.name && r["kept_up"] == true
            })
            .filter_map(|r| {
                Some((
                    r["target_writes_per_s"].as_f64()?,
                    r["achieved_writes_per_s"].as_f64()?,
                ))
            })
            .max_by(|a, b| a.0.total_cmp(&b.0));
        let first_failed = self
            .results
            .iter()
            .filter(|r| {
                r["measurement"] == "sustained" && r["mode"] == mode.name && r["kept_up"] == false
            })
            .filter_map(|r| r["target_writes_per_s"].as_f64())
            .min_by(|a, b| a.total_cmp(b));
        let achieved = best.map(|b| b.1).unwrap_or(0.0);
        self.results.push(json!({
            "measurement": "sustained_highest",
            "mode": mode.name,
            "highest_kept_up_target_writes_per_s": best.map(|b| b.0),
            "highest_kept_up_achieved_writes_per_s": best.map(|b| b.1),
            "ratio_to_raw": best.and_then(|b| self.ratio(b.1)),
            "lowest_failed_target_writes_per_s": first_failed,
            "rates_tried": self.rates,
        }));
        self.row(
            &format!("sustained {} highest kept up", mode.name),
            best.map_or("none".into(), |_| format!("{achieved:.0} w/s")),
            best.and_then(|b| self.ratio(b.1)),
            match first_failed {
                Some(f) => format!("lowest rate not kept up: {f:.0}/s (rates are steps)"),
                None => "kept up at every rate tried".into(),
            },
        );
    }

    /// Restart the mirror with --reload if it exited (recording why) or `force` is set.
    fn revive(&mut self, mode: &Mode, m: &mut Proc, what: &str, force: bool) -> Value {
        let how = "restarted_with_reload";
        self.revive_by(mode.name, m, what, force, how, |b| b.start_reload(mode))
    }

    /// Replace the mirror by `restart()` if it exited (recording why) or `force` is set; `how`
    /// names the restart in the JSON row.
    fn revive_by(
        &mut self,
        name: &str,
        m: &mut Proc,
        what: &str,
        force: bool,
        how: &str,
        restart: impl FnOnce(&mut Self) -> Proc,
    ) -> Value {
        if let Some(code) = m.exited() {
            let t = log_tail(&m.stderr());
            self.odd.push(format!(
                "{name} {what}: etcdmirror exited with code {code}; stderr tail:\n{}",
                indent(&t)
            ));
            *m = restart(self);
            return json!({"exit_code": code, "stderr_tail": t, how: true});
        }
        if force {
            m.stop();
            *m = restart(self);
            return json!({"exit_code": null, how: true, "why": "still behind after the drain time"});
        }
        Value::Null
    }

    /// Wait until the mirror's index reaches `target`, or it exits, or `timeout`. Returns the
    /// time taken when reached.
    fn wait_repl(&self, m: &mut Proc, target: u64, timeout: Duration) -> Option<f64> {
        let start = Instant::now();
        loop {
            if repl(&self.dst) >= target {
                return Some(start.elapsed().as_secs_f64());
            }
            if !m.alive() || start.elapsed() > timeout {
                return None;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Measurement 2: catch-up from the history (mirror stopped, 900 events written, mirror
    /// started).
    fn catchup(&mut self, mode: &Mode, m: &mut Proc) {
        const N: u64 = 900;
        self.say(&format!(
            "{}: catch-up: stop the mirror, write {N} events, start it, time until its index reaches the last",
            mode.name
        ));
        let caught = self.wait_repl(m, head(&self.src), Duration::from_secs(10));
        assert!(caught.is_some(), "mirror not caught up before catch-up run");
        m.stop();
        let from = repl(&self.dst);
        let log = WriteLog::default();
        let c = self.src.client.clone();
        let wsecs = burst_write(
            &c,
            N,
            4,
            &|i| format!("{SRC_PREFIX}/catchup/k{}", i % 300),
            &log,
        );
        let last = log.last_index.load(Ordering::SeqCst);
        let events = last - from;
        let start = Instant::now();
        *m = Proc::spawn(&self.bin, &self.mirror_args(&mode.src_url, false));
        let cpu0 = 0u64; // a fresh process
        let timeout = Duration::from_secs(if mode.proxy.is_some() { 60 } else { 30 });
        let took = self.wait_repl(m, last, timeout);
        let secs = took.unwrap_or(start.elapsed().as_secs_f64());
        let reached = repl(&self.dst);
        let cpu = m.cpu().map(|t| (t - cpu0) as f64 / self.tck);
        let rss = m.rss_kb();
        let done = reached.saturating_sub(from);
        let per_s = done as f64 / secs;
        let mut res = json!({
            "measurement": "catchup",
            "mode": mode.name,
            "events": events,
            "events_replicated": done,
            "completed": took.is_some(),
            "seconds": r3(secs),
            "events_per_s": r1(per_s),
            "ratio_to_raw": self.ratio(per_s),
            "writer_seconds": r3(wsecs),
            "mirror_cpu_seconds": cpu.map(r3),
            "mirror_rss_kb": rss,
        });
        let note = if took.is_some() {
            format!("{events} events in {secs:.2} s")
        } else {
            format!("INCOMPLETE: {done}/{events} events after {secs:.0} s")
        };
        self.row(
            &format!("catch-up {} (900 events)", mode.name),
            format!("{per_s:.0} ev/s"),
            self.ratio(per_s),
            note,
        );
        let restart = self.revive(mode, m, "catch-up", took.is_none());
        if !restart.is_null() {
            res["restart"] = restart;
        }
        self.results.push(res);
    }

    /// Measurement 3: sustained rate, an open-loop writer at `rate` writes/s for `self.step`.
    fn sustained(&mut self, mode: &Mode, m: &mut Proc, rate: f64) {
        self.say(&format!(
            "{}: sustained {rate:.0} writes/s for {:.0} s",
            mode.name,
            self.step.as_secs_f64()
        ));
        let threads = if rate >= 1000.0 { 4 } else { 1 };
        let log = WriteLog::default();
        let idx0 = head(&self.src);
        let cpu0 = m.cpu();
        let stop = AtomicBool::new(false);
        let samples: Mutex<Vec<(f64, u64, u64)>> = Mutex::new(Vec::new()); // (t, lag, rss)
        let pid = m.pid();
        let c = self.src.client.clone();
        let dst = self.dst.client.clone();
        let (count, wsecs, lag_end) = thread::scope(|s| {
            s.spawn(|| {
                let start = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    let last = log.last_index.load(Ordering::SeqCst);
                    let r = repl(&dst);
                    let rss = proc_status_kb(pid, "VmRSS").unwrap_or(0);
                    if last > 0 {
                        samples.lock().unwrap().push((
                            start.elapsed().as_secs_f64(),
                            last.saturating_sub(r),
                            rss,
                        ));
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            });
            let (count, wsecs) = rate_write(
                &c,
                rate,
                self.step,
                threads,
                &|i| format!("{SRC_PREFIX}/load/k{}", i % 1000),
                &log,
                None,
            );
            let lag_end = log
                .last_index
                .load(Ordering::SeqCst)
                .saturating_sub(repl(&dst));
            stop.store(true, Ordering::SeqCst);
            (count, wsecs, lag_end)
        });
        let last = log.last_index.load(Ordering::SeqCst);
        let drain = self.wait_repl(m, last, mode.drain);
        let alive = m.alive();
        let reached = repl(&self.dst);
        let cpu1 = m.cpu();
        let events = reached.saturating_sub(idx0);
        let cpu_per_10k = match (cpu0, cpu1) {
            (Some(a), Some(b)) if events > 0 && alive => {
                Some(r3((b - a) as f64 / self.tck / events as f64 * 10_000.0))
            }
            _ => None,
        };
        let samples = samples.into_inner().unwrap();
        let lag_max = samples.iter().map(|s| s.1).max().unwrap_or(0);
        let rss_max = samples.iter().map(|s| s.2).max().unwrap_or(0);
        let achieved = count as f64 / wsecs;
        let kept_up = alive && drain.is_some_and(|d| d <= 1.0);
        let mut res = json!({
            "measurement": "sustained",
            "mode": mode.name,
            "target_writes_per_s": rate,
            "achieved_writes_per_s": r1(achieved),
            "writes": count,
            "writer_threads": threads,
            "seconds": r3(wsecs),
            "lag_events_at_end": lag_end,
            "lag_events_max": lag_max,
            "drain_seconds": drain.map(r3),
            "drain_limit_seconds": mode.drain.as_secs_f64(),
            "kept_up": kept_up,
            "mirror_alive": alive,
            "ratio_to_raw": self.ratio(achieved),
            "mirror_cpu_seconds_per_10k_events": cpu_per_10k,
            "mirror_rss_kb_max": rss_max,
            "lag_samples_every_100ms": samples.iter().map(|s| s.1).collect::<Vec<_>>(),
        });
        let status = if kept_up {
            "kept up".to_string()
        } else if !alive {
            format!("MIRROR EXITED {}", m.exited().unwrap_or(-1))
        } else if drain.is_none() {
            format!(
                "fell behind (not caught up {:.0} s after)",
                mode.drain.as_secs_f64()
            )
        } else {
            "fell behind (drain > 1 s)".to_string()
        };
        self.row(
            &format!("sustained {} {rate:.0}/s", mode.name),
            format!("{achieved:.0} w/s"),
            self.ratio(achieved),
            format!(
                "{status}; lag end {lag_end}, max {lag_max}; drain {}",
                drain.map_or("-".into(), |d| format!("{d:.2} s"))
            ),
        );
        let restart = self.revive(mode, m, &format!("sustained {rate:.0}/s"), drain.is_none());
        if !restart.is_null() {
            res["restart"] = restart;
        }
        self.results.push(res);
    }

    /// Measurement 4: replication delay, from the source PUT's response to the arrival on a
    /// watch on the destination.
    fn delay(&mut self, mode: &Mode, m: &mut Proc, rate: f64, n: u64) {
        self.say(&format!(
            "{}: delay at {rate:.0} writes/s, {n} samples ({:.0} s)",
            mode.name,
            n as f64 / rate
        ));
        let sub = format!("delay-{}-{rate:.0}", mode.name);
        let dst_dir = format!("{DST_PREFIX}{SRC_PREFIX}/{sub}");
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(HashMap::new()));
        let watcher = dst_watcher(
            self.dst.url.clone(),
            dst_dir.clone(),
            head(&self.dst) + 1,
            stop.clone(),
            arrivals.clone(),
        );
        thread::sleep(Duration::from_millis(100)); // let the watch register
        let sent: Mutex<Vec<Option<Instant>>> = Mutex::new(vec![None; n as usize]);
        let log = WriteLog::default();
        let c = self.src.client.clone();
        // Tickets 0..n are due before (n - 0.5) / rate, ticket n is not.
        let dur = Duration::from_secs_f64((n as f64 - 0.5) / rate);
        let (count, _) = rate_write(
            &c,
            rate,
            dur,
            1,
            &|i| format!("{SRC_PREFIX}/{sub}/d{i}"),
            &log,
            Some(&|i, t| {
                if let Some(slot) = sent.lock().unwrap().get_mut(i as usize) {
                    *slot = Some(t);
                }
            }),
        );
        let wait = if mode.proxy.is_some() { 20 } else { 5 };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(wait)
            && (arrivals.lock().unwrap().len() as u64) < count
            && m.alive()
        {
            thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::SeqCst);
        let _ = watcher.join();
        let arr = arrivals.lock().unwrap().clone();
        let sent = sent.into_inner().unwrap();
        let d = delays(&sent, &arr, |i| format!("{dst_dir}/d{i}"));
        let (p50, p99, max) = (
            percentile(&d, 0.5),
            percentile(&d, 0.99),
            d.last().copied().unwrap_or(f64::NAN),
        );
        let missing = count - d.len() as u64;
        let mut res = delay_json(
            mode.name,
            json!(rate),
            count,
            json!(wait),
            &d,
            "source PUT response instant -> arrival on a long-poll watch (waitIndex) on the destination, one process, monotonic clock",
        );
        self.row(
            &format!("delay {} {rate:.0}/s p50/p99/max", mode.name),
            format!("{p50:.2}/{p99:.2}/{max:.1} ms"),
            None,
            format!(
                "{} samples{}",
                d.len(),
                if missing > 0 {
                    format!(", {missing} NOT ARRIVED within {wait} s")
                } else {
                    String::new()
                }
            ),
        );
        let restart = self.revive(mode, m, &format!("delay {rate:.0}/s"), missing > 0);
        if !restart.is_null() {
            res["restart"] = restart;
        }
        self.results.push(res);
    }

    /// Measurement 6: background noise, 1000 writes/s outside the prefix; samples the source
    /// head and the recorded index every 100 ms.
    fn noise(&mut self, mode: &Mode, m: &mut Proc) {
        let secs: f64 = env_num("ETCDMIRROR_BENCH_NOISE_SECS", 60.0);
        self.say(&format!(
            "{}: background noise, 1000 writes/s outside the prefix for {secs:.0} s",
            mode.name
        ));
        let stop = AtomicBool::new(false);
        let samples: Mutex<Vec<u64>> = Mutex::new(Vec::new());
        let c = self.src.client.clone();
        let dst = self.dst.client.clone();
        let pid = m.pid();
        let cpu0 = m.cpu();
        let ((count, wsecs), rss_max) = thread::scope(|s| {
            let h = s.spawn(|| {
                let mut rss_max = 0;
                while !stop.load(Ordering::SeqCst) {
                    // Recorded index first, then the head: the distance is never understated.
                    let rec = repl(&dst);
                    let h = head(&c);
                    samples.lock().unwrap().push(h.saturating_sub(rec));
                    rss_max = rss_max.max(proc_status_kb(pid, "VmRSS").unwrap_or(0));
                    thread::sleep(Duration::from_millis(100));
                }
                rss_max
            });
            let log = WriteLog::default();
            let r = rate_write(
                &c,
                1000.0,
                Duration::from_secs_f64(secs),
                2,
                &|i| format!("/noise/n{}", i % 1000),
                &log,
                None,
            );
            stop.store(true, Ordering::SeqCst);
            (r, h.join().unwrap())
        });
        let alive = m.alive();
        let cpu1 = m.cpu();
        let samples = samples.into_inner().unwrap();
        let worst = samples.iter().copied().max().unwrap_or(0);
        let mut sorted = samples.clone();
        sorted.sort_unstable();
        let p99 = sorted
            .get(((sorted.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0);
        let achieved = count as f64 / wsecs;
        let mut res = json!({
            "measurement": "noise",
            "mode": mode.name,
            "writes_per_s_target": 1000,
            "writes_per_s_achieved": r1(achieved),
            "seconds": r3(wsecs),
            "mirror_alive": alive,
            "worst_head_minus_recorded_index": worst,
            "p99_head_minus_recorded_index": p99,
            "margin_before_window_events": WINDOW as i64 - worst as i64,
            "samples_beyond_window": samples.iter().filter(|&&d| d >= WINDOW).count(),
            "samples": samples.len(),
            "mirror_rss_kb_max": rss_max,
            "mirror_cpu_seconds": match (cpu0, cpu1) {
                (Some(a), Some(b)) => Some(r3((b - a) as f64 / self.tck)),
                _ => None,
            },
        });
        self.row(
            &format!("noise {} 1000/s outside prefix, {secs:.0} s", mode.name),
            format!("worst {worst} behind"),
            None,
            format!(
                "margin {} of {WINDOW}; p99 {p99}; {achieved:.0} w/s; {}",
                WINDOW as i64 - worst as i64,
                if alive {
                    "mirror alive".to_string()
                } else {
                    format!("MIRROR EXITED {}", m.exited().unwrap_or(-1))
                }
            ),
        );
        let restart = self.revive(mode, m, "noise", false);
        if !restart.is_null() {
            res["restart"] = restart;
        }
        self.results.push(res);
    }

    /// Measurement 8: cost while idle (resident memory, CPU, requests sent to the source as
    /// counted by the proxy) over 20 s with nothing written anywhere; the under-load figures
    /// come from the sustained runs.
    fn idle_cost(&mut self, mode: &Mode, m: &mut Proc) {
        let proxy = mode.proxy.as_ref().expect("idle cost needs the proxy");
        self.say(&format!(
            "{}: idle cost: 60 s with no writes (requests counted by the proxy)",
            mode.name
        ));
        thread::sleep(Duration::from_secs(2));
        let (g0, c0, cpu0) = (
            proxy.gets.load(Ordering::SeqCst),
            proxy.conns.load(Ordering::SeqCst),
            m.cpu(),
        );
        let start = Instant::now();
        thread::sleep(Duration::from_secs(60));
        let secs = start.elapsed().as_secs_f64();
        let (g1, c1, cpu1) = (
            proxy.gets.load(Ordering::SeqCst),
            proxy.conns.load(Ordering::SeqCst),
            m.cpu(),
        );
        let rss = m.rss_kb();
        let per_min = (g1 - g0) as f64 * 60.0 / secs;
        let alive = m.alive();
        self.results.push(json!({
            "measurement": "idle_cost",
            "mode": mode.name,
            "seconds": r3(secs),
            "source_requests": g1 - g0,
            "source_requests_per_min": r1(per_min),
            "source_connections_opened": c1 - c0,
            "mirror_rss_kb_idle": rss,
            "mirror_cpu_seconds_per_min_idle": match (cpu0, cpu1) {
                (Some(a), Some(b)) => Some(r3((b - a) as f64 / self.tck * 60.0 / secs)),
                _ => None,
            },
            "mirror_alive": alive,
        }));
        self.row(
            "idle: requests/min to the source",
            format!("{per_min:.0} /min"),
            None,
            format!(
                "{:.1} new connections per minute",
                (c1 - c0) as f64 * 60.0 / secs
            ),
        );
        self.row(
            "idle: mirror RSS",
            format!("{:.1} MB", rss.unwrap_or(0) as f64 / 1024.0),
            None,
            String::new(),
        );
        // Under load and CPU: from the sustained runs.
        let loaded: Vec<&Value> = self
            .results
            .iter()
            .filter(|r| r["measurement"] == "sustained" && r["mode"] == "loopback")
            .collect();
        let rss_load = loaded
            .iter()
            .filter_map(|r| r["mirror_rss_kb_max"].as_u64())
            .max()
            .unwrap_or(0);
        let at1000 = loaded
            .iter()
            .find(|r| r["target_writes_per_s"].as_f64() == Some(1000.0))
            .or(loaded.first())
            .copied();
        let cpu10k = at1000.and_then(|r| r["mirror_cpu_seconds_per_10k_events"].as_f64());
        let rate = at1000.and_then(|r| r["target_writes_per_s"].as_f64());
        self.results.push(json!({
            "measurement": "load_cost",
            "mirror_rss_kb_max_under_load": rss_load,
            "rss_source": "max VmRSS sampled every 100 ms during the loopback sustained runs",
            "mirror_cpu_seconds_per_10k_events": cpu10k,
            "cpu_source": format!("loopback sustained run at {} writes/s (utime+stime from /proc)", rate.unwrap_or(0.0)),
        }));
        self.row(
            "load: mirror RSS max (loopback sustained)",
            format!("{:.1} MB", rss_load as f64 / 1024.0),
            None,
            String::new(),
        );
        self.row(
            "load: CPU s per 10k events",
            cpu10k.map_or("-".into(), |c| format!("{c:.2} s")),
            None,
            format!("loopback sustained {:.0}/s", rate.unwrap_or(0.0)),
        );
    }

    /// Measurement 7: `--reload` of 100,000 keys onto an empty destination, then onto one that
    /// differs in 10% of the keys.
    fn reload(&mut self) {
        let n: u64 = env_num("ETCDMIRROR_BENCH_RELOAD_KEYS", 100_000u64);
        self.say(&format!(
            "reload: fresh etcd pair; writing {n} keys to the source with 8 clients"
        ));
        let rs = Etcd::start("bench-reload-src");
        let rd = Etcd::start("bench-reload-dst");
        let log = WriteLog::default();
        let key = |i: u64| format!("/big/g{}/k{i}", i % 100);
        let wsecs = burst_write(&rs.client, n, 8, &key, &log);
        self.say(&format!(
            "reload: {n} keys written in {wsecs:.1} s ({:.0}/s, 8 clients)",
            n as f64 / wsecs
        ));
        let args = |_: ()| -> Vec<String> {
            [
                "--port",
                "0",
                "--src-prefix",
                "/big",
                "--dst-prefix",
                DST_PREFIX,
                "--reload",
                &rs.url,
                &rd.url,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let run = |this: &mut Bench, label: &str, short: &str, diffs: u64| {
            this.say(&format!("reload: --reload onto {label}"));
            let start = Instant::now();
            let mut m = Proc::spawn(&this.bin, &args(()));
            let r = m.wait_log(Duration::from_secs(300), "Starting replication at");
            let secs = start.elapsed().as_secs_f64();
            let hwm = m.hwm_kb();
            let cpu = m.cpu().map(|t| r3(t as f64 / this.tck));
            let summary = m
                .stderr()
                .lines()
                .find(|l| l.contains("reload done"))
                .map(|l| l.to_string());
            m.stop();
            let per_s = n as f64 / secs;
            if let Err(e) = &r {
                this.odd.push(format!("reload onto {label}: {e}"));
            }
            this.results.push(json!({
                "measurement": "reload",
                "destination": label,
                "keys": n,
                "differing_keys": diffs,
                "ok": r.is_ok(),
                "seconds": r3(secs),
                "keys_per_s": r1(per_s),
                "ratio_to_raw": this.ratio(per_s),
                "peak_rss_kb": hwm,
                "mirror_cpu_seconds": cpu,
                "log_summary": summary,
                "timed_until": "\"Starting replication at\" in the mirror's log",
            }));
            this.row(
                &format!("reload {n} keys onto {short}"),
                format!("{per_s:.0} keys/s"),
                this.ratio(per_s),
                format!(
                    "{}{secs:.1} s; peak RSS {:.1} MB",
                    if r.is_ok() { "" } else { "FAILED; " },
                    hwm.unwrap_or(0) as f64 / 1024.0
                ),
            );
        };
        run(self, "an empty destination", "empty dst", n);
        // Make 10% of the keys differ: 5% changed values, 2.5% missing, 2.5% extra.
        let dst = rd.client.clone();
        let next = AtomicU64::new(0);
        let step = 10u64;
        thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| loop {
                    let j = next.fetch_add(1, Ordering::SeqCst);
                    let i = j * step;
                    if i >= n {
                        break;
                    }
                    let k = format!("{DST_PREFIX}{}", key(i));
                    match j % 4 {
                        0 | 1 => {
                            dst.set(&k, "changed");
                        }
                        2 => {
                            dst.delete(&k, &[]);
                        }
                        _ => {
                            dst.set(&format!("{DST_PREFIX}/big/g{}/extra{i}", i % 100), "x");
                        }
                    }
                });
            }
        });
        run(
            self,
            "a destination differing in 10% of keys (5% changed, 2.5% missing, 2.5% extra)",
            "10%-different dst",
            n / step,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A v3 destination (issue 10): v3 to v3 and v2 to v3

/// Which API the source of a v3-destination run speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SrcApi {
    V2,
    V3,
}

/// One v3-destination combination. Every start from scratch moves to a fresh source prefix
/// (empty on both sides) and puts the index at the source's head by hand, which stands in
/// for `--reload` (not wired for a v3 destination on every branch yet).
struct V3Mode {
    /// "v3-to-v3" or "v2-to-v3".
    name: &'static str,
    src_api: SrcApi,
    /// The prefixes used are `/<base>-<generation>`.
    base: &'static str,
    generation: u32,
    /// The source prefix in use.
    prefix: String,
}

/// The CPU time of every process of a run and the destination's request counters at one
/// instant: where a run's time went.
struct Usage {
    at: Instant,
    /// The replication index on the destination.
    index: u64,
    mirror: Option<u64>,
    dst: Option<u64>,
    src: Option<u64>,
    bench: Option<u64>,
    /// The destination's gRPC requests by method (the JSON gateway's included).
    grpc: HashMap<String, u64>,
    /// Reads of the index by the bench itself, to subtract from the destination's ranges.
    own_reads: u64,
    /// The mirror's own time in destination writes: (seconds, writes), from its /metrics.
    writes: Option<(f64, u64)>,
    /// The whole machine's CPU: (busy, total) clock ticks summed over all cores.
    machine: Option<(u64, u64)>,
}

/// The machine's CPU from /proc/stat: (busy, total) ticks over all cores; busy is all but
/// idle and iowait.
fn machine_ticks() -> Option<(u64, u64)> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().sum();
    let idle = f.get(3)? + f.get(4)?;
    Some((total - idle, total))
}

/// The mirror's `etcdmirror_write_latency` sum and count from its metrics endpoint.
fn mirror_writes(url: &str) -> Option<(f64, u64)> {
    let text = ureq::get(format!("{url}/metrics"))
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()?;
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((
        value("etcdmirror_write_latency_sum")?,
        value("etcdmirror_write_latency_count")? as u64,
    ))
}

/// The destination's `grpc_server_handled_total` by method, from its /metrics.
fn grpc_counts(base: &str) -> HashMap<String, u64> {
    let text = ureq::get(format!("{base}/metrics"))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .unwrap_or_default();
    let mut out = HashMap::new();
    for l in text
        .lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{"))
    {
        let method = l
            .split("grpc_method=\"")
            .nth(1)
            .and_then(|r| r.split('"').next());
        let n = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(m), Some(n)) = (method, n) {
            *out.entry(m.to_string()).or_insert(0) += n as u64;
        }
    }
    out
}

/// A v3 watch on the destination's keys under `prefix`, from now, in its own thread: records
/// the arrival instant of every key (by name), signals `created` once the watch is in place,
/// and ends after the first message that arrives once `stop` is set (or after `limit`).
fn dst3_watcher(
    base: String,
    prefix: String,
    stop: Arc<AtomicBool>,
    arrivals: Arc<Mutex<HashMap<String, Instant>>>,
    created: mpsc::Sender<()>,
    limit: Duration,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(limit))
                .build(),
        );
        let body = json!({"create_request": {
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&prefix_end(prefix.as_bytes())),
        }});
        let resp = match agent
            .post(format!("{base}/v3/watch"))
            .send(body.to_string())
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("bench: the destination watch failed: {e}");
                return;
            }
        };
        let mut reader = std::io::BufReader::new(resp.into_body().into_reader());
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let t = Instant::now();
            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            let r = &v["result"];
            if r["created"] == json!(true) {
                let _ = created.send(());
            }
            if let Some(events) = r["events"].as_array() {
                let mut a = arrivals.lock().unwrap();
                for ev in events {
                    if let Some(k) = ev["kv"]["key"].as_str() {
                        a.entry(String::from_utf8_lossy(&unb64(k)).into_owned())
                            .or_insert(t);
                    }
                }
            }
            if stop.load(Ordering::SeqCst) {
                break;
            }
        }
    })
}

/// The client of the v3 ceiling: one raw keep-alive connection, 1000 keys whose values it
/// knows, and an index; each transaction is shaped as the mirror writes an event.
struct TxnCeiling {
    h: RawHttp,
    /// The index key, the keys and their current values, base64.
    index: String,
    keys: Vec<String>,
    values: Vec<String>,
    /// The index value the destination holds.
    idx: u64,
    /// Transactions sent so far (the next key is `next % 1000`).
    next: usize,
}

impl TxnCeiling {
    /// Connect and put the 1000 keys and the index, so that every transaction compares values.
    fn new(port: u16) -> TxnCeiling {
        let mut h = RawHttp::connect(port);
        let index = b64(b"/__replication/raw3");
        let keys: Vec<String> = (0..1000)
            .map(|k| b64(format!("/raw3/k{k}").as_bytes()))
            .collect();
        let values = vec![b64(b"init"); keys.len()];
        for (k, v) in keys.iter().zip(&values) {
            h.request(
                "POST",
                "/v3/kv/put",
                "application/json",
                &format!(r#"{{"key":"{k}","value":"{v}"}}"#),
            );
        }
        h.request(
            "POST",
            "/v3/kv/put",
            "application/json",
            &format!(r#"{{"key":"{index}","value":"{}"}}"#, b64(b"0")),
        );
        TxnCeiling {
            h,
            index,
            keys,
            values,
            idx: 0,
            next: 0,
        }
    }

    /// Transactions one after the other for `secs`: (count, seconds).
    fn run(&mut self, secs: f64) -> (u64, f64) {
        const SUCCEEDED: &[u8] = b"\"succeeded\":true";
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            let k = self.next % self.keys.len();
            let (index, key, old) = (&self.index, &self.keys[k], &self.values[k]);
            let idx = b64(self.idx.to_string().as_bytes());
            let new = b64(format!("v{}", self.next).as_bytes());
            let new_idx = b64((self.idx + 1).to_string().as_bytes());
            let body = format!(
                r#"{{"compare":[{{"key":"{index}","target":"VALUE","result":"EQUAL","value":"{idx}"}},{{"key":"{key}","target":"VALUE","result":"EQUAL","value":"{old}"}}],"success":[{{"request_put":{{"key":"{key}","value":"{new}"}}}},{{"request_put":{{"key":"{index}","value":"{new_idx}"}}}}],"failure":[{{"request_range":{{"key":"{index}"}}}},{{"request_range":{{"key":"{key}"}}}}]}}"#
            );
            let (_, answer) = self
                .h
                .request("POST", "/v3/kv/txn", "application/json", &body);
            assert!(
                answer.windows(SUCCEEDED.len()).any(|w| w == SUCCEEDED),
                "ceiling txn failed: {}",
                String::from_utf8_lossy(answer)
            );
            self.values[k] = new;
            self.idx += 1;
            self.next += 1;
            n += 1;
        }
        (n, start.elapsed().as_secs_f64())
    }
}

impl Bench {
    /// The replication index on the v3 destination, 0 when absent.
    fn v3_index(&self) -> u64 {
        self.dst_reads.fetch_add(1, Ordering::SeqCst);
        common::v3::replication_index(&self.dst3, DST_PREFIX).unwrap_or(0)
    }

    /// The source's head: its revision (v3) or X-Etcd-Index (v2).
    fn v3_head(&self, mode: &V3Mode) -> u64 {
        match mode.src_api {
            SrcApi::V3 => self.src3.revision(),
            SrcApi::V2 => head(&self.src),
        }
    }

    /// A writer's source write of `v{i}` at `key`: a v3 put or a v2 PUT; the revision or
    /// index it made.
    fn v3_src_put(&self, mode: &V3Mode, key: &str, i: u64) -> u64 {
        match mode.src_api {
            SrcApi::V3 => self.src3.put(key, &format!("v{i}")),
            SrcApi::V2 => v2_put(&self.src.client, key, i),
        }
    }

    /// Start the mirror on the index stored on the destination, serving /metrics on
    /// loopback (its write latencies are part of the profile).
    fn v3_spawn(&self, mode: &V3Mode) -> Proc {
        let port = common::free_port().to_string();
        let mut a: Vec<String> = [
            "--port",
            &port,
            "--listen",
            "127.0.0.1",
            "--src-prefix",
            &mode.prefix,
            "--dst-prefix",
            DST_PREFIX,
            "--dst-api",
            "v3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if mode.src_api == SrcApi::V3 {
            a.extend(["--src-api".to_string(), "v3".to_string()]);
        }
        a.push(self.src.url.clone());
        a.push(self.dst.url.clone());
        Proc::spawn(&self.bin, &a)
    }

    /// Move to a fresh prefix (nothing under it on either side), put the index at the source's
    /// head and start the mirror. The previous mirror must be stopped.
    fn v3_fresh(&self, mode: &mut V3Mode) -> Proc {
        mode.generation += 1;
        mode.prefix = format!("/{}-{}", mode.base, mode.generation);
        let head = self.v3_head(mode);
        self.dst3.put(&index_key(DST_PREFIX), &head.to_string());
        let mut m = self.v3_spawn(mode);
        if let Err(e) = m.wait_log(Duration::from_secs(30), "Starting replication into v3 at") {
            panic!("bench: the {} mirror did not start: {e}", mode.name);
        }
        m
    }

    /// Wait until the v3 destination's index reaches `target`, or the mirror exits, or
    /// `timeout`. Returns the time taken when reached.
    fn v3_wait(&self, m: &mut Proc, target: u64, timeout: Duration) -> Option<f64> {
        let start = Instant::now();
        loop {
            if self.v3_index() >= target {
                return Some(start.elapsed().as_secs_f64());
            }
            if !m.alive() || start.elapsed() > timeout {
                return None;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Start again from scratch if the mirror exited (recording why) or `force` is set.
    fn v3_revive(&mut self, mode: &mut V3Mode, m: &mut Proc, what: &str, force: bool) -> Value {
        let (name, how) = (mode.name, "restarted_on_a_fresh_prefix");
        self.revive_by(name, m, what, force, how, |b| b.v3_fresh(mode))
    }

    /// The counters now; `m` is the running mirror, if any.
    fn usage(&self, m: Option<&Proc>) -> Usage {
        Usage {
            at: Instant::now(),
            index: if m.is_some() { self.v3_index() } else { 0 },
            mirror: m.and_then(Proc::cpu),
            writes: m
                .and_then(Proc::metrics_url)
                .and_then(|u| mirror_writes(&u)),
            machine: machine_ticks(),
            dst: cpu_ticks(self.dst.pid()),
            src: cpu_ticks(self.src.pid()),
            bench: cpu_ticks(std::process::id()),
            grpc: grpc_counts(&self.dst.url),
            own_reads: self.dst_reads.load(Ordering::SeqCst),
        }
    }

    /// Between two `Usage`s: the events applied, the CPU each process used (in cores: 1.0 is
    /// one core busy all the time) and the destination requests per applied event.
    fn usage_json(&self, a: &Usage, b: &Usage) -> Value {
        let wall = (b.at - a.at).as_secs_f64();
        let events = b.index.saturating_sub(a.index);
        let cores = |x: Option<u64>, y: Option<u64>| match (x, y) {
            (Some(x), Some(y)) => Some(r3(y.saturating_sub(x) as f64 / self.tck / wall)),
            _ => None,
        };
        let diff = |m: &str| {
            b.grpc
                .get(m)
                .copied()
                .unwrap_or(0)
                .saturating_sub(a.grpc.get(m).copied().unwrap_or(0))
        };
        // The bench's own index reads are ranges too (the lag sampler and these snapshots).
        let ranges = diff("Range").saturating_sub(b.own_reads - a.own_reads);
        let per_event = |n: u64| (events > 0).then(|| r3(n as f64 / events as f64));
        let txns = diff("Txn");
        let dst_ms_per_txn = match (a.dst, b.dst) {
            (Some(x), Some(y)) if txns > 0 => Some(r3(y.saturating_sub(x) as f64 / self.tck
                * 1000.0
                / txns as f64)),
            _ => None,
        };
        let machine = match (a.machine, b.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                let n = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
                Some(r3((b1 - b0) as f64 / (t1 - t0) as f64 * n))
            }
            _ => None,
        };
        let ours: Option<f64> = [
            cores(a.mirror, b.mirror).or(Some(0.0)),
            cores(a.dst, b.dst),
            cores(a.src, b.src),
            cores(a.bench, b.bench),
        ]
        .into_iter()
        .sum();
        let (write_ms, in_writes) = match (a.writes, b.writes) {
            (Some((s0, c0)), Some((s1, c1))) if c1 > c0 => (
                Some(r3((s1 - s0) * 1000.0 / (c1 - c0) as f64)),
                Some(r3((s1 - s0) / wall)),
            ),
            _ => (None, None),
        };
        let mirror_cpu_ms = match (a.mirror, b.mirror) {
            (Some(x), Some(y)) if events > 0 => Some(r3(y.saturating_sub(x) as f64 / self.tck
                * 1000.0
                / events as f64)),
            _ => None,
        };
        json!({
            "seconds": r3(wall),
            "events_applied": events,
            "events_applied_per_s": r1(events as f64 / wall),
            "cpu_cores": {
                "mirror": cores(a.mirror, b.mirror),
                "dst_etcd": cores(a.dst, b.dst),
                "src_etcd": cores(a.src, b.src),
                "bench_writer_and_probes": cores(a.bench, b.bench),
            },
            "machine_busy_cores": machine,
            "other_processes_cores": machine.zip(ours).map(|(m, o)| r3(m - o)),
            "mirror_cpu_ms_per_event": mirror_cpu_ms,
            "mirror_write_ms_mean": write_ms,
            "mirror_share_of_time_in_dst_writes": in_writes,
            "dst_etcd_cpu_ms_per_txn": dst_ms_per_txn,
            "dst_requests_per_event": {
                "Txn": per_event(diff("Txn")),
                "Range": per_event(ranges),
                "Put": per_event(diff("Put")),
                "DeleteRange": per_event(diff("DeleteRange")),
            },
            "dst_index_reads_by_bench": b.own_reads - a.own_reads,
            "method": "utime+stime from /proc over the writer's run (machine: /proc/stat, \
                       other processes = machine - ours); the destination's \
                       grpc_server_handled_total by method (the JSON gateway forwards to gRPC), \
                       minus the bench's own index reads; the mirror's write time from its \
                       etcdmirror_write_latency sum and count",
        })
    }

    /// A short description of `usage_json` for a table note.
    fn usage_note(p: &Value) -> String {
        let c = &p["cpu_cores"];
        let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.2}"));
        format!(
            "cores: mirror {}, dst etcd {}, src etcd {}, writer {}, others {}; dst txn/event {}, \
             {} ms dst CPU/txn; mirror in writes {} of the time, {} ms each",
            f(&c["mirror"]),
            f(&c["dst_etcd"]),
            f(&c["src_etcd"]),
            f(&c["bench_writer_and_probes"]),
            f(&p["other_processes_cores"]),
            f(&p["dst_requests_per_event"]["Txn"]),
            f(&p["dst_etcd_cpu_ms_per_txn"]),
            f(&p["mirror_share_of_time_in_dst_writes"]),
            f(&p["mirror_write_ms_mean"]),
        )
    }

    /// Every v3 section: the v3 ceiling, then v3 to v3 and v2 to v3.
    fn v3_all(&mut self) {
        self.row(
            "--- v3 destination (x = ratio to raw_txn_v3)",
            String::new(),
            None,
            String::new(),
        );
        self.raw_txn_v3();
        let modes = [
            ("v3v3", "v3-to-v3", SrcApi::V3, "bench33"),
            ("v2v3", "v2-to-v3", SrcApi::V2, "bench23"),
        ];
        for (section, name, src_api, base) in modes {
            if !self.only.contains(&section) {
                continue;
            }
            let mut mode = V3Mode {
                name,
                src_api,
                base,
                generation: 0,
                prefix: String::new(),
            };
            self.say(&format!(
                "{name}: index put at the source's head by hand, mirror started without --reload"
            ));
            let mut m = self.v3_fresh(&mut mode);
            self.v3_catchup(&mut mode, &mut m);
            self.v3_ladder(&mut mode, &mut m);
            self.v3_delay(&mut mode, &mut m, 100.0, 500);
            m.stop();
        }
    }

    fn v3_ratio(&self, per_s: f64) -> Option<f64> {
        (self.raw_txn > 0.0).then(|| r3(per_s / self.raw_txn))
    }

    /// The v3 ceiling: serial keep-alive transactions into the destination alone, shaped as
    /// the mirror writes an event (compare the index's value and the key's previous value,
    /// put both; a failure branch reading both), on 1000 rotating keys. Then, for reference:
    /// the same through ureq and serde_json, and the same while the bench's writer puts into
    /// the source at 0.8 x the ceiling (what is left of the machine for the destination when
    /// the source takes the goal's load).
    fn raw_txn_v3(&mut self) {
        let secs: f64 = env_num("ETCDMIRROR_BENCH_V3_CEILING_SECS", 5.0);
        self.say(&format!(
            "raw_txn_v3: one client, sequential keep-alive v3 transactions into the destination, {secs:.0} s"
        ));
        let mut ceiling = TxnCeiling::new(self.dst.client_port);
        let u0 = self.usage(None);
        let (n, secs) = ceiling.run(secs);
        let u1 = self.usage(None);
        self.raw_txn = n as f64 / secs;
        let profile = self.usage_json(&u0, &u1);
        // Reference: the tests' V3 client (ureq, serde_json both ways), 3 s.
        let c = self.dst3.clone();
        let start = Instant::now();
        let mut n2 = 0usize;
        while start.elapsed() < Duration::from_secs(3) {
            let k = ceiling.next % ceiling.keys.len();
            let key = &ceiling.keys[k];
            let new = b64(format!("u{n2}").as_bytes());
            let (i_old, i_new) = (
                b64(ceiling.idx.to_string().as_bytes()),
                b64((ceiling.idx + 1).to_string().as_bytes()),
            );
            let v = c.ok(
                "kv/txn",
                &json!({
                    "compare": [
                        {"key": ceiling.index, "target": "VALUE", "result": "EQUAL", "value": i_old},
                        {"key": key, "target": "VALUE", "result": "EQUAL", "value": ceiling.values[k]},
                    ],
                    "success": [
                        {"request_put": {"key": key, "value": new}},
                        {"request_put": {"key": ceiling.index, "value": i_new}},
                    ],
                    "failure": [
                        {"request_range": {"key": ceiling.index}},
                        {"request_range": {"key": key}},
                    ],
                }),
            );
            assert_eq!(v["succeeded"], json!(true), "reference txn failed: {v}");
            ceiling.values[k] = new;
            ceiling.idx += 1;
            ceiling.next += 1;
            n2 += 1;
        }
        let secs2 = start.elapsed().as_secs_f64();
        let raw2 = n2 as f64 / secs2;
        self.results.push(json!({
            "measurement": "raw_txn_v3",
            "raw_txn_v3_per_s": r1(self.raw_txn),
            "txns": n,
            "seconds": r3(secs),
            "ratio_to_raw_put_v2": self.ratio(self.raw_txn),
            "target": "destination alone, one client, sequential, keep-alive, 1000 rotating keys",
            "txn": "compare the index VALUE and the key VALUE, put the key and the index; \
                    failure branch ranges both (the mirror's shape for an event)",
            "client": "hand-written HTTP/1.1 on one TcpStream (JSON body formatted, answer read \
                       by Content-Length and searched for \"succeeded\":true)",
            "profile": profile,
            "ureq_client_txn_per_s": r1(raw2),
            "ureq_client": "the tests' V3 client: ureq 3 agent, serde_json both ways (3 s); for \
                            reference, v3 ratios use raw_txn_v3_per_s",
        }));
        self.row(
            "raw_txn_v3_per_s (dst alone, 1 minimal client)",
            format!("{:.0} /s", self.raw_txn),
            Some(1.0),
            format!(
                "{n} txns in {secs:.1} s; {:.3}x raw_put_per_s; 2 compares + 2 puts; cores: dst \
                 etcd {}, client {}, others {}; {} ms dst CPU/txn",
                self.raw_txn / self.raw.max(1.0),
                profile["cpu_cores"]["dst_etcd"],
                profile["cpu_cores"]["bench_writer_and_probes"],
                profile["other_processes_cores"],
                profile["dst_etcd_cpu_ms_per_txn"],
            ),
        );
        self.row(
            "  same via ureq + serde_json (reference)",
            format!("{raw2:.0} /s"),
            self.v3_ratio(raw2),
            format!("{n2} txns in {secs2:.1} s; the tests' V3 client"),
        );
        // The same while the source is busy.
        let busy_secs: f64 = env_num("ETCDMIRROR_BENCH_V3_CEILING_SECS", 5.0);
        let rate = 0.8 * self.raw_txn;
        let src3 = self.src3.clone();
        let log = WriteLog::default();
        let u0 = self.usage(None);
        let ((n3, secs3), (w, wsecs)) = thread::scope(|s| {
            let writer = s.spawn(|| {
                rate_run(
                    rate,
                    Duration::from_secs_f64(busy_secs),
                    4,
                    &|i| src3.put(&format!("/rawload/k{}", i % 1000), &format!("v{i}")),
                    &log,
                    None,
                )
            });
            let r = ceiling.run(busy_secs);
            (r, writer.join().unwrap())
        });
        let u1 = self.usage(None);
        let busy = n3 as f64 / secs3;
        let busy_profile = self.usage_json(&u0, &u1);
        self.results.push(json!({
            "measurement": "raw_txn_v3_source_busy",
            "raw_txn_v3_per_s": r1(busy),
            "ratio_to_v3_ceiling": self.v3_ratio(busy),
            "txns": n3,
            "seconds": r3(secs3),
            "source_writes_per_s_target": r1(rate),
            "source_writes_per_s_achieved": r1(w as f64 / wsecs),
            "source_writer": "v3 puts into the source, 4 threads, open loop (the sustained runs' writer)",
            "profile": busy_profile,
        }));
        self.row(
            "  same, source taking 0.8x in v3 puts",
            format!("{busy:.0} /s"),
            self.v3_ratio(busy),
            format!(
                "source writer {:.0}/s; cores: dst etcd {}, src etcd {}, writer+client {}, others {}",
                w as f64 / wsecs,
                busy_profile["cpu_cores"]["dst_etcd"],
                busy_profile["cpu_cores"]["src_etcd"],
                busy_profile["cpu_cores"]["bench_writer_and_probes"],
                busy_profile["other_processes_cores"],
            ),
        );
    }

    /// Catch-up: the mirror stopped, `n` events written (v3: 5000 revisions, inside the
    /// source's history; v2: 900, inside its 1000-event window), the mirror started again on
    /// its stored index; time until its index reaches the last.
    fn v3_catchup(&mut self, mode: &mut V3Mode, m: &mut Proc) {
        let (n, keys) = match mode.src_api {
            SrcApi::V3 => (env_num("ETCDMIRROR_BENCH_V3_CATCHUP", 5000u64), 1000),
            SrcApi::V2 => (900, 300),
        };
        self.say(&format!(
            "{}: catch-up: stop the mirror, write {n} events, start it, time until its index reaches the last",
            mode.name
        ));
        m.stop();
        let from = self.v3_index();
        let log = WriteLog::default();
        let prefix = mode.prefix.clone();
        let this = &*self;
        let md = &*mode;
        let wsecs = burst_run(
            n,
            4,
            &|i| this.v3_src_put(md, &format!("{prefix}/catchup/k{}", i % keys), i),
            &log,
        );
        let last = log.last_index.load(Ordering::SeqCst);
        let events = last - from;
        let start = Instant::now();
        *m = self.v3_spawn(mode);
        let took = self.v3_wait(m, last, Duration::from_secs(60));
        let secs = took.unwrap_or(start.elapsed().as_secs_f64());
        let reached = self.v3_index();
        let cpu = m.cpu().map(|t| t as f64 / self.tck);
        let done = reached.saturating_sub(from);
        let per_s = done as f64 / secs;
        let mut res = json!({
            "measurement": "catchup",
            "mode": mode.name,
            "events": events,
            "events_replicated": done,
            "completed": took.is_some(),
            "seconds": r3(secs),
            "events_per_s": r1(per_s),
            "ratio_to_v3_ceiling": self.v3_ratio(per_s),
            "writer_seconds": r3(wsecs),
            "mirror_cpu_seconds": cpu.map(r3),
            "mirror_cpu_ms_per_event": cpu.filter(|_| done > 0).map(|c| r3(c * 1000.0 / done as f64)),
            "mirror_rss_kb": m.rss_kb(),
            "timed_from": "the mirror's spawn (its start-up included)",
        });
        let note = if took.is_some() {
            format!(
                "{events} events in {secs:.2} s; mirror CPU {:.2} s",
                cpu.unwrap_or(0.0)
            )
        } else {
            format!("INCOMPLETE: {done}/{events} events after {secs:.0} s")
        };
        self.row(
            &format!("catch-up {} ({n} events)", mode.name),
            format!("{per_s:.0} ev/s"),
            self.v3_ratio(per_s),
            note,
        );
        let restart = self.v3_revive(mode, m, "catch-up", took.is_none());
        if !restart.is_null() {
            res["restart"] = restart;
        }
        self.results.push(res);
    }

    /// One sustained run into the v3 destination: an open-loop writer at `rate` writes/s for
    /// `secs` under the prefix. Kept up as in the v2 runs: the mirror alive and its index at
    /// the last write within 1 s after the writer stops (scaled down for runs under 20 s).
    /// Returns the achieved rate if kept up.
    fn v3_sustained(
        &mut self,
        mode: &mut V3Mode,
        m: &mut Proc,
        rate: f64,
        secs: f64,
        phase: &str,
    ) -> Option<f64> {
        self.say(&format!(
            "{}: sustained {rate:.0} writes/s ({:.2} x ceiling) for {secs:.0} s ({phase})",
            mode.name,
            rate / self.raw_txn
        ));
        let drain_limit = Duration::from_secs(3);
        let threads = if rate >= 1000.0 { 4 } else { 1 };
        let log = WriteLog::default();
        let stop = AtomicBool::new(false);
        let samples: Mutex<Vec<u64>> = Mutex::new(Vec::new());
        let prefix = mode.prefix.clone();
        let this = &*self;
        let md = &*mode;
        let mp = Some(&*m);
        let ((count, wsecs), lag_end, u0, u1) = thread::scope(|s| {
            let u0 = this.usage(mp);
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let last = log.last_index.load(Ordering::SeqCst);
                    let r = this.v3_index();
                    if last > 0 {
                        samples.lock().unwrap().push(last.saturating_sub(r));
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            });
            let w = rate_run(
                rate,
                Duration::from_secs_f64(secs),
                threads,
                &|i| this.v3_src_put(md, &format!("{prefix}/load/k{}", i % 1000), i),
                &log,
                None,
            );
            let u1 = this.usage(mp);
            let lag_end = log
                .last_index
                .load(Ordering::SeqCst)
                .saturating_sub(u1.index);
            stop.store(true, Ordering::SeqCst);
            (w, lag_end, u0, u1)
        });
        let last = log.last_index.load(Ordering::SeqCst);
        let drain = self.v3_wait(m, last, drain_limit);
        let alive = m.alive();
        let profile = self.usage_json(&u0, &u1);
        let samples = samples.into_inner().unwrap();
        let lag_max = samples.iter().copied().max().unwrap_or(0);
        let achieved = count as f64 / wsecs;
        // 1 s after 20 s, as the v2 runs allow 1 s; a shorter probe allows as much backlog per
        // second of writing, so that a probe passes only where a hold can.
        let allowed = (secs / 20.0).min(1.0);
        let kept_up = alive && drain.is_some_and(|d| d <= allowed);
        let mut res = json!({
            "measurement": "sustained",
            "mode": mode.name,
            "phase": phase,
            "kept_up_if_drained_within_seconds": allowed,
            "target_writes_per_s": rate,
            "target_fraction_of_v3_ceiling": self.v3_ratio(rate),
            "achieved_writes_per_s": r1(achieved),
            "writes": count,
            "writer_threads": threads,
            "seconds": r3(wsecs),
            "lag_events_at_end": lag_end,
            "lag_events_max": lag_max,
            "drain_seconds": drain.map(r3),
            "drain_limit_seconds": drain_limit.as_secs_f64(),
            "kept_up": kept_up,
            "mirror_alive": alive,
            "ratio_to_v3_ceiling": self.v3_ratio(achieved),
            "profile": profile,
            "lag_samples_every_100ms": samples,
        });
        let status = if kept_up {
            "kept up".to_string()
        } else if !alive {
            format!("MIRROR EXITED {}", m.exited().unwrap_or(-1))
        } else if drain.is_none() {
            format!(
                "fell behind (not caught up {:.0} s after)",
                drain_limit.as_secs_f64()
            )
        } else {
            format!("fell behind (drain > {allowed:.2} s)")
        };
        self.row(
            &format!("sustained {} {rate:.0}/s ({phase})", mode.name),
            format!("{achieved:.0} w/s"),
            self.v3_ratio(achieved),
            format!(
                "{status}; lag end {lag_end}, max {lag_max}; drain {}; applied {:.0}/s; {}",
                drain.map_or("-".into(), |d| format!("{d:.2} s")),
                res["profile"]["events_applied_per_s"]
                    .as_f64()
                    .unwrap_or(0.0),
                Self::usage_note(&res["profile"])
            ),
        );
        let restart = self.v3_revive(mode, m, &format!("sustained {rate:.0}/s"), drain.is_none());
        if !restart.is_null() {
            res["restart"] = restart;
        }
        self.results.push(res);
        kept_up.then_some(achieved)
    }

    /// The highest rate kept up: short probes in steps of 0.1 x the ceiling from 0.8 (up
    /// while kept up, to 1.0; down while not), then the best one held for 20 s (one step
    /// lower again if that fails, at most three times).
    fn v3_ladder(&mut self, mode: &mut V3Mode, m: &mut Proc) {
        let probe_secs: f64 = env_num("ETCDMIRROR_BENCH_V3_PROBE_SECS", 5.0);
        let hold_secs: f64 = env_num("ETCDMIRROR_BENCH_V3_HOLD_SECS", 20.0);
        let start: f64 = env_num("ETCDMIRROR_BENCH_V3_START", 0.8);
        let ceiling = self.raw_txn;
        let rate_of =
            |tenths: i32| ((f64::from(tenths) / 10.0 * ceiling / 10.0).round() * 10.0).max(10.0);
        let mut probes: Vec<Value> = Vec::new();
        let mut t = ((start * 10.0).round() as i32).clamp(1, 10);
        let mut best: Option<i32> = None;
        let mut probe = |this: &mut Bench, mode: &mut V3Mode, m: &mut Proc, t: i32| {
            let kept = this
                .v3_sustained(mode, m, rate_of(t), probe_secs, "probe")
                .is_some();
            probes.push(json!({"fraction": f64::from(t) / 10.0, "writes_per_s": rate_of(t), "kept_up": kept}));
            kept
        };
        if probe(self, mode, m, t) {
            best = Some(t);
            while t < 10 {
                t += 1;
                if !probe(self, mode, m, t) {
                    break;
                }
                best = Some(t);
            }
        } else {
            while t > 1 {
                t -= 1;
                if probe(self, mode, m, t) {
                    best = Some(t);
                    break;
                }
            }
        }
        let mut t = best.unwrap_or(1);
        let mut held: Option<(f64, f64)> = None;
        let mut holds: Vec<Value> = Vec::new();
        for _ in 0..3 {
            let rate = rate_of(t);
            let kept = self.v3_sustained(mode, m, rate, hold_secs, "hold");
            holds.push(json!({"fraction": f64::from(t) / 10.0, "writes_per_s": rate, "kept_up": kept.is_some()}));
            if let Some(a) = kept {
                held = Some((rate, a));
                break;
            }
            if t <= 1 {
                break;
            }
            t -= 1;
        }
        let achieved = held.map(|h| h.1);
        self.results.push(json!({
            "measurement": "sustained_highest",
            "mode": mode.name,
            "highest_kept_up_target_writes_per_s": held.map(|h| h.0),
            "highest_kept_up_achieved_writes_per_s": achieved.map(r1),
            "held_seconds": hold_secs,
            "ratio_to_v3_ceiling": achieved.and_then(|a| self.v3_ratio(a)),
            "goal_ratio_to_v3_ceiling": 0.8,
            "probes": probes,
            "probe_seconds": probe_secs,
            "holds": holds,
        }));
        let probed: Vec<String> = probes
            .iter()
            .map(|p| {
                format!(
                    "{}{}",
                    p["fraction"],
                    if p["kept_up"] == json!(true) {
                        " ok"
                    } else {
                        " no"
                    }
                )
            })
            .collect();
        self.row(
            &format!("sustained {} highest kept up {hold_secs:.0} s", mode.name),
            achieved.map_or("none".into(), |a| format!("{a:.0} w/s")),
            achieved.and_then(|a| self.v3_ratio(a)),
            format!(
                "goal 0.8x; probes ({probe_secs:.0} s, x ceiling): {}",
                probed.join(", ")
            ),
        );
    }

    /// Replication delay into the v3 destination: from the source write's response to the
    /// arrival on a v3 watch on the destination.
    fn v3_delay(&mut self, mode: &mut V3Mode, m: &mut Proc, rate: f64, n: u64) {
        self.say(&format!(
            "{}: delay at {rate:.0} writes/s, {n} samples ({:.0} s)",
            mode.name,
            n as f64 / rate
        ));
        let dir = format!("{}/delay", mode.prefix);
        let dst_dir = format!("{DST_PREFIX}{dir}/");
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(HashMap::new()));
        let (tx, rx) = mpsc::channel();
        let watcher = dst3_watcher(
            self.dst.url.clone(),
            dst_dir.clone(),
            stop.clone(),
            arrivals.clone(),
            tx,
            Duration::from_secs_f64(n as f64 / rate + 60.0),
        );
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the destination's v3 watch was created");
        let sent: Mutex<Vec<Option<Instant>>> = Mutex::new(vec![None; n as usize]);
        let log = WriteLog::default();
        let this = &*self;
        let md = &*mode;
        // Tickets 0..n are due before (n - 0.5) / rate, ticket n is not.
        let (count, _) = rate_run(
            rate,
            Duration::from_secs_f64((n as f64 - 0.5) / rate),
            1,
            &|i| this.v3_src_put(md, &format!("{dir}/d{i}"), i),
            &log,
            Some(&|i, t| {
                if let Some(slot) = sent.lock().unwrap().get_mut(i as usize) {
                    *slot = Some(t);
                }
            }),
        );
        let wait = 5;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(wait)
            && (arrivals.lock().unwrap().len() as u64) < count
            && m.alive()
        {
            thread::sleep(Duration::from_millis(10));
        }
        // A key written on the destination alone wakes the watcher up to see `stop`.
        stop.store(true, Ordering::SeqCst);
        self.dst3.put(&format!("{dst_dir}~stop"), "x");
        let _ = watcher.join();
        let arr = arrivals.lock().unwrap().clone();
        let sent = sent.into_inner().unwrap();
        let d = delays(&sent, &arr, |i| format!("{dst_dir}d{i}"));
        let (p50, p99, max) = (
            percentile(&d, 0.5),
            percentile(&d, 0.99),
            d.last().copied().unwrap_or(f64::NAN),
        );
        let missing = count - d.len() as u64;
        let mut res = delay_json(
            mode.name,
            json!(rate),
            count,
            json!(wait),
            &d,
            "source write response instant -> arrival on a v3 watch (POST /v3/watch \
                       stream) on the destination, one process, monotonic clock",
        );
        self.row(
            &format!("delay {} {rate:.0}/s p50/p99/max", mode.name),
            format!("{p50:.2}/{p99:.2}/{max:.1} ms"),
            None,
            format!(
                "{} samples{}",
                d.len(),
                if missing > 0 {
                    format!(", {missing} NOT ARRIVED within {wait} s")
                } else {
                    String::new()
                }
            ),
        );
        let restart = self.v3_revive(mode, m, &format!("delay {rate:.0}/s"), false);
        if !restart.is_null() {
            res["restart"] = restart;
        }
        self.results.push(res);
    }
}

/// The end of the mirror's log without the per-event "Replicating key" lines (the last of those
/// is kept, to show where it was).
fn log_tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let last_event = lines.iter().rposition(|l| l.contains("Replicating key"));
    let mut out: Vec<&str> = lines
        .iter()
        .enumerate()
        .filter(|(i, l)| !l.contains("Replicating key") || Some(*i) == last_event)
        .map(|(_, l)| *l)
        .collect();
    let from = out.len().saturating_sub(6);
    out.drain(..from);
    out.join("\n")
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
