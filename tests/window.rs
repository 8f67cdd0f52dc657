//! The 1000-event history window: the 2024-02-28 incident, a busy source, and a mirror that was
//! down too long (exit 4, recovered by --reload).

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[test]
fn incident_2024_02_28_quiet_after_1100_outside_writes() {
    let p = Pair::start("incident");
    let mut m = p.mirror_from_now(&["--src-prefix", "/conftool"], "/replica");
    let first = p.src.set("/conftool/v1/pools/a", "inside").modified_index();
    m.wait_index(&p.dst, "/replica", first);
    assert_eq!(
        p.dst.get("/replica/conftool/v1/pools/a").as_deref(),
        Some("inside")
    );

    for i in 0..1100 {
        p.src
            .set(&format!("/spicerack/locks/k{}", i % 37), &i.to_string());
    }
    let after_burst = p.src.current_index();
    assert!(after_burst >= first + 1100);
    m.assert_alive("right after 1100 writes outside the prefix");

    // A minute and a half with no writes at all: well past the 65 s at which the old pacer
    // panicked after a burst.
    m.stays_alive(Duration::from_secs(90), "during the quiet period");
    // The root watch saw every outside write arrive, so the stored index followed them.
    let idx = replication_index(&p.dst, "/replica").unwrap();
    assert!(
        idx + 1000 > after_burst,
        "stored index {idx} is more than 1000 behind the source ({after_burst}): a restart \
         would lose the window"
    );
    // The incident itself was a restart: a killed mirror must resume inside the window.
    assert_eq!(m.kill(), 128 + 9);
    let mut m = Mirror::start(&["--src-prefix", "/conftool"], &p.src.url, &p.dst.url);
    m.wait_log(Duration::from_secs(10), "Starting replication at");

    let last = p
        .src
        .set("/conftool/v1/pools/b", "after the quiet minute")
        .modified_index();
    m.wait_index(&p.dst, "/replica", last);
    m.wait_for(Duration::from_secs(10), "last key arrives", || {
        p.dst.get("/replica/conftool/v1/pools/b").as_deref() == Some("after the quiet minute")
    });
    assert!(!p.dst.exists("/replica/spicerack"));
    m.assert_alive("end");
}

#[test]
fn busy_source_1000_writes_per_second_outside_prefix() {
    let p = Pair::start("busy");
    let mut m = p.mirror_from_now(&["--src-prefix", "/conftool"], "/replica");
    let first = p.src.set("/conftool/a", "inside").modified_index();
    m.wait_index(&p.dst, "/replica", first);

    let duration = Duration::from_secs(30);
    let target_rate = 1000u64;
    let done = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let mut worst_behind = 0u64;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for w in 0..4u64 {
            let c = p.src.client.clone();
            let done = &done;
            let failed = &failed;
            s.spawn(move || {
                let mut i = 0u64;
                while t0.elapsed() < duration {
                    // rate limit: write number n is due at t0 + n ms
                    let n = done.load(Ordering::Relaxed);
                    let due = Duration::from_millis(n * 1000 / target_rate);
                    if let Some(ahead) = due.checked_sub(t0.elapsed()) {
                        std::thread::sleep(ahead.min(Duration::from_millis(5)));
                        continue;
                    }
                    let r = c.put(&format!("/busy/w{w}/k{}", i % 50), &[("value", "x")]);
                    if !r.ok() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    i += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Meanwhile the mirror stays alive and its stored index stays inside the window,
        // so that a restart at any moment would resume.
        while t0.elapsed() < duration {
            m.assert_alive("during the busy period");
            let stored = replication_index(&p.dst, "/replica").unwrap_or(0);
            worst_behind = worst_behind.max(p.src.current_index().saturating_sub(stored));
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "wrote {n} keys outside the prefix in {elapsed:.1} s: {:.0} writes/s (target {target_rate}/s)",
        n as f64 / elapsed
    );
    assert!(!failed.load(Ordering::Relaxed), "some source writes failed");
    assert!(
        n as f64 / elapsed >= 0.8 * target_rate as f64,
        "the writers managed only {n} writes in {elapsed:.1} s; the test proves nothing"
    );
    println!("stored index at most {worst_behind} behind the source");
    assert!(
        worst_behind < 700,
        "the stored index fell {worst_behind} events behind: a restart could lose the window"
    );
    m.assert_alive("right after the busy period");
    // A restart right after the burst resumes inside the window.
    assert_eq!(m.kill(), 128 + 9);
    let mut m = Mirror::start(&["--src-prefix", "/conftool"], &p.src.url, &p.dst.url);
    m.wait_log(Duration::from_secs(10), "Starting replication at");

    let last = p
        .src
        .set("/conftool/b", "after the busy period")
        .modified_index();
    m.wait_index(&p.dst, "/replica", last);
    m.wait_for(Duration::from_secs(10), "last key arrives", || {
        p.dst.get("/replica/conftool/b").as_deref() == Some("after the busy period")
    });
    assert!(!p.dst.exists("/replica/busy"));
    m.assert_alive("end");
}

#[test]
fn stopped_mirror_loses_window_exit_4_then_reload_recovers() {
    let p = Pair::start("stopped");
    let mut m = p.mirror_from_now(&["--src-prefix", "/conftool"], "/replica");
    let first = p.src.set("/conftool/a", "1").modified_index();
    m.wait_index(&p.dst, "/replica", first);
    m.terminate();
    m.wait_exit(Duration::from_secs(5));
    let stored = replication_index(&p.dst, "/replica").unwrap();

    // 1500 writes while the mirror is stopped: mostly outside, some inside the prefix
    for i in 0..1500 {
        if i % 100 == 0 {
            p.src
                .set(&format!("/conftool/while-down/k{i}"), &i.to_string());
        } else {
            p.src
                .set(&format!("/elsewhere/k{}", i % 20), &i.to_string());
        }
    }
    assert!(p.src.current_index() > stored + 1000);

    let mut m = Mirror::start(&["--src-prefix", "/conftool"], &p.src.url, &p.dst.url);
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(code, 4, "expected exit 4 (index cleared); stderr:\n{err}");
    assert!(
        err.contains("--reload"),
        "message must say to run with --reload:\n{err}"
    );
    // nothing was written
    assert_eq!(replication_index(&p.dst, "/replica"), Some(stored));
    assert!(!p.dst.exists("/replica/conftool/while-down"));

    // --reload recovers and keeps replicating
    let mut m = Mirror::start(
        &["--src-prefix", "/conftool", "--reload"],
        &p.src.url,
        &p.dst.url,
    );
    m.wait_synced(
        &p.src,
        "/conftool",
        &p.dst,
        "/replica/conftool",
        "/replica",
        "reload after losing the window",
    );
    assert!(p.dst.exists("/replica/conftool/while-down/k1400"));
    let last = p.src.set("/conftool/new", "after reload").modified_index();
    m.wait_index(&p.dst, "/replica", last);
    m.wait_for(Duration::from_secs(10), "new key after reload", || {
        p.dst.get("/replica/conftool/new").as_deref() == Some("after reload")
    });
    assert!(!p.dst.exists("/replica/elsewhere"));
    m.assert_alive("end");
}

/// Expiry bursts: etcd expires every due key in one go every 0.5 s, and a go of more than 1000
/// keys leaves the history before a watcher that is behind could read it. A live mirror reads
/// them off its stream; if it ever cannot, it must stop with exit 4, never lose them.
#[test]
fn expiry_bursts_replicate_or_stop_with_exit_4() {
    for n in [500u64, 1500] {
        let p = Pair::start(&format!("expiry-{n}"));
        let mut m = p.mirror_from_now(&["--src-prefix", "/ttl"], "/replica");
        std::thread::scope(|s| {
            for w in 0..4u64 {
                let c = p.src.client.clone();
                s.spawn(move || {
                    for i in (w..n).step_by(4) {
                        c.put(&format!("/ttl/k{i}"), &[("value", "x"), ("ttl", "2")])
                            .expect_ok();
                    }
                });
            }
        });
        wait_until(Duration::from_secs(30), "the keys to expire", || {
            tree(&p.src, "/ttl").is_empty()
        });
        let gone = poll_until(Duration::from_secs(30), || {
            !m.is_alive() || tree(&p.dst, "/replica/ttl").is_empty()
        });
        match m.exited() {
            None => {
                assert!(gone, "{n} expired keys still on the replica after 30 s");
                m.wait_index(&p.dst, "/replica", p.src.current_index());
                println!("expiry burst of {n} keys: replicated");
            }
            Some(code) => {
                assert_eq!(code, 4, "{}", tail(&m.stderr(), 10));
                println!("expiry burst of {n} keys: exit 4 (history window lost)");
            }
        }
    }
}
