//! etcd v3 support (issue 10) under faults, on real etcd 3.4, v2 to v3 and v3 to v3: SIGKILLs
//! at random moments during a mixed workload, a kill between the chunks of a large revision,
//! transaction answers lost on the way back from the destination (connection closed, or no
//! answer at all), connections on both sides closed at random, the source (v3) and the
//! destination restarted mid-stream, watch bodies held back, `--reload` (dry run,
//! `--reload-only`, the mass-delete guard, a reload killed midway, a busy source) and
//! `--check`. Plain replication of each event kind is tests/v3.rs's.

#[macro_use]
mod common;

use common::proxy::{Faults, Proxy};
use common::v3::{map_diff, Mode, Setup, DST, SRC, SUB, V3};
use common::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The shortest --watch-timeout: a quiet source (the last revisions outside the prefix)
/// moves the stored index after it, so the tests that end that way use it.
const QUICK: [&str; 2] = ["--watch-timeout", "5"];

/// The exit code of a process killed by SIGKILL (128 + 9).
const KILLED: i32 = 137;

const VALUES: &[&str] = &[
    "",
    "plain",
    "two words",
    "a&b=c+d%20e?f#g",
    "ünïcødé ☃",
    "line1\nline2",
    "  padded  ",
];

fn value(rng: &mut Rng) -> String {
    VALUES[rng.below(VALUES.len() as u64) as usize].to_string()
        + if rng.chance(50) { "" } else { " x" }
}

/// One step of the v2 workload under /app: puts, conditional creates and updates, deletes,
/// directories made and removed recursively, in-order keys, a value replaced by a directory,
/// hidden keys (not mirrored), rarely the whole prefix deleted, a few writes outside the
/// prefix. True if it made an event.
fn v2_step(c: &Client, rng: &mut Rng) -> bool {
    let d = rng.below(4);
    let key = if rng.chance(5) {
        "/app/s p?#%".to_string()
    } else {
        format!("/app/d{d}/k{}", rng.below(12))
    };
    let v = value(rng);
    let sub = format!("/app/d{d}/sub{}", rng.below(3));
    let r = match rng.below(100) {
        0..=33 => c.put(&key, &[("value", &v)]),
        34..=40 => c.put(&key, &[("value", &v), ("prevExist", "false")]),
        41..=47 => c.put(&key, &[("value", &v), ("prevExist", "true")]),
        48..=61 => c.delete(&key, &[]),
        62..=69 => c.put(&format!("{sub}/c{}", rng.below(4)), &[("value", &v)]),
        70..=75 => c.delete(&sub, &[("recursive", "true")]),
        76..=79 => c.post("/app/q", &[("value", &v)]),
        80..=81 => c.delete("/app/q", &[("recursive", "true")]),
        82..=84 => c.put(&sub, &[("dir", "true")]),
        // A value replaced by a directory: in v3 its key goes.
        85..=87 => c.put(&key, &[("dir", "true")]),
        88..=90 => c.put(&format!("/app/h{d}/_lock"), &[("value", &v)]),
        91..=92 => c.put(&format!("/app/d{d}/_l{}", rng.below(3)), &[("value", &v)]),
        93 => c.delete(&format!("/app/h{d}"), &[("recursive", "true")]),
        94..=95 => c.delete(&format!("/app/d{d}"), &[("recursive", "true")]),
        96 if rng.chance(20) => c.delete(SRC, &[("recursive", "true")]),
        // Outside the prefix: the stored index must still reach the source's.
        97..=99 => c.put(&format!("/other/o{d}"), &[("value", &v)]),
        _ => c.put(&key, &[("value", &v)]),
    };
    r.ok()
}

/// One step of the v3 workload under /app: puts, deletes, multi-op transactions, range
/// deletes, keys with a `_` segment (mirrored in v3), 120 keys written in one revision and
/// deleted in one (more than one destination chunk), rarely the whole prefix deleted, a few
/// writes outside the prefix. True if it made a revision (or may have).
fn v3_step(c: &V3, rng: &mut Rng) -> bool {
    let d = rng.below(4);
    let key = if rng.chance(5) {
        "/app/s p?#%".to_string()
    } else {
        format!("/app/d{d}/k{}", rng.below(12))
    };
    let v = value(rng);
    match rng.below(100) {
        0..=39 => {
            c.put(&key, &v);
        }
        40..=54 => return c.delete(&key) > 0,
        55..=69 => {
            let n = 2 + rng.below(4);
            let mut keys = BTreeSet::new();
            while keys.len() < n as usize {
                keys.insert(format!("/app/d{}/k{}", rng.below(4), rng.below(12)));
            }
            let ops: Vec<(&str, &str, &str)> = keys
                .iter()
                .map(|k| {
                    if rng.chance(70) {
                        ("put", k.as_str(), v.as_str())
                    } else {
                        ("del", k.as_str(), "")
                    }
                })
                .collect();
            c.txn(&ops);
        }
        70..=76 => return c.delete_prefix(&format!("/app/d{d}/")) > 0,
        77..=82 => {
            c.put(&format!("/app/d{d}/_lock"), &v);
        }
        83..=84 => {
            let keys: Vec<String> = (0..120).map(|i| format!("/app/bulk/b{i:03}")).collect();
            let ops: Vec<(&str, &str, &str)> = keys
                .iter()
                .map(|k| ("put", k.as_str(), v.as_str()))
                .collect();
            c.txn(&ops);
        }
        85..=86 => return c.delete_prefix("/app/bulk/") > 0,
        87 if rng.chance(20) => return c.delete_prefix("/app/") > 0,
        // Outside the prefix (one starts like it): the stored index must still reach the
        // source's revision.
        88..=90 => {
            c.put(&format!("/other/o{d}"), &v);
        }
        91 => {
            c.put(&format!("/apple/a{d}"), &v);
        }
        _ => {
            c.put(&key, &v);
        }
    }
    true
}

/// The PRNG seed of the randomised tests (`ETCDMIRROR_TEST_SEED` replays a run).
fn seed() -> u64 {
    let seed: u64 = std::env::var("ETCDMIRROR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0010_3333);
    println!("PRNG seed: {seed} (set ETCDMIRROR_TEST_SEED to replay)");
    seed
}

/// A writer thread's mixed workload on the source (`v2_step` or `v3_step`, by mode), shared
/// with the thread that injects faults.
#[derive(Default)]
struct Writer {
    /// Source writes that made an event.
    events: AtomicU64,
    /// Set by the writer when it has finished.
    done: AtomicBool,
    /// Set to stop the writer early (a failed test).
    abort: AtomicBool,
    /// The largest lag of the stored index behind the source seen.
    max_lag: AtomicU64,
}

impl Writer {
    /// Write for `time` at `rate` steps a second, never more than 300 revisions ahead of
    /// the stored index (the tests are about faults, not about the v2 source's 1000-event
    /// history window); then set `done`.
    fn run(&self, s: &Setup, seed: u64, rate: u64, time: Duration) {
        let mut rng = Rng::new(seed);
        let t0 = Instant::now();
        let mut steps = 0u64;
        while t0.elapsed() < time && !self.abort.load(Ordering::Relaxed) {
            // Pacing, not synchronisation: step n is due at n / rate.
            let due = Duration::from_micros(steps * 1_000_000 / rate);
            if let Some(ahead) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(ahead);
            }
            if steps % 20 == 0 {
                let caught_up = poll_until(Duration::from_secs(60), || {
                    let lag = s.src_index().saturating_sub(s.stored().unwrap_or(0));
                    self.max_lag.fetch_max(lag, Ordering::Relaxed);
                    lag < 300 || self.abort.load(Ordering::Relaxed)
                });
                if !caught_up {
                    break;
                }
            }
            steps += 1;
            let event = match s.mode {
                Mode::V2ToV3 => v2_step(&s.src, &mut rng),
                Mode::V3ToV3 => v3_step(&s.s3, &mut rng),
            };
            if event {
                self.events.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.done.store(true, Ordering::Relaxed);
    }

    fn done(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    /// Wait for the writer to end by itself.
    fn wait(&self) {
        wait_until(Duration::from_secs(120), "the writer to finish", || {
            self.done()
        });
    }
}

/// SIGKILL the mirror at random moments, 10 to 15 times, during 12 s of mixed writes on the
/// source, restarting it each time without --reload; the destination is 3 ms away each way so
/// that kills land in the middle of transactions. The mirror never exits by itself, and at
/// the end the trees are equal and the stored index is the source's.
fn sigkills(mode: Mode) {
    const MIN_KILLS: u32 = 10;
    const MAX_KILLS: u32 = 15;
    let seed = seed();
    let s = Setup::start("kills", mode);
    s.set_index_now();
    let to_dst = Proxy::start(s.dst.addr(), Duration::from_millis(3));
    let mut m = s.mirror(&QUICK, &to_dst.url());

    let w = Writer::default();
    let mut kills = 0;
    let mut progressed = 0;
    // Runs that found a write of theirs, or a cut batch, already applied.
    let mut recognised = 0;
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        let (s, w) = (&s, &w);
        scope.spawn(move || w.run(s, seed, 80, Duration::from_secs(12)));
        // Stops the writer when this closure ends, by a failed assertion too.
        let _abort = StopOnDrop(&w.abort);
        let mut krng = Rng::new(seed ^ 0xdead_beef);
        while kills < MIN_KILLS || (!w.done() && kills < MAX_KILLS) {
            // A random moment: sometimes right after the start, mostly in the middle of work.
            let delay = if krng.chance(20) {
                krng.below(80)
            } else {
                300 + krng.below(1000)
            };
            let before = s.stored();
            m.stays_alive(
                Duration::from_millis(delay),
                &format!("after {kills} kills"),
            );
            let code = m.kill();
            if m.stderr().contains("already hold") {
                recognised += 1;
            }
            assert_eq!(
                code,
                KILLED,
                "etcdmirror exited by itself (not by our SIGKILL) after {kills} kills; stderr:\n{}",
                tail(&m.stderr(), 40)
            );
            kills += 1;
            if s.stored() != before {
                progressed += 1;
            }
            if krng.chance(30) {
                // Stay down for a moment, so that the restart has a backlog to catch up on.
                std::thread::sleep(Duration::from_millis(50 + krng.below(300)));
            }
            m = s.mirror(&QUICK, &to_dst.url());
        }
        w.wait();
    });
    let n = w.events.load(Ordering::Relaxed);
    println!(
        "{mode:?}: {n} source events, {kills} SIGKILLs ({progressed} after some progress, \
         {recognised} found writes already applied) in {:.1} s, max lag {}",
        t0.elapsed().as_secs_f64(),
        w.max_lag.load(Ordering::Relaxed)
    );
    assert!(
        n >= 300,
        "only {n} source events: the writer stopped early (the mirror did not follow?)"
    );
    assert!(
        progressed >= MIN_KILLS / 2,
        "only {progressed} of {kills} runs stored any progress before their kill"
    );
    // The last revision outside the prefix: the stored index must reach it all the same.
    s.src_put("/other/last", "outside the prefix");
    s.synced(&mut m, Duration::from_secs(90), "the SIGKILL workload");
}

both_modes!(sigkills_at_random_moments_then_trees_equal, sigkills);

/// Both sides behind proxies (1-3 ms away) whose connections are all closed at random
/// moments, every 150-500 ms, sometimes refusing new ones for up to 100 ms, during 6 s of
/// mixed writes: watch streams cut in the middle of a body, transactions cut before or after
/// they land. The mirror never exits, and the trees end equal.
fn flaky_network(mode: Mode) {
    let seed = seed();
    let s = Setup::start("flaky", mode);
    s.set_index_now();
    let near = Faults {
        jitter: Duration::from_millis(2),
        ..Faults::delay(Duration::from_millis(1))
    };
    let to_src = Proxy::start_with(s.src.addr(), near.clone());
    let to_dst = Proxy::start_with(s.dst.addr(), near.clone());
    let mut m = Mirror::start(
        &s.args(&["--retry-timeout", "30", "--watch-timeout", "5"]),
        &to_src.url(),
        &to_dst.url(),
    );
    let w = Writer::default();
    let mut resets = [0u32; 2];
    std::thread::scope(|scope| {
        let (s, w) = (&s, &w);
        scope.spawn(move || w.run(s, seed, 60, Duration::from_secs(6)));
        let _abort = StopOnDrop(&w.abort);
        let mut rng = Rng::new(seed ^ 0xf1a4);
        while !w.done() {
            m.stays_alive(
                Duration::from_millis(150 + rng.below(350)),
                "on a flaky network",
            );
            let side = rng.below(3);
            let proxies: Vec<&Proxy> = [&to_src, &to_dst]
                .into_iter()
                .enumerate()
                .filter(|(i, _)| side == 2 || side == *i as u64)
                .map(|(i, p)| {
                    resets[i] += 1;
                    p
                })
                .collect();
            for p in &proxies {
                p.set(Faults {
                    reset: true,
                    ..near.clone()
                });
            }
            m.stays_alive(
                Duration::from_millis(rng.below(100)),
                "while connections are refused",
            );
            for p in &proxies {
                p.set(near.clone());
            }
        }
    });
    let n = w.events.load(Ordering::Relaxed);
    println!(
        "{mode:?}: {n} source events, {} source and {} destination resets",
        resets[0], resets[1]
    );
    assert!(n >= 150, "only {n} source events: the writer stopped early");
    assert!(
        resets[0] >= 5 && resets[1] >= 5,
        "too few resets: {resets:?}"
    );
    s.src_put("/other/last", "outside the prefix");
    s.synced(&mut m, Duration::from_secs(90), "a flaky network");
    let log = m.stderr();
    println!(
        "{mode:?}: {} retries logged, {} writes found already applied",
        log.matches("retrying").count(),
        log.matches("already hold").count()
    );
}

both_modes!(a_flaky_network_on_both_sides_loses_nothing, flaky_network);

/// Swallow the answer to the next destination transaction, make `event` on the source, wait
/// until the transaction has landed (the stored index reached the event), leave the mirror
/// without an answer for a while, then close its connections: it must find its write already
/// applied and go on to the next event.
#[track_caller]
fn lose_the_answer(s: &Setup, m: &mut Mirror, proxy: &Proxy, what: &str, event: impl FnOnce()) {
    proxy.set(Faults {
        drop_responses: 1,
        drop_matching: "POST /v3/kv/txn".into(),
        ..Faults::default()
    });
    event();
    let target = s.src_index();
    m.wait_for(
        Duration::from_secs(60),
        &format!("the transaction of {what} to land (index {target})"),
        || proxy.faults().drop_responses == 0 && s.stored().is_some_and(|i| i >= target),
    );
    let silent = Instant::now();
    m.wait_for(Duration::from_secs(5), "a silent second", || {
        silent.elapsed() >= Duration::from_secs(1)
    });
    proxy.set(Faults {
        reset: true,
        ..Faults::default()
    });
    proxy.set(Faults::default());
    // The mirror applies events in order: once this one is on the replica, the retry of the
    // lost one is over (and cannot be the next answer dropped).
    s.src_put("/app/marker", what);
    s.synced(m, Duration::from_secs(60), what);
}

/// Answers to destination transactions lost after they landed (a single put, an event of
/// several keys, an index moved without an event after a write outside the prefix): the
/// mirror recognises its own writes (no exit 3 or 5) and goes on.
fn lost_answers(mode: Mode) {
    let s = Setup::start("lost", mode);
    s.set_index_now();
    let proxy = Proxy::start_with(s.dst.addr(), Faults::default());
    let mut m = s.mirror(&["-d", "--watch-timeout", "5"], &proxy.url());
    s.src_put("/app/a0", "first");
    for k in ["x", "y", "z"] {
        s.src_put(&format!("/app/dir/{k}"), k);
    }
    s.synced(&mut m, Duration::from_secs(30), "before any loss");

    lose_the_answer(&s, &mut m, &proxy, "a put", || {
        s.src_put("/app/a1", "its answer is lost")
    });
    lose_the_answer(&s, &mut m, &proxy, "an event of several keys", || {
        match mode {
            // A recursive delete: every key below the directory goes in one event.
            Mode::V2ToV3 => drop(
                s.src
                    .delete("/app/dir", &[("recursive", "true")])
                    .expect_ok(),
            ),
            Mode::V3ToV3 => {
                s.s3.txn(&[
                    ("put", "/app/a2", "in a txn"),
                    ("put", "/app/a3", "in the same txn"),
                    ("del", "/app/a0", ""),
                    ("del", "/app/dir/y", ""),
                ]);
            }
        }
    });
    lose_the_answer(
        &s,
        &mut m,
        &proxy,
        "an index moved by a quiet prefix",
        || s.src_put("/other/o", "outside the prefix"),
    );
    // An overwrite and a delete after the losses.
    s.src_put("/app/a1", "overwritten");
    match mode {
        Mode::V2ToV3 => drop(s.src.delete("/app/a0", &[]).expect_ok()),
        Mode::V3ToV3 => assert_eq!(s.s3.delete("/app/a2"), 1),
    }
    s.synced(&mut m, Duration::from_secs(30), "writes after the losses");
    assert_eq!(
        proxy.faults().drop_responses,
        0,
        "no answer was dropped: the test proves nothing"
    );
    let log = m.stderr();
    assert!(
        log.matches("already hold").count() >= 3,
        "the mirror did not say 3 times that it found its write already applied:\n{}",
        tail(&log, 30)
    );
}

both_modes!(lost_txn_answers_are_recognised, lost_answers);

/// A transaction whose answer never comes and whose connection stays open: the mirror waits
/// it out with its own timeout, then finds the write already applied.
#[test]
fn v3_to_v3_a_txn_answer_that_never_comes_is_waited_out() {
    let s = Setup::start("never", Mode::V3ToV3);
    s.set_index_now();
    let proxy = Proxy::start_with(
        s.dst.addr(),
        Faults {
            drop_responses: 1,
            drop_matching: "POST /v3/kv/txn".into(),
            ..Faults::default()
        },
    );
    let mut m = s.mirror(&["-d"], &proxy.url());
    s.s3.txn(&[
        ("put", "/app/a", "its answer never comes"),
        ("put", "/app/b", "same txn"),
    ]);
    s.s3.put("/app/c", "queued behind it");
    s.s3.delete("/app/a");
    let target = s.src_index();
    m.wait_for(
        Duration::from_secs(60),
        "the transaction whose answer is dropped to land",
        || proxy.faults().drop_responses == 0 && s.stored().is_some_and(|i| i >= target),
    );
    // The replica may be complete while the mirror still waits for the answer: a write made
    // now arrives only once it has given up waiting and recognised its own write.
    s.s3.put("/app/d", "after the wait");
    s.synced(
        &mut m,
        Duration::from_secs(120),
        "an answer that never came",
    );
    let log = m.stderr();
    assert!(
        log.contains("already hold"),
        "the mirror did not say it found its write already applied:\n{}",
        tail(&log, 30)
    );
}

/// The keys of the replica below `SUB` + `rel` (a count).
fn replica_count(s: &Setup, rel: &str) -> usize {
    s.d3.range_bytes(format!("{SUB}{rel}").as_bytes()).len()
}

/// Hold back the answer to the next destination transaction, make `revision` on the source
/// (one revision of more keys than one transaction takes), wait until the first chunk has
/// landed (some of the keys below `rel` changed, the index not moved), SIGKILL the mirror and
/// start it again: it accepts the keys already at their new state and writes the rest.
fn cut_between_chunks(
    s: &Setup,
    m: &mut Mirror,
    proxy: &Proxy,
    rel: &str,
    changed: impl Fn(usize) -> bool,
    revision: impl FnOnce(),
) {
    let before = s.stored();
    proxy.set(Faults {
        drop_responses: 1,
        drop_matching: "POST /v3/kv/txn".into(),
        ..Faults::default()
    });
    revision();
    let mut n = 0;
    m.wait_for(
        Duration::from_secs(30),
        &format!("the first chunk of the revision under {rel} to land"),
        || {
            n = replica_count(s, rel);
            proxy.faults().drop_responses == 0 && changed(n)
        },
    );
    assert_eq!(
        s.stored(),
        before,
        "the index moved with the first chunk ({n} keys under {rel})"
    );
    println!("{n} keys under {rel} after the first chunk");
    assert_eq!(m.kill(), KILLED, "{}", tail(&m.stderr(), 30));
    proxy.set(Faults::default());
    *m = s.mirror(&["-d"], &proxy.url());
    s.synced(
        m,
        Duration::from_secs(30),
        &format!("the cut revision under {rel}"),
    );
    let log = m.stderr();
    assert!(
        log.contains("already hold"),
        "the restart did not say it found part of the revision applied:\n{}",
        tail(&log, 30)
    );
}

/// One source revision of 300 deletes (a range delete), then one of 120 puts (a txn), each
/// larger than one destination transaction: the mirror SIGKILLed after the first chunk of
/// each landed resumes the revision on restart, and the trees end equal.
#[test]
fn v3_to_v3_a_kill_between_the_chunks_of_a_large_revision_is_resumed() {
    let s = Setup::start("chunks", Mode::V3ToV3);
    s.set_index_now();
    let proxy = Proxy::start_with(s.dst.addr(), Faults::default());
    let mut m = s.mirror(&["-d"], &proxy.url());
    let big: Vec<String> = (0..300).map(|i| format!("/app/big/k{i:03}")).collect();
    for chunk in big.chunks(100) {
        let ops: Vec<(&str, &str, &str)> = chunk.iter().map(|k| ("put", k.as_str(), "v")).collect();
        s.s3.txn(&ops);
    }
    s.s3.put("/app/keep", "k");
    s.synced(&mut m, Duration::from_secs(30), "the 300 keys");

    cut_between_chunks(
        &s,
        &mut m,
        &proxy,
        "/big/",
        |n| n > 0 && n < 300,
        || {
            assert_eq!(s.s3.delete_prefix("/app/big/"), 300);
        },
    );
    let bulk: Vec<String> = (0..120).map(|i| format!("/app/bulk/b{i:03}")).collect();
    cut_between_chunks(
        &s,
        &mut m,
        &proxy,
        "/bulk/",
        |n| n > 0 && n < 120,
        || {
            let ops: Vec<(&str, &str, &str)> =
                bulk.iter().map(|k| ("put", k.as_str(), "new")).collect();
            s.s3.txn(&ops);
        },
    );
    s.s3.put("/app/after", "a");
    s.synced(
        &mut m,
        Duration::from_secs(30),
        "a write after the cut revisions",
    );
}

/// The source etcd SIGKILLed and started again on the same data: once while the mirror is
/// catching up on a burst (the destination 3 ms away keeps it behind), once while it idles.
/// The mirror resumes from the last applied revision without exiting.
#[test]
fn v3_to_v3_source_restarts_mid_stream_and_idle() {
    let mut s = Setup::start("src-restart", Mode::V3ToV3);
    s.set_index_now();
    let to_dst = Proxy::start(s.dst.addr(), Duration::from_millis(3));
    let mut m = s.mirror(
        &["--retry-timeout", "30", "--watch-timeout", "5"],
        &to_dst.url(),
    );
    for i in 0..300 {
        s.s3.put(&format!("/app/k{:03}", i % 150), &format!("v{i}"));
    }
    s.s3.delete_prefix("/app/k01");
    s.s3.txn(&[("put", "/app/t1", "a"), ("del", "/app/k020", "")]);
    let stored = s.stored().unwrap_or(0);
    let last = s.src_index();
    s.src.restart();
    // Only meaningful if the restart found the mirror behind.
    println!("source restarted with the mirror at {stored} of {last}");
    for i in 0..50 {
        s.s3.put(&format!("/app/after/a{i:02}"), "after the first restart");
    }
    s.s3.delete_prefix("/app/k1");
    s.synced(&mut m, Duration::from_secs(60), "a restart mid-stream");

    s.src.restart();
    s.s3.txn(&[("put", "/app/idle", "after"), ("del", "/app/t1", "")]);
    s.s3.put("/app/last", "x");
    s.s3.put("/other/last", "outside the prefix");
    s.synced(&mut m, Duration::from_secs(60), "a restart while idle");
    assert!(
        stored < last,
        "the first restart did not find the mirror behind (stored {stored}, source {last}): \
         the test did not exercise a resume mid-stream"
    );
}

/// The destination etcd SIGKILLed and started again three times, each time right after a
/// burst of mixed writes that the mirror (the destination 3 ms away) is still applying: a
/// transaction in flight is lost before or after it lands. The mirror rides out each restart
/// (well within --retry-timeout) and the trees end equal.
fn destination_restarts(mode: Mode) {
    let mut rng = Rng::new(seed());
    let mut s = Setup::start("dst-restart", mode);
    s.set_index_now();
    let to_dst = Proxy::start(s.dst.addr(), Duration::from_millis(3));
    let mut m = s.mirror(
        &["--retry-timeout", "30", "--watch-timeout", "5"],
        &to_dst.url(),
    );
    let mut behind = 0;
    for round in 0..3 {
        for _ in 0..150 {
            match mode {
                Mode::V2ToV3 => v2_step(&s.src, &mut rng),
                Mode::V3ToV3 => v3_step(&s.s3, &mut rng),
            };
        }
        if s.stored().unwrap_or(0) < s.src_index() {
            behind += 1;
        }
        s.dst.restart();
        m.assert_alive(&format!("destination restart {round}"));
    }
    s.src_put("/other/last", "outside the prefix");
    s.synced(&mut m, Duration::from_secs(60), "destination restarts");
    assert!(
        behind >= 2,
        "only {behind} of 3 restarts found the mirror behind: the test did not exercise them"
    );
}

both_modes!(destination_restarts_mid_stream, destination_restarts);

/// The v3 watch stream from the source with its body held back 2 s after its headers (the
/// proxy is between the mirror and the SOURCE): events waiting at the start, a catch-up after
/// a stop, live writes of every kind. Silence after the headers is no proof that no event
/// is coming: nothing is lost.
#[test]
fn v3_to_v3_watch_bodies_held_2s_lose_nothing() {
    let s = Setup::start("held", Mode::V3ToV3);
    let proxy = Proxy::start_with(
        s.src.addr(),
        Faults {
            hold_body: Duration::from_secs(2),
            ..Faults::default()
        },
    );
    let start = |s: &Setup| Mirror::start(&s.args(&["-d"]), &proxy.url(), &s.dst.url);
    let bound = Duration::from_secs(60);
    s.set_index_now();
    s.s3.put("/app/a", "written before the start");
    let mut m = start(&s);
    s.synced(&mut m, bound, "an event waiting at the start");

    m.kill();
    for i in 0..3 {
        s.s3.put(&format!("/app/b{i}"), "written while stopped");
    }
    s.s3.txn(&[("put", "/app/t", "txn"), ("del", "/app/a", "")]);
    m = start(&s);
    s.synced(&mut m, bound, "catching up");

    let t = Instant::now();
    let mut i = 0;
    // Live writes for 5 s, spread so that some land while a body is held.
    while t.elapsed() < Duration::from_secs(5) {
        s.s3.put(&format!("/app/live/c{}", i % 7), &format!("v{i}"));
        if i % 5 == 4 {
            s.s3.txn(&[
                ("put", &format!("/app/live/t{i}"), "t"),
                ("del", &format!("/app/live/c{}", (i + 3) % 7), ""),
            ]);
        }
        if i % 11 == 10 {
            s.s3.delete_prefix("/app/b");
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    s.synced(&mut m, bound, "live writes");
}

/// Source content for the reload tests, in the mode's API: 20 values, two in a directory, and
/// what the reload must leave out (v2: an empty directory, a hidden key; v3: a key outside
/// the prefix that starts with it). v3 mirrors a key with a `_` segment. Returns how many
/// keys the replica is missing when it holds `replica_content`.
fn reload_source(s: &Setup) -> usize {
    for i in 0..20 {
        s.src_put(&format!("/app/k{i:02}"), &format!("v{i}"));
    }
    s.src_put("/app/dir/x", "x");
    s.src_put("/app/dir/y", "y\nwith a newline");
    s.src_put("/other/o", "outside the prefix");
    match s.mode {
        Mode::V2ToV3 => {
            s.src.mkdir("/app/empty");
            s.src.set("/app/_hidden", "not mirrored from v2");
            8
        }
        Mode::V3ToV3 => {
            s.s3.put("/apple/z", "outside the prefix /app/");
            s.s3.put("/app/d/_u", "mirrored from v3");
            9
        }
    }
}

/// A replica of `reload_source` with 10 keys right, 4 values changed, the rest missing and 3
/// keys too many; and a key outside the mirrored range that no reload may touch.
fn replica_content(s: &Setup) {
    for i in 0..14 {
        let v = if i < 10 {
            format!("v{i}")
        } else {
            "stale".into()
        };
        s.d3.put(&format!("{SUB}/k{i:02}"), &v);
    }
    s.d3.put(&format!("{SUB}/extra1"), "delete me");
    s.d3.put(&format!("{SUB}/gone/e2"), "delete me");
    s.d3.put(&format!("{SUB}/k05/below"), "delete me");
    s.d3.put("/replica/other", "outside the mirrored range");
}

/// After a reload: the replica is exact, the outside key is untouched, and what must not be
/// mirrored is not.
#[track_caller]
fn assert_reloaded(s: &Setup, what: &str) {
    assert_eq!(
        s.src_tree(),
        s.dst_tree(),
        "{what}: {}",
        map_diff(&s.src_tree(), &s.dst_tree())
    );
    assert_eq!(
        s.stored(),
        Some(s.src_index()),
        "{what}: the stored index is not the source's"
    );
    assert_eq!(
        s.d3.get("/replica/other").as_deref(),
        Some("outside the mirrored range"),
        "{what}: a key outside the mirrored range was touched"
    );
    assert_eq!(s.d3.get("/replica/apple/z"), None, "{what}");
    assert_eq!(s.d3.get("/replica/app/_hidden"), None, "{what}");
    assert_eq!(s.d3.get("/replica/other/o"), None, "{what}");
}

/// `--reload --dry-run` prints the plan and writes nothing; `--reload-only` makes the replica
/// exact, stores the index and exits 0; a plan deleting more than half of the replica's keys
/// is refused with exit 2 (nothing written) unless `--force`; a mirror started afterwards
/// replicates from the stored index.
fn reload_cycle(mode: Mode) {
    let s = Setup::start("reload", mode);
    let creates = reload_source(&s);
    replica_content(&s);

    let before = s.dst_everything();
    let rev_before = s.d3.revision();
    let (code, out) = s.run(&["--reload", "--dry-run"]);
    assert_eq!(code, 0, "--reload --dry-run:\n{out}");
    assert_eq!(
        s.dst_everything(),
        before,
        "the dry run changed the destination"
    );
    assert_eq!(
        s.d3.revision(),
        rev_before,
        "the dry run wrote to the destination"
    );
    assert!(
        mentions_count(&out, "create", creates),
        "the plan must count {creates} creates:\n{out}"
    );
    assert!(
        mentions_count(&out, "update", 4),
        "the plan must count 4 updates:\n{out}"
    );
    assert!(
        mentions_count(&out, "delete", 3),
        "the plan must count 3 deletes:\n{out}"
    );

    let (code, out) = s.run(&["--reload-only"]);
    assert_eq!(code, 0, "--reload-only:\n{out}");
    assert_reloaded(&s, "--reload-only");

    // 40 keys only on the replica next to 23 right ones: the plan deletes more than half.
    let junk: Vec<String> = (0..40).map(|i| format!("{SUB}/junk/j{i:02}")).collect();
    let ops: Vec<(&str, &str, &str)> = junk.iter().map(|k| ("put", k.as_str(), "j")).collect();
    s.d3.txn(&ops);
    s.src_put("/app/k00", "changed on the source");
    let before = s.dst_everything();
    let (code, out) = s.run(&["--reload-only"]);
    assert_eq!(
        code, 2,
        "a reload deleting 40 of 63 keys must be refused:\n{out}"
    );
    assert!(
        out.contains("--force"),
        "the refusal must name --force:\n{out}"
    );
    assert_eq!(
        s.dst_everything(),
        before,
        "the refused reload wrote to the destination"
    );

    let (code, out) = s.run(&["--reload-only", "--force"]);
    assert_eq!(code, 0, "--reload-only --force:\n{out}");
    assert_reloaded(&s, "--reload-only --force");

    let mut m = s.mirror(&[], &s.dst.url);
    s.src_put("/app/after", "written after the reload");
    s.src_put("/app/k01", "changed after the reload");
    s.synced(&mut m, Duration::from_secs(30), "writes after the reloads");
}

both_modes!(
    reload_dry_run_reload_only_and_the_mass_delete_guard,
    reload_cycle
);

/// A `--reload` SIGKILLed after part of its writes (the destination 20 ms away, so that it
/// is slow): it removed the stale index before writing, so a plain start refuses the
/// half-copied replica (exit 2, naming --reload), and another `--reload` finishes the job and
/// replicates from there.
fn reload_killed_midway(mode: Mode) {
    const N: usize = 3000;
    let s = Setup::start("reload-kill", mode);
    match mode {
        Mode::V2ToV3 => {
            for i in 0..N {
                s.src.set(&format!("/app/d{}/k{i:04}", i % 10), "v");
            }
        }
        Mode::V3ToV3 => {
            let keys: Vec<String> = (0..N)
                .map(|i| format!("/app/d{}/k{i:04}", i % 10))
                .collect();
            for chunk in keys.chunks(100) {
                let ops: Vec<(&str, &str, &str)> =
                    chunk.iter().map(|k| ("put", k.as_str(), "v")).collect();
                s.s3.txn(&ops);
            }
        }
    }
    // A few keys right, one to delete (not more than half: no --force needed), a stale index.
    for i in 0..5 {
        s.d3.put(&format!("{SUB}/d{}/k{i:04}", i % 10), "v");
    }
    s.d3.put(&format!("{SUB}/old"), "only on the replica");
    s.d3.put(&index_key(DST), "1");
    let slow = Proxy::start(s.dst.addr(), Duration::from_millis(20));
    let mut m = s.mirror(&["--reload"], &slow.url());
    let mut n = 0;
    m.wait_for(
        Duration::from_secs(60),
        "the reload to write some keys",
        || {
            n = s.dst_tree().len();
            n > 50
        },
    );
    assert_eq!(m.kill(), KILLED);
    let n = s.dst_tree().len();
    println!("killed the reload with {n} of {N} keys on the replica");
    assert!(
        n < N,
        "the reload finished before it could be killed: the test proves nothing"
    );
    assert_eq!(
        s.stored(),
        None,
        "a reload killed midway left an index on a half-copied replica"
    );

    let (code, out) = s.run(&[]);
    assert_eq!(code, 2, "a plain start after a killed reload:\n{out}");
    assert!(
        out.contains("--reload"),
        "the message must name --reload:\n{out}"
    );

    let mut m = s.mirror(&["--reload"], &s.dst.url);
    m.wait_for(
        Duration::from_secs(60),
        "the second reload to finish",
        || s.stored().is_some(),
    );
    s.src_put("/app/after", "written after the second reload");
    s.synced(
        &mut m,
        Duration::from_secs(30),
        "a reload after a killed one",
    );
}

both_modes!(
    a_reload_killed_midway_is_finished_by_another,
    reload_killed_midway
);

/// `--reload-only` while a writer changes the source prefix about 200 times a second
/// (puts, overwrites, deletes, transactions): it ends with exit 0, and a mirror started
/// afterwards from the stored revision makes the trees equal.
#[test]
fn v3_to_v3_reload_on_a_busy_source_then_the_mirror_converges() {
    const N: usize = 5000;
    let s = Setup::start("reload-busy", Mode::V3ToV3);
    let keys: Vec<String> = (0..N)
        .map(|i| format!("/app/d{}/k{i:04}", i % 10))
        .collect();
    for chunk in keys.chunks(100) {
        let ops: Vec<(&str, &str, &str)> =
            chunk.iter().map(|k| ("put", k.as_str(), "v0")).collect();
        s.s3.txn(&ops);
    }
    // The replica has a third of the keys, some stale, and a few extra.
    let stale: Vec<String> = keys
        .iter()
        .step_by(3)
        .map(|k| format!("{DST}{k}"))
        .collect();
    for (n, chunk) in stale.chunks(100).enumerate() {
        let v = if n % 2 == 0 { "v0" } else { "stale" };
        let ops: Vec<(&str, &str, &str)> = chunk.iter().map(|k| ("put", k.as_str(), v)).collect();
        s.d3.txn(&ops);
    }
    for i in 0..50 {
        s.d3.put(&format!("{SUB}/extra/e{i}"), "only on the replica");
    }

    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let mut at_reload_end = 0;
    std::thread::scope(|scope| {
        let (s, stop, writes, keys) = (&s, &stop, &writes, &keys);
        let writer = scope.spawn(move || {
            let mut rng = Rng::new(0xb05e);
            let t0 = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = Duration::from_micros(n * 1_000_000 / 200);
                if let Some(ahead) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(ahead);
                }
                n += 1;
                let k = &keys[rng.below(N as u64) as usize];
                let _revision_or_count = match rng.below(10) {
                    0..=5 => s.s3.put(k, &format!("u{n}")),
                    6 => s.s3.put(&format!("/app/new/n{n}"), "new"),
                    7 => s.s3.delete(k),
                    8 => s.s3.txn(&[
                        ("put", &format!("/app/txn/t{}", n % 50), "t"),
                        ("put", k, "in a txn"),
                    ]),
                    _ => s.s3.delete_prefix(&format!("/app/new/n{}", n % 100)),
                };
                writes.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Stops the writer when this closure ends, by a failed assertion too.
        let _stop = StopOnDrop(stop);
        wait_until(Duration::from_secs(10), "the writer to start", || {
            writes.load(Ordering::Relaxed) > 20
        });
        let before = writes.load(Ordering::Relaxed);
        let (code, out) = s.run(&["--reload-only"]);
        at_reload_end = writes.load(Ordering::Relaxed) - before;
        assert_eq!(
            code,
            0,
            "--reload-only on a busy source:\n{}",
            tail(&out, 30)
        );
        let stored = s.stored().expect("the reload stored no index");
        assert!(
            stored <= s.src_index(),
            "the stored index {stored} is ahead of the source"
        );
        // The source moves on for a while before the mirror starts, and while it runs.
        let moved = writes.load(Ordering::Relaxed) + 200;
        wait_until(Duration::from_secs(30), "200 more writes", || {
            writes.load(Ordering::Relaxed) >= moved
        });
        let mut m = s.mirror(&[], &s.dst.url);
        let moved = writes.load(Ordering::Relaxed) + 200;
        m.wait_for(Duration::from_secs(30), "200 more writes", || {
            writes.load(Ordering::Relaxed) >= moved
        });
        stop.store(true, Ordering::Relaxed);
        wait_until(Duration::from_secs(10), "the writer to stop", || {
            writer.is_finished()
        });
        s.synced(&mut m, Duration::from_secs(60), "a reload on a busy source");
    });
    println!(
        "{} source writes, {at_reload_end} during the reload",
        writes.load(Ordering::Relaxed)
    );
    assert!(
        at_reload_end > 0,
        "no write landed during the reload: the source was not busy"
    );
}

/// Sets its flag when dropped: a scoped writer thread stops even when the test fails.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What one `--check` run gave: (exit code, stdout, stderr).
fn check(s: &Setup) -> (i32, String, String) {
    let mut all: Vec<String> = vec!["--check".into()];
    all.extend(s.args(&[]).iter().map(|a| a.to_string()));
    all.push(s.src.url.clone());
    all.push(s.dst.url.clone());
    let mut m = Mirror::spawn(all);
    let code = m.wait_exit(Duration::from_secs(60));
    (code, m.stdout(), m.stderr())
}

/// `--check` on an exact replica: exit 0 and a line starting "OK"; after a value changed and
/// a key added on the replica out of band: exit 2, "CRITICAL", naming the changed key. The
/// checks write nothing.
fn check_cycle(mode: Mode) {
    let s = Setup::start("check", mode);
    reload_source(&s);
    for (k, v) in s.src_tree() {
        s.d3.put(&format!("{SUB}{k}"), &v);
    }
    s.set_index_now();
    assert_eq!(s.src_tree(), s.dst_tree(), "the test's own copy is wrong");
    let revs = (s.src_index(), s.d3.revision());

    let (code, out, err) = check(&s);
    assert!(
        code == 0 && out.starts_with("OK"),
        "an exact replica: expected exit 0 and OK, got {code}:\n{out}\nstderr:\n{err}"
    );

    s.d3.put(&format!("{SUB}/k03"), "changed on the replica");
    s.d3.put(&format!("{SUB}/only/here"), "added on the replica");
    let revs = (revs.0, revs.1 + 2);
    let (code, out, err) = check(&s);
    assert!(
        code == 2 && out.starts_with("CRITICAL"),
        "a replica changed out of band: expected exit 2 and CRITICAL, got {code}:\n{out}\n\
         stderr:\n{err}"
    );
    assert!(
        out.contains("/replica/app/k03"),
        "the changed key is named:\n{out}"
    );
    assert_eq!(
        (s.src_index(), s.d3.revision()),
        revs,
        "a check wrote to a cluster"
    );
}

both_modes!(
    check_ok_then_critical_after_an_out_of_band_change,
    check_cycle
);
