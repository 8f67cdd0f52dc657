//! `make soak`: a long mixed workload against real etcd through a delaying proxy, with bursts
//! and silences of 1 to 120 s, random SIGKILLs of the mirror, and restarts of both etcd
//! servers; trees compared at checkpoints. Prints a summary and fails on any lost event or
//! any exit outside the table. Runs only with ETCDMIRROR_SOAK=1 (`make soak`);
//! ETCDMIRROR_SOAK_SECS sets the length (default 900). ETCDMIRROR_SOAK_API picks the pair
//! (`make soak SOAK_API=...`): `v2` (default), `v2v3` (v2 source, `--dst-api v3`) or `v3`
//! (`--src-api v3 --dst-api v3`, with a v3 workload: puts, deletes, range deletes,
//! transactions, leases, and compactions of the source, now and then past a stopped
//! mirror's index, which must give exit 4).

mod common;

use common::proxy::{Faults, Proxy};
use common::v3::{b64, V3};
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which APIs the mirror reads and writes (ETCDMIRROR_SOAK_API).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    V2,
    V2V3,
    V3,
}

impl Api {
    fn from_env() -> Api {
        match std::env::var("ETCDMIRROR_SOAK_API").as_deref() {
            Err(_) | Ok("") | Ok("v2") => Api::V2,
            Ok("v2v3") => Api::V2V3,
            Ok("v3") => Api::V3,
            Ok(other) => panic!("ETCDMIRROR_SOAK_API={other:?}: use v2, v2v3 or v3"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Api::V2 => "v2",
            Api::V2V3 => "v2v3",
            Api::V3 => "v3",
        }
    }

    /// The mirror's flags for this pair.
    fn flags(self) -> &'static [&'static str] {
        match self {
            Api::V2 => &[],
            Api::V2V3 => &["--dst-api", "v3"],
            Api::V3 => &["--src-api", "v3", "--dst-api", "v3"],
        }
    }

    fn dst_v3(self) -> bool {
        self != Api::V2
    }
}

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

/// A v3 transaction put, under `lease` unless it is 0.
fn put_op(key: &str, value: &str, lease: i64) -> Value {
    let mut put = json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes())});
    if lease != 0 {
        put["lease"] = json!(lease.to_string());
    }
    json!({ "request_put": put })
}

/// A v3 transaction with `compare` and `success` (failure empty); whether it succeeded.
fn txn_raw(c: &V3, compare: Vec<Value>, success: Vec<Value>) -> bool {
    let v = c.ok("kv/txn", &json!({"compare": compare, "success": success}));
    v["succeeded"] == json!(true)
}

/// Revoke every lease this writer still holds (expired or unknown ones are fine), so that
/// none expires while a checkpoint compares.
fn revoke_all(c: &V3, leases: &mut Vec<i64>) {
    for id in leases.drain(..) {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            c.call("lease/revoke", &json!({"ID": id.to_string()}))
        }));
    }
}

/// One write of the v3 workload under /s/ (every event shape a v3 source produces: puts,
/// deletes, range deletes, transactions of several keys, of more than 100 keys and of more
/// than 1 MiB, failed compares, leases revoked or expiring, keys with a `_` segment) or
/// outside it (including keys that start with "/s" but not "/s/").
fn one_write_v3(c: &V3, rng: &mut Rng, inside: bool, n: u64, leases: &mut Vec<i64>) {
    if !inside {
        let k = rng.below(64);
        match rng.below(4) {
            0 => c.put(&format!("/sx/k{k}"), &n.to_string()),
            1 => c.put("/s", &n.to_string()),
            _ => c.put(&format!("/o/k{k}"), &n.to_string()),
        };
        return;
    }
    let d = rng.below(6);
    let k = rng.below(8);
    let key = format!("/s/d{d}/k{k}");
    match rng.below(26) {
        0..=5 => {
            c.put(&key, &format!("v{n}"));
        }
        6 => {
            c.put(&format!("/s/empty{k}"), "");
        }
        // v3 has no hidden keys: mirrored.
        7 => {
            c.put(&format!("/s/d{d}/_lock{k}"), "held");
        }
        8 => {
            c.delete(&key);
        }
        9 => {
            c.delete_prefix(&format!("/s/d{d}/"));
        }
        // A compare-and-swap on the key's value (or its absence).
        10 => {
            let cmp = match c.get(&key) {
                Some(v) => json!({"key": b64(key.as_bytes()), "target": "VALUE",
                                  "result": "EQUAL", "value": b64(v.as_bytes())}),
                None => json!({"key": b64(key.as_bytes()), "target": "MOD",
                               "result": "EQUAL", "mod_revision": "0"}),
            };
            txn_raw(c, vec![cmp], vec![put_op(&key, &format!("cas{n}"), 0)]);
        }
        // A failed compare: no revision, no event.
        11 => {
            let cmp = json!({"key": b64(key.as_bytes()), "target": "VALUE",
                             "result": "EQUAL", "value": b64(b"never")});
            txn_raw(c, vec![cmp], vec![put_op(&key, "no", 0)]);
        }
        // Several keys in one revision, in two directories and outside the prefix.
        12 => {
            let mut keys: Vec<String> = (0..8).map(|i| format!("/s/d{d}/k{i}")).collect();
            keys.push(format!("/s/d{}/t{k}", (d + 1) % 6));
            keys.push(format!("/o/t{k}"));
            let mut ops = Vec::new();
            for key in &keys {
                if rng.chance(40) {
                    ops.push(if rng.chance(70) {
                        ("put", key.as_str(), "t")
                    } else {
                        ("del", key.as_str(), "")
                    });
                }
            }
            if ops.is_empty() {
                ops.push(("put", keys[0].as_str(), "t"));
            }
            c.txn(&ops);
        }
        // More than 100 keys in one revision: several destination transactions.
        13 => {
            let ops: Vec<Value> = (0..120)
                .map(|i| put_op(&format!("/s/many/m{i}"), &format!("{n}"), 0))
                .collect();
            txn_raw(c, vec![], ops);
        }
        14 => {
            c.delete_prefix("/s/many/");
        }
        // Short leases: revoked later, or left to expire.
        15 => {
            let id = c.lease(2 + rng.below(3));
            for j in 0..=rng.below(3) {
                c.put_lease(&format!("/s/lease/k{}", (k + j) % 8), &n.to_string(), id);
            }
            leases.push(id);
        }
        // A lease that expired already is not found (404): not a failed write.
        16 => {
            if !leases.is_empty() {
                let id = leases.swap_remove(rng.below(leases.len() as u64) as usize);
                let (status, v) = c.call("lease/revoke", &json!({"ID": id.to_string()}));
                assert!(status == 200 || status == 404, "revoke {id}: {status} {v}");
            }
        }
        // A lease on 105 keys: its revoke (or expiry) deletes them in one revision.
        17 => {
            let id = c.lease(30);
            let ops: Vec<Value> = (0..105)
                .map(|i| put_op(&format!("/s/many/l{i}"), &format!("{n}"), id))
                .collect();
            txn_raw(c, vec![], ops);
            leases.push(id);
        }
        // Big values; now and then two of 700 KiB in one revision (over 1 MiB together).
        18 => {
            if rng.chance(20) {
                let big = "p".repeat((700 << 10) + n as usize % 7);
                c.txn(&[("put", "/s/big0", &big), ("put", "/s/big1", &big)]);
            } else {
                let len = [4 << 10, 64 << 10, 256 << 10, 1 << 20][rng.below(4) as usize];
                let big = "b".repeat(len + n as usize % 7);
                c.put(&format!("/s/big{}", k % 3), &big);
            }
        }
        19 => {
            c.delete(&format!("/s/big{}", k % 3));
        }
        // The key "/s/" itself, and a key that is also the parent of others.
        20 => {
            c.put("/s/", &n.to_string());
        }
        21 => {
            c.put(&format!("/s/d{d}"), &n.to_string());
        }
        _ => {
            c.put(&format!("/s/d{d}/sub{k}/x"), &n.to_string());
        }
    }
}

fn writer(url: String, plan: Arc<Plan>, seed: u64, api: Api) {
    let c = Client::new(&url);
    let c3 = V3::new(&url);
    let mut leases = Vec::new();
    let mut rng = Rng::new(seed);
    let mut n = 0u64;
    let mut next = Instant::now();
    while !plan.stop.load(Ordering::SeqCst) {
        let rate = plan.rate.load(Ordering::SeqCst);
        if plan.paused.load(Ordering::SeqCst) || rate == 0 {
            if plan.paused.load(Ordering::SeqCst) {
                revoke_all(&c3, &mut leases);
            }
            plan.idle.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            next = Instant::now();
            continue;
        }
        plan.idle.store(false, Ordering::SeqCst);
        let inside = rng.below(100) < plan.inside.load(Ordering::SeqCst);
        // The source restarts now and then: a write that cannot connect panics in the test
        // client, which is only a failed write here.
        let wrote = catch_unwind(AssertUnwindSafe(|| match api {
            Api::V3 => one_write_v3(&c3, &mut rng, inside, n, &mut leases),
            Api::V2 | Api::V2V3 => one_write(&c, &mut rng, inside, n),
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

/// A tree as the checkpoints compare it: keys relative to the prefix, None for a v2
/// directory.
type Tree = BTreeMap<String, Option<String>>;

/// The pair under test and how to read it; the servers themselves stay in `main`, which
/// restarts them (same URLs).
struct Soak {
    api: Api,
    proxy: Proxy,
    src: Client,
    dst: Client,
    src3: V3,
    dst3: V3,
    dst_url: String,
}

impl Soak {
    /// The source's head: its v2 index, or its v3 revision.
    fn head(&self) -> u64 {
        match self.api {
            Api::V3 => self.src3.revision(),
            Api::V2 | Api::V2V3 => self.src.current_index(),
        }
    }

    /// The replication index stored on the destination.
    fn stored(&self) -> Option<u64> {
        match self.api {
            Api::V2 => replication_index(&self.dst, "/replica"),
            Api::V2V3 | Api::V3 => v3::replication_index(&self.dst3, "/replica"),
        }
    }

    /// The mirrored part of the source and the destination's copy, comparable.
    fn trees(&self) -> (Tree, Tree) {
        let some = |m: BTreeMap<String, String>| -> Tree {
            m.into_iter().map(|(k, v)| (k, Some(v))).collect()
        };
        match self.api {
            Api::V2 => (rel_tree(&self.src, "/s"), rel_tree(&self.dst, "/replica/s")),
            Api::V2V3 => (
                some(v3::flat(&rel_tree(&self.src, "/s"))),
                some(self.dst3.rel_range("/replica/s")),
            ),
            Api::V3 => (
                some(self.src3.rel_range("/s/")),
                some(self.dst3.rel_range("/replica/s/")),
            ),
        }
    }
}

#[derive(Default)]
struct Tally {
    checkpoints: u64,
    /// The most keys a checkpoint found equal on both sides.
    keys_compared: usize,
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
    /// v3 source compactions up to the stored index, under a running (or restarting) mirror.
    src_compactions: u64,
    /// The last revision the source was compacted to.
    src_compacted: u64,
    /// v3 destination compactions (to its current revision), as an operator would.
    dst_compactions: u64,
    dst_compacted: u64,
    /// Compactions of the source past the index of a stopped mirror, and how many of the
    /// restarts after them exited 4.
    past_index: u64,
    past_index_exit4: u64,
}

const ARGS: [&str; 4] = ["--src-prefix", "/s", "--retry-timeout", "20"];

/// Start the mirror; `reload` as the runbook does after exit 4 (the workload deletes whole
/// directories often, so the more-than-half guard would refuse some plans: the operator has
/// read the plan, hence --force).
fn start(s: &Soak, reload: bool) -> Mirror {
    let mut args = ARGS.to_vec();
    args.extend(s.api.flags());
    if reload {
        args.extend(["--reload", "--force"]);
    }
    Mirror::start(&args, &s.proxy.url(), &s.dst_url)
}

/// Where the soak writes its summary and the logs of the mirror's exits.
fn out_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/soak");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Count a mirror's exit by itself; its last error line. The tail of its log goes to
/// target/soak/<api>-exit<N>.log.
fn record_exit(code: i32, m: &Mirror, s: &Soak, t: &mut Tally) -> String {
    *t.exits.entry(code).or_default() += 1;
    let log = m.stderr();
    let why = log
        .lines()
        .rev()
        .find(|l| l.contains("ERROR"))
        .unwrap_or("")
        .to_string();
    let file = format!("{}-exit{}.log", s.api.name(), t.why.len() + 1);
    let _ = std::fs::write(
        out_dir().join(&file),
        format!("{:?}\nexit {code}\n{}\n", m.args, tail(&log, 80)),
    );
    let reloading = if m.args.iter().any(|a| a == "--reload") {
        " (a --reload run)"
    } else {
        ""
    };
    t.why
        .push(format!("exit {code}{reloading} [{file}]: {why}"));
    why
}

/// Handle a mirror that stopped by itself: restart it as systemd would (exit 1), reload
/// after a lost window (exit 4), count anything else as a failure and reload to go on.
fn restart_after_exit(code: i32, m: &mut Mirror, s: &Soak, t: &mut Tally) {
    let why = record_exit(code, m, s, t);
    let reload = match code {
        1 => false,
        // The history window was lost (the mirror was down, or could not catch up, for
        // more than 1000 source events), or a killed reload left no index: the runbook's
        // reload. A v3 source is compacted here only up to the stored index, except by
        // `compact_past_stopped`, which handles its own exit 4: any other 4 is a fault.
        4 if s.api != Api::V3 => {
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
    *m = start(s, reload);
}

/// Restart the mirror with --reload while the writers go on (a reload under load).
fn reload_under_load(m: &mut Mirror, s: &Soak, t: &mut Tally) {
    m.kill();
    t.reloads += 1;
    t.load_reloads += 1;
    *m = start(s, true);
}

/// Compact the v3 source up to the stored index, never past it: a running, restarting or
/// reloading mirror only needs revisions after the index (a reload reads the source at its
/// current revision). Any failure (a server restarting) is only a compaction not made.
fn compact_source(s: &Soak, t: &mut Tally) {
    let done = catch_unwind(AssertUnwindSafe(|| {
        let stored = v3::replication_index(&s.dst3, "/replica")?;
        if stored <= t.src_compacted {
            return None;
        }
        let body = json!({"revision": stored.to_string(), "physical": true});
        (s.src3.call("kv/compaction", &body).0 == 200).then_some(stored)
    }));
    if let Ok(Some(rev)) = done {
        t.src_compacted = rev;
        t.src_compactions += 1;
    }
}

/// Compact the v3 destination to its current revision (keeps its store small; the mirror
/// reads only the destination's current state, and a reload lists it again when compacted).
fn compact_destination(s: &Soak, t: &mut Tally) {
    let done = catch_unwind(AssertUnwindSafe(|| {
        let rev = s.dst3.revision();
        if rev <= t.dst_compacted {
            return None;
        }
        let body = json!({"revision": rev.to_string(), "physical": true});
        (s.dst3.call("kv/compaction", &body).0 == 200).then_some(rev)
    }));
    if let Ok(Some(rev)) = done {
        t.dst_compacted = rev;
        t.dst_compactions += 1;
    }
}

/// Stop the mirror, move the source two revisions under the prefix past its index, compact
/// the source to its head, and start the mirror again without --reload: the revision it
/// needs is gone, so it must exit 4, and the soak then reloads as the runbook says.
fn compact_past_stopped(m: &mut Mirror, s: &Soak, t: &mut Tally) {
    m.kill();
    let moved = catch_unwind(AssertUnwindSafe(|| {
        let stored = v3::replication_index(&s.dst3, "/replica")?;
        s.src3.put("/s/past/a", &stored.to_string());
        s.src3.put("/s/past/b", &stored.to_string());
        let head = s.src3.revision();
        let body = json!({"revision": head.to_string(), "physical": true});
        (head >= stored + 2 && s.src3.call("kv/compaction", &body).0 == 200).then_some(head)
    }));
    let Ok(Some(head)) = moved else {
        // No index (a killed reload) or a server away: not this time.
        *m = start(s, false);
        return;
    };
    t.src_compacted = head;
    t.past_index += 1;
    *m = start(s, false);
    match m.wait_exit_timeout(Duration::from_secs(60)) {
        Some(4) => {
            record_exit(4, m, s, t);
            t.past_index_exit4 += 1;
            t.reloads += 1;
            *m = start(s, true);
        }
        Some(code) => {
            t.bad_exits.push(format!(
                "after a compaction past its index: exit {code}, not 4: {}",
                tail(&m.stderr(), 5)
            ));
            restart_after_exit(code, m, s, t);
        }
        None => {
            t.bad_exits.push(format!(
                "after a compaction past its index: still running after 60 s: {}",
                tail(&m.stderr(), 5)
            ));
            m.kill();
            t.reloads += 1;
            *m = start(s, true);
        }
    }
}

fn checkpoint(plan: &Plan, s: &Soak, m: &mut Mirror, t: &mut Tally) {
    plan.paused.store(true, Ordering::SeqCst);
    wait_until(Duration::from_secs(30), "the writer to pause", || {
        plan.idle.load(Ordering::SeqCst)
    });
    // Catching up costs a round trip (and any held-back body) per event: a checkpoint is
    // about what arrived, not about how fast, so it runs on a plainly delayed network.
    let faults = s.proxy.faults();
    s.proxy.set(Faults {
        hold_body: Duration::ZERO,
        ..faults.clone()
    });
    // TTL keys (and leases whose revoke failed) still expire while paused: wait until the
    // source settles.
    std::thread::sleep(Duration::from_secs(4));
    let head = s.head();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(code) = m.exited() {
            restart_after_exit(code, m, s, t);
        }
        let stored = s.stored().unwrap_or(0);
        let (a, b) = s.trees();
        let equal = a == b;
        if stored >= head && equal {
            t.keys_compared = t.keys_compared.max(a.len());
            break;
        }
        // Lost: the stored index passed the source's head, yet the trees differ.
        if stored >= head && !equal {
            std::thread::sleep(Duration::from_secs(2));
            let (a, b) = s.trees();
            if a != b {
                t.lost.push(format!(
                    "checkpoint {}: index {stored} >= {head} but the trees differ: {}",
                    t.checkpoints,
                    tree_diff(&a, &b)
                ));
                m.kill();
                t.reloads += 1;
                *m = start(s, true);
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
            *m = start(s, true);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    t.checkpoints += 1;
    s.proxy.set(faults);
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
    let api = Api::from_env();
    let mut src = Etcd::start("soak-src");
    let mut dst = Etcd::start("soak-dst");
    let upstream = format!("127.0.0.1:{}", src.client_port).parse().unwrap();
    let s = Soak {
        api,
        proxy: Proxy::start(upstream, Duration::from_millis(5)),
        src: Client::new(&src.url),
        dst: Client::new(&dst.url),
        src3: V3::new(&src.url),
        dst3: V3::new(&dst.url),
        dst_url: dst.url.clone(),
    };
    let plan = Arc::new(Plan {
        rate: AtomicU64::new(0),
        inside: AtomicU64::new(50),
        paused: AtomicBool::new(false),
        idle: AtomicBool::new(true),
        stop: AtomicBool::new(false),
        writes: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    // A write that fails (the source restarting) panics in the test clients: one line for
    // it, not a backtrace; any other panic as usual.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| match std::thread::current().name() {
        Some(name) if name.starts_with("writer") => {
            let msg = info.to_string();
            eprintln!("{name}: {}", msg.lines().nth(1).unwrap_or(&msg));
        }
        _ => default_hook(info),
    }));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (url, plan) = (src.url.clone(), plan.clone());
            std::thread::Builder::new()
                .name(format!("writer{w}"))
                .spawn(move || writer(url, plan, 7 + w, api))
                .unwrap()
        })
        .collect();
    match api {
        Api::V3 => {
            s.src3.put("/s/seed", "1");
        }
        Api::V2 | Api::V2V3 => {
            src.set("/s/seed", "1");
        }
    }
    let mut m = start(&s, true);
    m.wait_log(Duration::from_secs(30), "Starting replication");

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
        s.proxy.set(faults);
        let end = Instant::now() + Duration::from_secs(len);
        while Instant::now() < end && t0.elapsed() < Duration::from_secs(secs) {
            if let Some(code) = m.exited() {
                restart_after_exit(code, &mut m, &s, &mut t);
            }
            // The branches past 9 draw nothing from `rng`: the v2 soak's run is unchanged.
            match rng.below(1000) {
                0..=7 => {
                    m.kill();
                    t.kills += 1;
                    std::thread::sleep(Duration::from_millis(rng.below(1000)));
                    m = start(&s, false);
                }
                8 => {
                    src.restart();
                    t.src_restarts += 1;
                }
                9 => {
                    dst.restart();
                    t.dst_restarts += 1;
                }
                10..=13 if api == Api::V3 => compact_source(&s, &mut t),
                14 if api == Api::V3 => compact_past_stopped(&mut m, &s, &mut t),
                15..=16 if api.dst_v3() => compact_destination(&s, &mut t),
                _ => {}
            }
            // At least one compaction past a stopped mirror's index in every v3 run.
            if api == Api::V3 && t.past_index == 0 && t0.elapsed().as_secs() >= secs / 2 {
                compact_past_stopped(&mut m, &s, &mut t);
            }
            if Instant::now() >= next_checkpoint {
                if t.checkpoints % 3 == 2 {
                    plan.rate.store(200, Ordering::SeqCst);
                    reload_under_load(&mut m, &s, &mut t);
                    std::thread::sleep(Duration::from_secs(10));
                }
                checkpoint(&plan, &s, &mut m, &mut t);
                next_checkpoint = Instant::now() + Duration::from_secs(60 + rng.below(60));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    s.proxy.set(Faults::default());
    checkpoint(&plan, &s, &mut m, &mut t);
    plan.stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let mut summary = format!(
        "soak ({}): {} s, {} source writes ({} failed while the source restarted), {} checkpoints (up to {} keys equal), {} lost-event checkpoints, \
         {} not caught up within 180 s, {} SIGKILLs, {} source and {} destination etcd restarts, mirror exits by code {:?}, \
         {} reloads ({} of them while the writers went on), {} exits outside the expected codes",
        api.name(),
        t0.elapsed().as_secs(),
        plan.writes.load(Ordering::SeqCst),
        plan.failed.load(Ordering::SeqCst),
        t.checkpoints,
        t.keys_compared,
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
    if api == Api::V3 {
        summary += &format!(
            ", {} source compactions up to the stored index (last at {}), {} compactions past a \
             stopped mirror's index ({} of them exit 4 at the restart, then a reload)",
            t.src_compactions, t.src_compacted, t.past_index, t.past_index_exit4
        );
    }
    if api.dst_v3() {
        summary += &format!(
            ", {} destination compactions (last at {})",
            t.dst_compactions, t.dst_compacted
        );
    }
    println!("{summary}");
    for l in t.lost.iter().chain(t.bad_exits.iter()).chain(t.slow.iter()) {
        println!("  {l}");
    }
    println!("every exit the mirror made by itself:");
    for l in &t.why {
        println!("  {l}");
    }
    let dir = out_dir();
    let phases = phases.lock().unwrap().join("\n");
    let file = match api {
        Api::V2 => "summary.txt".to_string(),
        _ => format!("summary-{}.txt", api.name()),
    };
    let _ = std::fs::write(
        dir.join(file),
        format!("{summary}\n{}\n{phases}\n", t.why.join("\n")),
    );
    assert!(
        t.lost.is_empty() && t.bad_exits.is_empty(),
        "the soak found lost events or unexpected exits"
    );
}
