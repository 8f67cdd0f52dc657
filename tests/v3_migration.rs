//! The README's migration procedure, run as written on real etcd 3.4, with writers going on
//! throughout: a v2 pair (P mirrored into R by a v2 mirror) becomes a v3 pair. Hop 1 carries
//! P's v2 tree into P's own v3 store, hop 2 mirrors P's v3 into R's v3; then the writers move
//! from v2 to v3 and hop 1 stops. Asserts that the v2 mirror and hop 2 never stop, that every
//! store ends with the same keys and values, and that etcdctl reads R's v3 store the same.

mod common;

use common::v3::{self, V3};
use common::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PREFIX: &[&str] = &["--src-prefix", "/app", "--dst-prefix", "/"];

/// A one-shot run of the binary (a reload, a check) that must exit 0.
#[track_caller]
fn once(api: &[&str], extra: &[&str], src: &str, dst: &str) {
    let args: Vec<&str> = api.iter().chain(PREFIX).chain(extra).copied().collect();
    let mut m = Mirror::start(&args, src, dst);
    let code = m.wait_exit(Duration::from_secs(60));
    assert_eq!(code, 0, "{args:?}: stderr:\n{}", tail(&m.stderr(), 20));
}

/// A running mirror with these API flags.
fn unit(api: &[&str], src: &str, dst: &str) -> Mirror {
    let args: Vec<&str> = api.iter().chain(PREFIX).copied().collect();
    Mirror::start(&args, src, dst)
}

#[test]
fn a_v2_pair_becomes_a_v3_pair_with_the_mirror_running_throughout() {
    let p = Etcd::start("migrate-p");
    let r = Etcd::start("migrate-r");
    let (p3, r3) = (V3::new(&p.url), V3::new(&r.url));
    for i in 0..20 {
        p.set(&format!("/app/d{}/k{i}", i % 3), &format!("v{i}"));
    }

    // The v2 writers, until they move.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (c, stop, written) = (p.client.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("/app/d{}/k{}", n % 3, n % 40);
                if n % 7 == 3 {
                    c.delete(&key, &[]);
                } else {
                    c.set(&key, &format!("w{n}"));
                }
                n += 1;
                written.store(n, Ordering::SeqCst);
                // Pacing a workload, not synchronisation.
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    // Where the sites start: P's v2 mirrored into R's v2.
    once(&[], &["--reload-only"], &p.url, &r.url);
    let mut v2_unit = unit(&[], &p.url, &r.url);

    // Step 1: P v2 into P v3 (same cluster, other API).
    let hop1_api = ["--dst-api", "v3"];
    once(&hop1_api, &["--reload-only"], &p.url, &p.url);
    let mut hop1 = unit(&hop1_api, &p.url, &p.url);

    // Step 2: P v3 into R v3.
    let hop2_api = ["--src-api", "v3", "--dst-api", "v3"];
    once(&hop2_api, &["--reload-only"], &p.url, &r.url);
    let mut hop2 = unit(&hop2_api, &p.url, &r.url);
    let seen = written.load(Ordering::SeqCst);
    hop2.wait_for(Duration::from_secs(20), "v2 writes reach R's v3", || {
        written.load(Ordering::SeqCst) > seen + 50 && r3.get(&format!("/app/d0/k{}", 0)).is_some()
    });

    // Step 4: the writers stop on v2; hop 1 catches up (its check says OK) and stops.
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("the v2 writer");
    let head = p.current_index();
    hop1.wait_for(Duration::from_secs(20), "hop 1 caught up", || {
        v3::replication_index(&p3, "/") >= Some(head)
    });
    once(&hop1_api, &["--check"], &p.url, &p.url);
    hop1.terminate();
    hop1.wait_exit(Duration::from_secs(10));
    let v2_tree = v3::flat(&rel_tree(&p.client, "/app"));
    assert!(v2_tree.len() > 10, "the workload left keys: {v2_tree:?}");
    assert_eq!(
        p3.rel_range("/app"),
        v2_tree,
        "P's v3 store holds P's v2 tree"
    );

    // The writers now write v3 on P.
    for i in 0..30 {
        p3.put(&format!("/app/d1/k{i}"), &format!("v3-{i}"));
    }
    p3.delete("/app/d2/k5");
    p3.delete_prefix("/app/d0/");
    p3.txn(&[("put", "/app/new/a", "1"), ("del", "/app/d1/k3", "")]);
    let head = p3.revision();
    hop2.wait_for(Duration::from_secs(20), "v3 writes reach R's v3", || {
        v3::replication_index(&r3, "/") == Some(head)
    });
    assert_eq!(p3.rel_range("/app/"), r3.rel_range("/app/"));
    assert_eq!(
        v3::etcdctl_prefix(&r.url, "/app/"),
        p3.range_bytes(b"/app/")
            .into_iter()
            .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    );
    once(&hop2_api, &["--check"], &p.url, &r.url);

    // The v2 mirror kept R's v2 tree for the v2 readers, and never stopped.
    v2_unit.wait_synced(&p.client, "/app", &r.client, "/app", "/", "the v2 writes");
    assert_eq!(v3::flat(&rel_tree(&r.client, "/app")), v2_tree);
    v2_unit.assert_alive("the v2 mirror, at the end");
    hop2.assert_alive("hop 2, at the end");
}
