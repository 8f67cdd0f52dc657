//! Process behaviour: signals, transient failures, credentials in logs.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn sigterm_and_sigint_stop_within_a_second_while_idle() {
    let p = Pair::start("signals");
    for sig in ["TERM", "INT"] {
        // a long watch timeout: the mirror sits in a long poll when the signal arrives
        let mut m = p.mirror_from_now(&["--watch-timeout", "30"], "/replica");
        let i = p.src.set("/k", sig).modified_index();
        m.wait_index(&p.dst, "/replica", i);
        // Scenario, not synchronisation: give it time to enter its next (30 s) long poll,
        // which is where the signal must not be held up.
        std::thread::sleep(Duration::from_millis(300));
        m.assert_alive("before the signal");
        let t = Instant::now();
        send_signal(m.pid(), sig);
        let code = m.wait_exit_timeout(Duration::from_secs(1));
        let took = t.elapsed();
        assert!(
            code.is_some(),
            "SIG{sig}: still running after 1 s; stderr:\n{}",
            tail(&m.stderr(), 20)
        );
        let code = code.unwrap();
        assert!(
            code == 0 || code >= 128,
            "SIG{sig}: exit code {code} (took {took:?}); stderr:\n{}",
            tail(&m.stderr(), 20)
        );
        println!("SIG{sig}: exited with {code} in {took:?}");
    }
}

#[test]
fn sigterm_while_busy_stops_and_restart_is_clean() {
    let p = Pair::start("sigterm-busy");
    let mut m = p.mirror_from_now(&[], "/replica");
    std::thread::scope(|s| {
        let c = p.src.client.clone();
        let w = s.spawn(move || {
            for i in 0..300 {
                c.set(&format!("/busy/k{}", i % 30), &i.to_string());
            }
        });
        m.wait_for(Duration::from_secs(30), "some replication", || {
            p.dst.exists("/replica/busy/k5")
        });
        let t = Instant::now();
        m.terminate();
        let code = m.wait_exit_timeout(Duration::from_secs(1));
        assert!(code.is_some(), "still running 1 s after SIGTERM");
        println!(
            "SIGTERM while busy: exited with {code:?} in {:?}",
            t.elapsed()
        );
        w.join().unwrap();
    });
    let mut m = Mirror::start(&[], &p.src.url, &p.dst.url);
    m.wait_synced(
        &p.src,
        "/",
        &p.dst,
        "/replica",
        "/replica",
        "restart after SIGTERM",
    );
}

#[test]
fn credentials_never_logged() {
    let p = Pair::start("creds");
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    let src = p.src.url_with_auth("alice", "s3cretSRCpw");
    let dst = p.dst.url_with_auth("bob", "s3cretDSTpw");
    let mut m = Mirror::start(&["-d"], &src, &dst);
    p.src.set("/k", "v");
    p.src.mkdir("/d");
    m.wait_synced(
        &p.src,
        "/",
        &p.dst,
        "/replica",
        "/replica",
        "with credentials",
    );
    m.terminate();
    m.wait_exit(Duration::from_secs(5));
    let err = m.stderr() + &m.stdout();
    assert!(
        err.contains("Replicating key"),
        "no replication logged:\n{err}"
    );
    for secret in ["s3cretSRCpw", "s3cretDSTpw"] {
        assert!(
            !err.contains(secret),
            "password {secret} appears in the output:\n{err}"
        );
    }

    // errors naming the endpoint must not leak it either: destination down, short retry
    let dead = format!("http://carol:s3cretDEADpw@127.0.0.1:{}", free_port());
    let mut m = Mirror::start(&["-d", "--retry-timeout", "2"], &src, &dead);
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr() + &m.stdout();
    assert_eq!(
        code, 1,
        "expected exit 1 (transient) with the destination down:\n{err}"
    );
    assert!(
        !err.contains("s3cretDEADpw"),
        "password appears in the output:\n{err}"
    );
    assert!(
        !err.contains("s3cretSRCpw"),
        "password appears in the output:\n{err}"
    );
}

#[test]
fn source_going_away_exits_1_after_retry_timeout() {
    let src = Etcd::start("gone-src");
    let dst = Etcd::start("gone-dst");
    set_replication_index(&dst, "/replica", src.current_index());
    let mut m = Mirror::start(&["--retry-timeout", "2"], &src.url, &dst.url);
    let i = src.set("/k", "v").modified_index();
    m.wait_index(&dst, "/replica", i);
    drop(src);
    let t = Instant::now();
    let code = m.wait_exit(Duration::from_secs(30));
    let took = t.elapsed();
    assert_eq!(
        code,
        1,
        "expected exit 1 (transient); stderr:\n{}",
        tail(&m.stderr(), 20)
    );
    assert!(
        took >= Duration::from_millis(1500),
        "gave up after {took:?}, before the 2 s retry timeout"
    );
    assert!(dst.exists("/replica/k"));
}

#[test]
fn transient_outage_shorter_than_retry_timeout_is_survived() {
    // The destination is unreachable for a moment (we point the mirror at a port that only
    // starts answering later, via a tiny TCP forwarder).
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let p = Pair::start("outage");
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    let port = free_port();
    let up = Arc::new(AtomicBool::new(false));
    let target = p.dst.client_port;
    let up2 = up.clone();
    std::thread::spawn(move || {
        // wait until told, then listen and forward connections to the destination
        while !up2.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let l = TcpListener::bind(("127.0.0.1", port)).expect("bind forwarder");
        for conn in l.incoming() {
            let Ok(a) = conn else { continue };
            let Ok(b) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let (mut a, mut b) = (a, b);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = a.read(&mut buf) {
                    if n == 0 || b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = b.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = b2.read(&mut buf) {
                    if n == 0 || a2.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = a2.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    let mut m = Mirror::start(
        &["--retry-timeout", "30"],
        &p.src.url,
        &format!("http://127.0.0.1:{port}"),
    );
    p.src.set("/k", "v");
    // down for ~2 s, then up
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        m.assert_alive("during the outage");
        std::thread::sleep(Duration::from_millis(50));
    }
    up.store(true, Ordering::Relaxed);
    m.wait_synced(
        &p.src,
        "/",
        &p.dst,
        "/replica",
        "/replica",
        "after the outage",
    );
}
