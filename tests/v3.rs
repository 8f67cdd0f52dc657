//! etcd v3 support (issue 10) on real etcd 3.4: a v2 source into a v3 destination and a v3
//! source into a v3 destination. Covers every event kind after a `--reload` start, the
//! `etcdctl` cross-check, resuming after SIGTERM, a compacted source (exit 4, then
//! `--reload`), another writer on a key (exit 3) or on the index (exit 5), the refused v3 to
//! v2 combination (exit 2, no connection) and value sizes (up to 1 MiB; 2 MiB exits 6).

mod common;

use common::v3::{self, b64, V3};
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::Duration;

/// Keys and values as bytes (v3 values need not be UTF-8).
type Bytes = BTreeMap<Vec<u8>, Vec<u8>>;

/// The mirrored source subtree; it maps to `DST_SUBTREE` under `DST_PREFIX`.
const SRC_PREFIX: &str = "/app";
const DST_PREFIX: &str = "/replica";
const DST_SUBTREE: &str = "/replica/app";
/// Source keys below `/app/locks` are never mirrored (`--src-ignore-keys-regex`).
const IGNORE: &str = "/app/locks(/.*)?";

/// Which APIs the source and the destination speak.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Api {
    V2ToV3,
    V3ToV3,
}

/// The shared setup: a source and a destination server, the mirror's command line for
/// `api`, and what the replica should hold.
struct Setup {
    api: Api,
    pair: Pair,
    src3: V3,
    dst3: V3,
}

impl Setup {
    /// Start both servers; no mirror runs yet.
    fn new(tag: &str, api: Api) -> Setup {
        let pair = Pair::start(tag);
        let (src3, dst3) = (V3::new(&pair.src.url), V3::new(&pair.dst.url));
        Setup {
            api,
            pair,
            src3,
            dst3,
        }
    }

    /// Start the mirror, with `--reload` or without.
    fn start(&self, reload: bool) -> Mirror {
        let mut args = match self.api {
            Api::V2ToV3 => vec!["--dst-api", "v3"],
            Api::V3ToV3 => vec!["--src-api", "v3", "--dst-api", "v3"],
        };
        args.extend([
            "--src-prefix",
            SRC_PREFIX,
            "--src-ignore-keys-regex",
            IGNORE,
        ]);
        if reload {
            args.push("--reload");
        }
        Mirror::start(&args, &self.pair.src.url, &self.pair.dst.url)
    }

    /// Start with `--reload` and wait until it has recorded the source's current index.
    fn start_reloaded(&self) -> Mirror {
        let head = self.head();
        let mut m = self.start(true);
        m.wait_for(
            Duration::from_secs(30),
            &format!("the reload to record an index >= {head}"),
            || self.stored().is_some_and(|i| i >= head),
        );
        m
    }

    /// The source's v2 index or v3 revision.
    fn head(&self) -> u64 {
        match self.api {
            Api::V2ToV3 => self.pair.src.current_index(),
            Api::V3ToV3 => self.src3.revision(),
        }
    }

    /// The replication index stored in the v3 destination.
    fn stored(&self) -> Option<u64> {
        v3::replication_index(&self.dst3, DST_PREFIX)
    }

    /// Write a value on the source.
    fn put(&self, key: &str, value: &str) {
        match self.api {
            Api::V2ToV3 => {
                self.pair.src.set(key, value);
            }
            Api::V3ToV3 => {
                self.src3.put(key, value);
            }
        }
    }

    /// Delete one value on the source.
    fn del(&self, key: &str) {
        match self.api {
            Api::V2ToV3 => {
                self.pair.src.delete(key, &[]).expect_ok();
            }
            Api::V3ToV3 => assert_eq!(self.src3.delete(key), 1, "delete {key}"),
        }
    }

    /// Delete everything below `dir` on the source (a recursive v2 delete, a v3 range delete).
    fn del_tree(&self, dir: &str) {
        match self.api {
            Api::V2ToV3 => {
                self.pair
                    .src
                    .delete(dir, &[("recursive", "true")])
                    .expect_ok();
            }
            Api::V3ToV3 => assert!(self.src3.delete_prefix(&format!("{dir}/")) > 0),
        }
    }

    /// What the replica must hold, keys relative to the mirrored subtree: the source's
    /// values (a v2 source's directories have no v3 key) less the ignored keys.
    fn expected(&self) -> Bytes {
        let all: Bytes = match self.api {
            Api::V2ToV3 => v3::flat(&rel_tree(&self.pair.src, SRC_PREFIX))
                .into_iter()
                .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
                .collect(),
            Api::V3ToV3 => strip(
                self.src3.range_bytes(format!("{SRC_PREFIX}/").as_bytes()),
                SRC_PREFIX,
            ),
        };
        all.into_iter().filter(|(k, _)| !ignored(k)).collect()
    }

    /// What the replica holds, keys relative to `DST_SUBTREE`; without a `/` after it, so
    /// that a stray `/replica/app` or `/replica/appX` key shows up as a difference.
    fn replica(&self) -> Bytes {
        match self.api {
            Api::V2ToV3 => self
                .dst3
                .rel_range(DST_SUBTREE)
                .into_iter()
                .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
                .collect(),
            Api::V3ToV3 => strip(self.dst3.range_bytes(DST_SUBTREE.as_bytes()), DST_SUBTREE),
        }
    }

    /// Wait until the stored index reaches the source's head, then until the replica
    /// equals the source. A v3 source's revision must then be stored exactly (the last
    /// source write must be a mirrored key); a v2 index may never pass the source's.
    #[track_caller]
    fn wait_synced(&self, m: &mut Mirror, what: &str) {
        let head = self.head();
        m.wait_for(
            Duration::from_secs(30),
            &format!("{what}: the stored index to reach the source's {head}"),
            || self.stored().is_some_and(|i| i >= head),
        );
        if !poll_until(Duration::from_secs(10), || {
            self.expected() == self.replica()
        }) {
            panic!(
                "after {what}: the replica differs from the source (left = source): {}\n\
                 etcdmirror stderr tail:\n{}",
                diff(&self.expected(), &self.replica()),
                tail(&m.stderr(), 30)
            );
        }
        let stored = self.stored().expect("stored index");
        match self.api {
            Api::V3ToV3 => assert_eq!(
                stored,
                self.src3.revision(),
                "after {what}: the stored index is not the source revision"
            ),
            Api::V2ToV3 => assert!(
                stored <= self.pair.src.current_index(),
                "after {what}: stored index {stored} is past the source's"
            ),
        }
        m.assert_alive(what);
    }

    /// The destination holds nothing but the mirrored subtree and the index key.
    #[track_caller]
    fn assert_nothing_else_on_destination(&self) {
        let index = index_key(DST_PREFIX);
        let subtree = format!("{DST_SUBTREE}/");
        for k in self.dst3.range_bytes(b"").keys() {
            assert!(
                k.starts_with(subtree.as_bytes()) || k == index.as_bytes(),
                "unexpected key {:?} on the destination",
                String::from_utf8_lossy(k)
            );
        }
    }
}

/// Keys relative to `prefix` (which every key starts with).
fn strip(map: Bytes, prefix: &str) -> Bytes {
    map.into_iter()
        .map(|(k, v)| (k[prefix.len()..].to_vec(), v))
        .collect()
}

/// A relative key that `IGNORE` matches.
fn ignored(rel: &[u8]) -> bool {
    rel == b"/locks" || rel.starts_with(b"/locks/")
}

fn show(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(40)]).into_owned();
    if b.len() > 40 {
        format!("{s:?}... ({} bytes)", b.len())
    } else {
        format!("{s:?}")
    }
}

/// Keys that differ between two maps, for failure messages.
fn diff(a: &Bytes, b: &Bytes) -> String {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("only in left: {} = {}", show(k), show(v))),
            Some(w) if w != v => {
                out.push(format!("differs: {}: {} vs {}", show(k), show(v), show(w)))
            }
            _ => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            out.push(format!("only in right: {} = {}", show(k), show(v)));
        }
    }
    let n = out.len();
    out.truncate(20);
    format!("{n} differences; first: {}", out.join("; "))
}

/// The key-value record of `key` as the gateway returns it, if the key exists.
fn kv(c: &V3, key: &str) -> Option<Value> {
    let v = c.ok("kv/range", &json!({"key": b64(key.as_bytes())}));
    v["kvs"].as_array().and_then(|kvs| kvs.first()).cloned()
}

/// One value's bytes on a v3 server.
fn value_bytes(c: &V3, key: &str) -> Option<Vec<u8>> {
    c.range_bytes(key.as_bytes()).remove(key.as_bytes())
}

/// SIGTERM, and wait (bounded) for the process to go.
fn stop(m: &mut Mirror) {
    m.terminate();
    m.wait_exit(Duration::from_secs(10));
}

/// A value of exactly `len` bytes that differs by `tag`: multi-byte UTF-8 first, then
/// characters that a form encodes specially.
fn sized(len: usize, tag: u8) -> String {
    const FILL: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789 &=+%;#?/";
    let mut s = String::from("é€");
    s.extend((0..len - s.len()).map(|i| char::from(FILL[(i + usize::from(tag)) % FILL.len()])));
    s
}

#[test]
fn v2_to_v3_every_event_kind_reload_then_live() {
    let s = Setup::new("v2v3-events", Api::V2ToV3);
    let src = &s.pair.src;
    let dst = &s.dst3;
    // What the reload copies: values, an empty directory, hidden, ignored and outside keys.
    src.set("/app/seed/a", "1");
    src.set("/app/seed/b", "2");
    src.mkdir("/app/seed/empty");
    src.set("/app/_hidden", "h");
    src.set("/app/locks/l0", "ignored");
    src.set("/other/x", "outside");
    let mut m = s.start_reloaded();
    s.wait_synced(&mut m, "the reload");
    assert_eq!(dst.get("/replica/app/seed/a").as_deref(), Some("1"));
    assert!(dst.range_bytes(b"/replica/app/seed/empty").is_empty());
    assert!(dst.get("/replica/app/_hidden").is_none());
    assert!(dst.range_bytes(b"/replica/app/locks").is_empty());

    // set, create (PUT and POST), update, compareAndSwap (by value and by index)
    src.set("/app/set", "s1");
    src.put("/app/created", &[("value", "c1"), ("prevExist", "false")])
        .expect_ok();
    let queued = src
        .post("/app/queue", &[("value", "job1")])
        .expect_ok()
        .key();
    src.put("/app/set", &[("value", "s2"), ("prevExist", "true")])
        .expect_ok();
    src.put("/app/set", &[("value", "s3"), ("prevValue", "s2")])
        .expect_ok();
    let mi = src.node("/app/created").unwrap()["modifiedIndex"].to_string();
    src.put("/app/created", &[("value", "c2"), ("prevIndex", &mi)])
        .expect_ok();
    s.wait_synced(
        &mut m,
        "set, create, in-order create, update, compareAndSwap",
    );
    assert_eq!(dst.get("/replica/app/set").as_deref(), Some("s3"));
    assert_eq!(dst.get("/replica/app/created").as_deref(), Some("c2"));
    assert_eq!(
        dst.get(&format!("/replica{queued}")).as_deref(),
        Some("job1")
    );

    // delete, compareAndDelete (by value and by index)
    src.delete("/app/created", &[]).expect_ok();
    src.delete(&queued, &[("prevValue", "job1")]).expect_ok();
    let mi = src.node("/app/set").unwrap()["modifiedIndex"].to_string();
    src.delete("/app/set", &[("prevIndex", &mi)]).expect_ok();
    s.wait_synced(&mut m, "delete and compareAndDelete");
    assert!(dst.get("/replica/app/created").is_none());
    assert!(dst.get(&format!("/replica{queued}")).is_none());
    assert!(dst.get("/replica/app/set").is_none());

    // mkdir: no v3 key
    src.mkdir("/app/emptydir");
    src.set("/app/after-mkdir", "m");
    s.wait_synced(&mut m, "mkdir");
    assert!(dst.range_bytes(b"/replica/app/emptydir").is_empty());
    src.delete("/app/emptydir", &[("dir", "true")]).expect_ok();
    src.set("/app/after-rmdir", "r");
    s.wait_synced(&mut m, "rmdir of an empty directory");

    // a recursive delete removes every key below the directory, and only those
    for k in ["a", "b", "sub/c", "sub/deeper/d", "_hidden"] {
        src.set(&format!("/app/dir/{k}"), k);
    }
    src.set("/app/dirx", "a neighbour, not below /app/dir");
    s.wait_synced(&mut m, "filling a directory");
    assert_eq!(dst.range_bytes(b"/replica/app/dir/").len(), 4);
    src.delete("/app/dir", &[("recursive", "true")]).expect_ok();
    s.wait_synced(&mut m, "a recursive rmdir");
    assert!(dst.range_bytes(b"/replica/app/dir/").is_empty());
    assert_eq!(
        dst.get("/replica/app/dirx").as_deref(),
        Some("a neighbour, not below /app/dir")
    );

    // a value turned into a directory, and back
    src.set("/app/vd", "value");
    s.wait_synced(&mut m, "a value");
    src.delete("/app/vd", &[]).expect_ok();
    src.set("/app/vd/child", "c");
    s.wait_synced(&mut m, "the value turned into a directory");
    assert!(dst.get("/replica/app/vd").is_none());
    assert_eq!(dst.get("/replica/app/vd/child").as_deref(), Some("c"));
    src.delete("/app/vd", &[("recursive", "true")]).expect_ok();
    src.set("/app/vd", "value again");
    s.wait_synced(&mut m, "the directory turned back into a value");
    assert!(dst.get("/replica/app/vd/child").is_none());

    // hidden, ignored and outside keys are not copied
    src.set("/app/_x", "hidden");
    src.set("/app/d2/_y", "hidden");
    src.set("/app/locks/l1", "ignored");
    src.set("/app/locks/sub/l2", "ignored");
    src.delete("/app/locks/l0", &[]).expect_ok();
    src.set("/other/y", "outside");
    src.set("/app/visible", "v");
    s.wait_synced(&mut m, "hidden, ignored and outside keys");
    assert!(dst.get("/replica/app/_x").is_none());
    assert!(dst.get("/replica/app/d2/_y").is_none());
    assert!(dst.range_bytes(b"/replica/app/locks").is_empty());

    // TTL expiry is a delete (of a value, and of a directory's keys); TTLs are not copied.
    // The keys get their TTL once the replica holds them, so their removal is the expiry's.
    src.put("/app/ttl-long", &[("value", "stays"), ("ttl", "300")])
        .expect_ok();
    src.set("/app/tdir/a", "1");
    src.set("/app/tdir/b", "2");
    src.set("/app/ttl", "goes");
    s.wait_synced(&mut m, "keys about to get a TTL");
    assert_eq!(dst.range_bytes(b"/replica/app/tdir/").len(), 2);
    assert_eq!(dst.get("/replica/app/ttl").as_deref(), Some("goes"));
    src.put(
        "/app/tdir",
        &[("dir", "true"), ("ttl", "1"), ("prevExist", "true")],
    )
    .expect_ok();
    src.put("/app/ttl", &[("value", "goes"), ("ttl", "1")])
        .expect_ok();
    wait_until(
        Duration::from_secs(20),
        "the TTLs to expire on the source",
        || !src.exists("/app/ttl") && !src.exists("/app/tdir"),
    );
    s.wait_synced(&mut m, "TTL expiry");
    assert!(dst.get("/replica/app/ttl").is_none());
    assert!(dst.range_bytes(b"/replica/app/tdir").is_empty());
    let long = kv(dst, "/replica/app/ttl-long").expect("the TTL key on the replica");
    assert!(
        long.get("lease").is_none(),
        "a TTL was copied as a lease: {long}"
    );

    // the stored index reaches the source's v2 index
    src.set("/app/last", "l");
    s.wait_synced(&mut m, "the last write");
    let head = src.current_index();
    assert!(s.stored().is_some_and(|i| i >= head));

    // etcdctl reads the same replica
    let want: BTreeMap<String, String> = v3::flat(&rel_tree(src, SRC_PREFIX))
        .into_iter()
        .filter(|(k, _)| !ignored(k.as_bytes()))
        .map(|(k, v)| (format!("{DST_SUBTREE}{k}"), v))
        .collect();
    let got = v3::etcdctl_prefix(&s.pair.dst.url, &format!("{DST_SUBTREE}/"));
    assert_eq!(got, want, "etcdctl get --prefix on the replica");
    s.assert_nothing_else_on_destination();
}

#[test]
fn v3_to_v3_every_event_kind_reload_then_live() {
    let s = Setup::new("v3v3-events", Api::V3ToV3);
    let src = &s.src3;
    let dst = &s.dst3;
    let binary: &[u8] = &[0xff, 0x00, 0xc3, 0x28, b'\n', 0x80, 0xfe];
    src.put("/app/seed/a", "1");
    src.put_bytes(b"/app/seed/bin", binary);
    src.put("/app/seed/empty", "");
    src.put("/app/_seed", "underscore");
    src.put("/app/locks/l0", "ignored");
    src.put("/other/x", "outside");
    let mut m = s.start_reloaded();
    s.wait_synced(&mut m, "the reload");
    assert_eq!(
        value_bytes(dst, "/replica/app/seed/bin").as_deref(),
        Some(binary)
    );
    assert_eq!(dst.get("/replica/app/seed/empty").as_deref(), Some(""));
    assert_eq!(dst.get("/replica/app/_seed").as_deref(), Some("underscore"));

    // put, overwrite, delete
    src.put("/app/k", "v1");
    src.put("/app/k", "v2");
    src.put("/app/gone", "x");
    src.delete("/app/gone");
    s.wait_synced(&mut m, "put, overwrite, delete");
    assert_eq!(dst.get("/replica/app/k").as_deref(), Some("v2"));
    assert!(dst.get("/replica/app/gone").is_none());

    // empty values, both ways
    src.put("/app/e", "");
    src.put("/app/e2", "full");
    s.wait_synced(&mut m, "an empty value");
    src.put("/app/e", "now set");
    src.put("/app/e2", "");
    s.wait_synced(&mut m, "empty to set and set to empty");
    assert_eq!(dst.get("/replica/app/e").as_deref(), Some("now set"));
    assert_eq!(dst.get("/replica/app/e2").as_deref(), Some(""));

    // binary values, overwritten; a key that is not UTF-8
    src.put_bytes(b"/app/bin", binary);
    src.put_bytes(b"/app/bin", &binary[1..]);
    src.put_bytes(b"/app/\xff\xfe/k", binary);
    s.wait_synced(&mut m, "binary values");
    assert_eq!(
        dst.range_bytes(b"/replica/app/\xff\xfe/k")
            .get(&b"/replica/app/\xff\xfe/k"[..])
            .map(Vec::as_slice),
        Some(binary)
    );
    assert_eq!(
        value_bytes(dst, "/replica/app/bin").as_deref(),
        Some(&binary[1..])
    );

    // `_` segments are ordinary v3 keys; ignored and outside keys are not copied
    src.put("/app/_u/x", "1");
    src.put("/app/_y", "2");
    src.put("/app/locks/l1", "ignored");
    src.delete("/app/locks/l0");
    for k in ["/other/k", "/app2/k", "/app", "/ap"] {
        src.put(k, "outside");
    }
    src.put("/app/after-outside", "a");
    s.wait_synced(&mut m, "underscore, ignored and outside keys");
    assert_eq!(dst.get("/replica/app/_u/x").as_deref(), Some("1"));
    assert_eq!(dst.get("/replica/app/_y").as_deref(), Some("2"));
    assert!(dst.range_bytes(b"/replica/app/locks").is_empty());
    s.assert_nothing_else_on_destination();

    // a txn of several puts and deletes (one of a missing key): one source revision
    let before = src.revision();
    let rev = src.txn(&[
        ("put", "/app/t/1", "one"),
        ("put", "/app/t/2", "two"),
        ("del", "/app/k", ""),
        ("put", "/app/t/3", "three"),
        ("del", "/app/missing", ""),
        ("del", "/app/e", ""),
    ]);
    assert_eq!(rev, before + 1);
    s.wait_synced(&mut m, "a txn with several operations");
    assert!(dst.get("/replica/app/k").is_none());
    assert!(dst.get("/replica/app/e").is_none());
    assert_eq!(dst.get("/replica/app/t/3").as_deref(), Some("three"));

    // 300 keys in 3 revisions (two of 128 puts, the most a txn takes: more than one
    // destination txn can carry with its compares), then one range delete in one revision
    let mut n = 0;
    for size in [128, 128, 44] {
        let keys: Vec<(String, String)> = (n..n + size)
            .map(|i| (format!("/app/bulk/{i:03}"), format!("value {i}")))
            .collect();
        n += size;
        let ops: Vec<(&str, &str, &str)> = keys
            .iter()
            .map(|(k, v)| ("put", k.as_str(), v.as_str()))
            .collect();
        src.txn(&ops);
    }
    s.wait_synced(&mut m, "300 keys in 3 txns");
    assert_eq!(dst.range_bytes(b"/replica/app/bulk/").len(), 300);
    let before = src.revision();
    assert_eq!(src.delete_prefix("/app/bulk/"), 300);
    assert_eq!(src.revision(), before + 1);
    s.wait_synced(&mut m, "a range delete of 300 keys");
    assert!(dst.range_bytes(b"/replica/app/bulk/").is_empty());

    // keys under a lease are copied without it; revoking the lease deletes them
    let lease = src.lease(120);
    src.put_lease("/app/leased/1", "l1", lease);
    src.put_lease("/app/leased/2", "l2", lease);
    s.wait_synced(&mut m, "keys with a lease");
    let on_src = kv(src, "/app/leased/1").expect("leased key on the source");
    assert!(
        on_src.get("lease").is_some(),
        "no lease on the source: {on_src}"
    );
    let on_dst = kv(dst, "/replica/app/leased/1").expect("leased key on the replica");
    assert!(
        on_dst.get("lease").is_none(),
        "a lease was copied: {on_dst}"
    );
    src.revoke(lease);
    s.wait_synced(&mut m, "the lease revoked");
    assert!(dst.range_bytes(b"/replica/app/leased/").is_empty());

    src.put("/app/last", "l");
    s.wait_synced(&mut m, "the last write");
    assert_eq!(s.stored(), Some(src.revision()));
    s.assert_nothing_else_on_destination();
}

/// Stop the mirror with SIGTERM, write on the source, start it again without `--reload`:
/// it resumes from its stored index and catches up.
fn resumes_after_sigterm(api: Api, tag: &str) {
    let s = Setup::new(tag, api);
    for i in 0..5 {
        s.put(&format!("/app/r/{i}"), "seed");
    }
    let mut m = s.start_reloaded();
    s.wait_synced(&mut m, "the reload");
    s.put("/app/live", "1");
    s.wait_synced(&mut m, "a live write");
    stop(&mut m);
    let stopped_at = s.stored();

    s.put("/app/live", "2");
    s.put("/app/new", "n");
    s.del("/app/r/0");
    s.put("/app/d/x", "x");
    s.put("/app/d/y", "y");
    s.del_tree("/app/d");
    s.put("/app/tail", "t");
    assert!(
        s.dst3.get("/replica/app/new").is_none(),
        "written while stopped"
    );
    assert_eq!(s.stored(), stopped_at);

    let mut m = s.start(false);
    s.wait_synced(&mut m, "the restart without --reload");
    assert_eq!(s.dst3.get("/replica/app/live").as_deref(), Some("2"));
    assert!(s.dst3.range_bytes(b"/replica/app/d/").is_empty());
    s.put("/app/after-restart", "a");
    s.wait_synced(&mut m, "a write after the restart");
}

#[test]
fn v2_to_v3_resumes_after_sigterm() {
    resumes_after_sigterm(Api::V2ToV3, "v2v3-resume");
}

#[test]
fn v3_to_v3_resumes_after_sigterm() {
    resumes_after_sigterm(Api::V3ToV3, "v3v3-resume");
}

#[test]
fn v3_to_v3_compacted_source_exits_4_then_reload_recovers() {
    let s = Setup::new("v3v3-compact", Api::V3ToV3);
    for i in 0..6 {
        s.put(&format!("/app/c/{i}"), "seed");
    }
    let mut m = s.start_reloaded();
    s.wait_synced(&mut m, "the reload");
    stop(&mut m);
    let stored = s.stored().expect("stored index");

    s.put("/app/c/0", "changed");
    s.del("/app/c/1");
    s.put("/app/c/new", "n");
    let head = s.src3.revision();
    assert!(head >= stored + 3);
    s.src3.compact(head);
    let mut m = s.start(false);
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(code, 4, "a compacted source must exit 4; stderr:\n{err}");
    assert!(
        err.contains("compacted") && err.contains("--reload"),
        "stderr must say the history was compacted and to run --reload:\n{err}"
    );
    assert_eq!(s.stored(), Some(stored), "the index moved");
    assert!(s.dst3.get("/replica/app/c/new").is_none());

    let mut m = s.start_reloaded();
    s.wait_synced(&mut m, "the reload after the compaction");
    s.put("/app/c/after", "a");
    s.wait_synced(&mut m, "a write after the reload");
}

/// A replica key changed out of band, then written on the source: exit 3, showing the
/// expected and the found value. A `--reload` repairs it; then an index changed out of band
/// (as another mirror would) and a source write: exit 5.
fn other_writers(api: Api, tag: &str) {
    let s = Setup::new(tag, api);
    s.put("/app/k", "expected-v1");
    for i in 0..4 {
        s.put(&format!("/app/o/{i}"), "seed");
    }
    let mut m = s.start_reloaded();
    s.wait_synced(&mut m, "the reload");
    let stored = s.stored();

    s.dst3.put("/replica/app/k", "tampered-oob");
    s.put("/app/k", "source-v2");
    s.put("/app/after", "must not be written");
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(
        code, 3,
        "a key changed out of band must exit 3; stderr:\n{err}"
    );
    assert!(
        err.contains("expected-v1") && err.contains("tampered-oob"),
        "stderr must show the expected and the found value:\n{err}"
    );
    assert_eq!(
        s.dst3.get("/replica/app/k").as_deref(),
        Some("tampered-oob")
    );
    assert!(s.dst3.get("/replica/app/after").is_none());
    assert_eq!(s.stored(), stored, "the index moved past the failed event");

    let mut m = s.start_reloaded();
    s.wait_synced(&mut m, "the reload after exit 3");
    assert_eq!(s.dst3.get("/replica/app/k").as_deref(), Some("source-v2"));
    let foreign = s.stored().expect("stored index") - 1;
    s.dst3.put(&index_key(DST_PREFIX), &foreign.to_string());
    s.put("/app/k2", "after the foreign index");
    let code = m.wait_exit(Duration::from_secs(30));
    assert_eq!(
        code,
        5,
        "an index changed by another writer must exit 5; stderr:\n{}",
        m.stderr()
    );
    assert!(s.dst3.get("/replica/app/k2").is_none());
    assert_eq!(
        s.stored(),
        Some(foreign),
        "the foreign index was overwritten"
    );
}

#[test]
fn v2_to_v3_other_writers_exit_3_and_5() {
    other_writers(Api::V2ToV3, "v2v3-writers");
}

#[test]
fn v3_to_v3_other_writers_exit_3_and_5() {
    other_writers(Api::V3ToV3, "v3v3-writers");
}

/// Two mirrors really running on one destination prefix: every event is written by one of
/// them first, so the other's transaction fails its compare on the index; that answer is
/// no lost answer of its own, so it must stop (exit 5, or 3), and the survivor goes on.
#[test]
fn two_v3_mirrors_on_one_destination_one_exits() {
    let s = Setup::new("v3v3-two", Api::V3ToV3);
    s.put("/app/seed", "s");
    let mut a = s.start_reloaded();
    s.wait_synced(&mut a, "the reload");
    let mut b = s.start(false);
    b.wait_log(Duration::from_secs(20), "Starting replication");
    // One write at a time, the next once both mirrors have handled it (the faster one says
    // "index N" once, the slower one twice, with its verdict; a bound, not a failure, if
    // the wording differs): the slower one then always finds the index and the keys
    // exactly where its own transaction would have put them.
    let exited = |a: &mut Mirror, b: &mut Mirror| a.exited().is_some() || b.exited().is_some();
    for n in 0..5 {
        s.put(&format!("/app/two/{n}"), "x");
        let needle = format!("index {} ", s.head());
        poll_until(Duration::from_secs(5), || {
            exited(&mut a, &mut b)
                || (a.stderr() + &b.stderr()).matches(needle.as_str()).count() >= 3
        });
        if exited(&mut a, &mut b) {
            break;
        }
    }
    let one_exited = poll_until(Duration::from_secs(5), || exited(&mut a, &mut b));
    assert!(
        one_exited,
        "neither mirror exited although both write the same index; stderr a:\n{}\n\
         stderr b:\n{}",
        tail(&a.stderr(), 5),
        tail(&b.stderr(), 5)
    );
    let (mut gone, mut survivor) = if a.exited().is_some() { (a, b) } else { (b, a) };
    let code = gone.exited().unwrap();
    assert!(
        code == 5 || code == 3,
        "exit {code}; stderr:\n{}",
        tail(&gone.stderr(), 10)
    );
    s.put("/app/after", "a");
    s.wait_synced(&mut survivor, "a write after the other mirror stopped");
}

#[test]
fn a_v3_source_into_a_v2_destination_is_refused_before_any_connection() {
    // Listeners on loopback stand for SRC and DST: any connection attempt would show.
    let traps: Vec<TcpListener> = (0..2)
        .map(|_| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.set_nonblocking(true).unwrap();
            l
        })
        .collect();
    let urls: Vec<String> = traps
        .iter()
        .map(|l| format!("http://127.0.0.1:{}", l.local_addr().unwrap().port()))
        .collect();
    for flags in [
        &["--src-api", "v3"][..],
        &["--src-api=v3", "--dst-api", "v2"],
    ] {
        let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        args.extend(urls.iter().cloned());
        let mut m = Mirror::spawn(args);
        let code = m.wait_exit_timeout(Duration::from_secs(2));
        let err = m.stderr();
        assert_eq!(code, Some(2), "{flags:?}: stderr:\n{err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{flags:?}: one line expected:\n{err}");
        assert!(lines[0].contains("--src-api"), "{flags:?}: {}", lines[0]);
        for t in &traps {
            match t.accept() {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Ok(_) => panic!("{flags:?}: the binary connected before refusing"),
                Err(e) => panic!("accept: {e}"),
            }
        }
    }
}

#[test]
fn v2_values_up_to_1_mib_arrive_byte_for_byte_in_v3() {
    let s = Setup::new("v2v3-values", Api::V2ToV3);
    let seed = sized(1 << 20, 0);
    s.put("/app/seed", &seed);
    let mut m = s.start_reloaded();
    s.wait_synced(&mut m, "the reload of a 1 MiB value");
    assert_eq!(
        value_bytes(&s.dst3, "/replica/app/seed").as_deref(),
        Some(seed.as_bytes())
    );
    for len in [4 << 10, 64 << 10, 1 << 20] {
        let key = format!("/app/v/{len}");
        for tag in [1, 2] {
            let v = sized(len, tag);
            s.put(&key, &v);
            s.wait_synced(&mut m, &format!("a value of {len} bytes"));
            assert_eq!(
                value_bytes(&s.dst3, &format!("/replica{key}")).as_deref(),
                Some(v.as_bytes()),
                "{len} bytes, version {tag}"
            );
        }
        s.del(&key);
        s.wait_synced(&mut m, &format!("deleting a value of {len} bytes"));
    }
}

#[test]
fn a_2_mib_v2_value_exits_6_on_a_v3_destination() {
    let s = Setup::new("v2v3-huge", Api::V2ToV3);
    s.put("/app/a", "1");
    let mut m = s.start_reloaded();
    s.wait_synced(&mut m, "the reload");
    let stored = s.stored();
    s.put("/app/huge", &sized(2 << 20, 3));
    let code = m.wait_exit(Duration::from_secs(60));
    assert_eq!(
        code,
        6,
        "a value too large for v3 must exit 6; stderr:\n{}",
        tail(&m.stderr(), 20)
    );
    assert!(s.dst3.get("/replica/app/huge").is_none());
    assert_eq!(s.stored(), stored);
}
