//! Key mapping: --src-prefix, --dst-prefix, --strip, "/" prefixes, whole-segment matching,
//! no double slashes, recursive deletes of ancestors of the source prefix.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::Duration;

fn map(entries: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
        .collect()
}

/// "Replicating key ..." log lines must never show a double slash in a key.
fn assert_no_double_slash_in_log(m: &Mirror) {
    for line in m.stderr().lines() {
        if let Some(rest) = line.split("Replicating key").nth(1) {
            assert!(!rest.contains("//"), "double slash in log line: {line}");
        }
    }
}

#[test]
fn default_mapping_prefixes_replica() {
    let p = Pair::start("map-default");
    let mut m = p.mirror_from_now(&[], "/replica");
    p.src.set("/a", "1");
    p.src.set("/b/c/d", "2");
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    m.wait_for(Duration::from_secs(10), "mapped keys", || {
        tree(&p.dst, "/replica")
            == map(&[
                ("/replica/a", Some("1")),
                ("/replica/b", None),
                ("/replica/b/c", None),
                ("/replica/b/c/d", Some("2")),
            ])
    });
    // nothing written outside /replica and /__replication on the destination
    let top: Vec<String> = tree(&p.dst, "/")
        .into_keys()
        .filter(|k| k.matches('/').count() == 1)
        .collect();
    assert_eq!(top, vec!["/replica".to_string()]);
    assert!(p.dst.exists("/__replication/replica"));
    assert_no_double_slash_in_log(&m);
}

#[test]
fn strip_with_prefixes() {
    let p = Pair::start("map-strip");
    let mut m = p.mirror_from_now(
        &["--strip", "--src-prefix", "/conftool", "--dst-prefix", "/x"],
        "/x",
    );
    p.src.set("/conftool/a/b", "ab");
    p.src.set("/conftool/top", "t");
    p.src.set("/other/c", "not mirrored");
    p.src.set("/conftool2/x", "not mirrored either");
    p.src.set("/conftool/last", "l");
    m.wait_index(&p.dst, "/x", p.src.current_index());
    m.wait_for(Duration::from_secs(10), "stripped keys under /x", || {
        tree(&p.dst, "/x")
            == map(&[
                ("/x/a", None),
                ("/x/a/b", Some("ab")),
                ("/x/top", Some("t")),
                ("/x/last", Some("l")),
            ])
    });
    assert!(!p.dst.exists("/x/conftool"));
    assert!(!p.dst.exists("/other"));
    assert!(!p.dst.exists("/x/other"));
    assert!(!p.dst.exists("/replica"));
    assert!(p.dst.exists("/__replication/x"));
    assert_no_double_slash_in_log(&m);
}

#[test]
fn strip_into_root_destination() {
    let p = Pair::start("map-root");
    let mut m = p.mirror_from_now(&["--strip", "--src-prefix", "/a", "--dst-prefix", "/"], "/");
    assert!(p.dst.exists("/__replication/__ROOT__"));
    p.src.set("/a/k", "v");
    p.src.set("/a/d/e", "w");
    p.src.set("/b/no", "x");
    m.wait_index(&p.dst, "/", p.src.current_index());
    m.wait_for(
        Duration::from_secs(10),
        "keys at the destination root",
        || tree(&p.dst, "/") == map(&[("/k", Some("v")), ("/d", None), ("/d/e", Some("w"))]),
    );
    let idx = replication_index(&p.dst, "/").expect("/__replication/__ROOT__");
    assert!(idx >= p.src.current_index());
    // only the index is under /__replication (__ROOT__ itself is hidden from listings)
    assert!(p.dst.exists("/__replication/__ROOT__"));
    assert!(
        tree(&p.dst, "/__replication").is_empty(),
        "unexpected keys under /__replication: {:?}",
        tree(&p.dst, "/__replication")
    );
    assert_no_double_slash_in_log(&m);
}

#[test]
fn root_to_root_and_trailing_slashes() {
    // src prefix "/" and dst prefix "/x/" (trailing slash trimmed: index at /__replication/x)
    let p = Pair::start("map-slash");
    let mut m = p.mirror_from_now(&["--src-prefix", "/", "--dst-prefix", "/x/"], "/x");
    p.src.set("/k", "1");
    p.src.set("/d/k", "2");
    m.wait_index(&p.dst, "/x", p.src.current_index());
    m.wait_for(Duration::from_secs(10), "keys under /x", || {
        tree(&p.dst, "/x") == map(&[("/x/k", Some("1")), ("/x/d", None), ("/x/d/k", Some("2"))])
    });
    assert_no_double_slash_in_log(&m);

    // --strip with src prefix "/" is the identity on keys
    let p = Pair::start("map-slash2");
    let mut m = p.mirror_from_now(&["--strip", "--src-prefix", "/"], "/replica");
    p.src.set("/k", "1");
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    m.wait_for(Duration::from_secs(10), "/replica/k", || {
        tree(&p.dst, "/replica") == map(&[("/replica/k", Some("1"))])
    });
    assert_no_double_slash_in_log(&m);
}

#[test]
fn prefix_matches_whole_segments() {
    let p = Pair::start("map-segment");
    let mut m = p.mirror_from_now(&["--src-prefix", "/conftool"], "/replica");
    p.src.set("/conftool2/x", "no");
    p.src.set("/conftoolx", "no");
    p.src.set("/conftool/x", "yes");
    p.src.set("/conf", "no");
    p.src.set("/conftool2/y", "no");
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    m.wait_for(Duration::from_secs(10), "only /conftool/x", || {
        tree(&p.dst, "/replica")
            == map(&[
                ("/replica/conftool", None),
                ("/replica/conftool/x", Some("yes")),
            ])
    });
    assert!(!p.dst.exists("/replica/conftool2"));
    assert!(!p.dst.exists("/replica/conftoolx"));
}

#[test]
fn recursive_delete_of_prefix_and_ancestor() {
    // A recursive delete of an ancestor of the source prefix removes the whole mapped subtree.
    let p = Pair::start("map-ancestor");
    let mut m = p.mirror_from_now(
        &[
            "--strip",
            "--src-prefix",
            "/conftool/eqiad",
            "--dst-prefix",
            "/r",
        ],
        "/r",
    );
    p.src.set("/conftool/eqiad/a", "1");
    p.src.set("/conftool/eqiad/d/b", "2");
    p.src.set("/conftool/codfw/c", "not mirrored");
    m.wait_index(&p.dst, "/r", p.src.current_index());
    m.wait_for(Duration::from_secs(10), "initial keys", || {
        tree(&p.dst, "/r") == map(&[("/r/a", Some("1")), ("/r/d", None), ("/r/d/b", Some("2"))])
    });
    p.dst.set("/unrelated", "stays");
    p.src
        .delete("/conftool", &[("recursive", "true")])
        .expect_ok();
    m.wait_index(&p.dst, "/r", p.src.current_index());
    m.wait_for(Duration::from_secs(10), "mapped subtree removed", || {
        tree(&p.dst, "/r").is_empty()
    });
    assert_eq!(p.dst.get("/unrelated").as_deref(), Some("stays"));
    assert!(p.dst.exists("/__replication/r"));
    // replication goes on afterwards
    p.src.set("/conftool/eqiad/new", "n");
    m.wait_index(&p.dst, "/r", p.src.current_index());
    m.wait_for(
        Duration::from_secs(10),
        "new key after the ancestor delete",
        || p.dst.get("/r/new").as_deref() == Some("n"),
    );

    // the prefix itself deleted recursively (without --strip)
    let p = Pair::start("map-prefixdel");
    let mut m = p.mirror_from_now(&["--src-prefix", "/conftool"], "/replica");
    p.src.set("/conftool/a", "1");
    p.src.set("/conftool/d/b", "2");
    p.src.set("/other", "o");
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    m.wait_for(Duration::from_secs(10), "keys before delete", || {
        p.dst.exists("/replica/conftool/d/b")
    });
    p.src
        .delete("/conftool", &[("recursive", "true")])
        .expect_ok();
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    m.wait_for(Duration::from_secs(10), "subtree removed", || {
        tree(&p.dst, "/replica/conftool").is_empty()
    });
    assert!(!p.dst.exists("/replica/other"));
}
