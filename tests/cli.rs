//! Command-line handling (no etcd needed): bad input exits 2 with one line naming the flag,
//! before any network call; --help and --version.

mod common;

use common::*;
use std::io::ErrorKind;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn run(args: &[&str]) -> Run {
    let t = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn etcdmirror");
    // read the pipes from threads so a chatty child cannot block
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let ho = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let he = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let code = wait_for_exit(&mut child, Duration::from_secs(10));
    if code.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("etcdmirror {args:?} did not exit within 10 s");
    }
    Run {
        code: code.unwrap(),
        stdout: ho.join().unwrap(),
        stderr: he.join().unwrap(),
        took: t.elapsed(),
    }
}

/// A listener nothing else uses: if the binary connects to it, we see it.
struct Trap {
    listener: TcpListener,
    url: String,
}

impl Trap {
    fn new() -> Trap {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        Trap { listener, url }
    }
    fn assert_untouched(&self, args: &[&str]) {
        match self.listener.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok(_) => panic!("{args:?}: the binary connected to the network before failing"),
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Expect exit 2 with exactly one non-empty stderr line containing `needle`
/// (case-insensitive), quickly, without any connection to SRC or DST.
#[track_caller]
fn bad(args: &[&str], needle: &str, src: &Trap, dst: &Trap) {
    let r = run(args);
    assert_eq!(
        r.code, 2,
        "{args:?}: expected exit 2, got {}; stderr:\n{}",
        r.code, r.stderr
    );
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected exactly one line on stderr, got:\n{}",
        r.stderr
    );
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: the error line must name {needle:?}: {}",
        lines[0]
    );
    assert!(
        r.took < Duration::from_secs(3),
        "{args:?}: took {:?} to fail",
        r.took
    );
    src.assert_untouched(args);
    dst.assert_untouched(args);
}

#[test]
fn bad_command_lines_exit_2_with_one_line() {
    let s = Trap::new();
    let d = Trap::new();
    let (src, dst) = (s.url.as_str(), d.url.as_str());
    bad(&["--bogus-flag", src, dst], "--bogus-flag", &s, &d);
    bad(
        &["--src-prefix", "conftool", src, dst],
        "--src-prefix",
        &s,
        &d,
    );
    bad(
        &["--dst-prefix", "replica", src, dst],
        "--dst-prefix",
        &s,
        &d,
    );
    bad(
        &["--src-ignore-keys-regex", "(unclosed", src, dst],
        "--src-ignore-keys-regex",
        &s,
        &d,
    );
    bad(&["--port", "abc", src, dst], "--port", &s, &d);
    bad(&["--port", "70000", src, dst], "--port", &s, &d);
    bad(
        &["--watch-timeout", "soon", src, dst],
        "--watch-timeout",
        &s,
        &d,
    );
    bad(
        &["--retry-timeout", "later", src, dst],
        "--retry-timeout",
        &s,
        &d,
    );
    bad(&["--src-prefix"], "--src-prefix", &s, &d);
    bad(&[src], "DST", &s, &d);
    bad(&[], "SRC", &s, &d);
    bad(&["::not a url::", dst], "SRC", &s, &d);
    bad(&[src, "not-a-url"], "DST", &s, &d);
    bad(
        &[src, dst, "http://127.0.0.1:1"],
        "http://127.0.0.1:1",
        &s,
        &d,
    );
    // flags after the positional arguments are still checked before any network call
    bad(&[src, dst, "--src-prefix", "x"], "--src-prefix", &s, &d);
}

#[test]
fn bad_url_with_credentials_does_not_print_them() {
    let s = Trap::new();
    let r = run(&[&s.url, "http://user:pw-s3cret@bad host:2379"]);
    assert_eq!(r.code, 2, "stderr:\n{}", r.stderr);
    assert!(
        !r.stderr.contains("pw-s3cret"),
        "password printed: {}",
        r.stderr
    );
    assert!(
        !r.stdout.contains("pw-s3cret"),
        "password printed: {}",
        r.stdout
    );
}

#[test]
fn help_lists_the_exit_codes() {
    for flag in ["--help", "-h"] {
        let r = run(&[flag]);
        assert_eq!(r.code, 0, "{flag}: stderr:\n{}", r.stderr);
        let text = r.stdout.clone() + &r.stderr;
        assert!(
            text.to_lowercase().contains("exit"),
            "{flag}: no exit codes:\n{text}"
        );
        for code in 0..=5 {
            assert!(
                text.lines()
                    .any(|l| l.trim_start().starts_with(&code.to_string())),
                "{flag}: exit code {code} not listed:\n{text}"
            );
        }
        for f in [
            "--reload",
            "--src-prefix",
            "--dst-prefix",
            "--strip",
            "--src-ignore-keys-regex",
            "--port",
            "--force",
            "--dry-run",
        ] {
            assert!(text.contains(f), "{flag}: {f} not documented:\n{text}");
        }
    }
}

#[test]
fn version_prints_the_version() {
    let r = run(&["--version"]);
    assert_eq!(r.code, 0, "stderr:\n{}", r.stderr);
    assert!(
        (r.stdout.clone() + &r.stderr).contains(env!("CARGO_PKG_VERSION")),
        "no version in: {}{}",
        r.stdout,
        r.stderr
    );
}
