//! Hard failures: out-of-band changes on the destination (exit 3), another writer (exit 5),
//! a missing index without --reload (exit 2).

mod common;

use common::*;
use std::time::Duration;

#[test]
fn out_of_band_change_on_destination_exits_3() {
    let p = Pair::start("oob");
    let mut m = p.mirror_from_now(&[], "/replica");
    let i1 = p.src.set("/cfg/k", "v1").modified_index();
    m.wait_index(&p.dst, "/replica", i1);
    assert_eq!(p.dst.get("/replica/cfg/k").as_deref(), Some("v1"));

    p.dst.set("/replica/cfg/k", "tampered");
    let i2 = p.src.set("/cfg/k", "v2").modified_index();
    p.src
        .set("/cfg/other", "must not be written after the failure");
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(code, 3, "expected exit 3 (inconsistency); stderr:\n{err}");
    assert!(err.contains("/cfg/k"), "stderr must name the key:\n{err}");
    assert!(
        err.contains("tampered"),
        "stderr must say what the destination has:\n{err}"
    );
    assert!(
        err.contains("v1"),
        "stderr must say what the source had before the event:\n{err}"
    );
    // nothing written after the mismatch
    assert_eq!(p.dst.get("/replica/cfg/k").as_deref(), Some("tampered"));
    assert!(!p.dst.exists("/replica/cfg/other"));
    let idx = replication_index(&p.dst, "/replica").unwrap();
    assert!(idx < i2, "index {idx} moved past the failed event {i2}");

    // a restart fails the same way (the state is not silently accepted)
    let mut m = Mirror::start(&[], &p.src.url, &p.dst.url);
    assert_eq!(m.wait_exit(Duration::from_secs(30)), 3, "{}", m.stderr());
}

#[test]
fn out_of_band_create_and_delete_on_destination_exit_3() {
    // a key created on the destination behind the mirror's back, then created on the source
    let p = Pair::start("oob-create");
    let mut m = p.mirror_from_now(&[], "/replica");
    let i = p.src.set("/cfg/a", "1").modified_index();
    m.wait_index(&p.dst, "/replica", i);
    p.dst.set("/replica/cfg/new", "sneaky");
    p.src
        .put("/cfg/new", &[("value", "real"), ("prevExist", "false")])
        .expect_ok();
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(code, 3, "stderr:\n{err}");
    assert!(err.contains("/cfg/new"), "stderr must name the key:\n{err}");
    assert_eq!(p.dst.get("/replica/cfg/new").as_deref(), Some("sneaky"));

    // a mirrored key deleted on the destination, then updated on the source
    let p = Pair::start("oob-delete");
    let mut m = p.mirror_from_now(&[], "/replica");
    let i = p.src.set("/cfg/gone", "1").modified_index();
    m.wait_index(&p.dst, "/replica", i);
    p.dst.delete("/replica/cfg/gone", &[]).expect_ok();
    p.src.set("/cfg/gone", "2");
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(code, 3, "stderr:\n{err}");
    assert!(
        err.contains("/cfg/gone"),
        "stderr must name the key:\n{err}"
    );
    assert!(!p.dst.exists("/replica/cfg/gone"));

    // an empty-string value changed on the destination (etcd cannot check prevValue="")
    let p = Pair::start("oob-empty");
    let mut m = p.mirror_from_now(&[], "/replica");
    let i = p.src.set("/cfg/empty", "").modified_index();
    m.wait_index(&p.dst, "/replica", i);
    assert_eq!(p.dst.get("/replica/cfg/empty").as_deref(), Some(""));
    p.dst.set("/replica/cfg/empty", "not empty any more");
    p.src.set("/cfg/empty", "new");
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(code, 3, "stderr:\n{err}");
    assert!(
        err.contains("/cfg/empty"),
        "stderr must name the key:\n{err}"
    );
    assert_eq!(
        p.dst.get("/replica/cfg/empty").as_deref(),
        Some("not empty any more")
    );
}

#[test]
fn two_mirrors_on_one_destination_one_exits_5() {
    let p = Pair::start("two");
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    let mut a = Mirror::start(&[], &p.src.url, &p.dst.url);
    let mut b = Mirror::start(&[], &p.src.url, &p.dst.url);
    let mut n = 0;
    let finished = poll_until(Duration::from_secs(60), || {
        if a.exited().is_some() || b.exited().is_some() {
            return true;
        }
        if n < 200 {
            p.src.set(&format!("/two/k{}", n % 10), &n.to_string());
            n += 1;
        }
        false
    });
    assert!(
        finished,
        "neither mirror exited although both write the same index; stderr a:\n{}\nstderr b:\n{}",
        tail(&a.stderr(), 20),
        tail(&b.stderr(), 20)
    );
    let (loser, winner) = if a.exited().is_some() {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let code = loser.exited().unwrap();
    let err = loser.stderr();
    assert_eq!(code, 5, "expected exit 5 (another writer); stderr:\n{err}");
    assert!(
        err.to_lowercase().contains("writer"),
        "message must say another writer is active:\n{err}"
    );
    // the survivor keeps the replica correct
    p.src.set("/two/final", "f");
    winner.wait_synced(&p.src, "/", &p.dst, "/replica", "/replica", "two mirrors");
    winner.assert_alive("end");
}

#[test]
fn missing_index_without_reload_exits_2() {
    let p = Pair::start("noindex");
    p.src.set("/a", "1");
    let before = tree(&p.dst, "/");
    let mut m = Mirror::start(&[], &p.src.url, &p.dst.url);
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(code, 2, "stderr:\n{err}");
    assert!(
        err.contains("--reload"),
        "message must mention --reload:\n{err}"
    );
    assert_eq!(tree(&p.dst, "/"), before, "the destination was modified");
    assert!(replication_index(&p.dst, "/replica").is_none());
}
