//! Faults a real etcd cannot produce, injected by a fake HTTP server standing in for the
//! source: malformed JSON, a body that stalls, and 5xx answers. Replication itself is always
//! proven against real etcd elsewhere; here the destination is still a real server.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A fake source that answers every request with `head` + `body`, then holds the connection
/// open for `hold` (a stalled body) before closing. Counts the requests it served.
fn fake_source(
    head: &'static str,
    body: &'static str,
    hold: Duration,
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let count = count.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 2 {
                    line.clear();
                }
                count.fetch_add(1, Ordering::SeqCst);
                let mut w = &stream;
                let _ = write!(w, "{head}\r\n\r\n{body}");
                let _ = w.flush();
                std::thread::sleep(hold);
            });
        }
    });
    (url, served)
}

fn mirror_against(src: &str, dst: &Etcd, index: u64, extra: &[&str]) -> Mirror {
    set_replication_index(dst, "/replica", index);
    let mut args = vec!["--src-prefix", "/p"];
    args.extend(extra);
    Mirror::start(&args, src, &dst.url)
}

#[test]
fn malformed_event_json_is_retried_then_exits_transient() {
    let dst = Etcd::start("fault-json");
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Etcd-Index: 50";
    let (src, served) = fake_source(
        head,
        "{\"action\":\"set\",\"node\":{not json\n",
        Duration::ZERO,
    );
    let started = Instant::now();
    let mut m = mirror_against(&src, &dst, 10, &["--retry-timeout", "2"]);
    let code = m.wait_exit(Duration::from_secs(20));
    assert_eq!(code, 1, "stderr:\n{}", tail(&m.stderr(), 10));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "it retried for a while"
    );
    assert!(
        m.stderr().contains("malformed"),
        "{}",
        tail(&m.stderr(), 10)
    );
    assert!(served.load(Ordering::SeqCst) >= 3, "it retried");
    assert_eq!(
        replication_index(&dst, "/replica"),
        Some(10),
        "nothing recorded"
    );
}

#[test]
fn server_errors_are_retried_then_exit_transient() {
    let dst = Etcd::start("fault-5xx");
    let head = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0";
    let (src, served) = fake_source(head, "", Duration::ZERO);
    let mut m = mirror_against(&src, &dst, 10, &["--retry-timeout", "2"]);
    assert_eq!(m.wait_exit(Duration::from_secs(20)), 1);
    assert!(m.stderr().contains("503"), "{}", tail(&m.stderr(), 10));
    assert!(served.load(Ordering::SeqCst) >= 3);
}

/// Headers flushed, then nothing. Silence shorter than --watch-timeout proves nothing (a
/// body can be late), so the registration index is recorded only once a whole
/// --watch-timeout has passed without a byte; then the watch is renewed.
#[test]
fn stalled_watch_body_proves_its_registration_only_after_the_whole_watch_timeout() {
    let dst = Etcd::start("fault-stall");
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nX-Etcd-Index: 777";
    let (src, served) = fake_source(head, "", Duration::from_secs(60));
    let started = Instant::now();
    let mut m = mirror_against(&src, &dst, 10, &["--watch-timeout", "5"]);
    m.wait_for(
        Duration::from_secs(20),
        "the index proven by the headers",
        || replication_index(&dst, "/replica") == Some(777),
    );
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "index recorded after {:?} of silence, before --watch-timeout",
        started.elapsed()
    );
    let before = served.load(Ordering::SeqCst);
    m.wait_for(
        Duration::from_secs(15),
        "a renewal after the next silence",
        || served.load(Ordering::SeqCst) > before,
    );
    m.assert_alive("after stalled watches");
}

/// An answer that cannot be right (an event older than the index the watch asked for) is
/// never written: it is logged as a broken answer and the watch is opened again, until the
/// retry budget ends in exit 1.
#[test]
fn an_event_older_than_asked_for_is_never_written() {
    let dst = Etcd::start("fault-old");
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Etcd-Index: 50";
    let body = "{\"action\":\"set\",\"node\":{\"key\":\"/p/old\",\"value\":\"stale\",\"modifiedIndex\":5,\"createdIndex\":5}}\n";
    let (src, served) = fake_source(head, body, Duration::ZERO);
    let mut m = mirror_against(&src, &dst, 10, &["--retry-timeout", "2"]);
    assert_eq!(m.wait_exit(Duration::from_secs(30)), 1);
    let err = m.stderr();
    assert!(
        err.contains("older than the index 11"),
        "{}",
        tail(&err, 10)
    );
    assert!(err.contains("WARN"), "{}", tail(&err, 10));
    assert!(!dst.exists("/replica/p/old"), "a broken answer was written");
    assert_eq!(replication_index(&dst, "/replica"), Some(10));
    assert!(
        served.load(Ordering::SeqCst) >= 2,
        "the watch was opened again"
    );
}
