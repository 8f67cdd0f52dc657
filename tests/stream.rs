//! The streamed watch: switching between history replays and live streaming never misses,
//! reorders or doubles an event.

mod common;

use common::*;
use std::time::Duration;

/// Three writers, 180 mixed events in prefix; returns when they are done.
fn burst(src_url: &str, round: u64) {
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let url = src_url.to_string();
            std::thread::spawn(move || {
                let c = Client::new(&url);
                let mut rng = Rng::new(1 + round * 10 + w);
                for i in 0..60u64 {
                    let key = format!("/s/w{w}/k{}", rng.below(8));
                    match rng.below(10) {
                        0..=5 => {
                            c.set(&key, &format!("r{round} i{i} {}", rng.below(1000)));
                        }
                        6..=7 => {
                            c.delete(&key, &[]);
                        }
                        _ => {
                            if let Some(v) = c.get(&key).filter(|v| !v.is_empty()) {
                                c.put(&key, &[("value", "cas"), ("prevValue", &v)]);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
}

/// Odd rounds write while the mirror is down (the next mirror replays them from the history,
/// one registration each, then goes live); even rounds write while it streams live, once a
/// marker write has been seen arriving live.
#[test]
fn history_replays_and_live_streaming_alternate_without_losing_events() {
    let pair = Pair::start("stream-switch");
    let args = ["--port", "0", "-d"];
    let mut m = pair.mirror_from_now(&args, "/replica");
    m.wait_log(Duration::from_secs(10), "Starting replication at");
    let (mut replayed, mut live) = (0, 0);
    for round in 0..8u64 {
        if round % 2 == 1 {
            m.terminate();
            assert_eq!(m.wait_exit(Duration::from_secs(5)), 128 + 15);
            burst(&pair.src.url, round);
            let log = m.stderr();
            replayed += log.matches("was replayed from the history").count();
            live += log.matches("arrived live").count();
            m = Mirror::start(&args, &pair.src.url, &pair.dst.url);
        } else {
            // Live: a marker written now must arrive on the stream, not from the history.
            let seen = m.stderr().matches("arrived live").count();
            pair.src.set("/marker", &format!("r{round}"));
            wait_until(Duration::from_secs(10), "the marker to arrive live", || {
                m.stderr().matches("arrived live").count() > seen
            });
            burst(&pair.src.url, round);
        }
        m.wait_index(&pair.dst, "/replica", pair.src.current_index());
        m.wait_synced(
            &pair.src,
            "/s",
            &pair.dst,
            "/replica/s",
            "/replica",
            "after a round",
        );
    }
    let log = m.stderr();
    replayed += log.matches("was replayed from the history").count();
    live += log.matches("arrived live").count();
    eprintln!("events replayed from the history: {replayed}, arrived live: {live}");
    assert!(
        replayed >= 4 * 100,
        "expected history replays, saw {replayed}"
    );
    assert!(live >= 4 * 100, "expected live stream events, saw {live}");
    m.assert_alive("after the workload");
}

/// Across a 15 ms (each way) link a history replay costs a round trip per event (33/s), so
/// a mirror that starts 100 events behind while the source keeps writing 100/s must not
/// stay on replays: it registers a live stream first and replays only what came before it.
#[test]
fn a_distant_mirror_that_starts_behind_catches_up_while_writes_continue() {
    use common::proxy::Proxy;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    let pair = Pair::start("stream-distance");
    let upstream = format!("127.0.0.1:{}", pair.src.client_port)
        .parse()
        .unwrap();
    let proxy = Proxy::start(upstream, Duration::from_millis(15));
    set_replication_index(&pair.dst, "/replica", pair.src.current_index());
    for i in 0..100 {
        pair.src
            .set(&format!("/d/before/{}", i % 40), &format!("v{i}"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (url, stop) = (pair.src.url.clone(), stop.clone());
        std::thread::spawn(move || {
            let c = Client::new(&url);
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(60) {
                c.set(&format!("/d/during/{}", n % 50), &format!("w{n}"));
                n += 1;
                let due = start + Duration::from_millis(n * 1000 / 100);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        })
    };
    let mut m = Mirror::start(&["-d"], &proxy.url(), &pair.dst.url);
    let live_before = |m: &Mirror| m.stderr().matches("arrived live").count();
    wait_until(Duration::from_secs(40), "the mirror to go live", || {
        live_before(&m) >= 5
    });
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    m.wait_synced(
        &pair.src,
        "/d",
        &pair.dst,
        "/replica/d",
        "/replica",
        "after the writer",
    );
    let log = m.stderr();
    assert!(
        log.matches("was replayed from the history").count() >= 100,
        "{}",
        tail(&log, 20)
    );
    m.assert_alive("after catching up at a distance");
}
