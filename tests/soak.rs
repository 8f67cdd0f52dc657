//! `make soak`: a long mixed workload against real etcd through a delaying proxy, with bursts
//! and silences of 1 to 120 s, random SIGKILLs of the mirror, and restarts of both etcd
//! servers; trees compared at checkpoints. Prints a summary and fails on any lost event or
//! any exit outside the table. Runs only with ETCDMIRROR_SOAK=1 (`make soak`);
//! ETCDMIRROR_SOAK_SECS sets the length (default 900).

mod common;

use common::proxy::{Faults, Proxy};
use common::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the writer is asked to do: `rate` writes per second (0 = silence).
struct Plan {
    rate: AtomicU64,
    /// Share of writes under the mirrored prefix, in percent.
    inside: AtomicU64,
    paused: AtomicBool,
    idle: AtomicBool,
    stop: AtomicBool,
    writes: AtomicU64,
    /// Writes that could not reach the source (it was restarting).
    failed: AtomicU64,
}

/// The value of `key`, or None when it is missing, a directory or unreadable.
fn value_of(c: &Client, key: &str) -> Option<String> {
    let r = c.get_raw(key, &[]);
    let node = r.body.get("node")?;
    node.get("value")?.as_str().map(str::to_string)
}

/// One write of the mixed workload under /s (every action and tree shape the mirror
/// handles) or outside it.
fn one_write(c: &Client, rng: &mut Rng, inside: bool, n: u64) {
    if !inside {
        c.put(
            &format!("/o/k{}", rng.below(64)),
            &[("value", &n.to_string())],
        );
        return;
    }
    let d = rng.below(6);
    let k = rng.below(8);
    let key = format!("/s/d{d}/k{k}");
    match rng.below(23) {
        0..=5 => {
            c.put(&key, &[("value", &format!("v{n}"))]);
        }
        6 => {
            c.put(&format!("/s/empty{k}"), &[("value", "")]);
        }
        7 => {
            c.put(&key, &[("value", &format!("c{n}")), ("prevExist", "false")]);
        }
        8 => {
            if let Some(v) = value_of(c, &key).filter(|v| !v.is_empty()) {
                c.put(&key, &[("value", &format!("cas{n}")), ("prevValue", &v)]);
            }
        }
        9 => {
            c.put(&key, &[("value", &format!("u{n}")), ("prevExist", "true")]);
        }
        10 => {
            c.delete(&key, &[]);
        }
        11 => {
            if let Some(v) = value_of(c, &key).filter(|v| !v.is_empty()) {
                c.delete(&key, &[("prevValue", &v)]);
            }
        }
        12 => {
            c.put(
                &format!("/s/ttl/t{k}"),
                &[("value", "t"), ("ttl", &(1 + rng.below(3)).to_string())],
            );
        }
        13 => {
            c.post("/s/queue", &[("value", &n.to_string())]);
        }
        14 => {
            c.put(&format!("/s/d{d}/sub{k}"), &[("dir", "true")]);
        }
        15 => {
            c.put(&format!("/s/d{d}/_lock{k}"), &[("value", "hidden")]);
        }
        16 => {
            c.delete(&format!("/s/d{d}"), &[("recursive", "true")]);
        }
        17 => {
            c.delete("/s/queue", &[("recursive", "true")]);
        }
        // A value replaced by a directory (two destination writes).
        19 => {
            c.put(&key, &[("dir", "true")]);
        }
        // Big values: their conditions travel as the destination's modifiedIndex.
        20 => {
            let len = [4 << 10, 64 << 10, 1 << 20][rng.below(3) as usize];
            let big = "b".repeat(len + n as usize % 7);
            c.put(&format!("/s/big{}", k % 3), &[("value", &big)]);
        }
        21 => {
            c.delete(&format!("/s/big{}", k % 3), &[]);
        }
        _ => {
            c.put(&format!("/s/d{d}/sub{k}/x"), &[("value", &n.to_string())]);
        }
    }
}

fn writer(url: String, plan: Arc<Plan>, seed: u64) {
    let c = Client::new(&url);
    let mut rng = Rng::new(seed);
    let mut n = 0u64;
    let mut next = Instant::now();
    while !plan.stop.load(Ordering::SeqCst) {
        let rate = plan.rate.load(Ordering::SeqCst);
        if plan.paused.load(Ordering::SeqCst) || rate == 0 {
            plan.idle.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            next = Instant::now();
            continue;
        }
        plan.idle.store(false, Ordering::SeqCst);
        let inside = rng.below(100) < plan.inside.load(Ordering::SeqCst);
        // The source restarts now and then: a write that cannot connect panics in the test
        // client, which is only a failed write here.
        let wrote = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            one_write(&c, &mut rng, inside, n)
        }));
        if wrote.is_err() {
            plan.failed.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
        }
        n += 1;
        plan.writes.fetch_add(1, Ordering::SeqCst);
        next += Duration::from_micros(1_000_000 / rate.max(1));
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

#[derive(Default)]
struct Tally {
    checkpoints: u64,
    lost: Vec<String>,
    /// Checkpoints where the mirror had not caught up within the bound (not a loss).
    slow: Vec<String>,
    kills: u64,
    src_restarts: u64,
    dst_restarts: u64,
    exits: BTreeMap<i32, u64>,
    reloads: u64,
    load_reloads: u64,
    bad_exits: Vec<String>,
    /// The error line of every exit the mirror made by itself.
    why: Vec<String>,
}

const ARGS: [&str; 4] = ["--src-prefix", "/s", "--retry-timeout", "20"];

/// Start the mirror; `reload` as the runbook does after exit 4 (the workload deletes whole
/// directories often, so the more-than-half guard would refuse some plans: the operator has
/// read the plan, hence --force).
fn start(proxy: &Proxy, dst: &Etcd, reload: bool) -> Mirror {
    let mut args = ARGS.to_vec();
    if reload {
        args.extend(["--reload", "--force"]);
    }
    Mirror::start(&args, &proxy.url(), &dst.url)
}

/// Handle a mirror that stopped by itself: restart it as systemd would (exit 1), reload
/// after a lost window (exit 4), count anything else as a failure and reload to go on.
fn restart_after_exit(code: i32, m: &mut Mirror, proxy: &Proxy, dst: &Etcd, t: &mut Tally) {
    *t.exits.entry(code).or_default() += 1;
    let log = m.stderr();
    let why = log
        .lines()
        .rev()
        .find(|l| l.contains("ERROR"))
        .unwrap_or("")
        .to_string();
    t.why.push(format!("exit {code}: {why}"));
    let reload = match code {
        1 => false,
        // The history window was lost (the mirror was down, or could not catch up, for
        // more than 1000 source events), or a killed reload left no index: the runbook's
        // reload.
        4 => {
            t.reloads += 1;
            true
        }
        2 if why.contains("no replication index") => {
            t.reloads += 1;
            true
        }
        _ => {
            t.bad_exits.push(format!("exit {code}: {why}"));
            t.reloads += 1;
            true
        }
    };
    *m = start(proxy, dst, reload);
}

/// Restart the mirror with --reload while the writers go on (a reload under load).
fn reload_under_load(m: &mut Mirror, proxy: &Proxy, dst: &Etcd, t: &mut Tally) {
    m.kill();
    t.reloads += 1;
    t.load_reloads += 1;
    *m = start(proxy, dst, true);
}

fn checkpoint(plan: &Plan, src: &Etcd, dst: &Etcd, m: &mut Mirror, proxy: &Proxy, t: &mut Tally) {
    plan.paused.store(true, Ordering::SeqCst);
    wait_until(Duration::from_secs(30), "the writer to pause", || {
        plan.idle.load(Ordering::SeqCst)
    });
    // Catching up costs a round trip (and any held-back body) per event: a checkpoint is
    // about what arrived, not about how fast, so it runs on a plainly delayed network.
    let faults = proxy.faults();
    proxy.set(Faults {
        hold_body: Duration::ZERO,
        ..faults.clone()
    });
    // TTL keys still expire while paused: wait until the source settles.
    std::thread::sleep(Duration::from_secs(4));
    let head = src.current_index();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(code) = m.exited() {
            restart_after_exit(code, m, proxy, dst, t);
        }
        let stored = replication_index(dst, "/replica").unwrap_or(0);
        let equal = rel_tree(src, "/s") == rel_tree(dst, "/replica/s");
        if stored >= head && equal {
            break;
        }
        // Lost: the stored index passed the source's head, yet the trees differ.
        if stored >= head && !equal {
            std::thread::sleep(Duration::from_secs(2));
            let (a, b) = (rel_tree(src, "/s"), rel_tree(dst, "/replica/s"));
            if a != b {
                t.lost.push(format!(
                    "checkpoint {}: index {stored} >= {head} but the trees differ: {}",
                    t.checkpoints,
                    tree_diff(&a, &b)
                ));
                m.kill();
                t.reloads += 1;
                *m = start(proxy, dst, true);
                break;
            }
        }
        if Instant::now() > deadline {
            t.slow.push(format!(
                "checkpoint {}: stored index {stored} still below the head {head} after 180 s",
                t.checkpoints
            ));
            // Repair so that later checkpoints test something.
            m.kill();
            t.reloads += 1;
            *m = start(proxy, dst, true);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    t.checkpoints += 1;
    proxy.set(faults);
    plan.paused.store(false, Ordering::SeqCst);
}

fn main() {
    if std::env::var_os("ETCDMIRROR_SOAK").is_none() {
        println!("soak: skipped (run `make soak`, or set ETCDMIRROR_SOAK=1)");
        return;
    }
    let secs: u64 = std::env::var("ETCDMIRROR_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(900);
    let mut src = Etcd::start("soak-src");
    let mut dst = Etcd::start("soak-dst");
    let upstream = format!("127.0.0.1:{}", src.client_port).parse().unwrap();
    let proxy = Proxy::start(upstream, Duration::from_millis(5));
    let plan = Arc::new(Plan {
        rate: AtomicU64::new(0),
        inside: AtomicU64::new(50),
        paused: AtomicBool::new(false),
        idle: AtomicBool::new(true),
        stop: AtomicBool::new(false),
        writes: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (url, plan) = (src.url.clone(), plan.clone());
            std::thread::spawn(move || writer(url, plan, 7 + w))
        })
        .collect();
    src.set("/s/seed", "1");
    let mut m = start(&proxy, &dst, true);
    m.wait_log(Duration::from_secs(30), "Starting replication at");

    let phases = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut t = Tally::default();
    let mut rng = Rng::new(42);
    let t0 = Instant::now();
    let mut next_checkpoint = t0 + Duration::from_secs(60);
    while t0.elapsed() < Duration::from_secs(secs) {
        // A burst of 1-20 s or a silence of 1-120 s, under a changing network.
        let burst = rng.chance(55);
        let len = if burst {
            1 + rng.below(20)
        } else if rng.chance(25) {
            60 + rng.below(61)
        } else {
            1 + rng.below(30)
        };
        let rate = if burst { 10 + rng.below(250) } else { 0 };
        plan.rate.store(rate, Ordering::SeqCst);
        plan.inside.store(rng.below(101), Ordering::SeqCst);
        let faults = Faults {
            to_server: Duration::from_millis(rng.below(25)),
            to_client: Duration::from_millis(rng.below(25)),
            jitter: Duration::from_millis(rng.below(10)),
            hold_body: if rng.chance(15) {
                Duration::from_millis(100 + rng.below(3000))
            } else {
                Duration::ZERO
            },
            ..Faults::default()
        };
        phases.lock().unwrap().push(format!(
            "{:>5}s {} {len}s rate {rate}/s {faults:?}",
            t0.elapsed().as_secs(),
            if burst { "burst" } else { "silence" }
        ));
        proxy.set(faults);
        let end = Instant::now() + Duration::from_secs(len);
        while Instant::now() < end && t0.elapsed() < Duration::from_secs(secs) {
            if let Some(code) = m.exited() {
                restart_after_exit(code, &mut m, &proxy, &dst, &mut t);
            }
            match rng.below(1000) {
                0..=7 => {
                    m.kill();
                    t.kills += 1;
                    std::thread::sleep(Duration::from_millis(rng.below(1000)));
                    m = start(&proxy, &dst, false);
                }
                8 => {
                    src.restart();
                    t.src_restarts += 1;
                }
                9 => {
                    dst.restart();
                    t.dst_restarts += 1;
                }
                _ => {}
            }
            if Instant::now() >= next_checkpoint {
                if t.checkpoints % 3 == 2 {
                    plan.rate.store(200, Ordering::SeqCst);
                    reload_under_load(&mut m, &proxy, &dst, &mut t);
                    std::thread::sleep(Duration::from_secs(10));
                }
                checkpoint(&plan, &src, &dst, &mut m, &proxy, &mut t);
                next_checkpoint = Instant::now() + Duration::from_secs(60 + rng.below(60));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    proxy.set(Faults::default());
    checkpoint(&plan, &src, &dst, &mut m, &proxy, &mut t);
    plan.stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let summary = format!(
        "soak: {} s, {} source writes ({} failed while the source restarted), {} checkpoints, {} lost-event checkpoints, \
         {} not caught up within 180 s, {} SIGKILLs, {} source and {} destination etcd restarts, mirror exits by code {:?}, \
         {} reloads ({} of them while the writers went on), {} exits outside the expected codes",
        t0.elapsed().as_secs(),
        plan.writes.load(Ordering::SeqCst),
        plan.failed.load(Ordering::SeqCst),
        t.checkpoints,
        t.lost.len(),
        t.slow.len(),
        t.kills,
        t.src_restarts,
        t.dst_restarts,
        t.exits,
        t.reloads,
        t.load_reloads,
        t.bad_exits.len()
    );
    println!("{summary}");
    for l in t.lost.iter().chain(t.bad_exits.iter()).chain(t.slow.iter()) {
        println!("  {l}");
    }
    println!("every exit the mirror made by itself:");
    for l in &t.why {
        println!("  {l}");
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/soak");
    let _ = std::fs::create_dir_all(&dir);
    let phases = phases.lock().unwrap().join("\n");
    let _ = std::fs::write(
        dir.join("summary.txt"),
        format!("{summary}\n{}\n{phases}\n", t.why.join("\n")),
    );
    assert!(
        t.lost.is_empty() && t.bad_exits.is_empty(),
        "the soak found lost events or unexpected exits"
    );
}
