//! Values of every size etcd accepts, through every action: conditions on big values travel
//! as the destination's modifiedIndex, never as the value itself.

mod common;

use common::*;
use std::time::Duration;

/// A value of `len` bytes that differs by `tag`, in characters a form needs no escape for.
fn value(len: usize, tag: u8) -> String {
    let body: String = (0..len)
        .map(|i| char::from(b'a' + ((i as u8).wrapping_add(tag)) % 26))
        .collect();
    body
}

/// Every action on one key with values of `len` bytes; the replica follows each step.
fn every_action_with(len: usize) {
    let p = Pair::start(&format!("values-{len}"));
    let mut m = p.mirror_from_now(
        &["--src-prefix", "/big", "--watch-timeout", "5"],
        "/replica",
    );
    let synced = |m: &mut Mirror, what: &str| {
        m.wait_synced(&p.src, "/big", &p.dst, "/replica/big", "/replica", what);
    };
    let k = "/big/k";
    p.src
        .put(k, &[("value", &value(len, 1)), ("prevExist", "false")])
        .expect_ok();
    p.src.set(k, &value(len, 2)).expect_ok();
    synced(&mut m, "create and set");
    p.src
        .put(k, &[("value", &value(len, 3)), ("prevExist", "true")])
        .expect_ok();
    let mi = p.src.node(k).unwrap()["modifiedIndex"].to_string();
    p.src
        .put(k, &[("value", &value(len, 4)), ("prevIndex", &mi)])
        .expect_ok();
    synced(&mut m, "update and compareAndSwap");
    let mi = p.src.node(k).unwrap()["modifiedIndex"].to_string();
    p.src.delete(k, &[("prevIndex", &mi)]).expect_ok();
    p.src.set(k, &value(len, 5)).expect_ok();
    p.src.delete(k, &[]).expect_ok();
    synced(&mut m, "compareAndDelete, set and delete");
    p.src
        .put(k, &[("value", &value(len, 6)), ("ttl", "1")])
        .expect_ok();
    wait_until(
        Duration::from_secs(20),
        "the key to expire on the source",
        || !p.src.exists(k),
    );
    synced(&mut m, "expire");
    p.src.set(k, &value(len, 7)).expect_ok();
    synced(&mut m, "the last value");
    assert_eq!(p.dst.get("/replica/big/k").map(|v| v.len()), Some(len));
    let log = m.stderr();
    assert!(
        !log.contains("WARN") && !log.contains("ERROR"),
        "{}",
        tail(&log, 20)
    );
    m.assert_alive("end");
}

#[test]
fn values_of_4_kib() {
    every_action_with(4 << 10);
}

#[test]
fn values_of_64_kib() {
    every_action_with(64 << 10);
}

#[test]
fn values_of_1_mib() {
    every_action_with(1 << 20);
}

#[test]
fn values_of_6_mib() {
    every_action_with(6 << 20);
}

/// Multi-byte text with every character a form treats specially arrives byte for byte.
#[test]
fn a_large_utf8_value_with_form_characters_arrives_intact() {
    let p = Pair::start("values-utf8");
    let mut m = p.mirror_from_now(&["--src-prefix", "/big"], "/replica");
    let v = "é".repeat(1_500_000) + " & = + % ; # \n end";
    p.src.set("/big/u", &v).expect_ok();
    m.wait_synced(&p.src, "/big", &p.dst, "/replica/big", "/replica", "utf-8");
    assert_eq!(p.dst.get("/replica/big/u").as_deref(), Some(v.as_str()));
}
