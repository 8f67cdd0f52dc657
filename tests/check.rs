//! `--check` on real etcd: equal trees, each kind of difference, hidden and ignored keys, a
//! replica that lags and catches up while the mirror runs, one that does not, an unreachable
//! side; the exit codes and output of a monitoring plugin, and not one write.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

const IGNORE: &str = "/app/ignored(/.*)?";

/// What one `--check` run gave.
struct Checked {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Checked {
    /// The one status line.
    #[track_caller]
    fn line(&self) -> &str {
        let lines: Vec<&str> = self.stdout.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "one line on stdout, got:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        lines[0]
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "not one JSON document ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    #[track_caller]
    fn expect(&self, code: i32, start: &str) -> &Self {
        let first = self.stdout.lines().next().unwrap_or_default();
        assert!(
            self.code == code && (first.starts_with(start) || self.stdout.contains(start)),
            "expected exit {code} and {start:?}, got exit {}:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }
}

fn spawn_check(args: &[&str], src: &str, dst: &str) -> Mirror {
    let mut all: Vec<String> = vec!["--check".into()];
    all.extend(args.iter().map(|s| s.to_string()));
    all.push(src.into());
    all.push(dst.into());
    Mirror::spawn(all)
}

fn check(args: &[&str], src: &str, dst: &str) -> Checked {
    let mut m = spawn_check(args, src, dst);
    let code = m.wait_exit(Duration::from_secs(120));
    Checked {
        code,
        stdout: m.stdout(),
        stderr: m.stderr(),
    }
}

/// The differences of a `--json` document as (key, kind, confirmed).
fn differences(doc: &Value) -> Vec<(String, String, bool)> {
    doc["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| {
            (
                d["key"].as_str().unwrap().to_string(),
                d["kind"].as_str().unwrap().to_string(),
                d["confirmed"].as_bool().unwrap(),
            )
        })
        .collect()
}

const ODD_KEY: &str = "/app/sp ace&=?%";
const ODD_VALUE: &str = "a\nb é&=+ ";

/// A tree under `/app` with hidden, ignored and outside keys, which the check must not count.
fn source_tree(src: &Client) {
    src.set("/app/a", "1");
    src.set("/app/dir/b", "2");
    src.set("/app/dir/e", "");
    src.mkdir("/app/empty");
    src.set(ODD_KEY, ODD_VALUE);
    src.set("/app/_hidden", "h");
    // A hidden write creates its visible directory: the replica has it too.
    src.set("/app/d2/_lock", "l");
    src.set("/app/ignored/x", "i");
    src.set("/other/o", "outside the prefix");
}

/// The same visible tree under `root` on a replica, with hidden and ignored keys of its own.
fn replica_tree(dst: &Client, root: &str) {
    let r = |k: &str| {
        format!(
            "{}{}",
            root.trim_end_matches('/'),
            k.trim_start_matches("/app")
        )
    };
    dst.set(&r("/app/a"), "1");
    dst.set(&r("/app/dir/b"), "2");
    dst.set(&r("/app/dir/e"), "");
    dst.mkdir(&r("/app/empty"));
    dst.set(&r(ODD_KEY), ODD_VALUE);
    dst.mkdir(&r("/app/d2"));
    dst.set(&r("/app/_secret"), "hidden on the replica");
    dst.set(&r("/app/ignored/y"), "mirrors an ignored source key");
}

#[test]
fn equal_trees_are_ok_whatever_hidden_ignored_and_outside_keys_hold() {
    let p = Pair::start("check-equal");
    source_tree(&p.src);
    replica_tree(&p.dst, "/replica/app");
    p.dst
        .set("/replica/elsewhere", "outside the replica's subtree");
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    let root = Etcd::start("check-equal-root");
    replica_tree(&root, "/");
    root.set("/_hidden_at_the_root", "x");
    set_replication_index(&root, "/", p.src.current_index());

    let before = (
        p.src.current_index(),
        p.dst.current_index(),
        root.current_index(),
    );
    let flags = ["--src-prefix", "/app", "--src-ignore-keys-regex", IGNORE];
    let c = check(&flags, &p.src.url, &p.dst.url);
    c.expect(0, "OK: 7 keys equal");
    assert!(
        c.line()
            .ends_with("| keys=7 differences=0 unconfirmed=0 lag=0"),
        "{}",
        c.line()
    );
    assert!(
        c.stderr.trim().is_empty(),
        "a check is quiet on stderr: {}",
        c.stderr
    );

    let mut json = flags.to_vec();
    json.push("--json");
    let doc = check(&json, &p.src.url, &p.dst.url)
        .expect(0, "\"OK\"")
        .json();
    assert_eq!(doc["status"], "OK");
    assert_eq!(doc["code"], 0);
    assert_eq!(doc["keys"], 7);
    assert_eq!(doc["replica"]["root"], "/replica/app");
    assert_eq!(differences(&doc), vec![]);

    // The destination's root holds the tree, next to /__replication and a hidden key.
    let mut strip = flags.to_vec();
    strip.extend(["--dst-prefix", "/", "--strip"]);
    check(&strip, &p.src.url, &root.url).expect(0, "OK: 7 keys equal");

    let after = (
        p.src.current_index(),
        p.dst.current_index(),
        root.current_index(),
    );
    assert_eq!(before, after, "a check wrote to a cluster");
}

#[test]
fn each_kind_of_difference_is_critical_and_listed_in_json() {
    let p = Pair::start("check-kinds");
    let (s, d) = (&p.src, &p.dst);
    s.set("/app/same", "1");
    s.set("/app/differs", "on the source");
    s.set("/app/missing", "m");
    s.mkdir("/app/emptydir");
    s.set("/app/val", "v");
    s.set("/app/ws", "x");
    s.set("/app/_hidden", "only on the source");
    s.set("/app/ignored/k", "only on the source");
    s.set("/other", "outside");
    d.set("/replica/app/same", "1");
    d.set("/replica/app/differs", "on the replica");
    d.set("/replica/app/emptydir", "a value");
    d.mkdir("/replica/app/val");
    d.set("/replica/app/ws", "x\n");
    d.set("/replica/app/extra", "e");
    d.set("/replica/app/extradir/c", "c");
    d.set("/replica/app/_secret", "only on the replica");
    d.set("/replica/app/ignored/z", "only on the replica");
    set_replication_index(d, "/replica", s.current_index());
    let before = (s.current_index(), d.current_index());

    let flags = ["--src-prefix", "/app", "--src-ignore-keys-regex", IGNORE];
    let mut json = flags.to_vec();
    json.push("--json");
    let doc = check(&json, &s.url, &d.url)
        .expect(2, "\"CRITICAL\"")
        .json();
    assert_eq!(doc["status"], "CRITICAL");
    let want: Vec<(String, String, bool)> = [
        ("differs", "value_differs"),
        ("emptydir", "value_vs_directory"),
        ("extra", "extra_on_replica"),
        ("extradir", "extra_on_replica"),
        ("extradir/c", "extra_on_replica"),
        ("missing", "missing_on_replica"),
        ("val", "value_vs_directory"),
        ("ws", "value_differs"),
    ]
    .iter()
    .map(|(k, kind)| (format!("/replica/app/{k}"), kind.to_string(), true))
    .collect();
    assert_eq!(differences(&doc), want, "{doc:#}");
    let by_key = |k: &str| {
        doc["differences"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["key"] == k)
            .cloned()
            .unwrap()
    };
    let differs = by_key("/replica/app/differs");
    assert_eq!(differs["source_key"], "/app/differs");
    assert_eq!(differs["source"]["value"], "on the source");
    assert_eq!(differs["replica"]["value"], "on the replica");
    assert_eq!(by_key("/replica/app/ws")["replica"]["value"], "x\n");
    assert_eq!(by_key("/replica/app/emptydir")["source"]["dir"], true);
    assert_eq!(by_key("/replica/app/val")["replica"]["dir"], true);
    assert_eq!(by_key("/replica/app/missing")["replica"], Value::Null);
    assert_eq!(by_key("/replica/app/extra")["source"], Value::Null);
    // Keys only on the replica need a second read, one GET per key: it proves they stay.
    assert_eq!(doc["reads"], 2);

    let c = check(&flags, &s.url, &d.url);
    c.expect(
        2,
        "CRITICAL: 8 keys differ: \"/replica/app/differs\" value differs, ",
    );
    assert!(
        c.line().contains("| keys=6 differences=8 unconfirmed=0"),
        "{}",
        c.line()
    );

    assert_eq!(
        before,
        (s.current_index(), d.current_index()),
        "a check wrote"
    );
}

/// Stop the mirror, make the source move with `write`, start a check, and start the mirror
/// again once the check has made its first read: the check must end OK. Returns the check's
/// document and its debug log.
fn lag_then_catch_up(
    p: &Pair,
    mirror: &mut Mirror,
    args: &[&str],
    write: impl FnOnce(),
    first_read: &str,
) -> (Value, String) {
    mirror.kill();
    write();
    let mut check_args = vec!["-d", "--json", "--check-wait", "90"];
    check_args.extend(args);
    let mut c = spawn_check(&check_args, &p.src.url, &p.dst.url);
    c.wait_log(Duration::from_secs(30), "first read: ");
    assert!(
        c.stderr().contains(first_read),
        "the replica was behind at the first read ({first_read:?}):\n{}",
        c.stderr()
    );
    *mirror = Mirror::spawn(
        args.iter()
            .chain([&p.src.url.as_str(), &p.dst.url.as_str()])
            .map(|s| s.to_string())
            .collect(),
    );
    let code = c.wait_exit(Duration::from_secs(120));
    let out = Checked {
        code,
        stdout: c.stdout(),
        stderr: c.stderr(),
    };
    let doc = out.expect(0, "\"OK\"").json();
    assert_eq!(doc["caught_up"], true);
    // The mirror ran beside the check, on its own metrics port, all along.
    mirror.assert_alive("beside the check");
    (doc, out.stderr)
}

#[test]
fn a_lagging_replica_that_catches_up_inside_the_wait_is_ok() {
    let p = Pair::start("check-lag");
    let port = free_port().to_string();
    // The check gets the mirror's own arguments, metrics port included, as in the runbook.
    let args = ["--src-prefix", "/app", "--port", port.as_str()];
    for i in 0..20 {
        p.src.set(&format!("/app/old/k{i}"), "1");
    }
    set_replication_index(&p.dst, "/replica", 0);
    let mut mirror = Mirror::spawn(
        ["--reload"]
            .iter()
            .chain(&args)
            .chain([&p.src.url.as_str(), &p.dst.url.as_str()])
            .map(|s| s.to_string())
            .collect(),
    );
    mirror.wait_log(Duration::from_secs(30), "Starting replication at");
    mirror.wait_synced(
        &p.src,
        "/app",
        &p.dst,
        "/replica/app",
        "/replica",
        "the reload",
    );

    // A few directories: the differences are read again one GET per directory and side.
    let (doc, log) = lag_then_catch_up(
        &p,
        &mut mirror,
        &args,
        || {
            for i in 0..50 {
                p.src.set(&format!("/app/new/k{i:02}"), &format!("v{i}"));
            }
            p.src.set("/app/old/k0", "changed");
            p.src.delete("/app/old/k1", &[]).expect_ok();
        },
        "first read: 53 of 71 keys differ",
    );
    assert_eq!(doc["lagging"], 53, "{doc:#}");
    assert!(log.contains("read 2 (6 directories)"), "{log}");
    assert!(
        doc["message"]
            .as_str()
            .unwrap()
            .contains("(53 keys caught up during the check)"),
        "{doc:#}"
    );

    // More directories than the limit: both trees are listed again.
    let (doc, log) = lag_then_catch_up(
        &p,
        &mut mirror,
        &args,
        || {
            for i in 0..300 {
                p.src.set(&format!("/app/wide/d{i:03}/k"), &format!("v{i}"));
            }
        },
        "first read: 601 of 672 keys differ",
    );
    assert_eq!(doc["lagging"], 601, "{doc:#}");
    assert!(log.contains("read 2 (two listings)"), "{log}");
}

#[test]
fn a_replica_that_does_not_reach_the_source_index_is_a_warning() {
    let p = Pair::start("check-behind");
    p.src.set("/app/a", "1");
    p.dst.set("/replica/app/a", "1");
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    let flags = ["--src-prefix", "/app", "--check-wait", "1"];

    // Equal, but the source moved (outside the prefix) and no mirror records it.
    p.src.set("/other", "x");
    check(&flags, &p.src.url, &p.dst.url).expect(
        1,
        "WARNING: no difference in 1 key, but the replication index",
    );

    // A key written after the index cannot be told from lag: not CRITICAL.
    p.src.set("/app/new", "n");
    let mut json = flags.to_vec();
    json.push("--json");
    let doc = check(&json, &p.src.url, &p.dst.url)
        .expect(1, "\"WARNING\"")
        .json();
    assert_eq!(
        differences(&doc),
        vec![(
            "/replica/app/new".into(),
            "missing_on_replica".into(),
            false
        )]
    );
    assert_eq!(doc["caught_up"], false);

    // An index ahead of the source: the source was restored, or is another cluster.
    set_replication_index(&p.dst, "/replica", p.src.current_index() + 1000);
    check(&flags, &p.src.url, &p.dst.url).expect(2, "CRITICAL: the replication index");
}

#[test]
fn an_unreachable_side_a_missing_index_or_a_bad_command_line_is_unknown() {
    let e = Etcd::start("check-unknown");
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let quick = ["--check-wait", "1"];
    set_replication_index(&e, "/replica", e.current_index());

    let c = check(&quick, &nobody, &e.url);
    c.expect(3, "UNKNOWN: ");
    assert!(c.line().contains(&nobody), "names the side: {}", c.line());
    let c = check(&quick, &e.url, &nobody);
    c.expect(3, "UNKNOWN: ");
    assert!(c.line().contains(&nobody), "names the side: {}", c.line());
    // --retry-timeout bounds the retries too, when it is the shorter.
    check(&["--retry-timeout", "0.5"], &nobody, &e.url).expect(3, "UNKNOWN: ");

    e.delete(&index_key("/replica"), &[]).expect_ok();
    check(&quick, &e.url, &e.url)
        .expect(3, "UNKNOWN: no replication index at /__replication/replica");

    check(&["--bogus"], &e.url, &e.url).expect(3, "UNKNOWN: ");
    check(&["--reload"], &e.url, &e.url).expect(3, "UNKNOWN: --check only reads");
    let doc = check(&["--json", "--check-wait", "x"], &e.url, &e.url)
        .expect(3, "\"UNKNOWN\"")
        .json();
    assert!(
        doc["message"].as_str().unwrap().contains("--check-wait"),
        "{doc}"
    );
    assert_eq!(doc["code"], 3);
}
