//! Keys that are never mirrored: --src-ignore-keys-regex, hidden keys, /__replication.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn ignore_regex_full_match_and_index_advances() {
    let p = Pair::start("ignore");
    let mut m = p.mirror_from_now(
        &[
            "--src-ignore-keys-regex",
            "/spicerack/locks/etcd(/.*)?",
            "--watch-timeout",
            "5",
        ],
        "/replica",
    );
    p.src.set("/spicerack/locks/etcd/foo", "ignored");
    p.src.set("/spicerack/locks/etcd/bar/baz", "ignored");
    p.src
        .set("/spicerack/locks/etcdx", "mirrored: not a full match");
    p.src.set("/spicerack/locks/other", "mirrored");
    p.src
        .set("/x/spicerack/locks/etcd/foo", "mirrored: regex is anchored");
    p.src.set("/spicerack/locks/etcd/foo", "ignored again");
    p.src
        .delete("/spicerack/locks/etcd/bar", &[("recursive", "true")])
        .expect_ok();
    p.src.set("/plain", "mirrored");
    // the last event is an ignored one: the index must still move past it
    let last = p
        .src
        .set("/spicerack/locks/etcd/last", "ignored")
        .modified_index();
    m.wait_index(&p.dst, "/replica", last);
    let t = tree(&p.dst, "/replica");
    for k in [
        "/replica/spicerack/locks/etcdx",
        "/replica/spicerack/locks/other",
        "/replica/x/spicerack/locks/etcd/foo",
        "/replica/plain",
    ] {
        assert!(t.contains_key(k), "{k} missing on the destination: {t:?}");
    }
    for k in t.keys() {
        assert!(
            !k.starts_with("/replica/spicerack/locks/etcd/")
                && k != "/replica/spicerack/locks/etcd",
            "ignored key {k} reached the destination"
        );
    }
    assert_eq!(
        p.dst.get("/replica/spicerack/locks/etcdx").as_deref(),
        Some("mirrored: not a full match")
    );

    // a recursive delete of the ignored dir itself is ignored too; others keep flowing
    p.src
        .delete("/spicerack/locks/etcd", &[("recursive", "true")])
        .expect_ok();
    p.src.set("/after", "a");
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    m.wait_for(Duration::from_secs(10), "/replica/after", || {
        p.dst.get("/replica/after").as_deref() == Some("a")
    });
    assert!(p.dst.exists("/replica/spicerack/locks/etcdx"));
    m.assert_alive("end");
}

#[test]
fn hidden_keys_never_mirrored() {
    let p = Pair::start("hidden");
    // Written before the mirror starts, so they come from the history replay, where etcd does
    // return hidden keys.
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    p.src.set("/_hidden/a", "h");
    p.src.set("/app/_secret", "h");
    p.src.set("/app/visible", "v");
    p.src.set("/app/_dir/deep", "h");
    let mut m = Mirror::start(&["-d", "--watch-timeout", "5"], &p.src.url, &p.dst.url);
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    // and written while it runs (live watch: hidden writes are invisible to it, so the index
    // passes them once a renewed registration has been silent for --watch-timeout)
    p.src.set("/_hidden/b", "h");
    p.src.set("/app/_secret", "h2");
    p.src.set("/app/visible2", "v");
    p.src.delete("/app/_secret", &[]).expect_ok();
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    m.wait_for(Duration::from_secs(10), "visible keys", || {
        p.dst.exists("/replica/app/visible") && p.dst.exists("/replica/app/visible2")
    });
    // hidden keys do not show in listings, so look them up directly
    for k in [
        "/replica/_hidden",
        "/replica/_hidden/a",
        "/replica/_hidden/b",
        "/replica/app/_secret",
        "/replica/app/_dir",
        "/_hidden/a",
    ] {
        assert!(!p.dst.exists(k), "hidden key {k} was mirrored");
    }
    m.assert_alive("end");
}

#[test]
fn source_replication_keys_never_mirrored() {
    // A source that is itself a replica has /__replication keys; with a root-to-root mapping
    // they would land exactly on the destination's own index key.
    let p = Pair::start("srcrepl");
    let mut m = p.mirror_from_now(&["--dst-prefix", "/"], "/");
    let mine = replication_index(&p.dst, "/").unwrap();
    p.src.set("/__replication/__ROOT__", "999999");
    p.src.set("/__replication/replica", "888888");
    p.src.set("/__replication/other/deep", "777777");
    let last = p.src.set("/visible", "v").modified_index();
    m.wait_index(&p.dst, "/", last);
    m.wait_for(Duration::from_secs(10), "/visible", || {
        p.dst.exists("/visible")
    });
    let idx = replication_index(&p.dst, "/").unwrap();
    assert!(idx >= last && idx >= mine && idx < 999999, "index is {idx}");
    assert!(!p.dst.exists("/__replication/replica"));
    assert!(!p.dst.exists("/__replication/other"));
    // only the index is under /__replication (__ROOT__ itself is hidden from listings)
    assert!(p.dst.exists("/__replication/__ROOT__"));
    assert!(
        tree(&p.dst, "/__replication").is_empty(),
        "unexpected keys under /__replication: {:?}",
        tree(&p.dst, "/__replication")
    );
    // and with the default mapping they are not copied under /replica/__replication either
    let p = Pair::start("srcrepl2");
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    p.src.set("/__replication/replica", "5");
    let last = p.src.set("/k", "v").modified_index();
    let mut m = Mirror::start(&[], &p.src.url, &p.dst.url);
    m.wait_index(&p.dst, "/replica", last);
    assert!(p.dst.exists("/replica/k"));
    assert!(!p.dst.exists("/replica/__replication"));
    assert!(!p.dst.exists("/replica/__replication/replica"));
    m.assert_alive("end");
}
