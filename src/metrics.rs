//! Counters the loop publishes, and the read-only HTTP responder that serves them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds of the write-latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Everything the endpoint shows. The loop writes it, the responder thread only reads a copy.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Labels of the write-latency histogram: destination URL (no credentials) and prefix.
    pub url: String,
    pub prefix: String,
    pub source_index: u64,
    pub replicated_index: u64,
    pub events_by_action: BTreeMap<String, u64>,
    pub ignored_events: u64,
    pub idle_advances: u64,
    pub retries: u64,
    pub last_watch: Option<Instant>,
    write_buckets: [u64; BUCKETS.len()],
    write_sum: f64,
    write_count: u64,
    load_sum: f64,
    load_count: u64,
}

static STATS: Mutex<Option<Stats>> = Mutex::new(None);

/// Change the published statistics.
pub fn update(f: impl FnOnce(&mut Stats)) {
    let mut guard = STATS.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Stats::default));
}

fn snapshot() -> Stats {
    let guard = STATS.lock().unwrap_or_else(|e| e.into_inner());
    guard.clone().unwrap_or_default()
}

impl Stats {
    /// Count one destination write that took `d`.
    pub fn observe_write(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (count, &le) in self.write_buckets.iter_mut().zip(&BUCKETS) {
            if s <= le {
                *count = count.saturating_add(1);
            }
        }
        self.write_sum += s;
        self.write_count = self.write_count.saturating_add(1);
    }

    /// Count one reload that took `d`.
    pub fn observe_load(&mut self, d: Duration) {
        self.load_sum += d.as_secs_f64();
        self.load_count = self.load_count.saturating_add(1);
    }

    pub fn lag(&self) -> u64 {
        self.source_index.saturating_sub(self.replicated_index)
    }

    fn replicated_total(&self) -> u64 {
        self.events_by_action
            .values()
            .fold(0, |total, &n| total.saturating_add(n))
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The Prometheus text exposition (format 0.0.4) of `s` at time `now`.
pub fn render(s: &Stats, now: Instant) -> String {
    let mut o = String::new();
    metric(
        &mut o,
        "etcdmirror_replicated_events_total",
        "counter",
        "Source events applied to the destination.",
    );
    let _ = writeln!(
        o,
        "etcdmirror_replicated_events_total {}",
        s.replicated_total()
    );
    metric(
        &mut o,
        "etcdmirror_events_total",
        "counter",
        "Source events applied, by etcd action.",
    );
    for (action, n) in &s.events_by_action {
        let _ = writeln!(
            o,
            "etcdmirror_events_total{{action=\"{}\"}} {n}",
            label(action)
        );
    }
    metric(
        &mut o,
        "etcdmirror_ignored_events_total",
        "counter",
        "Source events not written (ignored, hidden or outside the prefix).",
    );
    let _ = writeln!(o, "etcdmirror_ignored_events_total {}", s.ignored_events);
    metric(
        &mut o,
        "etcdmirror_idle_index_advances_total",
        "counter",
        "Index writes that recorded progress without an event.",
    );
    let _ = writeln!(
        o,
        "etcdmirror_idle_index_advances_total {}",
        s.idle_advances
    );
    metric(
        &mut o,
        "etcdmirror_retries_total",
        "counter",
        "Requests retried after a transient fault.",
    );
    let _ = writeln!(o, "etcdmirror_retries_total {}", s.retries);
    metric(
        &mut o,
        "etcdmirror_lag",
        "gauge",
        "Source index seen minus replicated index.",
    );
    let _ = writeln!(o, "etcdmirror_lag {}", s.lag());
    metric(
        &mut o,
        "etcdmirror_source_index",
        "gauge",
        "Latest X-Etcd-Index seen on the source.",
    );
    let _ = writeln!(o, "etcdmirror_source_index {}", s.source_index);
    metric(
        &mut o,
        "etcdmirror_replicated_index",
        "gauge",
        "Source index up to which everything is replicated.",
    );
    let _ = writeln!(o, "etcdmirror_replicated_index {}", s.replicated_index);
    metric(
        &mut o,
        "etcdmirror_seconds_since_last_watch",
        "gauge",
        "Seconds since the last successful watch round trip (-1: none yet).",
    );
    let since = s
        .last_watch
        .map_or(-1.0, |t| now.saturating_duration_since(t).as_secs_f64());
    let _ = writeln!(o, "etcdmirror_seconds_since_last_watch {since:.3}");
    metric(
        &mut o,
        "etcdmirror_write_latency",
        "histogram",
        "Time to apply one event on the destination, in seconds.",
    );
    let labels = format!("url=\"{}\",prefix=\"{}\"", label(&s.url), label(&s.prefix));
    for (le, n) in BUCKETS.iter().zip(s.write_buckets) {
        let _ = writeln!(
            o,
            "etcdmirror_write_latency_bucket{{{labels},le=\"{le}\"}} {n}"
        );
    }
    let _ = writeln!(
        o,
        "etcdmirror_write_latency_bucket{{{labels},le=\"+Inf\"}} {}",
        s.write_count
    );
    let _ = writeln!(
        o,
        "etcdmirror_write_latency_sum{{{labels}}} {}",
        s.write_sum
    );
    let _ = writeln!(
        o,
        "etcdmirror_write_latency_count{{{labels}}} {}",
        s.write_count
    );
    metric(
        &mut o,
        "etcdmirror_load_time",
        "summary",
        "Time taken by --reload, in seconds.",
    );
    let _ = writeln!(o, "etcdmirror_load_time_sum {}", s.load_sum);
    let _ = writeln!(o, "etcdmirror_load_time_count {}", s.load_count);
    metric(
        &mut o,
        "etcdmirror_build_info",
        "gauge",
        "Always 1; the version is a label.",
    );
    let _ = writeln!(
        o,
        "etcdmirror_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    o
}

/// Status, content type and body for a request path.
fn respond(path: &str) -> (&'static str, &'static str, String) {
    let text = "text/plain; charset=utf-8";
    match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(&snapshot(), Instant::now())),
        "/lag" => ("200 OK", text, format!("{}\n", snapshot().lag())),
        "/" => ("200 OK", text, "etcdmirror\n/metrics  Prometheus metrics\n/lag      source index seen minus replicated index\n".into()),
        _ => ("404 Not Found", text, "not found\n".into()),
    }
}

fn handle(stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.set_write_timeout(Some(Duration::from_millis(500)))?;
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers so the client sees a clean close.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match method {
        "GET" | "HEAD" => respond(path),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    let body = if method == "HEAD" {
        String::new()
    } else {
        body
    };
    let mut out = &stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// Bind the endpoint now (so a busy port fails at start) and serve it from one thread.
pub fn serve(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = handle(stream);
            }
        })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_old_names_and_a_consistent_histogram() {
        let mut s = Stats {
            url: "http://d:2379".into(),
            prefix: "/replica".into(),
            ..Stats::default()
        };
        s.source_index = 120;
        s.replicated_index = 100;
        *s.events_by_action.entry("set".into()).or_default() += 2;
        *s.events_by_action.entry("delete".into()).or_default() += 1;
        s.observe_write(Duration::from_millis(3));
        s.observe_write(Duration::from_secs(9));
        s.observe_load(Duration::from_secs(2));
        let text = render(&s, Instant::now());
        assert!(text.contains("etcdmirror_replicated_events_total 3\n"));
        assert!(text.contains("etcdmirror_lag 20\n"));
        assert!(text.contains("etcdmirror_events_total{action=\"delete\"} 1\n"));
        assert!(text.contains(
            "etcdmirror_write_latency_bucket{url=\"http://d:2379\",prefix=\"/replica\",le=\"0.005\"} 1\n"
        ));
        assert!(text.contains("le=\"+Inf\"} 2\n"));
        assert!(text.contains(
            "etcdmirror_write_latency_count{url=\"http://d:2379\",prefix=\"/replica\"} 2\n"
        ));
        assert!(text.contains("etcdmirror_load_time_count 1\n"));
        assert!(text.contains("etcdmirror_seconds_since_last_watch -1.000\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn routes() {
        assert_eq!(respond("/lag").0, "200 OK");
        assert_eq!(respond("/nope").0, "404 Not Found");
        assert!(respond("/").2.contains("/metrics"));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn duration() -> impl Strategy<Value = Duration> {
            prop_oneof![
                (0u64..10_000_000).prop_map(Duration::from_micros),
                any::<(u64, u32)>().prop_map(|(s, n)| Duration::new(s, n % 1_000_000_000)),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any counters, labels and latencies: no panic, one sample per line, every
            /// value a number, and the histogram cumulative.
            #[test]
            fn any_stats_render_as_numbers(
                url in any::<String>(),
                prefix in any::<String>(),
                counters in any::<[u64; 5]>(),
                actions in proptest::collection::btree_map(any::<String>(), any::<u64>(), 0..4),
                writes in proptest::collection::vec(duration(), 0..20),
                loads in proptest::collection::vec(duration(), 0..3),
                watched in proptest::option::of(0u64..1_000_000),
            ) {
                let now = Instant::now();
                let mut s = Stats {
                    url,
                    prefix,
                    source_index: counters[0],
                    replicated_index: counters[1],
                    events_by_action: actions,
                    ignored_events: counters[2],
                    idle_advances: counters[3],
                    retries: counters[4],
                    // A watch in the future (a clock step) must not panic either.
                    last_watch: watched.and_then(|ms| now.checked_add(Duration::from_millis(ms)).or(Some(now))),
                    ..Stats::default()
                };
                writes.iter().for_each(|&d| s.observe_write(d));
                loads.iter().for_each(|&d| s.observe_load(d));
                prop_assert_eq!(s.lag(), counters[0].saturating_sub(counters[1]));
                let text = render(&s, now);
                let mut buckets = Vec::new();
                for line in text.lines().filter(|l| !l.starts_with('#')) {
                    let value = line.rsplit(' ').next().unwrap_or_default();
                    let v: f64 = value.parse().map_err(|_| TestCaseError::fail(line.to_string()))?;
                    if line.starts_with("etcdmirror_write_latency_bucket") {
                        buckets.push(v);
                    }
                }
                prop_assert_eq!(buckets.len(), BUCKETS.len() + 1);
                prop_assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{:?}", buckets);
                prop_assert_eq!(buckets.last().copied(), Some(writes.len() as f64));
                for (le, n) in BUCKETS.iter().zip(&buckets) {
                    let want = writes.iter().filter(|d| d.as_secs_f64() <= *le).count();
                    prop_assert_eq!(*n, want as f64);
                }
            }
        }
    }
}
