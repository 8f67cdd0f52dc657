//! A v3 side as operators run it (issue 10 on top of issue 9), on real etcd 3.4: a v3
//! source given as a 3-member list keeps replicating when the member in use is SIGKILLed;
//! a v3 destination list with a member of another cluster exits 2 at start; a v3
//! destination with etcd's v3 auth on replicates with the right password (the mirror gets
//! a token) and exits 2 naming the flags with a wrong one or none; both v3 sides over TLS
//! with client certificates replicate, and an untrusted v3 server exits 2 at start.

mod common;

use common::v3::{b64, V3};
use common::*;
use serde_json::json;
use std::time::Duration;

const DST_TREE: &str = "/replica/p/";

fn put_index(dst: &V3, value: u64) {
    dst.put(&index_key("/replica"), &value.to_string());
}

#[test]
fn v3_source_member_in_use_killed_replication_goes_on() {
    let mut cluster = Cluster::start("v3-members", 3);
    let dst = Etcd::start("v3-members-dst");
    let leader = cluster.leader();
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let order = [followers[0], followers[1], leader];
    let src = V3::new(&cluster.member(leader).url);
    let dst3 = V3::new(&dst.url);
    put_index(&dst3, src.revision());
    src.put("/p/k0", "0");
    let mut m = Mirror::start(
        &[
            "--src-api",
            "v3",
            "--dst-api",
            "v3",
            "--src-prefix",
            "/p",
            "--retry-timeout",
            "30",
        ],
        &cluster.urls(&order),
        &dst.url,
    );
    for i in 1..=20 {
        src.put(&format!("/p/k{i}"), &i.to_string());
    }
    m.wait_for(
        Duration::from_secs(20),
        "the first writes replicated",
        || dst3.get("/replica/p/k20").is_some(),
    );
    cluster.kill(order[0]);
    for i in 21..=60 {
        src.put(&format!("/p/k{i}"), &i.to_string());
    }
    src.delete("/p/k3");
    let head = src.revision();
    m.wait_for(
        Duration::from_secs(30),
        "replication after the kill",
        || v3::replication_index(&dst3, "/replica") == Some(head),
    );
    assert_eq!(src.rel_range("/p/"), dst3.rel_range(DST_TREE));
    assert_eq!(dst3.rel_range(DST_TREE).len(), 60);
    assert!(
        m.stderr().contains("moving from member"),
        "the move is logged:\n{}",
        tail(&m.stderr(), 20)
    );
    m.assert_alive("at the end");
}

#[test]
fn v3_destination_member_of_another_cluster_exits_2_at_start() {
    let cluster = Cluster::start("v3-other", 2);
    let other = Etcd::start("v3-other-single");
    let src = Etcd::start("v3-other-src");
    let list = format!("{},{},{}", cluster.urls(&[0, 1]), other.url, "");
    let list = list.trim_end_matches(',');
    let mut m = Mirror::start(&["--src-api", "v3", "--dst-api", "v3"], &src.url, list);
    let code = m.wait_exit(Duration::from_secs(30));
    assert_eq!(code, 2, "stderr:\n{}", m.stderr());
    assert!(
        m.stderr().contains("cluster"),
        "the message names the cluster mismatch:\n{}",
        m.stderr()
    );
}

/// Enable etcd's v3 auth with a root user and a user `mirror` that may read and write
/// every key; returns root's token.
fn enable_auth(c: &V3) -> String {
    c.ok(
        "auth/user/add",
        &json!({"name": "root", "password": "rootpw"}),
    );
    c.ok("auth/user/grant", &json!({"user": "root", "role": "root"}));
    c.ok(
        "auth/user/add",
        &json!({"name": "mirror", "password": "mpw"}),
    );
    c.ok("auth/role/add", &json!({"name": "rw"}));
    c.ok(
        "auth/role/grant",
        &json!({"name": "rw", "perm": {"permType": "READWRITE", "key": b64(b"/"), "range_end": b64(b"0")}}),
    );
    c.ok("auth/user/grant", &json!({"user": "mirror", "role": "rw"}));
    c.ok("auth/enable", &json!({}));
    let v = c.ok(
        "auth/authenticate",
        &json!({"name": "root", "password": "rootpw"}),
    );
    v["token"].as_str().expect("a token").to_string()
}

/// A v3 request with a token.
fn call_with(c: &V3, token: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build(),
    );
    let text = agent
        .post(format!("{}/v3/{path}", c.base))
        .header("Authorization", token)
        .send(body.to_string())
        .expect("request")
        .body_mut()
        .read_to_string()
        .expect("body");
    serde_json::from_str(&text).expect("json")
}

#[test]
fn v3_destination_with_auth_needs_the_right_password() {
    let src = Etcd::start("v3-auth-src");
    let dst = Etcd::start("v3-auth-dst");
    let (s3, d3) = (V3::new(&src.url), V3::new(&dst.url));
    s3.put("/p/a", "1");
    let root = enable_auth(&d3);
    let rev = s3.revision();
    call_with(
        &d3,
        &root,
        "kv/put",
        json!({"key": b64(index_key("/replica").as_bytes()), "value": b64(rev.to_string().as_bytes())}),
    );
    let scratch = Scratch::new("v3-auth");
    let good = scratch.path.join("good");
    let bad = scratch.path.join("bad");
    std::fs::write(&good, "mpw\n").unwrap();
    std::fs::write(&bad, "nope\n").unwrap();
    let base = ["--src-api", "v3", "--dst-api", "v3", "--src-prefix", "/p"];

    for (extra, what) in [
        (
            vec![
                "--dst-user",
                "mirror",
                "--dst-password-file",
                bad.to_str().unwrap(),
            ],
            "a wrong password",
        ),
        (vec![], "no user"),
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra).collect();
        let mut m = Mirror::start(&args, &src.url, &dst.url);
        let code = m.wait_exit(Duration::from_secs(20));
        let err = m.stderr();
        assert_eq!(code, 2, "{what}: stderr:\n{err}");
        assert!(
            err.contains("--dst-user") && err.contains("--dst-password-file"),
            "{what}: the message names the flags:\n{err}"
        );
        assert!(!err.contains("mpw") && !err.contains("nope"), "{err}");
    }

    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain([
            "--dst-user",
            "mirror",
            "--dst-password-file",
            good.to_str().unwrap(),
        ])
        .collect();
    let mut m = Mirror::start(&args, &src.url, &dst.url);
    s3.put("/p/b", "2");
    m.wait_for(Duration::from_secs(20), "/p/b replicated", || {
        let v = call_with(&d3, &root, "kv/range", json!({"key": b64(b"/replica/p/b")}));
        v["kvs"][0]["value"].as_str() == Some(&b64(b"2"))
    });
    m.assert_alive("with the right password");
}

/// The v3 form of incident 2024-02-28: the prefix is quiet while the rest of the source is
/// busy and compacted (as Kubernetes compacts every 5 minutes). The stored revision must
/// follow the source anyway, so that a mirror killed after the compaction restarts without
/// exit 4 and replicates the next write.
#[test]
fn a_quiet_prefix_keeps_its_place_across_a_compaction() {
    let src = Etcd::start("v3-quiet-src");
    let dst = Etcd::start("v3-quiet-dst");
    let (s3, d3) = (V3::new(&src.url), V3::new(&dst.url));
    put_index(&d3, s3.revision());
    let args = [
        "--src-api",
        "v3",
        "--dst-api",
        "v3",
        "--src-prefix",
        "/p",
        "--watch-timeout",
        "5",
    ];
    let mut m = Mirror::start(&args, &src.url, &dst.url);
    s3.put("/p/a", "1");
    m.wait_for(Duration::from_secs(20), "/p/a replicated", || {
        d3.get("/replica/p/a").is_some()
    });
    for i in 0..200 {
        s3.put(&format!("/elsewhere/k{}", i % 10), &i.to_string());
    }
    let head = s3.revision();
    m.wait_for(
        Duration::from_secs(30),
        "the stored revision follows the busy source",
        || v3::replication_index(&d3, "/replica") == Some(head),
    );
    s3.compact(head);
    m.kill();
    let mut m = Mirror::start(&args, &src.url, &dst.url);
    s3.put("/p/b", "2");
    m.wait_for(
        Duration::from_secs(20),
        "/p/b replicated after the restart",
        || d3.get("/replica/p/b").is_some(),
    );
    assert_eq!(s3.rel_range("/p/"), d3.rel_range(DST_TREE));
    m.assert_alive("after the compaction and the restart");
}

#[test]
fn v3_to_v3_over_tls_with_client_certificates() {
    let pki = TlsFiles::generate("v3-tls");
    let src = Etcd::start_tls("v3-tls-src", &pki);
    let dst = Etcd::start_tls("v3-tls-dst", &pki);
    assert!(src.url.starts_with("https://") && dst.url.starts_with("https://"));
    let (s3, d3) = (
        V3::with_tls(&src.url, Some(&pki)),
        V3::with_tls(&dst.url, Some(&pki)),
    );
    s3.put("/p/pre", "loaded by the reload");
    let (ca, cert, key) = (
        TlsFiles::s(&pki.ca),
        TlsFiles::s(&pki.client_cert),
        TlsFiles::s(&pki.client_key),
    );
    let tls = ["--ca-file", &ca, "--cert-file", &cert, "--key-file", &key];
    let mut args = vec!["--src-api", "v3", "--dst-api", "v3", "--src-prefix", "/p"];
    args.extend(tls);

    // Without the CA, the servers' certificates are not trusted: exit 2 at start.
    let mut refused = Mirror::start(&args[..6], &src.url, &dst.url);
    let code = refused.wait_exit(Duration::from_secs(30));
    let err = refused.stderr();
    assert_eq!(code, 2, "{}", tail(&err, 10));
    assert!(
        err.contains("TLS") || err.contains("certificate"),
        "{}",
        tail(&err, 10)
    );

    args.push("--reload");
    let mut m = Mirror::start(&args, &src.url, &dst.url);
    m.wait_for(Duration::from_secs(30), "the reloaded key", || {
        d3.get("/replica/p/pre").as_deref() == Some("loaded by the reload")
    });
    s3.put("/p/live", "over TLS");
    s3.delete("/p/pre");
    m.wait_for(Duration::from_secs(30), "the live put and delete", || {
        d3.get("/replica/p/live").as_deref() == Some("over TLS")
            && d3.get("/replica/p/pre").is_none()
    });
    let head = s3.revision();
    m.wait_for(
        Duration::from_secs(30),
        "the index at the source's revision",
        || common::v3::replication_index(&d3, "/replica").is_some_and(|i| i >= head),
    );
}
