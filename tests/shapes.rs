//! Tree shapes that used to end in exit 3: directories that exist only because of hidden or
//! ignored children, and every intermediate state of a plan with two writes found on restart.

mod common;

use common::*;
use std::time::Duration;

/// Wait until the replica's /replica/app equals the source's /app, with the mirror alive.
fn synced(m: &mut Mirror, p: &Pair, what: &str) {
    m.wait_synced(&p.src, "/app", &p.dst, "/replica/app", "/replica", what);
}

#[test]
fn directories_with_only_hidden_children_replicate() {
    let p = Pair::start("shape-hidden");
    let mut m = p.mirror_from_now(&["--watch-timeout", "5"], "/replica");
    p.src.set("/app/x/_lock", "held");
    synced(&mut m, &p, "a hidden key created /app/x");
    assert!(p
        .dst
        .node("/replica/app/x")
        .is_some_and(|n| n["dir"] == true));
    assert!(!p.dst.exists("/replica/app/x/_lock"));

    // A TTL update of such a directory, then its recursive delete.
    p.src
        .put(
            "/app/x",
            &[("dir", "true"), ("prevExist", "true"), ("ttl", "300")],
        )
        .expect_ok();
    synced(&mut m, &p, "a TTL update of the hidden-only directory");
    p.src.delete("/app/x", &[("recursive", "true")]).expect_ok();
    synced(&mut m, &p, "the recursive delete of /app/x");
    assert!(!p.dst.exists("/replica/app/x"));

    // Hidden directories below visible ones, several levels deep.
    p.src.set("/app/y/z/_h/deep", "h");
    synced(&mut m, &p, "a deep hidden key");
    assert!(p.dst.exists("/replica/app/y/z"));
    p.src.delete("/app/y", &[("recursive", "true")]).expect_ok();
    synced(&mut m, &p, "deleting it all");
    m.assert_alive("end");
}

#[test]
fn directories_with_only_ignored_leaves_replicate() {
    let p = Pair::start("shape-ignored");
    let mut m = p.mirror_from_now(
        &["--src-ignore-keys-regex", ".*/leaf", "--watch-timeout", "5"],
        "/replica",
    );
    let visible = |p: &Pair| {
        let mut t = rel_tree(&p.src, "/app");
        t.retain(|k, _| !k.ends_with("/leaf"));
        t
    };
    p.src.set("/app/z/leaf", "ignored");
    p.src.set("/app/w/v/leaf", "ignored");
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    assert_eq!(rel_tree(&p.dst, "/replica/app"), visible(&p));
    assert!(p.dst.exists("/replica/app/w/v") && !p.dst.exists("/replica/app/z/leaf"));
    p.src.delete("/app/z", &[("recursive", "true")]).expect_ok();
    p.src
        .delete("/app/w/v", &[("recursive", "true")])
        .expect_ok();
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    assert_eq!(rel_tree(&p.dst, "/replica/app"), visible(&p));
    m.assert_alive("end");
}

/// A restart finds the destination in the middle of a two-write plan (killed between the
/// writes): it goes on from that state instead of reporting an inconsistency.
#[test]
fn a_restart_between_the_writes_of_a_type_change_goes_on() {
    let p = Pair::start("shape-crash");
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    // value -> directory
    p.src.set("/app/a", "v");
    let mut m = Mirror::start(&[], &p.src.url, &p.dst.url);
    synced(&mut m, &p, "the value");
    m.kill();
    let before = replication_index(&p.dst, "/replica").unwrap();
    p.src.put("/app/a", &[("dir", "true")]).expect_ok();
    // What a kill after the delete and before the create leaves: no key, old index.
    p.dst.delete("/replica/app/a", &[]).expect_ok();
    let mut m = Mirror::start(&[], &p.src.url, &p.dst.url);
    synced(
        &mut m,
        &p,
        "the value turned into a directory after a restart",
    );
    assert!(m.stderr().contains("already holds"), "{}", m.stderr());
    assert!(replication_index(&p.dst, "/replica").unwrap() > before);

    // The same after the create but before the index write: the post-state.
    m.kill();
    p.src.set("/app/b", "w");
    let mut m2 = Mirror::start(&[], &p.src.url, &p.dst.url);
    synced(&mut m2, &p, "b");
    m2.kill();
    p.src.put("/app/b", &[("dir", "true")]).expect_ok();
    p.dst.delete("/replica/app/b", &[]).expect_ok();
    p.dst.mkdir("/replica/app/b").expect_ok();
    let mut m3 = Mirror::start(&[], &p.src.url, &p.dst.url);
    synced(
        &mut m3,
        &p,
        "the directory already created before the restart",
    );
    m3.assert_alive("end");
}

/// Without a restart, the same intermediate state is a real mismatch: exit 3, naming both.
#[test]
fn the_same_state_mid_run_is_an_inconsistency() {
    let p = Pair::start("shape-strict");
    let mut m = p.mirror_from_now(&[], "/replica");
    p.src.set("/app/a", "v");
    p.src.set("/app/first", "1");
    synced(&mut m, &p, "the value");
    p.dst.delete("/replica/app/a", &[]).expect_ok();
    p.src.put("/app/a", &[("dir", "true")]).expect_ok();
    assert_eq!(m.wait_exit(Duration::from_secs(20)), 3);
    let err = m.stderr();
    assert!(
        err.contains("/replica/app/a") && err.contains("no key") && err.contains("\"v\""),
        "{err}"
    );
}

/// A destination write whose response is lost is retried; the retry finds the key already
/// holding what the write wanted, and replication goes on (no exit 3).
#[test]
fn a_retried_write_whose_response_was_lost_goes_on() {
    use common::proxy::{Faults, Proxy};
    let p = Pair::start("shape-lost-response");
    let proxy = Proxy::start_with(p.dst.addr(), Faults::default());
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    let mut m = Mirror::start(&["--watch-timeout", "5"], &p.src.url, &proxy.url());
    p.src.set("/app/first", "1");
    m.wait_synced(&p.src, "/app", &p.dst, "/replica/app", "/replica", "first");
    proxy.set(Faults {
        drop_responses: 1,
        drop_matching: "PUT /v2/keys/replica/app/lost".into(),
        ..Faults::default()
    });
    p.src
        .set("/app/lost", "the response to this write is dropped");
    p.src.set("/app/next", "and replication goes on");
    m.wait_for(Duration::from_secs(90), "the replica to catch up", || {
        p.dst.get("/replica/app/next").is_some()
    });
    m.wait_synced(
        &p.src,
        "/app",
        &p.dst,
        "/replica/app",
        "/replica",
        "after the lost response",
    );
    assert_eq!(proxy.faults().drop_responses, 0, "the response was dropped");
    assert!(
        m.stderr().contains("already holds"),
        "{}",
        tail(&m.stderr(), 10)
    );
}
