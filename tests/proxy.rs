//! The fault proxy itself (tests/common/proxy.rs), against tiny std-only servers: held
//! bodies on keep-alive and chunked responses, byte order under jitter, black hole, dropped
//! responses, reset, a changed upstream, and connection and request counting.

mod common;

use common::proxy::{Faults, Proxy};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A keep-alive HTTP/1.1 server. The n-th request it receives (from 1, over all connections)
/// is answered with the body `{tag}{n} end`; a request for `/stream` gets a chunked body
/// `first`, then 50 ms later `second`.
fn http_server(tag: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicU64::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let served = served.clone();
            std::thread::spawn(move || serve(stream, tag, &served));
        }
    });
    addr
}

fn serve(mut s: TcpStream, tag: &str, served: &AtomicU64) {
    let _ = s.set_nodelay(true);
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let n = served.fetch_add(1, Ordering::SeqCst) + 1;
        let written = if head.starts_with(b"GET /stream ") {
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                .and_then(|()| {
                    std::thread::sleep(Duration::from_millis(50));
                    s.write_all(b"6\r\nsecond\r\n0\r\n\r\n")
                })
        } else {
            let body = format!("{tag}{n} end");
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        if written.is_err() {
            return;
        }
    }
}

/// A server that sends back every byte it receives.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    addr
}

fn connect(proxy: &Proxy) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn get(s: &mut TcpStream, path: &str) {
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
}

/// Read one byte at a time (nothing beyond `needle`) until the bytes read end with it.
#[track_caller]
fn read_until(s: &mut TcpStream, needle: &[u8]) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8];
    while !got.ends_with(needle) {
        match s.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            other => panic!(
                "waiting for {:?} after {:?}: {other:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8(got).unwrap()
}

/// Nothing arrives for `d`, and the connection stays open.
#[track_caller]
fn assert_silent(s: &mut TcpStream, d: Duration) {
    s.set_read_timeout(Some(d)).unwrap();
    let mut byte = [0u8];
    match s.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected silence on an open connection, got {other:?}"),
    }
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
}

/// The proxy closed the connection (end of stream or reset, not a timeout).
#[track_caller]
fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected a closed connection, got {other:?}"),
    }
}

#[test]
fn held_bodies_come_after_their_headers_on_every_keep_alive_and_chunked_response() {
    const HOLD: Duration = Duration::from_millis(500);
    let proxy = Proxy::start_with(
        http_server("r"),
        Faults {
            hold_body: HOLD,
            ..Faults::default()
        },
    );
    let mut s = connect(&proxy);
    // A chunked response in the middle: the framing must find the next response after it.
    for path in ["/a", "/stream", "/b"] {
        let sent = Instant::now();
        get(&mut s, path);
        let head = read_until(&mut s, b"\r\n\r\n");
        let headers_at = Instant::now();
        assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
        let end: &[u8] = if path == "/stream" {
            b"0\r\n\r\n"
        } else {
            b" end"
        };
        let body = read_until(&mut s, end);
        let body_at = Instant::now();
        assert!(
            body_at - sent >= HOLD,
            "{path}: body after {:?}",
            body_at - sent
        );
        assert!(
            body_at - headers_at >= HOLD / 2,
            "{path}: the headers were held with the body ({:?} between them)",
            body_at - headers_at
        );
        if path == "/stream" {
            let (first, second) = (body.find("first"), body.find("second"));
            assert!(first.is_some() && first < second, "{body:?}");
        }
    }
    assert_eq!(
        proxy.conns.load(Ordering::SeqCst),
        1,
        "one keep-alive connection"
    );
    assert_eq!(proxy.gets.load(Ordering::SeqCst), 3, "three GET requests");
}

#[test]
fn jitter_never_reorders_bytes() {
    let proxy = Proxy::start_with(
        echo_server(),
        Faults {
            jitter: Duration::from_millis(20),
            ..Faults::delay(Duration::from_millis(1))
        },
    );
    let mut s = connect(&proxy);
    s.set_nodelay(true).unwrap();
    let sent: String = (0..3000).map(|i| format!("{i},")).collect();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..3000 {
            w.write_all(format!("{i},").as_bytes()).unwrap();
        }
    });
    let mut got = vec![0u8; sent.len()];
    s.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert!(
        got == sent.as_bytes(),
        "bytes came back out of order: {:?}...",
        String::from_utf8_lossy(&got[..200])
    );
}

#[test]
fn a_black_hole_swallows_bytes_on_open_and_new_connections_without_closing_them() {
    let proxy = Proxy::start_with(echo_server(), Faults::default());
    let mut a = connect(&proxy);
    a.write_all(b"hello").unwrap();
    assert_eq!(read_until(&mut a, b"hello"), "hello");

    proxy.set(Faults {
        black_hole: true,
        ..Faults::default()
    });
    a.write_all(b"lost").unwrap();
    let mut b = connect(&proxy);
    b.write_all(b"lost").unwrap();
    assert_silent(&mut a, Duration::from_millis(300));
    assert_silent(&mut b, Duration::from_millis(300));

    proxy.set(Faults::default());
    for s in [&mut a, &mut b] {
        s.write_all(b"kept").unwrap();
        assert_eq!(read_until(s, b"kept"), "kept", "swallowed bytes came back");
    }
    assert_eq!(proxy.conns.load(Ordering::SeqCst), 2);
}

#[test]
fn a_dropped_response_is_swallowed_whole_and_the_connection_goes_on() {
    let proxy = Proxy::start_with(
        http_server("r"),
        Faults {
            drop_responses: 1,
            drop_matching: "wait=true".into(),
            ..Faults::default()
        },
    );
    let mut s = connect(&proxy);
    get(&mut s, "/a");
    assert!(read_until(&mut s, b" end").ends_with("r1 end"));
    get(&mut s, "/w?wait=true");
    assert_silent(&mut s, Duration::from_millis(300));
    assert_eq!(proxy.faults().drop_responses, 0, "the drop was used up");
    // The server answered the second request; its response is gone, the third one arrives.
    get(&mut s, "/c");
    let third = read_until(&mut s, b" end");
    assert!(
        third.starts_with("HTTP/1.1 200") && third.ends_with("r3 end"),
        "{third:?}"
    );
    assert_eq!(proxy.gets.load(Ordering::SeqCst), 3);
}

#[test]
fn reset_closes_open_connections_and_refuses_new_ones_and_the_upstream_can_change() {
    let proxy = Proxy::start_with(http_server("first"), Faults::default());
    let mut open = connect(&proxy);
    get(&mut open, "/");
    assert!(read_until(&mut open, b" end").ends_with("first1 end"));

    proxy.set(Faults {
        reset: true,
        ..Faults::default()
    });
    assert_closed(&mut open);
    let mut refused = connect(&proxy);
    assert_closed(&mut refused);
    assert_eq!(
        proxy.conns.load(Ordering::SeqCst),
        1,
        "the refused one is not counted"
    );

    proxy.set_upstream(http_server("second"));
    proxy.set(Faults::default());
    let mut again = connect(&proxy);
    get(&mut again, "/");
    assert!(read_until(&mut again, b" end").ends_with("second1 end"));
    assert_eq!(proxy.conns.load(Ordering::SeqCst), 2);
}
