//! --reload: diff-based copy that never shrinks the replica below its final content, the
//! guards (same cluster, mass delete, mass expiry), both-empty start, --dry-run, passes that
//! converge on a busy source, type changes, lost responses, reruns after a kill.

mod common;

use common::proxy::{Faults, Proxy};
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Write `items` with `threads` parallel writers.
fn write_parallel(c: &Client, items: &[(String, String)], threads: usize) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let c = c.clone();
            let next = &next;
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((k, v)) = items.get(i) else { break };
                c.set(k, v);
            });
        }
    });
}

#[test]
fn reload_20000_keys_never_shrinks_the_replica() {
    const N: usize = 20_000;
    let p = Pair::start("reload-big");
    let t = Instant::now();
    let src_items: Vec<(String, String)> = (0..N)
        .map(|i| (format!("/big/d{:02}/k{i:05}", i % 20), format!("v{i}")))
        .collect();
    let mut dst_items: Vec<(String, String)> = (0..N / 2)
        .map(|i| {
            let v = if i % 7 == 0 {
                format!("old{i}")
            } else {
                format!("v{i}")
            };
            (format!("/replica/d{:02}/k{i:05}", i % 20), v)
        })
        .collect();
    for i in 0..1000 {
        dst_items.push((format!("/replica/extra/e{i:04}"), "delete me".into()));
    }
    std::thread::scope(|s| {
        s.spawn(|| write_parallel(&p.src, &src_items, 6));
        s.spawn(|| write_parallel(&p.dst, &dst_items, 6));
    });
    p.dst.set("/replica/_hidden_keep", "left alone");
    let snapshot = p.src.current_index();
    println!(
        "wrote {} keys in {:.1} s",
        N + dst_items.len(),
        t.elapsed().as_secs_f64()
    );

    let expected: BTreeMap<String, Option<String>> = rel_tree(&p.src, "/big")
        .into_iter()
        .map(|(k, v)| (format!("/replica{k}"), v))
        .collect();
    assert_eq!(expected.values().filter(|v| v.is_some()).count(), N);
    let initial = tree(&p.dst, "/replica");
    // keys present at the start that must be present at the end: never absent in between
    let must_stay: BTreeSet<String> = initial
        .keys()
        .filter(|k| expected.contains_key(*k))
        .cloned()
        .collect();
    // and those whose value is already right must keep it
    let stable: BTreeMap<String, Option<String>> = initial
        .iter()
        .filter(|(k, v)| expected.get(*k) == Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    println!(
        "destination: {} keys at start, {} must stay, {} already right; expected {} at the end",
        initial.len(),
        must_stay.len(),
        stable.len(),
        expected.len()
    );

    let stop = AtomicBool::new(false);
    let polls = AtomicUsize::new(0);
    let min_count = AtomicUsize::new(usize::MAX);
    let violations: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut m = None;
    let t = Instant::now();
    std::thread::scope(|s| {
        let dst = p.dst.client.clone();
        let (stop, polls, min_count, violations) = (&stop, &polls, &min_count, &violations);
        let (must_stay, stable) = (&must_stay, &stable);
        s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let now = tree(&dst, "/replica");
                polls.fetch_add(1, Ordering::Relaxed);
                min_count.fetch_min(now.len(), Ordering::Relaxed);
                let mut v = violations.lock().unwrap();
                if v.len() < 20 {
                    if let Some(k) = must_stay.iter().find(|k| !now.contains_key(*k)) {
                        v.push(format!(
                            "poll {}: {k} missing ({} keys listed)",
                            polls.load(Ordering::Relaxed),
                            now.len()
                        ));
                    }
                    if let Some((k, want)) = stable.iter().find(|(k, w)| now.get(*k) != Some(*w)) {
                        v.push(format!(
                            "poll {}: {k} was {want:?}, now {:?}",
                            polls.load(Ordering::Relaxed),
                            now.get(k)
                        ));
                    }
                }
            }
        });
        let mut mirror = Mirror::start(
            &["--reload", "--src-prefix", "/big", "--strip"],
            &p.src.url,
            &p.dst.url,
        );
        // the index is created at the end of the reload
        mirror.wait_for(
            Duration::from_secs(240),
            "reload finished (index key)",
            || replication_index(&p.dst, "/replica").is_some_and(|i| i >= snapshot),
        );
        println!("reload took {:.1} s", t.elapsed().as_secs_f64());
        // one more poll after the end
        let p0 = polls.load(Ordering::Relaxed);
        wait_until(Duration::from_secs(60), "one more poll", || {
            polls.load(Ordering::Relaxed) > p0 + 1
        });
        stop.store(true, Ordering::Relaxed);
        m = Some(mirror);
    });
    let mut m = m.unwrap();
    let v = violations.into_inner().unwrap();
    println!(
        "{} polls, smallest listing {} keys",
        polls.load(Ordering::Relaxed),
        min_count.load(Ordering::Relaxed)
    );
    assert!(v.is_empty(), "the replica shrank during the reload: {v:#?}");
    // creates and updates come before deletes: the listing never has fewer keys than at
    // the start (the final content is larger here)
    assert!(
        min_count.load(Ordering::Relaxed) >= initial.len().min(expected.len()),
        "the listing dropped to {} keys (started with {})",
        min_count.load(Ordering::Relaxed),
        initial.len()
    );
    assert!(
        polls.load(Ordering::Relaxed) >= 3,
        "too few polls to prove anything"
    );

    let now = tree(&p.dst, "/replica");
    assert!(
        now == expected,
        "after reload: {}",
        tree_diff(&expected, &now)
    );
    let idx = replication_index(&p.dst, "/replica").unwrap();
    assert!(idx >= snapshot, "index {idx} < source snapshot {snapshot}");
    assert_eq!(
        p.dst.get("/replica/_hidden_keep").as_deref(),
        Some("left alone"),
        "reload touched a hidden key"
    );
    // and it keeps replicating
    p.src.set("/big/d00/after", "reload");
    m.wait_synced(
        &p.src,
        "/big",
        &p.dst,
        "/replica",
        "/replica",
        "write after reload",
    );
}

#[test]
fn reload_refuses_same_cluster_unless_forced() {
    let e = Etcd::start("same");
    e.set("/a/k1", "1");
    e.set("/a/d/k2", "2");
    let mut m = Mirror::start(
        &["--reload", "--src-prefix", "/a", "--dst-prefix", "/b"],
        &e.url,
        &e.url,
    );
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(code, 2, "stderr:\n{err}");
    assert!(err.contains("--force"), "message must name --force:\n{err}");
    assert!(!e.exists("/b"), "refused reload wrote to the destination");
    assert!(replication_index(&e, "/b").is_none());

    let mut m = Mirror::start(
        &[
            "--reload",
            "--force",
            "--src-prefix",
            "/a",
            "--dst-prefix",
            "/b",
        ],
        &e.url,
        &e.url,
    );
    m.wait_for(
        Duration::from_secs(30),
        "forced reload copies /a to /b/a",
        || replication_index(&e, "/b").is_some() && rel_tree(&e, "/a") == rel_tree(&e, "/b/a"),
    );
    e.set("/a/k3", "3");
    m.wait_synced(&e, "/a", &e, "/b/a", "/b", "write after forced reload");
}

/// On one cluster, a destination inside the mirrored subtree would replicate its own writes
/// forever: refused even with --force, before anything is written.
#[test]
fn a_mirror_that_would_feed_itself_is_refused_even_with_force() {
    let e = Etcd::start("feed");
    e.set("/a/k1", "1");
    let before = e.current_index();
    for args in [&["--reload", "--force"][..], &[][..]] {
        let mut all = args.to_vec();
        all.extend(["--src-prefix", "/", "--dst-prefix", "/replica"]);
        let mut m = Mirror::start(&all, &e.url, &e.url);
        let code = m.wait_exit(Duration::from_secs(30));
        let err = m.stderr();
        assert_eq!(code, 2, "args {all:?}, stderr:\n{err}");
        assert!(err.contains("replicate its own writes"), "{err}");
    }
    assert_eq!(e.current_index(), before, "nothing was written");
}

#[test]
fn reload_refuses_mass_delete_unless_forced() {
    let p = Pair::start("massdel");
    for i in 0..10 {
        p.dst.set(&format!("/replica/conftool/k{i}"), "v");
    }
    p.dst.set("/__replication/replica", "3");
    p.src.set("/other", "x");
    let before = tree(&p.dst, "/replica");
    // the plan deletes all 11 destination keys (and creates /replica/other)
    let mut m = Mirror::start(&["--reload"], &p.src.url, &p.dst.url);
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(code, 2, "stderr:\n{err}");
    assert!(err.contains("--force"), "message must name --force:\n{err}");
    assert_eq!(
        tree(&p.dst, "/replica"),
        before,
        "refused reload changed the replica"
    );
    assert_eq!(p.dst.get("/__replication/replica").as_deref(), Some("3"));

    let mut m = Mirror::start(
        &["--reload", "--src-prefix", "/conftool"],
        &p.src.url,
        &p.dst.url,
    );
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(
        code, 2,
        "empty source prefix over a populated replica; stderr:\n{err}"
    );
    assert!(err.contains("--force"), "message must name --force:\n{err}");
    assert_eq!(
        tree(&p.dst, "/replica"),
        before,
        "refused reload changed the replica"
    );
    assert_eq!(p.dst.get("/__replication/replica").as_deref(), Some("3"));

    let mut m = Mirror::start(
        &["--reload", "--force", "--src-prefix", "/conftool"],
        &p.src.url,
        &p.dst.url,
    );
    m.wait_for(
        Duration::from_secs(30),
        "forced reload empties the replica",
        || {
            tree(&p.dst, "/replica/conftool").is_empty()
                && replication_index(&p.dst, "/replica").is_some_and(|i| i > 3)
        },
    );
    p.src.set("/conftool/new", "n");
    m.wait_synced(
        &p.src,
        "/conftool",
        &p.dst,
        "/replica/conftool",
        "/replica",
        "write after forced reload",
    );
}

#[test]
fn reload_on_two_empty_clusters_needs_no_force() {
    let p = Pair::start("empty");
    let mut m = Mirror::start(&["--reload"], &p.src.url, &p.dst.url);
    m.wait_for(Duration::from_secs(30), "index created", || {
        replication_index(&p.dst, "/replica").is_some()
    });
    m.wait_log(Duration::from_secs(10), "Starting replication at");
    p.src.set("/first", "key");
    m.wait_synced(
        &p.src,
        "/",
        &p.dst,
        "/replica",
        "/replica",
        "first key after reload",
    );
}

#[test]
fn reload_skips_ignored_and_hidden_keys_and_keeps_replicating() {
    let p = Pair::start("reload-filter");
    p.src.set("/app/a", "1");
    p.src.set("/app/_hidden", "h");
    p.src.set("/spicerack/locks/etcd/x", "ignored");
    p.src.set("/__replication/replica", "12345");
    p.dst.set("/replica/app/a", "stale");
    p.dst.set("/replica/app/b", "extra");
    p.dst.set("/replica/app/c", "keep");
    p.src.set("/app/c", "keep");
    p.src.set("/app/d", "keep");
    p.dst.set("/replica/app/_dst_hidden", "dst hidden");
    let snapshot = p.src.current_index();
    let mut m = Mirror::start(
        &[
            "--reload",
            "--src-ignore-keys-regex",
            "/spicerack/locks/etcd(/.*)?",
        ],
        &p.src.url,
        &p.dst.url,
    );
    m.wait_for(Duration::from_secs(30), "reload done", || {
        replication_index(&p.dst, "/replica").is_some_and(|i| i >= snapshot)
    });
    let want: BTreeMap<String, Option<String>> = [
        ("/replica/app", None),
        ("/replica/app/a", Some("1")),
        ("/replica/app/c", Some("keep")),
        ("/replica/app/d", Some("keep")),
        // the parents of the ignored key are not ignored themselves
        ("/replica/spicerack", None),
        ("/replica/spicerack/locks", None),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
    .collect();
    let now = tree(&p.dst, "/replica");
    assert!(now == want, "{}", tree_diff(&want, &now));
    assert!(!p.dst.exists("/replica/app/_hidden"));
    assert!(!p.dst.exists("/replica/spicerack/locks/etcd/x"));
    assert!(!p.dst.exists("/replica/__replication"));
    assert_eq!(
        p.dst.get("/replica/app/_dst_hidden").as_deref(),
        Some("dst hidden")
    );
    let idx = replication_index(&p.dst, "/replica").unwrap();
    assert!(idx < 12345, "index copied from the source's /__replication");
    p.src.set("/app/e", "live");
    m.wait_index(&p.dst, "/replica", p.src.current_index());
    assert_eq!(p.dst.get("/replica/app/e").as_deref(), Some("live"));
}

#[test]
fn dry_run_prints_plan_and_writes_nothing() {
    let p = Pair::start("dryrun");
    // source: 5 unchanged, 2 to update, 4 to create
    for i in 0..11 {
        p.src.set(&format!("/app/k{i:02}"), &format!("v{i}"));
    }
    // destination: 5 identical, 2 differing, 1 extra (to delete)
    for i in 0..7 {
        let v = if i < 5 {
            format!("v{i}")
        } else {
            "stale".into()
        };
        p.dst.set(&format!("/replica/app/k{i:02}"), &v);
    }
    p.dst.set("/replica/app/extra", "x");
    p.dst.set("/__replication/replica", "2");
    let before = tree(&p.dst, "/");
    let dst_index_before = p.dst.current_index();

    let mut m = Mirror::start(
        &["--reload", "--dry-run", "--src-prefix", "/app"],
        &p.src.url,
        &p.dst.url,
    );
    let code = m.wait_exit(Duration::from_secs(30));
    let out = m.stdout() + &m.stderr();
    assert_eq!(code, 0, "output:\n{out}");
    assert_eq!(tree(&p.dst, "/"), before, "dry run changed the destination");
    assert_eq!(p.dst.get("/__replication/replica").as_deref(), Some("2"));
    assert_eq!(
        p.dst.current_index(),
        dst_index_before,
        "dry run wrote to the destination (its X-Etcd-Index moved)"
    );
    // the plan: 4 creates, 2 updates, 1 delete
    assert!(
        mentions_count(&out, "create", 4),
        "plan must count 4 creates:\n{out}"
    );
    assert!(
        mentions_count(&out, "update", 2),
        "plan must count 2 updates:\n{out}"
    );
    assert!(
        mentions_count(&out, "delete", 1),
        "plan must count 1 delete:\n{out}"
    );
}

#[test]
fn reload_cut_short_by_a_crash_needs_another_reload() {
    let p = Pair::start("reload-crash");
    let items: Vec<(String, String)> = (0..8000)
        .map(|i| (format!("/app/d{}/k{i:05}", i % 10), format!("v{i}")))
        .collect();
    write_parallel(&p.src, &items, 6);
    p.dst.set("/replica/app/old", "x");
    for (k, v) in &items[..5] {
        p.dst.set(&k.replacen("/app", "/replica/app", 1), v);
    }
    set_replication_index(&p.dst, "/replica", 3);
    let mut m = Mirror::start(&["--reload"], &p.src.url, &p.dst.url);
    // the reload removes the index before its first write; kill it in the middle
    m.wait_for(
        Duration::from_secs(60),
        "reload removes the index key",
        || replication_index(&p.dst, "/replica").is_none(),
    );
    m.wait_for(Duration::from_secs(60), "reload wrote something", || {
        p.dst.exists("/replica/app/d5") || p.dst.exists("/replica/app/d9")
    });
    m.kill();
    assert!(
        replication_index(&p.dst, "/replica").is_none(),
        "the reload finished before it could be killed: the test proves nothing"
    );
    let partial = tree(&p.dst, "/replica").len();
    println!("killed the reload with {partial} destination keys");

    // a plain restart refuses to replay onto the half-copied tree
    let mut m = Mirror::start(&[], &p.src.url, &p.dst.url);
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(code, 2, "stderr:\n{err}");
    assert!(
        err.contains("--reload"),
        "message must mention --reload:\n{err}"
    );

    // another --reload finishes the job
    let mut m = Mirror::start(&["--reload"], &p.src.url, &p.dst.url);
    m.wait_for(Duration::from_secs(120), "second reload done", || {
        replication_index(&p.dst, "/replica").is_some()
    });
    p.src.set("/app/after", "a");
    m.wait_synced(
        &p.src,
        "/",
        &p.dst,
        "/replica",
        "/replica",
        "reload after a crashed reload",
    );
}

/// Issue 8, 5b: type changes with children, both ways, including a destination directory
/// that holds a hidden key the reload does not own (a value cannot keep it) and nesting
/// several levels deep. No exit 3, and the index is written only at the end.
#[test]
fn reload_turns_values_into_directories_and_back() {
    let p = Pair::start("reload-kinds");
    // /app/d is a directory with a child on the source, a value on the destination;
    // /app/e is a value on the source, a directory with children on the destination.
    p.src.set("/app/d/x", "1");
    p.src.set("/app/e", "2");
    p.src.set("/app/f", "3");
    p.src.set("/app/g/h/i", "4");
    p.src.set("/app/h", "5");
    p.dst.set("/replica/d", "was a value");
    p.dst.set("/replica/e/y/z", "was below a directory");
    p.dst.set(
        "/replica/e/_lock",
        "hidden, below a directory that becomes a value",
    );
    p.dst.set("/replica/f", "3");
    p.dst.set("/replica/g", "was a value");
    p.dst.set("/replica/h/i/j", "deep");
    p.dst.set("/replica/h/i/_k", "hidden and deep");
    set_replication_index(&p.dst, "/replica", 1);
    let snapshot = p.src.current_index();
    let mut m = Mirror::start(
        &["--reload", "--force", "--src-prefix", "/app", "--strip"],
        &p.src.url,
        &p.dst.url,
    );
    let done = poll_until(Duration::from_secs(30), || {
        replication_index(&p.dst, "/replica").is_some_and(|i| i >= snapshot) || !m.is_alive()
    });
    assert!(
        done && m.is_alive(),
        "reload did not finish:\n{}",
        tail(&m.stderr(), 20)
    );
    let want: BTreeMap<String, Option<String>> = [
        ("/replica/d", None),
        ("/replica/d/x", Some("1")),
        ("/replica/e", Some("2")),
        ("/replica/f", Some("3")),
        ("/replica/g", None),
        ("/replica/g/h", None),
        ("/replica/g/h/i", Some("4")),
        ("/replica/h", Some("5")),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
    .collect();
    let now = tree(&p.dst, "/replica");
    assert!(now == want, "{}", tree_diff(&want, &now));
    p.src.set("/app/e", "2b");
    p.src.set("/app/g/h/i2", "6");
    m.wait_synced(
        &p.src,
        "/app",
        &p.dst,
        "/replica",
        "/replica",
        "type changes",
    );
}

/// Writers that keep a server busy at about `rate` writes a second in all (spread over
/// `threads`), until stopped; `write(client, n)` makes write number n.
struct Load {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(
        c: &Client,
        threads: usize,
        rate: f64,
        write: impl Fn(&Client, usize) + Send + Sync + 'static,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let write = Arc::new(write);
        let per_thread = rate / threads as f64;
        let threads = (0..threads)
            .map(|_| {
                let (c, stop, count, write) =
                    (c.clone(), stop.clone(), count.clone(), write.clone());
                std::thread::spawn(move || {
                    let mut start = Instant::now();
                    let mut n = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        // Pacing, not synchronisation: write n is due at start + n / rate.
                        let due = start + Duration::from_secs_f64(f64::from(n) / per_thread);
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        } else if now - due > Duration::from_secs(1) {
                            (start, n) = (now, 0);
                        }
                        write(&c, count.fetch_add(1, Ordering::Relaxed));
                        n += 1;
                    }
                })
            })
            .collect();
        Load {
            stop,
            count,
            threads,
        }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Stop and wait for the writers; returns how many writes they made.
    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("load writer panicked");
        }
        self.count()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Issue 8, 5a: a reload of 20,000 keys takes far longer than the source needs to write
/// 1000 events, so the first pass's listing leaves the history long before it ends. The
/// reload lists and diffs again until a pass ends inside the window, then replicates.
#[test]
fn reload_of_20000_keys_converges_while_the_source_is_busy() {
    const N: usize = 20_000;
    let p = Pair::start("reload-busy");
    let t = Instant::now();
    let items: Vec<(String, String)> = (0..N)
        .map(|i| (format!("/big/d{:02}/k{i:05}", i % 20), format!("v{i}")))
        .collect();
    write_parallel(&p.src, &items, 6);
    println!("wrote {N} keys in {:.1} s", t.elapsed().as_secs_f64());

    // 500 writes/s outside the prefix, 50/s under it: updates, creates and deletes.
    let noise = Load::start(&p.src, 4, 500.0, |c, i| {
        c.set(&format!("/noise/n{:03}", i % 1000), &i.to_string());
    });
    let inside = Load::start(&p.src, 1, 50.0, |c, i| {
        let j = i.wrapping_mul(7919) % N;
        let key = format!("/big/d{:02}/k{j:05}", j % 20);
        match i % 10 {
            0..=6 => drop(c.set(&key, &format!("u{i}"))),
            7 | 8 => drop(c.set(&format!("/big/new/n{i:05}"), "n")),
            _ => drop(c.delete(&key, &[])),
        }
    });
    let t = Instant::now();
    let mut m = Mirror::start(
        &["--reload", "--src-prefix", "/big"],
        &p.src.url,
        &p.dst.url,
    );
    m.wait_for(Duration::from_secs(150), "the reload to finish", || {
        replication_index(&p.dst, "/replica").is_some()
    });
    let reload_secs = t.elapsed().as_secs_f64();
    let log = m.stderr();
    let passes = log.lines().filter(|l| l.contains("reload of /big")).count();
    for line in log
        .lines()
        .filter(|l| l.contains("reload") || l.contains("listing"))
    {
        println!("{line}");
    }
    println!(
        "reload took {reload_secs:.1} s in {passes} passes; the source took {} + {} writes",
        noise.count(),
        inside.count()
    );
    assert!(
        passes >= 2,
        "one pass cannot have ended inside the history window on this source:\n{}",
        tail(&log, 20)
    );
    // Replication goes on under the same load from where the reload left it.
    let later = p.src.current_index() + 2000;
    wait_until(Duration::from_secs(30), "the source to move on", || {
        p.src.current_index() >= later
    });
    m.wait_index(&p.dst, "/replica", later);
    let (a, b) = (noise.stop(), inside.stop());
    println!("writers stopped after {a} + {b} writes");
    m.wait_synced(
        &p.src,
        "/big",
        &p.dst,
        "/replica/big",
        "/replica",
        "a reload on a busy source",
    );
}

/// A read-only user on the destination: its refusal (etcd 110) is about credentials, not
/// about the key's state, so it is no inconsistency (exit 3) and names the etcd code.
#[test]
fn a_write_refused_for_another_reason_is_not_an_inconsistency() {
    let p = Pair::start("reload-ro");
    p.src.set("/app/k", "v");
    set_replication_index(&p.dst, "/replica", 1);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let call = |method: &str, path: &str, body: &str, user: Option<&str>| {
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", p.dst.url));
        if let Some(u) = user {
            req = req.header("Authorization", format!("Basic {}", base64(u.as_bytes())));
        }
        let mut resp = agent.run(req.body(body.to_string()).unwrap()).unwrap();
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        assert!(status < 300, "{method} {path}: {status} {text}");
    };
    call(
        "PUT",
        "/v2/auth/users/root",
        r#"{"user":"root","password":"rootpw"}"#,
        None,
    );
    call(
        "PUT",
        "/v2/auth/roles/reader",
        r#"{"role":"reader","permissions":{"kv":{"read":["/*"],"write":[]}}}"#,
        None,
    );
    call(
        "PUT",
        "/v2/auth/users/ro",
        r#"{"user":"ro","password":"ropw","roles":["reader"]}"#,
        None,
    );
    call("PUT", "/v2/auth/enable", "", None);
    call(
        "PUT",
        "/v2/auth/roles/guest",
        r#"{"role":"guest","revoke":{"kv":{"read":["/*"],"write":["/*"]}}}"#,
        Some("root:rootpw"),
    );
    let mut m = Mirror::start(
        &["--reload"],
        &p.src.url,
        &p.dst.url_with_auth("ro", "ropw"),
    );
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(code, 2, "stderr:\n{err}");
    assert!(
        err.contains("etcd error 110") && err.contains("check the user and password"),
        "the message must name the etcd code and what to check:\n{err}"
    );
    assert!(!err.contains("inconsistency"), "{err}");
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Issue 8, 5c: the response to one reload write is lost (the proxy swallows it); the
/// mirror retries and finds the key already holding what it wanted.
#[test]
fn a_lost_response_during_a_reload_is_recognised() {
    let p = Pair::start("reload-lost");
    for i in 0..20 {
        p.src.set(&format!("/app/k{i:02}"), &format!("v{i}"));
    }
    p.dst.set("/replica/app/k05", "stale");
    set_replication_index(&p.dst, "/replica", 1);
    let proxy = Proxy::start_with(
        p.dst.addr(),
        Faults {
            drop_responses: 1,
            drop_matching: "PUT /v2/keys/replica/app/".into(),
            ..Faults::default()
        },
    );
    let mut m = Mirror::start(&["--reload"], &p.src.url, &proxy.url());
    m.wait_for(Duration::from_secs(100), "the reload to finish", || {
        replication_index(&p.dst, "/replica").is_some_and(|i| i > 1)
    });
    assert_eq!(
        proxy.faults().drop_responses,
        0,
        "no response was dropped: the test proves nothing"
    );
    let log = m.stderr();
    assert!(log.contains("already holds"), "{}", tail(&log, 20));
    p.src.set("/app/after", "a");
    m.wait_synced(
        &p.src,
        "/",
        &p.dst,
        "/replica",
        "/replica",
        "a lost response",
    );
}

/// Issue 8, 5c: a reload killed (SIGKILL) after part of its writes, twice, at different
/// stages of the plan, is finished by running it again; creates, updates, deletes and type
/// changes both ways (with keys the reload does not own below a directory that becomes a
/// value) are all in the plan.
#[test]
fn a_reload_killed_midway_is_finished_by_running_it_again() {
    let p = Pair::start("reload-rerun");
    let mut src = Vec::new();
    let mut dst = Vec::new();
    for i in 0..1500 {
        src.push((format!("/app/d{}/k{i:04}", i % 10), format!("v{i}")));
        if i % 3 == 0 {
            let v = if i % 2 == 0 {
                format!("v{i}")
            } else {
                "stale".into()
            };
            dst.push((format!("/replica/app/d{}/k{i:04}", i % 10), v));
        }
    }
    for i in 0..300 {
        dst.push((format!("/replica/app/gone{}/g{i:04}", i % 4), "x".into()));
    }
    for i in 0..30 {
        // a directory with children on the source, a value on the destination
        src.push((format!("/app/t{i:02}/x/y"), "dir now".into()));
        dst.push((format!("/replica/app/t{i:02}"), "was a value".into()));
        // a value on the source, a directory with children (one hidden) on the destination
        src.push((format!("/app/u{i:02}"), "value now".into()));
        dst.push((format!("/replica/app/u{i:02}/a/b"), "was below".into()));
        dst.push((format!("/replica/app/u{i:02}/_lock"), "hidden".into()));
    }
    std::thread::scope(|s| {
        s.spawn(|| write_parallel(&p.src, &src, 4));
        s.spawn(|| write_parallel(&p.dst, &dst, 4));
    });
    set_replication_index(&p.dst, "/replica", 1);

    let mut dry = Mirror::start(&["--reload", "--dry-run"], &p.src.url, &p.dst.url);
    assert_eq!(
        dry.wait_exit(Duration::from_secs(60)),
        0,
        "{}",
        dry.stderr()
    );
    let plan = dry.stdout();
    let count = |kind: &str| plan.lines().filter(|l| l.starts_with(kind)).count();
    let writes = count("create ") + count("update ") + 2 * count("replace ") + count("delete ");
    println!("plan: {}", plan.lines().next().unwrap_or(""));
    assert!(count("replace ") == 60 && count("update ") > 0 && count("delete ") > 300);

    // Kill the first run after 40% of its writes (creates), the second at 70% of what is
    // left (deletes and type changes), and let the third finish.
    let mut left = writes;
    for share in [0.4, 0.7] {
        let start = p.dst.current_index();
        let target = start + (left as f64 * share) as u64;
        let mut m = Mirror::start(&["--reload"], &p.src.url, &p.dst.url);
        m.wait_for(Duration::from_secs(120), "part of the writes", || {
            p.dst.current_index() >= target
        });
        m.kill();
        assert!(
            replication_index(&p.dst, "/replica").is_none(),
            "the reload finished before it was killed: the test proves nothing"
        );
        let done = p.dst.current_index() - start;
        println!("killed a reload after {done} of {left} writes");
        left = left.saturating_sub(done as usize);
    }
    let mut m = Mirror::start(&["--reload"], &p.src.url, &p.dst.url);
    m.wait_for(
        Duration::from_secs(120),
        "the third reload to finish",
        || replication_index(&p.dst, "/replica").is_some(),
    );
    let now = tree(&p.dst, "/replica/app");
    let want: BTreeMap<String, Option<String>> = tree(&p.src, "/app")
        .into_iter()
        .map(|(k, v)| (format!("/replica{k}"), v))
        .collect();
    assert!(now == want, "{}", tree_diff(&want, &now));
    // the hidden key went with the directory that became a value
    assert_eq!(p.dst.get("/replica/app/u00").as_deref(), Some("value now"));
    p.src.set("/app/t00/x/after", "a");
    p.src.set("/app/u00", "changed");
    m.wait_synced(
        &p.src,
        "/",
        &p.dst,
        "/replica",
        "/replica",
        "reruns after kills",
    );
}

/// Issue 8, 5d: most keys expired on the source (a mass TTL expiry while the mirror was
/// down); the guard refuses the reload, says why and what to run.
#[test]
fn after_a_mass_expiry_the_guard_says_why_and_what_to_run() {
    let p = Pair::start("reload-expiry");
    for i in 0..30 {
        let key = format!("/app/lease{i:02}");
        p.src
            .put(&key, &[("value", "held"), ("ttl", "1")])
            .expect_ok();
        p.dst.set(&format!("/replica{key}"), "held");
    }
    for i in 0..10 {
        p.src.set(&format!("/app/keep{i}"), "k");
        p.dst.set(&format!("/replica/app/keep{i}"), "k");
    }
    set_replication_index(&p.dst, "/replica", 1);
    wait_until(Duration::from_secs(10), "the leases to expire", || {
        tree(&p.src, "/app").len() == 10
    });
    let before = tree(&p.dst, "/");

    let mut m = Mirror::start(&["--reload"], &p.src.url, &p.dst.url);
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(code, 2, "stderr:\n{err}");
    for needle in [
        "30 of the 41 keys",
        "lost most of its keys",
        "TTL expiry",
        "--src-prefix",
        "--reload --dry-run",
        "--force",
    ] {
        assert!(err.contains(needle), "{needle:?} missing:\n{err}");
    }
    assert_eq!(tree(&p.dst, "/"), before, "a refused reload wrote");

    // What the message suggests: the plan, then the reload with --force.
    let mut m = Mirror::start(&["--reload", "--dry-run"], &p.src.url, &p.dst.url);
    assert_eq!(m.wait_exit(Duration::from_secs(30)), 0, "{}", m.stderr());
    let out = m.stdout();
    assert!(mentions_count(&out, "delete", 30), "{out}");
    assert!(
        out.contains("--force"),
        "the dry run says a reload needs --force:\n{out}"
    );
    assert_eq!(tree(&p.dst, "/"), before, "a dry run wrote");
    let mut m = Mirror::start(&["--reload", "--force"], &p.src.url, &p.dst.url);
    m.wait_for(Duration::from_secs(30), "the forced reload", || {
        replication_index(&p.dst, "/replica").is_some_and(|i| i > 1)
    });
    assert_eq!(rel_tree(&p.src, "/"), rel_tree(&p.dst, "/replica"));
}
