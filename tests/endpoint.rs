//! The metrics endpoint cannot be used against the mirror: idle, slow and oversized clients
//! neither delay a scrape nor grow the mirror's memory, and replication goes on meanwhile.

mod common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Per-request bound for a scrape (a correctness bound: without it, a handful of idle
/// connections would stall Prometheus; not a benchmark).
const SCRAPE_BOUND: Duration = Duration::from_secs(1);

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// Start the mirror with its endpoint on a free loopback port (retrying when another
/// process takes the port first: the mirror then exits 2 naming --port).
fn start_with_metrics(p: &Pair) -> (Mirror, u16) {
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    for _ in 0..10 {
        let port = free_port();
        let args = vec![
            "--port".to_string(),
            port.to_string(),
            "--listen".into(),
            "127.0.0.1".into(),
            p.src.url.clone(),
            p.dst.url.clone(),
        ];
        let mut m = Mirror::spawn(args);
        let ready = poll_until(Duration::from_secs(15), || {
            m.exited().is_some() || m.stderr().contains("serving /metrics")
        });
        match m.exited() {
            Some(2) if m.stderr().contains("--port") => continue,
            Some(code) => panic!("etcdmirror exited with {code}:\n{}", m.stderr()),
            None if ready => return (m, port),
            None => panic!("no `serving /metrics` within 15 s:\n{}", m.stderr()),
        }
    }
    panic!("no free metrics port after 10 tries");
}

/// GET `path` on a fresh connection: status line, body, and the time from before the
/// connect to the end of the body.
fn scrape(port: u16, path: &str) -> (String, String, Duration) {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr(port), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to the metrics port: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("reading {path}: {e} after {:?}", t.elapsed()));
    let took = t.elapsed();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    (status, body.to_string(), took)
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// True when the server has closed `s` (EOF or reset); `s` must be non-blocking.
fn closed(mut s: &TcpStream) -> bool {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    }
}

fn idle_connection(port: u16) -> TcpStream {
    let s = TcpStream::connect(addr(port)).expect("open an idle connection");
    s.set_nonblocking(true).unwrap();
    s
}

/// Keep `n` idle connections open until `stop`: each one the server closes is reopened.
/// `open` counts the connections opened and not yet seen closed.
fn hold_idle(port: u16, n: usize, stop: &AtomicBool, open: &AtomicUsize) {
    let mut conns: Vec<TcpStream> = (0..n).map(|_| idle_connection(port)).collect();
    open.store(n, Ordering::SeqCst);
    while !stop.load(Ordering::SeqCst) {
        for c in conns.iter_mut() {
            if closed(c) {
                open.fetch_sub(1, Ordering::SeqCst);
                *c = idle_connection(port);
                open.fetch_add(1, Ordering::SeqCst);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A slow client: one byte of a request every 0.2 s, reconnecting when cut off.
fn slow_client(port: u16, stop: &AtomicBool, cut: &AtomicUsize) {
    let request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    while !stop.load(Ordering::SeqCst) {
        let Ok(mut s) = TcpStream::connect(addr(port)) else {
            continue;
        };
        for b in request.iter().cycle() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            if s.write_all(&[*b]).is_err() {
                cut.fetch_add(1, Ordering::SeqCst);
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn scrapes_are_answered_and_memory_stays_flat_under_idle_slow_and_huge_clients() {
    let p = Pair::start("endpoint-abuse");
    let (mut m, port) = start_with_metrics(&p);
    let (status, _, _) = scrape(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let rss_before = rss_kib(m.pid());

    let stop = AtomicBool::new(false);
    let (open, cut) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        s.spawn(|| hold_idle(port, 200, &stop, &open));
        for _ in 0..10 {
            s.spawn(|| slow_client(port, &stop, &cut));
        }
        let stopper = scopeguard(&stop);
        wait_until(
            Duration::from_secs(10),
            "200 idle connections accepted and open",
            || open.load(Ordering::SeqCst) == 200,
        );

        // 1. Fresh scrapes, spread over more than one 2 s connection deadline.
        let mut took = Vec::new();
        for i in 0..12 {
            let idle = open.load(Ordering::SeqCst);
            let (status, body, t) = scrape(port, "/metrics");
            assert_eq!(status, "HTTP/1.1 200 OK", "scrape {i}");
            assert!(body.contains("etcdmirror_lag "), "scrape {i}: {body}");
            assert!(
                t < SCRAPE_BOUND,
                "scrape {i} took {t:?} with {idle} idle and 10 slow connections open"
            );
            took.push(t.as_secs_f64() * 1000.0);
            // pacing, not synchronisation: spread the scrapes over the reconnect cycle
            std::thread::sleep(Duration::from_millis(250));
        }
        let max = took.iter().cloned().fold(0.0, f64::max);
        println!("scrapes with 200 idle + 10 slow connections (ms): {took:.1?}, max {max:.1}");

        // 2. Replication goes on.
        let i = p.src.set("/during/abuse", "1").modified_index();
        m.wait_index(&p.dst, "/replica", i);
        assert_eq!(p.dst.get("/replica/during/abuse").as_deref(), Some("1"));

        // 3. A request that never ends its line is cut off, not buffered.
        let mut big = TcpStream::connect(addr(port)).unwrap();
        big.set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let chunk = vec![b'a'; 64 * 1024];
        let limit = 64 * 1024 * 1024;
        let mut sent = 0usize;
        let err = loop {
            if sent >= limit {
                break None;
            }
            match big.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) => break Some(e),
            }
        };
        let err = err.unwrap_or_else(|| panic!("the server took {sent} bytes without a newline"));
        assert!(
            matches!(
                err.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            ),
            "the oversized request should be cut off by the server, got {err} after {sent} bytes"
        );
        println!(
            "oversized request cut off after {} KiB sent: {err}",
            sent / 1024
        );

        let (status, _, t) = scrape(port, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            t < SCRAPE_BOUND,
            "scrape after the oversized request: {t:?}"
        );
        assert!(
            cut.load(Ordering::SeqCst) >= 1,
            "no slow client was cut off by the deadline"
        );
        drop(stopper);
    });
    let rss_after = rss_kib(m.pid());
    println!("mirror VmRSS: {rss_before} KiB before, {rss_after} KiB after");
    assert!(
        rss_after <= rss_before + 4 * 1024,
        "VmRSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    m.assert_alive("after the abuse");
}

/// Sets the flag on drop, so the helper threads stop even when an assertion fails.
struct Stopper<'a>(&'a AtomicBool);

impl Drop for Stopper<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn scopeguard(flag: &AtomicBool) -> Stopper<'_> {
    Stopper(flag)
}

#[test]
fn request_heads_are_capped_at_8_kib_and_connections_at_2_s() {
    let p = Pair::start("endpoint-limits");
    let (mut m, port) = start_with_metrics(&p);

    // A head of exactly 8 KiB is served; 8 KiB without the end of the head is refused.
    let start = "GET /lag HTTP/1.1\r\nX-Pad: ";
    let pad = 8192 - start.len() - 4;
    let exact = format!("{start}{}\r\n\r\n", "p".repeat(pad));
    assert_eq!(exact.len(), 8192);
    let mut s = TcpStream::connect(addr(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(exact.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");

    let mut s = TcpStream::connect(addr(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&exact.as_bytes()[..8190]).unwrap();
    s.write_all(b"pp").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{out}"
    );

    // A connection that sends nothing is closed by its deadline.
    let mut idle = TcpStream::connect(addr(port)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t = Instant::now();
    let mut b = [0u8; 16];
    let n = idle.read(&mut b).unwrap_or(0);
    let took = t.elapsed();
    assert_eq!(n, 0, "an idle connection got data");
    assert!(
        took < Duration::from_secs(9),
        "an idle connection stayed open {took:?}"
    );
    println!("idle connection closed after {took:?}");

    // Beyond 256 open connections the oldest are closed, so a scrape still gets through
    // (were new connections refused instead, this scrape would get no answer).
    let conns: Vec<TcpStream> = (0..300).map(|_| idle_connection(port)).collect();
    let (status, _, took) = scrape(port, "/lag");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        took < SCRAPE_BOUND,
        "scrape with 300 idle connections: {took:?}"
    );
    let gone = conns.iter().filter(|c| closed(c)).count();
    println!("scrape with 300 idle connections: {took:?}; {gone} of them closed by then");
    m.assert_alive("after the limits");
}
