//! `--reload` and `--check` onto a v3 destination on real etcd 3.4: a v2 source reloaded
//! by difference (dry run first, equal keys left untouched, the stale index replaced), a v3
//! source reloaded at one revision behind the more-than-half guard and replicated from
//! there, and `--check` saying OK on an equal replica and CRITICAL on a changed key.

mod common;

use common::v3::{flat, replication_index, V3};
use common::*;
use std::time::Duration;

const V2_TO_V3: [&str; 4] = ["--dst-api", "v3", "--src-prefix", "/app"];
const V3_TO_V3: [&str; 6] = ["--src-api", "v3", "--dst-api", "v3", "--src-prefix", "/app"];

/// Run the binary to its end: (exit code, stdout, stderr).
fn run(flags: &[&str], extra: &[&str], src: &str, dst: &str) -> (i32, String, String) {
    let args: Vec<&str> = flags.iter().chain(extra).copied().collect();
    let mut m = Mirror::start(&args, src, dst);
    let code = m.wait_exit(Duration::from_secs(60));
    (code, m.stdout(), m.stderr())
}

#[test]
fn v2_source_reloads_into_v3_by_difference() {
    let src = Etcd::start("v3reload-v2src");
    let dst = Etcd::start("v3reload-v2dst");
    let d = V3::new(&dst.url);
    src.set("/app/a", "1").expect_ok();
    src.set("/app/dir/b", "2").expect_ok();
    src.set("/app/same", "s").expect_ok();
    src.set("/app/_hidden", "h").expect_ok();
    src.mkdir("/app/empty").expect_ok();
    d.put("/replica/app/same", "s");
    d.put("/replica/app/a", "old");
    d.put("/replica/app/gone", "x");
    d.put("/replica/app/_local", "kept: maps to a hidden v2 key");
    d.put("/replica/other", "outside the root");
    d.put(&index_key("/replica"), "5");
    let same_rev = d.mod_revision("/replica/app/same");

    let (code, out, err) = run(&V2_TO_V3, &["--reload", "--dry-run"], &src.url, &dst.url);
    assert_eq!(code, 0, "dry run: {out}\n{err}");
    assert!(
        out.contains("reload plan: 1 creates, 1 updates, 0 replaces, 1 deletes"),
        "{out}"
    );
    for line in [
        "create /replica/app/dir/b",
        "update /replica/app/a",
        "delete /replica/app/gone",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "{line:?} missing from {out}"
        );
    }
    assert_eq!(
        d.get("/replica/app/gone").as_deref(),
        Some("x"),
        "a dry run wrote"
    );
    assert_eq!(replication_index(&d, "/replica"), Some(5));

    let head = src.current_index();
    let (code, out, err) = run(&V2_TO_V3, &["--reload-only"], &src.url, &dst.url);
    assert_eq!(code, 0, "reload: {out}\n{err}");
    let mut want = flat(&rel_tree(&src, "/app"));
    want.insert("/_local".into(), "kept: maps to a hidden v2 key".into());
    assert_eq!(d.rel_range("/replica/app"), want);
    assert_eq!(
        d.mod_revision("/replica/app/same"),
        same_rev,
        "an equal key was rewritten"
    );
    assert_eq!(d.get("/replica/other").as_deref(), Some("outside the root"));
    assert_eq!(replication_index(&d, "/replica"), Some(head));

    // Replication starts from the recorded index.
    let mut m = Mirror::start(&V2_TO_V3, &src.url, &dst.url);
    src.set("/app/later", "l").expect_ok();
    m.wait_for(Duration::from_secs(20), "a later write replicated", || {
        d.get("/replica/app/later").as_deref() == Some("l")
    });
}

#[test]
fn v3_source_reloads_at_one_revision_behind_the_guard() {
    let src = Etcd::start("v3reload-v3src");
    let dst = Etcd::start("v3reload-v3dst");
    let (s, d) = (V3::new(&src.url), V3::new(&dst.url));
    s.put("/app/x", "1");
    s.put_bytes(b"/app/_u\xff", b"\x00bytes");
    s.put("/app2/y", "not below /app/");
    for k in ["o1", "o2", "o3"] {
        d.put(&format!("/replica/app/{k}"), "old");
    }

    // Three of three owned keys would go: refused without --force, nothing written.
    let (code, out, err) = run(&V3_TO_V3, &["--reload-only"], &src.url, &dst.url);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("deletes 3 of the 3 keys") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(d.get("/replica/app/o1").as_deref(), Some("old"));
    let (code, out, _) = run(&V3_TO_V3, &["--reload", "--dry-run"], &src.url, &dst.url);
    assert_eq!(code, 0);
    assert!(
        out.contains("--reload without --force would refuse"),
        "{out}"
    );

    let rev = s.revision();
    let (code, out, err) = run(&V3_TO_V3, &["--reload-only", "--force"], &src.url, &dst.url);
    assert_eq!(code, 0, "{out}\n{err}");
    let mut copied = d.range_bytes(b"/replica/");
    copied.remove(index_key("/replica").as_bytes());
    let want: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = [
        (b"/replica/app/_u\xff".to_vec(), b"\x00bytes".to_vec()),
        (b"/replica/app/x".to_vec(), b"1".to_vec()),
    ]
    .into();
    assert_eq!(copied, want);
    assert_eq!(replication_index(&d, "/replica"), Some(rev));

    // Replication resumes with the revision after the snapshot.
    let mut m = Mirror::start(&V3_TO_V3, &src.url, &dst.url);
    s.put("/app/x", "2");
    m.wait_for(
        Duration::from_secs(20),
        "the next revision replicated",
        || d.get("/replica/app/x").as_deref() == Some("2"),
    );
}

#[test]
fn check_says_ok_on_an_equal_replica_and_critical_on_a_changed_key() {
    let src = Etcd::start("v3check-src");
    let dst = Etcd::start("v3check-dst");
    let (s, d) = (V3::new(&src.url), V3::new(&dst.url));
    for i in 0..5 {
        s.put(&format!("/app/k{i}"), &i.to_string());
    }
    let (code, out, err) = run(&V3_TO_V3, &["--reload-only"], &src.url, &dst.url);
    assert_eq!(code, 0, "{out}\n{err}");

    let (code, out, err) = run(
        &V3_TO_V3,
        &["--check", "--check-wait", "5"],
        &src.url,
        &dst.url,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.starts_with("OK: 5 keys equal"), "{out}");

    d.put("/replica/app/k3", "changed by hand");
    let (code, out, err) = run(
        &V3_TO_V3,
        &["--check", "--check-wait", "5", "--json"],
        &src.url,
        &dst.url,
    );
    assert_eq!(code, 2, "{out}\n{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(doc["status"], "CRITICAL", "{out}");
    let diffs = doc["differences"].as_array().expect("differences");
    assert_eq!(diffs.len(), 1, "{out}");
    assert_eq!(diffs[0]["key"], "/replica/app/k3");
    assert_eq!(diffs[0]["kind"], "value_differs");
    assert_eq!(diffs[0]["confirmed"], true);
    assert_eq!(diffs[0]["replica"]["value"], "changed by hand");
}
