//! Counters the loop publishes, and the read-only HTTP responder that serves them.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
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
    /// Each side's members ("source", "destination").
    pub members: BTreeMap<String, Members>,
    write_buckets: [u64; BUCKETS.len()],
    write_sum: f64,
    write_count: u64,
    load_sum: f64,
    load_count: u64,
}

/// One side's members, as its client uses them.
#[derive(Debug, Clone, Default)]
pub struct Members {
    /// Member URLs, without credentials.
    pub urls: Vec<String>,
    /// The position in `urls` of the member in use.
    pub in_use: usize,
    /// Moves to another member after a failure.
    pub moves: u64,
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
        "etcdmirror_member_in_use",
        "gauge",
        "Each member of each side: 1 for the one the mirror talks to, 0 for the others.",
    );
    for (side, m) in &s.members {
        for (i, url) in m.urls.iter().enumerate() {
            let _ = writeln!(
                o,
                "etcdmirror_member_in_use{{side=\"{}\",url=\"{}\"}} {}",
                label(side),
                label(url),
                u8::from(i == m.in_use)
            );
        }
    }
    metric(
        &mut o,
        "etcdmirror_member_moves_total",
        "counter",
        "Moves to the next member of a side after a failure.",
    );
    for (side, m) in &s.members {
        let _ = writeln!(
            o,
            "etcdmirror_member_moves_total{{side=\"{}\"}} {}",
            label(side),
            m.moves
        );
    }
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

// The responder is one thread serving every connection from one loop over non-blocking
// sockets, so that no client, however slow or idle, can hold up a scrape, and its memory
// and file descriptors are bounded: at most MAX_CONNECTIONS sockets, each holding at most
// MAX_REQUEST bytes, for at most DEADLINE.

/// Largest request head (request line, headers, blank line) read; a longer one gets 431.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a connection may stay open from accept to the end of its response.
const DEADLINE: Duration = Duration::from_secs(2);
/// Connections open at once. When a new one arrives beyond this, the oldest is closed: a
/// scraper sends its request at once, so the oldest connection is the one least likely to
/// be a real client, and a flood of new connections can never lock out the next scrape.
const MAX_CONNECTIONS: usize = 256;
/// Sleep when a round over every socket found nothing to do.
const IDLE_SLEEP: Duration = Duration::from_millis(5);

/// One client connection: reading its request, then writing its response.
struct Conn {
    stream: TcpStream,
    accepted: Instant,
    /// The request head read so far (at most MAX_REQUEST bytes).
    request: Vec<u8>,
    /// The response and how much of it is written, once the request is complete.
    response: Option<(Vec<u8>, usize)>,
}

/// What one turn over a connection did.
enum Turn {
    /// Nothing to do until the client sends or reads more.
    Waiting,
    /// Some bytes moved.
    Progress,
    /// Finished or failed: close it.
    Done,
}

/// Where the request head ends (after its blank line), if it has ended.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The full HTTP response to a request head (or to a head that did not fit: `None`).
fn answer(head: Option<&[u8]>) -> Vec<u8> {
    let text = "text/plain; charset=utf-8";
    let (status, ctype, body, head_only) = match head {
        None => (
            "431 Request Header Fields Too Large",
            text,
            "request too large\n".to_string(),
            false,
        ),
        Some(head) => {
            let head = String::from_utf8_lossy(head);
            let mut parts = head.lines().next().unwrap_or("").split_whitespace();
            let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let path = target.split('?').next().unwrap_or("");
            match method {
                "GET" | "HEAD" => {
                    let (status, ctype, body) = respond(path);
                    (status, ctype, body, method == "HEAD")
                }
                _ => ("405 Method Not Allowed", text, "only GET\n".into(), false),
            }
        }
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

impl Conn {
    /// Read what the client sent, or write what is left of the response, without blocking.
    fn turn(&mut self) -> Turn {
        if let Some((out, written)) = &mut self.response {
            return match out.get(*written..).map(|rest| self.stream.write(rest)) {
                Some(Ok(0)) | None => Turn::Done,
                Some(Ok(n)) => {
                    *written = written.saturating_add(n);
                    if *written >= out.len() {
                        Turn::Done
                    } else {
                        Turn::Progress
                    }
                }
                Some(Err(e)) if e.kind() == ErrorKind::WouldBlock => Turn::Waiting,
                Some(Err(e)) if e.kind() == ErrorKind::Interrupted => Turn::Progress,
                Some(Err(_)) => Turn::Done,
            };
        }
        let room = MAX_REQUEST.saturating_sub(self.request.len());
        if room == 0 {
            // Full, and no complete head in it (that is checked after every read).
            self.response = Some((answer(None), 0));
            return Turn::Progress;
        }
        let mut chunk = [0u8; 2048];
        let buf = chunk.get_mut(..room.min(2048)).unwrap_or_default();
        match self.stream.read(buf) {
            Ok(0) => {
                // The client stopped sending: answer a request line without a blank line
                // (`printf 'GET /lag\n' | nc -N`), drop anything else.
                if !self.request.contains(&b'\n') {
                    return Turn::Done;
                }
                self.response = Some((answer(Some(&self.request)), 0));
                Turn::Progress
            }
            Ok(n) => {
                self.request
                    .extend_from_slice(buf.get(..n).unwrap_or_default());
                if let Some(end) = head_end(&self.request) {
                    self.response = Some((answer(self.request.get(..end)), 0));
                }
                Turn::Progress
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Turn::Waiting,
            Err(e) if e.kind() == ErrorKind::Interrupted => Turn::Progress,
            Err(_) => Turn::Done,
        }
    }
}

/// Take every pending connection; with `wait`, sleep in accept() until one comes. False
/// when none came.
fn accept(listener: &TcpListener, conns: &mut VecDeque<Conn>, wait: bool) -> bool {
    let mut any = false;
    if wait {
        if listener.set_nonblocking(false).is_err() {
            return false;
        }
        let first = listener.accept();
        // Back to non-blocking before the loop below, or it would sleep in accept() while
        // connections wait for their turn.
        if listener.set_nonblocking(true).is_err() {
            return false;
        }
        if let Ok((stream, _)) = first {
            any = add(conns, stream);
        }
    }
    loop {
        match listener.accept() {
            Ok((stream, _)) => any = add(conns, stream) || any,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return any,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                // Out of file descriptors or similar: give the open sockets their turn.
                std::thread::sleep(IDLE_SLEEP);
                return any;
            }
        }
    }
}

/// Track a new connection, closing the oldest when MAX_CONNECTIONS are open.
fn add(conns: &mut VecDeque<Conn>, stream: TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    if conns.len() >= MAX_CONNECTIONS {
        conns.pop_front();
    }
    conns.push_back(Conn {
        stream,
        accepted: Instant::now(),
        request: Vec::new(),
        response: None,
    });
    true
}

/// The responder loop. With no client connected it waits in accept(), so an idle mirror
/// pays no wake-ups for its endpoint.
fn respond_forever(listener: TcpListener) {
    let mut conns: VecDeque<Conn> = VecDeque::new();
    loop {
        let idle = conns.is_empty();
        let mut busy = accept(&listener, &mut conns, idle);
        let now = Instant::now();
        conns.retain_mut(|c| {
            if now.saturating_duration_since(c.accepted) > DEADLINE {
                return false;
            }
            match c.turn() {
                Turn::Waiting => true,
                Turn::Progress => {
                    busy = true;
                    true
                }
                Turn::Done => false,
            }
        });
        if !busy {
            std::thread::sleep(IDLE_SLEEP);
        }
    }
}

/// Bind the endpoint now (so a busy port fails at start) and serve it from one thread.
pub fn serve(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || respond_forever(listener))?;
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
        s.members.insert(
            "source".into(),
            Members {
                urls: vec!["http://s1:2379".into(), "http://s2:2379".into()],
                in_use: 1,
                moves: 4,
            },
        );
        let text = render(&s, Instant::now());
        assert!(text.contains(
            "etcdmirror_member_in_use{side=\"source\",url=\"http://s1:2379\"} 0\n\
             etcdmirror_member_in_use{side=\"source\",url=\"http://s2:2379\"} 1\n"
        ));
        assert!(text.contains("etcdmirror_member_moves_total{side=\"source\"} 4\n"));
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
    fn request_heads_end_at_the_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"), Some(27));
        assert_eq!(head_end(b"GET /lag\n\n"), Some(10));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn answers() {
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        let lag = text(answer(Some(b"GET /lag?x=1 HTTP/1.1\r\n\r\n")));
        assert!(lag.starts_with("HTTP/1.1 200 OK\r\n"), "{lag}");
        assert!(lag.ends_with("\r\n\r\n0\n"), "{lag}");
        let head = text(answer(Some(b"HEAD /metrics HTTP/1.1\r\n\r\n")));
        assert!(head.ends_with("\r\n\r\n") && !head.contains("etcdmirror_lag"));
        assert!(text(answer(Some(b"POST / HTTP/1.1\r\n\r\n"))).starts_with("HTTP/1.1 405"));
        assert!(text(answer(Some(b"\r\n\r\n"))).starts_with("HTTP/1.1 405"));
        assert!(text(answer(None)).starts_with("HTTP/1.1 431"));
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
