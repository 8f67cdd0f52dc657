//! Every etcd v2 action, on values and directories, replicated with the default mapping
//! (source "/" -> destination "/replica"), values and keys byte for byte.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const DST: &str = "/replica";

fn action(r: &Resp) -> &str {
    r.body["action"].as_str().unwrap_or("")
}

#[track_caller]
fn expect_action(r: Resp, want: &str) -> Resp {
    assert!(
        r.ok(),
        "source write for {want} failed: {} {}",
        r.status,
        r.body
    );
    assert_eq!(action(&r), want, "unexpected action in {}", r.body);
    r
}

fn synced(p: &Pair, m: &mut Mirror, what: &str) {
    m.wait_synced(&p.src, "/", &p.dst, DST, DST, what);
}

#[test]
fn every_action_on_values() {
    let p = Pair::start("values");
    let start_index = p.src.current_index();
    let mut m = p.mirror_from_now(&[], DST);

    // set (new key, no prevNode)
    expect_action(p.src.put("/v/a", &[("value", "plain")]), "set");
    synced(&p, &mut m, "set of a new key");

    // set over an existing value (prevNode present) to the empty string
    expect_action(p.src.put("/v/a", &[("value", "")]), "set");
    synced(&p, &mut m, "set to the empty string");
    assert_eq!(p.dst.get("/replica/v/a").as_deref(), Some(""));

    // update (prevExist=true) of a key whose value is the empty string
    let unicode = "héllo wörld ☃ 日本語 🚀";
    expect_action(
        p.src
            .put("/v/a", &[("value", unicode), ("prevExist", "true")]),
        "update",
    );
    synced(&p, &mut m, "update from the empty string");
    assert_eq!(p.dst.get("/replica/v/a").as_deref(), Some(unicode));

    // create (prevExist=false)
    let newlines = "line1\nline2\r\n\ttab\n";
    expect_action(
        p.src
            .put("/v/b", &[("value", newlines), ("prevExist", "false")]),
        "create",
    );
    synced(&p, &mut m, "create");
    assert_eq!(p.dst.get("/replica/v/b").as_deref(), Some(newlines));

    // compareAndSwap with prevValue
    let special = "a&b=c+d%20e?f#g";
    expect_action(
        p.src
            .put("/v/b", &[("value", special), ("prevValue", newlines)]),
        "compareAndSwap",
    );
    synced(&p, &mut m, "compareAndSwap (prevValue)");
    assert_eq!(p.dst.get("/replica/v/b").as_deref(), Some(special));

    // compareAndSwap with prevIndex
    let mi = p.src.node("/v/b").unwrap()["modifiedIndex"]
        .as_u64()
        .unwrap();
    let spaces = "  two  leading and trailing spaces  ";
    expect_action(
        p.src
            .put("/v/b", &[("value", spaces), ("prevIndex", &mi.to_string())]),
        "compareAndSwap",
    );
    synced(&p, &mut m, "compareAndSwap (prevIndex)");
    assert_eq!(p.dst.get("/replica/v/b").as_deref(), Some(spaces));

    // compareAndSwap (prevIndex) of a key whose value is the empty string
    p.src.set("/v/e", "");
    synced(&p, &mut m, "set /v/e to empty");
    let mi = p.src.node("/v/e").unwrap()["modifiedIndex"]
        .as_u64()
        .unwrap();
    expect_action(
        p.src.put(
            "/v/e",
            &[("value", "not empty"), ("prevIndex", &mi.to_string())],
        ),
        "compareAndSwap",
    );
    synced(&p, &mut m, "compareAndSwap from the empty string");

    // POST in-order keys: the same generated names on the destination
    let q1 = expect_action(p.src.post("/v/queue", &[("value", "first")]), "create").key();
    let q2 = expect_action(p.src.post("/v/queue", &[("value", "second")]), "create").key();
    synced(&p, &mut m, "POST in-order keys");
    assert_eq!(
        p.dst.get(&format!("/replica{q1}")).as_deref(),
        Some("first")
    );
    assert_eq!(
        p.dst.get(&format!("/replica{q2}")).as_deref(),
        Some("second")
    );

    // delete
    expect_action(p.src.delete("/v/a", &[]), "delete");
    synced(&p, &mut m, "delete");
    assert!(!p.dst.exists("/replica/v/a"));

    // delete of an in-order key
    expect_action(p.src.delete(&q1, &[]), "delete");
    synced(&p, &mut m, "delete of an in-order key");

    // compareAndDelete with prevValue
    expect_action(
        p.src.delete("/v/b", &[("prevValue", spaces)]),
        "compareAndDelete",
    );
    synced(&p, &mut m, "compareAndDelete (prevValue)");
    assert!(!p.dst.exists("/replica/v/b"));

    // compareAndDelete with prevIndex
    let r = p.src.set("/v/c", "cad me");
    synced(&p, &mut m, "set /v/c");
    expect_action(
        p.src
            .delete("/v/c", &[("prevIndex", &r.modified_index().to_string())]),
        "compareAndDelete",
    );
    synced(&p, &mut m, "compareAndDelete (prevIndex)");

    // compareAndDelete (prevIndex) and delete of keys holding the empty string
    let r = p.src.set("/v/empty1", "");
    p.src.set("/v/empty2", "");
    synced(&p, &mut m, "set two empty values");
    expect_action(
        p.src.delete(
            "/v/empty1",
            &[("prevIndex", &r.modified_index().to_string())],
        ),
        "compareAndDelete",
    );
    expect_action(p.src.delete("/v/empty2", &[]), "delete");
    synced(&p, &mut m, "deletes of empty values");

    // keys that need percent-encoding, with awkward values
    let keys = [
        "/k/sp ace",
        "/k/q?mark",
        "/k/hash#tag",
        "/k/pct%41",
        "/k/ünïcødé ☃",
        "/k/amp&eq=plus+",
        "/k/quote\"'",
    ];
    for (i, k) in keys.iter().enumerate() {
        p.src.set(k, &format!("{k} {special} {i}\n"));
    }
    synced(&p, &mut m, "sets of keys with special characters");
    for k in keys {
        assert_eq!(
            p.dst.get(&format!("/replica{k}")),
            p.src.get(k),
            "value of {k:?} on the destination"
        );
    }
    for k in keys {
        expect_action(
            p.src.put(k, &[("value", ""), ("prevExist", "true")]),
            "update",
        );
    }
    synced(&p, &mut m, "updates of keys with special characters");
    for k in keys {
        expect_action(p.src.delete(k, &[]), "delete");
    }
    synced(&p, &mut m, "deletes of keys with special characters");

    let final_src = p.src.current_index();
    let idx = replication_index(&p.dst, DST).expect("index key on the destination");
    assert!(
        idx >= final_src && idx > start_index,
        "replication index {idx} did not advance to {final_src}"
    );
    let log = m.stderr();
    assert!(
        log.contains("Starting replication at"),
        "no start line in:\n{log}"
    );
    assert!(
        log.contains("Replicating key"),
        "no per-event line in:\n{log}"
    );
}

/// A failed source write produces no event and must not disturb the mirror.
#[test]
fn failed_source_writes_produce_nothing() {
    let p = Pair::start("failed");
    let mut m = p.mirror_from_now(&[], DST);
    p.src.set("/f/a", "1");
    let r = p.src.delete("/f/a", &[("prevValue", "2")]);
    assert_eq!(r.error_code(), Some(101), "{}", r.body);
    let r = p.src.put("/f/a", &[("value", "x"), ("prevExist", "false")]);
    assert_eq!(r.error_code(), Some(105), "{}", r.body);
    p.src.set("/f/b", "2");
    m.wait_synced(&p.src, "/", &p.dst, DST, DST, "failed source writes");
    assert_eq!(p.dst.get("/replica/f/a").as_deref(), Some("1"));
}

#[test]
fn every_action_on_directories() {
    let p = Pair::start("dirs");
    let mut m = p.mirror_from_now(&[], DST);

    // dir create with plain PUT dir=true: action set
    expect_action(p.src.put("/d1", &[("dir", "true")]), "set");
    synced(&p, &mut m, "mkdir (set)");
    assert!(p.dst.node("/replica/d1").unwrap()["dir"].as_bool() == Some(true));

    // dir create with prevExist=false: action create
    expect_action(
        p.src.put("/d2", &[("dir", "true"), ("prevExist", "false")]),
        "create",
    );
    synced(&p, &mut m, "mkdir (create)");

    // in-order directory (POST dir=true)
    let qd = expect_action(p.src.post("/q", &[("dir", "true")]), "create").key();
    p.src.set(&format!("{qd}/inside"), "v");
    synced(&p, &mut m, "POST dir=true");
    assert!(p.dst.node(&format!("/replica{qd}")).unwrap()["dir"].as_bool() == Some(true));

    // children
    p.src.set("/d1/child", "v");
    p.src.mkdir("/d1/sub");
    p.src.set("/d1/sub/x", "y");
    p.src.mkdir("/d1/sub/deeper");
    synced(&p, &mut m, "children");

    // dir TTL update (prevExist=true ttl=N): action update; the TTL is not copied
    expect_action(
        p.src.put(
            "/d2",
            &[("dir", "true"), ("prevExist", "true"), ("ttl", "300")],
        ),
        "update",
    );
    synced(&p, &mut m, "dir TTL update");
    let n = p.dst.node("/replica/d2").expect("/replica/d2");
    assert!(
        n.get("ttl").is_none() && n.get("expiration").is_none(),
        "destination dir has a TTL: {n}"
    );
    // remove the TTL again
    expect_action(
        p.src.put(
            "/d2",
            &[("dir", "true"), ("prevExist", "true"), ("ttl", "")],
        ),
        "update",
    );
    synced(&p, &mut m, "dir TTL removal");

    // delete of an empty dir (dir=true)
    expect_action(p.src.delete("/d2", &[("dir", "true")]), "delete");
    synced(&p, &mut m, "rmdir");
    assert!(!p.dst.exists("/replica/d2"));

    // recursive delete of a dir with children
    expect_action(p.src.delete("/d1", &[("recursive", "true")]), "delete");
    synced(&p, &mut m, "recursive delete");
    assert!(!p.dst.exists("/replica/d1"));
    assert!(!p.dst.exists("/replica/d1/sub/x"));

    // recursive delete of an in-order dir
    expect_action(p.src.delete(&qd, &[("recursive", "true")]), "delete");
    synced(&p, &mut m, "recursive delete of in-order dir");

    // a dir with a TTL expires with its children
    p.src.mkdir("/d3");
    p.src.set("/d3/keep", "x");
    p.src.mkdir("/d4");
    p.src.set("/d4/k", "v");
    expect_action(
        p.src.put(
            "/d4",
            &[("dir", "true"), ("prevExist", "true"), ("ttl", "1")],
        ),
        "update",
    );
    synced(&p, &mut m, "dir with children and TTL");
    let n = p.dst.node("/replica/d4").expect("/replica/d4");
    assert!(n.get("ttl").is_none(), "destination dir has a TTL: {n}");
    wait_until(Duration::from_secs(15), "source dir /d4 expires", || {
        !p.src.exists("/d4")
    });
    m.wait_for(
        Duration::from_secs(15),
        "expired dir removed on the destination",
        || !p.dst.exists("/replica/d4"),
    );
    synced(&p, &mut m, "dir expire");
    assert!(p.dst.exists("/replica/d3/keep"));
}

#[test]
fn expire_without_copying_the_ttl() {
    let p = Pair::start("expire");
    let mut m = p.mirror_from_now(&[], DST);

    p.src.set("/stay", "here");
    let r = p
        .src
        .put("/t/k", &[("value", "temp"), ("ttl", "1")])
        .expect_ok();
    assert!(r.node().get("ttl").is_some());
    m.wait_for(Duration::from_secs(10), "ttl key replicated", || {
        p.dst.exists("/replica/t/k")
    });
    if let Some(n) = p.dst.node("/replica/t/k") {
        assert_eq!(n["value"].as_str(), Some("temp"));
        assert!(
            n.get("ttl").is_none() && n.get("expiration").is_none(),
            "the replica key must not carry a TTL: {n}"
        );
    }
    wait_until(Duration::from_secs(15), "source key expires", || {
        !p.src.exists("/t/k")
    });
    m.wait_for(
        Duration::from_secs(15),
        "replica key removed after the source's expire event",
        || !p.dst.exists("/replica/t/k"),
    );
    synced(&p, &mut m, "expire");
    assert_eq!(p.dst.get("/replica/stay").as_deref(), Some("here"));

    // A key whose TTL is refreshed: refreshes are invisible to watchers, so a copied TTL
    // would make the replica key expire early. It must stay as long as the source key stays.
    p.src
        .put("/t/refreshed", &[("value", "r"), ("ttl", "2")])
        .expect_ok();
    m.wait_for(Duration::from_secs(10), "refreshed key replicated", || {
        p.dst.exists("/replica/t/refreshed")
    });
    let n = p
        .dst
        .node("/replica/t/refreshed")
        .expect("/replica/t/refreshed");
    assert!(
        n.get("ttl").is_none() && n.get("expiration").is_none(),
        "the replica key must not carry a TTL: {n}"
    );
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        p.src
            .put(
                "/t/refreshed",
                &[("refresh", "true"), ("prevExist", "true"), ("ttl", "2")],
            )
            .expect_ok();
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(p.src.exists("/t/refreshed"));
    assert!(
        p.dst.exists("/replica/t/refreshed"),
        "replica key expired although the source key was refreshed"
    );
    m.assert_alive("after refreshes");
    wait_until(Duration::from_secs(15), "refreshed key expires", || {
        !p.src.exists("/t/refreshed")
    });
    m.wait_for(
        Duration::from_secs(15),
        "refreshed key removed on the destination",
        || !p.dst.exists("/replica/t/refreshed"),
    );
    synced(&p, &mut m, "expire after refreshes");
}

#[test]
fn replays_history_from_a_stored_index() {
    // Events written before the mirror starts (but after the stored index) are replayed from
    // the source's history.
    let p = Pair::start("replay");
    set_replication_index(&p.dst, DST, p.src.current_index());
    for i in 0..50 {
        p.src.set(&format!("/h/k{i}"), &format!("v{i}"));
    }
    p.src.delete("/h/k7", &[]).expect_ok();
    p.src.mkdir("/h/dir");
    let mut m = Mirror::start(&[], &p.src.url, &p.dst.url);
    synced(&p, &mut m, "history replay");
    assert!(!p.dst.exists("/replica/h/k7"));
    let v: Value = p.dst.node("/replica/h/dir").unwrap();
    assert_eq!(v["dir"].as_bool(), Some(true));
}
