//! Process behaviour: signals, transient failures, credentials in logs.

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

/// What the docs promise for SIGTERM and SIGINT: the process dies of the signal itself at
/// once (no exit code; a shell shows 128 + N, systemd counts it as a clean stop).
const SIGNALS: [(&str, i32); 2] = [("TERM", 15), ("INT", 2)];

/// Bound on the time from the signal to the end of the process (the docs say "at once",
/// "within a second").
const STOP_BOUND: Duration = Duration::from_secs(1);

/// Send SIG`name` and check the process ends of that signal within STOP_BOUND.
#[track_caller]
fn stop_with(m: &mut Mirror, name: &str, number: i32) -> Duration {
    let t = Instant::now();
    send_signal(m.pid(), name);
    let status = loop {
        if let Some(st) = m.child.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            t.elapsed() < STOP_BOUND,
            "SIG{name}: still running after {STOP_BOUND:?}; stderr:\n{}",
            tail(&m.stderr(), 20)
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = t.elapsed();
    assert_eq!(
        (status.code(), status.signal()),
        (None, Some(number)),
        "SIG{name}: the docs say the process dies of the signal (no exit code), got {status}; \
         stderr:\n{}",
        tail(&m.stderr(), 20)
    );
    assert_eq!(status_code(status), 128 + number, "what a shell shows");
    took
}

#[test]
fn the_docs_say_what_a_signal_does() {
    let help = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let man = std::fs::read_to_string(root.join("src/etcdmirror.1")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for (what, text) in [
        ("--help", &help),
        ("the man page", &man),
        ("README.md", &readme),
    ] {
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in ["SIGTERM", "SIGINT", "143 or 130", "clean stop"] {
            assert!(flat.contains(want), "{what} does not say {want:?}:\n{text}");
        }
        assert!(
            !flat.contains("clean stop (SIGTERM") && !flat.contains("exit 0, SIGTERM"),
            "{what} still promises exit 0 on SIGTERM"
        );
    }
}

#[test]
fn sigterm_and_sigint_end_the_process_at_once_while_idle() {
    let p = Pair::start("signals");
    for (name, number) in SIGNALS {
        // a long watch timeout: the mirror sits in a long poll when the signal arrives
        let mut m = p.mirror_from_now(&["--watch-timeout", "30"], "/replica");
        let i = p.src.set("/k", name).modified_index();
        m.wait_index(&p.dst, "/replica", i);
        // Scenario, not synchronisation: give it time to enter its next (30 s) long poll,
        // which is where the signal must not be held up.
        std::thread::sleep(Duration::from_millis(300));
        m.assert_alive("before the signal");
        let took = stop_with(&mut m, name, number);
        println!("SIG{name}: died of the signal in {took:?}");
    }
}

#[test]
fn sigterm_while_busy_ends_the_process_and_restart_is_clean() {
    let p = Pair::start("sigterm-busy");
    let mut m = p.mirror_from_now(&[], "/replica");
    std::thread::scope(|s| {
        let c = p.src.client.clone();
        let w = s.spawn(move || {
            for i in 0..300 {
                c.set(&format!("/busy/k{}", i % 30), &i.to_string());
            }
        });
        m.wait_for(Duration::from_secs(30), "some replication", || {
            p.dst.exists("/replica/busy/k5")
        });
        let took = stop_with(&mut m, "TERM", 15);
        println!("SIGTERM while busy: died of the signal in {took:?}");
        w.join().unwrap();
    });
    let mut m = Mirror::start(&[], &p.src.url, &p.dst.url);
    m.wait_synced(
        &p.src,
        "/",
        &p.dst,
        "/replica",
        "/replica",
        "restart after SIGTERM",
    );
}

#[test]
fn credentials_never_logged() {
    let p = Pair::start("creds");
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    let src = p.src.url_with_auth("alice", "s3cretSRCpw");
    let dst = p.dst.url_with_auth("bob", "s3cretDSTpw");
    let mut m = Mirror::start(&["-d"], &src, &dst);
    p.src.set("/k", "v");
    p.src.mkdir("/d");
    m.wait_synced(
        &p.src,
        "/",
        &p.dst,
        "/replica",
        "/replica",
        "with credentials",
    );
    m.terminate();
    m.wait_exit(Duration::from_secs(5));
    let err = m.stderr() + &m.stdout();
    assert!(
        err.contains("Replicating key"),
        "no replication logged:\n{err}"
    );
    for secret in ["s3cretSRCpw", "s3cretDSTpw"] {
        assert!(
            !err.contains(secret),
            "password {secret} appears in the output:\n{err}"
        );
    }

    // errors naming the endpoint must not leak it either: destination down, short retry
    let dead = format!("http://carol:s3cretDEADpw@127.0.0.1:{}", free_port());
    let mut m = Mirror::start(&["-d", "--retry-timeout", "2"], &src, &dead);
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr() + &m.stdout();
    assert_eq!(
        code, 1,
        "expected exit 1 (transient) with the destination down:\n{err}"
    );
    assert!(
        !err.contains("s3cretDEADpw"),
        "password appears in the output:\n{err}"
    );
    assert!(
        !err.contains("s3cretSRCpw"),
        "password appears in the output:\n{err}"
    );
}

#[test]
fn source_going_away_exits_1_after_retry_timeout() {
    let src = Etcd::start("gone-src");
    let dst = Etcd::start("gone-dst");
    set_replication_index(&dst, "/replica", src.current_index());
    let mut m = Mirror::start(&["--retry-timeout", "2"], &src.url, &dst.url);
    let i = src.set("/k", "v").modified_index();
    m.wait_index(&dst, "/replica", i);
    drop(src);
    let t = Instant::now();
    let code = m.wait_exit(Duration::from_secs(30));
    let took = t.elapsed();
    assert_eq!(
        code,
        1,
        "expected exit 1 (transient); stderr:\n{}",
        tail(&m.stderr(), 20)
    );
    assert!(
        took >= Duration::from_millis(1500),
        "gave up after {took:?}, before the 2 s retry timeout"
    );
    assert!(dst.exists("/replica/k"));
}

#[test]
fn transient_outage_shorter_than_retry_timeout_is_survived() {
    // The destination is unreachable for a moment (we point the mirror at a port that only
    // starts answering later, via a tiny TCP forwarder).
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let p = Pair::start("outage");
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    let port = free_port();
    let up = Arc::new(AtomicBool::new(false));
    let target = p.dst.client_port;
    let up2 = up.clone();
    std::thread::spawn(move || {
        // wait until told, then listen and forward connections to the destination
        while !up2.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let l = TcpListener::bind(("127.0.0.1", port)).expect("bind forwarder");
        for conn in l.incoming() {
            let Ok(a) = conn else { continue };
            let Ok(b) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let (mut a, mut b) = (a, b);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = a.read(&mut buf) {
                    if n == 0 || b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = b.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = b2.read(&mut buf) {
                    if n == 0 || a2.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = a2.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    let mut m = Mirror::start(
        &["--retry-timeout", "30"],
        &p.src.url,
        &format!("http://127.0.0.1:{port}"),
    );
    p.src.set("/k", "v");
    // down for ~2 s, then up
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        m.assert_alive("during the outage");
        std::thread::sleep(Duration::from_millis(50));
    }
    up.store(true, Ordering::Relaxed);
    m.wait_synced(
        &p.src,
        "/",
        &p.dst,
        "/replica",
        "/replica",
        "after the outage",
    );
}

// ---------------------------------------------------------------------------------------
// etcd's own v2 auth, and credentials at every log level

/// RFC 4648 base64, for the `Authorization: Basic` token the mirror must never log.
fn base64(input: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ABC[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

/// One request to `e` with an optional `Authorization` header: status and body.
fn call(e: &Etcd, method: &str, path: &str, body: &str, auth: Option<&str>) -> (u16, String) {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build(),
    );
    let mut req = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", e.url));
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    if method == "PUT" && path.starts_with("/v2/keys") {
        req = req.header("Content-Type", "application/x-www-form-urlencoded");
    }
    let mut resp = agent
        .run(req.body(body.to_string()).unwrap())
        .unwrap_or_else(|err| panic!("{method} {path}: {err}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

/// Turn on etcd's own v2 auth: a root user with `password`, auth enabled, and the guest
/// role's access revoked, so that only a request with root's password is served.
fn enable_v2_auth(e: &Etcd, password: &str) {
    let user = serde_json::json!({"user": "root", "password": password}).to_string();
    let (status, body) = call(e, "PUT", "/v2/auth/users/root", &user, None);
    assert_eq!(status, 201, "create root: {body}");
    let (status, body) = call(e, "PUT", "/v2/auth/enable", "", None);
    assert_eq!(status, 200, "enable auth: {body}");
    let revoke = r#"{"role":"guest","revoke":{"kv":{"read":["/*"],"write":["/*"]}}}"#;
    let root = basic("root", password);
    let (status, body) = call(e, "PUT", "/v2/auth/roles/guest", revoke, Some(&root));
    assert_eq!(status, 200, "revoke guest: {body}");
    let (status, body) = call(e, "GET", "/v2/keys/", "", None);
    assert!(
        status == 401 && body.contains("110"),
        "without credentials the source should refuse (401, errorCode 110): {status} {body}"
    );
}

/// Set `key` on an auth-enabled `e` as root.
fn set_as_root(e: &Etcd, password: &str, key: &str, value: &str) {
    let body = format!("value={}", encode_query(value));
    let path = format!("/v2/keys{}", encode_path(key));
    let (status, body) = call(e, "PUT", &path, &body, Some(&basic("root", password)));
    assert!(
        status == 200 || status == 201,
        "PUT {key} as root: {status} {body}"
    );
}

/// Every credential found in a log: the plain text, and the ASCII column of ureq's hex
/// dumps (16 bytes a line, which split a header over several lines) joined up.
fn credential_leaks(log: &str, secrets: &[String]) -> Vec<String> {
    let dump: String = log
        .lines()
        .filter_map(|l| {
            let (hex, ascii) = l.split_once("] ")?.1.split_once("  ")?;
            hex.split(' ')
                .all(|g| g.len() == 4 && g.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
                .then_some(ascii)
        })
        .collect();
    let mut found = Vec::new();
    for (place, text) in [("the log", log), ("the log's hex dumps", dump.as_str())] {
        let lower = text.to_lowercase();
        if lower.contains("authorization: basic") || lower.contains("authorization:.basic") {
            found.push(format!("an Authorization header in {place}"));
        }
        for s in secrets {
            if text.contains(s.as_str()) {
                found.push(format!("{s:?} in {place}"));
            }
        }
    }
    found
}

#[test]
fn no_credential_in_the_log_at_trace_level() {
    const SRC_PW: &str = "s3cretTRACEsrc";
    const DST_PW: &str = "s3cretTRACEdst";
    let p = Pair::start("trace-creds");
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    enable_v2_auth(&p.src, SRC_PW);
    let dir = Scratch::new("trace-creds-pw");
    let pw = dir.path.join("src-password");
    std::fs::write(&pw, format!("{SRC_PW}\n")).unwrap();
    let secrets: Vec<String> = [SRC_PW, DST_PW]
        .iter()
        .map(|s| s.to_string())
        .chain([basic("root", SRC_PW), basic("bob", DST_PW)].map(|b| b[6..].to_string()))
        .collect();
    // The destination has no auth: it ignores the header, but the mirror still sends it.
    let dst = p.dst.url_with_auth("bob", DST_PW);
    let runs: [(Option<&str>, &[&str]); 3] = [
        (Some("trace"), &[]),
        (Some("ureq=trace,ureq_proto=trace"), &[]),
        (None, &["-d"]),
    ];
    for (n, (rust_log, extra)) in runs.into_iter().enumerate() {
        let mut args: Vec<String> = ["--port", "0", "--src-user", "root", "--src-password-file"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(pw.to_string_lossy().into_owned());
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend([p.src.url.clone(), dst.clone()]);
        let mut m = Mirror::spawn_env(args, &[("RUST_LOG", rust_log), ("JOURNAL_STREAM", None)]);
        let key = format!("/trace/k{n}");
        set_as_root(&p.src, SRC_PW, &key, "v");
        m.wait_for(Duration::from_secs(30), "the key replicated", || {
            p.dst.exists(&format!("/replica{key}"))
        });
        m.terminate();
        m.wait_exit(Duration::from_secs(5));
        let log = m.stderr() + &m.stdout();
        if rust_log != Some("ureq=trace,ureq_proto=trace") {
            assert!(
                log.contains("Replicating key") && log.contains("DEBUG"),
                "RUST_LOG={rust_log:?} {extra:?}: the mirror's own debug lines are missing:\n{log}"
            );
        }
        let leaks = credential_leaks(&log, &secrets);
        assert!(
            leaks.is_empty(),
            "RUST_LOG={rust_log:?} {extra:?}: {leaks:?}\n{}",
            tail(&log, 40)
        );
    }
}

#[test]
fn etcd_v2_auth_accepts_the_password_file_and_refuses_a_wrong_password_with_exit_2() {
    const PW: &str = "s3cretAUTHroot";
    let p = Pair::start("v2auth");
    set_replication_index(&p.dst, "/replica", p.src.current_index());
    enable_v2_auth(&p.src, PW);
    let dir = Scratch::new("v2auth-pw");
    let (right, wrong) = (dir.path.join("right"), dir.path.join("wrong"));
    std::fs::write(&right, format!("{PW}\n")).unwrap();
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let with_password = |file: &std::path::Path| {
        let file = file.to_string_lossy().into_owned();
        Mirror::start(
            &[
                "--retry-timeout",
                "600",
                "--src-user",
                "root",
                "--src-password-file",
                &file,
            ],
            &p.src.url,
            &p.dst.url,
        )
    };

    // (a) The right password: the guest role may read nothing, so replication proves the
    // password was sent and accepted.
    let mut m = with_password(&right);
    set_as_root(&p.src, PW, "/auth/k", "v1");
    m.wait_for(Duration::from_secs(30), "/auth/k replicated", || {
        p.dst.get("/replica/auth/k").as_deref() == Some("v1")
    });
    m.kill();

    // (b) A wrong password: exit 2 at start (configuration), not a retry loop of 600 s.
    let mut m = with_password(&wrong);
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(code, 2, "a wrong source password should exit 2:\n{err}");
    for want in [
        "source",
        &p.src.url,
        "authentication failed",
        "--src-password-file",
    ] {
        assert!(
            err.contains(want),
            "the message should name {want:?}:\n{err}"
        );
    }
    assert!(
        !err.contains("retrying"),
        "retried a refused password:\n{err}"
    );
    assert!(!err.contains("not-the-password"), "password logged:\n{err}");

    // (c) No credentials at all: exit 2, saying the source needs them.
    let mut m = Mirror::start(&["--retry-timeout", "600"], &p.src.url, &p.dst.url);
    let code = m.wait_exit(Duration::from_secs(30));
    let err = m.stderr();
    assert_eq!(
        code, 2,
        "no credentials for an auth-enabled source should exit 2:\n{err}"
    );
    assert!(
        err.contains("source") && err.contains("requires authentication"),
        "{err}"
    );
}
