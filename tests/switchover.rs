//! `--reload-only` and the switchover of the replication direction (README, "Switchover"),
//! end to end on real etcd: A->B replicates; both read-only; stop A->B; B->A
//! `--reload-only --dry-run` shows an empty plan; `--reload-only` writes only the index on
//! A; B->A (without --reload) carries B's writes to A. Whole keyspace and a prefix.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::Duration;

/// What an empty `--dry-run` prints, and nothing else.
const EMPTY_PLAN: &str = "reload plan: 0 creates, 0 updates, 0 replaces, 0 deletes\n";

/// Holds a TCP port on every address, as a unit's metrics endpoint would: a one-shot run
/// given the same `--port` must not need it.
struct BusyPort {
    _listener: TcpListener,
    port: String,
}

impl BusyPort {
    fn new() -> BusyPort {
        let listener = TcpListener::bind("0.0.0.0:0").expect("bind 0.0.0.0:0");
        let port = listener.local_addr().unwrap().port().to_string();
        BusyPort {
            _listener: listener,
            port,
        }
    }
}

/// Run etcdmirror to its end with `extra` then `args`, from `src` into `dst`; (exit code,
/// stdout, stderr).
fn once(extra: &[&str], args: &[&str], src: &Etcd, dst: &Etcd) -> (i32, String, String) {
    let all: Vec<&str> = extra.iter().chain(args).copied().collect();
    let mut m = Mirror::start(&all, &src.url, &dst.url);
    let code = m.wait_exit(Duration::from_secs(30));
    (code, m.stdout(), m.stderr())
}

/// A tree without the keys the mirror never owns (`skip`: the ignored subtree).
fn owned(c: &Client, prefix: &str, skip: Option<&str>) -> BTreeMap<String, Option<String>> {
    rel_tree(c, prefix)
        .into_iter()
        .filter(|(k, _)| skip.is_none_or(|s| k != s && !k.starts_with(&format!("{s}/"))))
        .collect()
}

/// The switch of `args` from `from` into `to`, both read-only: the dry run prints an empty
/// plan, then `--reload-only` exits 0 having made exactly one write on `to`, to the index
/// key, whose value is `from`'s index. Both runs are given the port of a running unit.
/// Returns the action of that one write.
#[track_caller]
fn switch(from: &Etcd, to: &Etcd, args: &[&str], dst_prefix: &str) -> String {
    let busy = BusyPort::new();
    let port = ["--port", busy.port.as_str()];
    let before = to.current_index();
    let visible_before = tree(to, "/");
    let (code, out, err) = once(
        &[&["--reload-only", "--dry-run"], &port[..]].concat(),
        args,
        from,
        to,
    );
    assert_eq!(code, 0, "dry run: stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(out, EMPTY_PLAN, "the plan must be empty; stderr:\n{err}");
    assert_eq!(to.current_index(), before, "the dry run wrote");

    let (code, out, err) = once(&[&["--reload-only"], &port[..]].concat(), args, from, to);
    assert_eq!(code, 0, "--reload-only: stdout:\n{out}\nstderr:\n{err}");
    let key = index_key(dst_prefix);
    assert!(
        err.contains(&format!("recorded at {key}")) && !err.contains("Starting replication"),
        "--reload-only must record the index and not replicate:\n{err}"
    );
    assert!(!err.contains("serving /metrics"), "served metrics:\n{err}");
    // Exactly one write, and the history says which: the index key.
    assert_eq!(
        to.current_index(),
        before + 1,
        "--reload-only must make exactly one write on the new replica; stderr:\n{err}"
    );
    let wait_index = (before + 1).to_string();
    let ev = to.get_raw(
        "/",
        &[
            ("wait", "true"),
            ("recursive", "true"),
            ("waitIndex", wait_index.as_str()),
        ],
    );
    assert_eq!(
        ev.body["node"]["key"],
        Value::from(key.clone()),
        "{}",
        ev.body
    );
    assert_eq!(ev.body["node"]["modifiedIndex"], Value::from(before + 1));
    assert_eq!(
        replication_index(to, dst_prefix),
        Some(from.current_index()),
        "the index must be the new source's own (nothing wrote there since)"
    );
    assert_eq!(tree(to, "/"), visible_before, "a visible key changed");
    ev.body["action"].as_str().unwrap_or("").to_string()
}

/// Start `args` from `src` into `dst` without --reload, make `writes` on `src` (a `None`
/// value deletes), wait until `dst` holds them and the index has passed them, stop it.
#[track_caller]
fn replicate(
    src: &Etcd,
    dst: &Etcd,
    args: &[&str],
    (src_prefix, dst_prefix, skip): (&str, &str, Option<&str>),
    writes: &[(&str, Option<&str>)],
) {
    let mut m = Mirror::start(args, &src.url, &dst.url);
    m.wait_log(Duration::from_secs(10), "Starting replication at");
    for (k, v) in writes {
        match v {
            Some(v) => {
                src.set(k, v);
            }
            None => {
                src.delete(k, &[]).expect_ok();
            }
        }
    }
    let head = src.current_index();
    m.wait_index(dst, dst_prefix, head);
    let ok = poll_until(Duration::from_secs(10), || {
        owned(src, src_prefix, skip) == owned(dst, dst_prefix, skip)
    });
    let (a, b) = (owned(src, src_prefix, skip), owned(dst, dst_prefix, skip));
    assert!(ok, "replica differs (left = source): {}", tree_diff(&a, &b));
    let ignored = |k: &str| skip.is_some_and(|s| k.starts_with(&format!("{s}/")));
    for (k, v) in writes.iter().filter(|(k, _)| !ignored(k)) {
        let dk = k.replacen(
            src_prefix.trim_end_matches('/'),
            dst_prefix.trim_end_matches('/'),
            1,
        );
        assert_eq!(dst.get(&dk).as_deref(), *v, "{dk} on the replica");
    }
    m.assert_alive("replicating");
    m.terminate();
    m.wait_exit(Duration::from_secs(10));
}

/// The runbook's layout: `/` to `/` with the python-etcd locks ignored. Hidden keys (the
/// index under /__replication included) are never mirrored and never disturb the plan.
#[test]
fn switchover_of_the_whole_keyspace() {
    let a = Etcd::start("switch-root-a");
    let b = Etcd::start("switch-root-b");
    let ignored = "/spicerack/locks/etcd";
    let args = [
        "--src-prefix",
        "/",
        "--dst-prefix",
        "/",
        "--src-ignore-keys-regex",
        "/spicerack/locks/etcd(/.*)?",
        "--watch-timeout",
        "5",
    ];
    let map = ("/", "/", Some(ignored));
    a.set(
        "/conftool/v1/pools/eqiad/app/host1",
        "{\"pooled\": \"yes\"}",
    );
    a.set("/conftool/v1/pools/eqiad/app/host2", "{\"pooled\": \"no\"}");
    a.mkdir("/conftool/v1/empty");
    a.set("/spicerack/locks/etcd/a-lock", "held by A");
    a.set("/_hidden_on_a", "stays on A");

    // First load of the new replica: the one-liner of the README's Install section.
    let (code, out, err) = once(&["--reload-only"], &args, &a, &b);
    assert_eq!(code, 0, "first load: {out}\n{err}");
    assert_eq!(replication_index(&b, "/"), Some(a.current_index()));
    assert!(!b.exists("/_hidden_on_a") && !b.exists("/spicerack/locks/etcd/a-lock"));
    b.set("/_hidden_on_b", "stays on B");
    b.set("/spicerack/locks/etcd/b-lock", "held by B");

    replicate(
        &a,
        &b,
        &args,
        map,
        &[
            (
                "/conftool/v1/pools/eqiad/app/host2",
                Some("{\"pooled\": \"yes\"}"),
            ),
            ("/conftool/v1/pools/eqiad/app/host3", Some("new")),
            ("/conftool/v1/pools/eqiad/app/host1", None),
            ("/spicerack/locks/etcd/a-lock", Some("renewed on A")),
        ],
    );

    // Both read-only, A->B stopped: B->A finds nothing to write but its index.
    assert_eq!(switch(&b, &a, &args, "/"), "create");
    assert!(!a.exists("/_hidden_on_b"), "a hidden key was mirrored");
    assert_eq!(a.get("/_hidden_on_a").as_deref(), Some("stays on A"));
    assert_eq!(
        a.get("/spicerack/locks/etcd/a-lock").as_deref(),
        Some("renewed on A")
    );

    replicate(
        &b,
        &a,
        &args,
        map,
        &[
            ("/conftool/v1/pools/eqiad/app/host3", Some("changed on B")),
            ("/conftool/v1/pools/codfw/app/host9", Some("created on B")),
            ("/conftool/v1/pools/eqiad/app/host2", None),
        ],
    );
    assert_eq!(a.get("/_hidden_on_a").as_deref(), Some("stays on A"));
    assert!(!a.exists("/spicerack/locks/etcd/b-lock"));
    // A's stale lock state is its own business: the ignore rule applies both ways.
    assert_eq!(
        a.get("/spicerack/locks/etcd/a-lock").as_deref(),
        Some("renewed on A")
    );
}

/// `/conftool` to `/conftool` with --strip (the runbook's etcdmirror-conftool units), there
/// and back: the way back finds the index the first direction left on B and replaces it
/// in one write. A write on A that never reached B shows in the dry run, and letting A->B
/// catch up empties the plan again.
#[test]
fn switchover_of_a_prefix_and_back() {
    let a = Etcd::start("switch-prefix-a");
    let b = Etcd::start("switch-prefix-b");
    let args = [
        "--src-prefix",
        "/conftool",
        "--dst-prefix",
        "/conftool",
        "--strip",
        "--watch-timeout",
        "5",
    ];
    let map = ("/conftool", "/conftool", None);
    a.set("/conftool/v1/pools/x", "1");
    a.set("/conftool/v1/pools/y", "2");
    a.set("/outside/a-only", "A's own");
    b.set("/outside/b-only", "B's own");
    b.set("/conftool/v1/pools/y", "stale");
    let (code, out, err) = once(&["--reload-only"], &args, &a, &b);
    assert_eq!(code, 0, "first load: {out}\n{err}");
    assert_eq!(b.get("/conftool/v1/pools/y").as_deref(), Some("2"));

    replicate(
        &a,
        &b,
        &args,
        map,
        &[
            ("/conftool/v1/pools/z", Some("3")),
            ("/conftool/v1/pools/x", None),
        ],
    );

    // A write on A after the mirror stopped (A not read-only yet): the dry run shows that
    // the switch would revert it on A.
    a.set("/conftool/v1/pools/late", "never reached B");
    let (code, out, err) = once(&["--reload-only", "--dry-run"], &args, &b, &a);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("reload plan: 0 creates, 0 updates, 0 replaces, 1 deletes\n")
            && out.lines().any(|l| l == "delete /conftool/v1/pools/late"),
        "the dry run must show the late write:\n{out}"
    );
    // The remedy: let A->B catch up, stop it again.
    replicate(&a, &b, &args, map, &[]);
    assert_eq!(
        b.get("/conftool/v1/pools/late").as_deref(),
        Some("never reached B")
    );

    assert_eq!(switch(&b, &a, &args, "/conftool"), "create");
    replicate(
        &b,
        &a,
        &args,
        map,
        &[
            ("/conftool/v1/pools/x", Some("back on B")),
            ("/conftool/v1/pools/late", None),
        ],
    );
    assert_eq!(a.get("/outside/a-only").as_deref(), Some("A's own"));
    assert!(!a.exists("/outside/b-only"));

    // And back: B holds the index A->B left there; it is replaced, not deleted and created.
    assert_eq!(switch(&a, &b, &args, "/conftool"), "compareAndSwap");
    replicate(
        &a,
        &b,
        &args,
        map,
        &[("/conftool/v1/pools/y", Some("A again"))],
    );
    assert_eq!(b.get("/outside/b-only").as_deref(), Some("B's own"));
}

/// The port a one-shot run is given is the unit's: `--reload-only` does not serve metrics,
/// while a replicating run on a taken port exits 2 at once (so the port really is taken).
#[test]
fn reload_only_needs_no_metrics_port_and_exits_after_the_index() {
    let p = Pair::start("reload-only-port");
    p.src.set("/app/k", "v");
    let busy = BusyPort::new();
    let args = ["--src-prefix", "/app", "--port", busy.port.as_str()];
    let (code, _, err) = once(&[], &args, &p.src, &p.dst);
    assert_eq!(code, 2, "a taken port must fail the mirror:\n{err}");
    assert!(err.contains("cannot serve metrics"), "{err}");

    let (code, out, err) = once(&["--reload-only", "--reload"], &args, &p.src, &p.dst);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(p.dst.get("/replica/app/k").as_deref(), Some("v"));
    assert_eq!(
        replication_index(&p.dst, "/replica"),
        Some(p.src.current_index())
    );
    // The unit (no --reload) starts from that index and replicates what follows.
    let mut m = Mirror::start(&["--src-prefix", "/app"], &p.src.url, &p.dst.url);
    p.src.set("/app/after", "a");
    m.wait_synced(
        &p.src,
        "/app",
        &p.dst,
        "/replica/app",
        "/replica",
        "after --reload-only",
    );
}
