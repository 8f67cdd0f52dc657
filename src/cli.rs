//! Command line: lexopt parsing into raw arguments, then validation into a `Config`, before any I/O.

use std::ffi::OsString;
use std::time::Duration;

use lexopt::prelude::*;
use regex_lite::Regex;

use crate::endpoint::{Endpoint, Security};
use crate::error::{Error, Result};
use crate::keys::{normalize_prefix, KeyMap};

/// The help text; the exit-code table here is the same as the README's.
pub const HELP: &str = "\
etcdmirror: mirror an etcd cluster (SRC) into a read-only replica (DST), v2 or v3

Usage: etcdmirror [OPTIONS] SRC DST
  SRC, DST are URLs like https://user:pass@host:2379, or a cluster's member URLs separated
  by commas (https://conf1001:2379,https://conf1002:2379): one member is used at a time,
  and the next at once when it fails

Source and destination (SIDE is src or dst; the flag without a side applies to both):
      --ca-file, --SIDE-ca-file PATH       PEM bundle of CAs to trust, replacing the system's
      --cert-file, --SIDE-cert-file PATH   client certificate (PEM) for TLS client auth
      --key-file, --SIDE-key-file PATH     its private key (PEM)
      --SIDE-user USER                     user for HTTP basic auth (or user@ in the URL)
      --SIDE-password-file PATH            read the password from PATH (keeps it out of `ps`)
Replication:
      --src-prefix PREFIX          source subtree to mirror [default: /]
      --dst-prefix PREFIX          destination prefix [default: /replica]
      --strip                      remove the source prefix before adding the destination prefix
      --src-ignore-keys-regex RE   never write source keys that fully match RE (they still
                                   advance the replication index)
      --watch-timeout SECS         silence that proves no event is coming, how often a quiet
                                   watch is renewed, and how long a write's answer may stay
                                   silent before it is retried; at least 5 [default: 15]
      --retry-timeout SECS         retry transient faults this long, then exit 1 [default: 60]
      --src-api v2|v3              the API SRC is read with [default: v2]
      --dst-api v2|v3              the API DST is written with [default: v2]; the combinations
                                   are v2 to v2, v2 to v3 (migration) and v3 to v3; v3 keys
                                   and values are bytes, a v2 directory has no v3 key
Reload:
      --reload                     make DST an exact copy of SRC by writing only the
                                   differences (again until a pass keeps up with a busy
                                   source), then replicate
      --reload-only                the same reload, then record the index and exit 0 without
                                   replicating and without serving metrics (implies --reload)
      --dry-run                    with --reload(-only): print the plan (and whether a guard
                                   would refuse it) and exit without writing
      --force                      with --reload(-only): allow SRC and DST to be the same
                                   cluster, and a plan that deletes more than half of the
                                   destination's keys
Check (a read-only audit for monitoring; its own exit codes, below):
      --check                      compare the replica with SRC key by key (the mirror's
                                   mapping and filters), print one line (OK/WARNING/CRITICAL/
                                   UNKNOWN) and exit; never writes, serves no metrics
      --check-wait SECS            how long a difference may be replication lag: the wait for
                                   the replica's index to reach the source's; also bounds the
                                   retries of a side that does not answer [default: 10]
      --json                       with --check: print every difference as one JSON document
Metrics:
      --port PORT                  serve /metrics and /lag on this port, 0 = off [default: 8000]
      --listen ADDR                address for the metrics endpoint [default: 0.0.0.0]
Logging:
  -d, --debug                      debug logging (RUST_LOG is also honoured)
  -h, --help                       print this help
      --version                    print the version

Exit codes:
  0  --help, --version, or a finished --dry-run or --reload-only; replication never exits 0
  1  transient failure, retries exhausted (safe to restart)
  2  usage or configuration error, or a refused --reload
  3  inconsistency on the destination (needs a human)
  4  source index cleared: history window lost, or a v3 revision compacted
     (run with --reload)
  5  another writer changed the replication index (stop the other mirror)
  6  etcd refused a request for a reason that is not the key's state (e.g. too large)

With --check the exit codes are a monitoring plugin's (Nagios, Icinga), not the above:
  0  OK: the replica equals the source (after waiting out replication lag)
  1  WARNING: no difference confirmed, but the replica did not reach the source's index
     within --check-wait (replication stopped or slow), so some keys could not be compared
  2  CRITICAL: keys differ, or the replication index is ahead of the source
  3  UNKNOWN: a side unreachable or refusing, no replication index, or a bad command line

Signals: SIGTERM and SIGINT end the process at once by the signal itself, without an exit
code (a shell shows 143 or 130); systemd counts that as a clean stop and does not restart
it. A stop or a SIGKILL at any moment is safe: the next start carries on from the index.
";

/// The shortest silence that may count as proof that no event is coming.
pub const MIN_WATCH_TIMEOUT: Duration = Duration::from_secs(5);

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Config>),
    Help,
    Version,
}

/// A validated configuration: nothing in here can fail to parse later.
#[derive(Debug)]
pub struct Config {
    pub src: Endpoint,
    pub dst: Endpoint,
    pub keys: KeyMap,
    pub reload: bool,
    /// `--reload-only`: reload, record the index, exit (`reload` is set too).
    pub reload_only: bool,
    pub dry_run: bool,
    pub force: bool,
    pub debug: bool,
    /// Where to serve metrics; `None` with `--port 0`.
    pub metrics: Option<std::net::SocketAddr>,
    pub watch_timeout: Duration,
    pub retry_timeout: Duration,
    /// `--check`: audit instead of replicating.
    pub check: Option<crate::check::Options>,
    /// `--src-api`, `--dst-api`: which etcd API each side is read and written with.
    pub src_api: Api,
    pub dst_api: Api,
}

/// The etcd API a side speaks: v2 (`/v2/keys`) or v3 (the JSON gateway, `/v3/...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    V2,
    V3,
}

/// The command line as typed, before validation.
#[derive(Debug, Default)]
struct RawArgs {
    positional: Vec<String>,
    src_prefix: Option<String>,
    dst_prefix: Option<String>,
    strip: bool,
    ignore: Option<String>,
    watch_timeout: Option<String>,
    retry_timeout: Option<String>,
    reload: bool,
    reload_only: bool,
    dry_run: bool,
    force: bool,
    check: bool,
    check_wait: Option<String>,
    json: bool,
    port: Option<String>,
    listen: Option<String>,
    src_api: Option<String>,
    dst_api: Option<String>,
    /// TLS flags without a side, then per side.
    both: Security,
    src: Security,
    dst: Security,
    debug: bool,
    help: bool,
    version: bool,
}

/// Parse and validate the arguments (without the program name).
pub fn parse<I>(args: I) -> Result<Command>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let raw = parse_raw(args).map_err(|e| Error::Usage(e.to_string()));
    let cmd = match raw {
        Ok(raw) if raw.help => Ok(Command::Help),
        Ok(raw) if raw.version => Ok(Command::Version),
        Ok(raw) => validate(raw).map(|c| Command::Run(Box::new(c))),
        Err(e) => Err(e),
    };
    cmd.map_err(|e| match e {
        Error::Usage(m) => Error::Usage(one_line(m)),
        other => other,
    })
}

/// Messages repeat what was typed (paths, flags): escape control characters, so that each
/// stays one line and cannot drive the terminal.
pub(crate) fn one_line(m: String) -> String {
    if !m.contains(char::is_control) {
        return m;
    }
    m.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn parse_raw<I>(args: I) -> std::result::Result<RawArgs, lexopt::Error>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut raw = RawArgs::default();
    let mut p = lexopt::Parser::from_args(args);
    while let Some(arg) = p.next()? {
        match arg {
            Short('d') | Long("debug") => raw.debug = true,
            Short('h') | Long("help") => raw.help = true,
            Long("version") => raw.version = true,
            Long("strip") => raw.strip = true,
            Long("reload") => raw.reload = true,
            Long("reload-only") => raw.reload_only = true,
            Long("dry-run") => raw.dry_run = true,
            Long("force") => raw.force = true,
            Long("check") => raw.check = true,
            Long("json") => raw.json = true,
            Long("check-wait") => raw.check_wait = Some(p.value()?.string()?),
            Long("src-prefix") => raw.src_prefix = Some(p.value()?.string()?),
            Long("dst-prefix") => raw.dst_prefix = Some(p.value()?.string()?),
            Long("src-ignore-keys-regex") => raw.ignore = Some(p.value()?.string()?),
            Long("watch-timeout") => raw.watch_timeout = Some(p.value()?.string()?),
            Long("retry-timeout") => raw.retry_timeout = Some(p.value()?.string()?),
            Long("port") => raw.port = Some(p.value()?.string()?),
            Long("listen") => raw.listen = Some(p.value()?.string()?),
            Long("src-api") => raw.src_api = Some(p.value()?.string()?),
            Long("dst-api") => raw.dst_api = Some(p.value()?.string()?),
            Long(flag) if security_flag(flag).is_some() => {
                let (side, field) = security_flag(flag).unwrap_or_default();
                let sec = match side {
                    "src" => &mut raw.src,
                    "dst" => &mut raw.dst,
                    _ => &mut raw.both,
                };
                let slot = match field {
                    "ca-file" => &mut sec.ca_file,
                    "cert-file" => &mut sec.cert_file,
                    "key-file" => &mut sec.key_file,
                    "user" => &mut sec.user,
                    _ => &mut sec.password_file,
                };
                *slot = Some(p.value()?.string()?);
            }
            Value(v) => raw.positional.push(v.string()?),
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(raw)
}

/// Split `src-ca-file` into `("src", "ca-file")`; `ca-file` has no side. Users and passwords
/// always have one.
fn security_flag(flag: &str) -> Option<(&'static str, &'static str)> {
    let (side, field) = match flag.split_once('-') {
        Some(("src", f)) => ("src", f),
        Some(("dst", f)) => ("dst", f),
        _ => ("", flag),
    };
    let field = ["ca-file", "cert-file", "key-file", "user", "password-file"]
        .into_iter()
        .find(|f| *f == field)?;
    (!side.is_empty() || (field.ends_with("-file") && field != "password-file"))
        .then_some((side, field))
}

/// The side's flags, falling back to the ones without a side.
fn merged(side: &Security, both: &Security) -> Security {
    Security {
        ca_file: side.ca_file.clone().or_else(|| both.ca_file.clone()),
        cert_file: side.cert_file.clone().or_else(|| both.cert_file.clone()),
        key_file: side.key_file.clone().or_else(|| both.key_file.clone()),
        user: side.user.clone(),
        password_file: side.password_file.clone(),
    }
}

fn usage(msg: String) -> Error {
    Error::Usage(msg)
}

fn prefix(flag: &str, value: Option<String>, default: &str) -> Result<String> {
    let v = value.unwrap_or_else(|| default.to_string());
    if !v.starts_with('/') {
        return Err(usage(format!(
            "{flag} must be an absolute key prefix starting with '/', got {v:?}"
        )));
    }
    let v = normalize_prefix(&v);
    if crate::keys::below(&v, crate::keys::REPLICATION_DIR).is_some() {
        return Err(usage(format!(
            "{flag} must not be under {}, which holds the replication index",
            crate::keys::REPLICATION_DIR
        )));
    }
    Ok(v)
}

/// A positive number of seconds below a million, or `default` when the flag is absent.
fn seconds(flag: &str, value: Option<String>, default: Duration) -> Result<Duration> {
    let Some(v) = value else {
        return Ok(default);
    };
    match decimal_seconds(&v).filter(|d| !d.is_zero()) {
        Some(d) => Ok(d),
        None => Err(usage(format!(
            "{flag} takes a positive number of seconds, got {v:?}"
        ))),
    }
}

/// Seconds written `S`, `S.F` or `.F` in decimal digits, below a million, with checked
/// integer arithmetic only (no float: no rounding, nothing that can overflow or panic);
/// digits past the nanosecond are dropped. `None` for anything else.
fn decimal_seconds(v: &str) -> Option<Duration> {
    let (whole, frac) = v.split_once('.').unwrap_or((v, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !all_digits(whole) || !all_digits(frac) {
        return None;
    }
    let secs = decimal(whole.bytes()).filter(|s| *s < 1_000_000)?;
    // Exactly nine digits: the fraction cut after the nanosecond, or padded with zeros.
    let nanos = decimal(frac.bytes().chain(std::iter::repeat(b'0')).take(9))?;
    Duration::from_secs(secs).checked_add(Duration::from_nanos(nanos))
}

/// The value of decimal digits; `None` on a non-digit or past `u64::MAX`.
fn decimal(mut digits: impl Iterator<Item = u8>) -> Option<u64> {
    digits.try_fold(0u64, |n, b| {
        let d = b.is_ascii_digit().then(|| b.wrapping_sub(b'0'))?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

fn endpoint(name: &str, url: &str) -> Result<Endpoint> {
    Endpoint::parse(url).map_err(|e| usage(format!("invalid {name} URL: {e}")))
}

fn validate(raw: RawArgs) -> Result<Config> {
    let ignore = match raw.ignore {
        None => None,
        Some(re) => Some(Regex::new(&format!("^(?:{re})$")).map_err(|e| {
            let first = e.to_string().lines().next().unwrap_or_default().to_string();
            usage(format!("--src-ignore-keys-regex does not compile: {first}"))
        })?),
    };
    let port = match raw.port {
        None => 8000,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| usage(format!("--port takes a port number 0-65535, got {p:?}")))?,
    };
    let listen = raw.listen.as_deref().unwrap_or("0.0.0.0");
    let ip = listen
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .map_err(|_| {
            usage(format!(
                "--listen takes an IP address like 0.0.0.0 or ::1, got {listen:?}"
            ))
        })?;
    let metrics = (port != 0).then(|| std::net::SocketAddr::new(ip, port));
    // --reload-only is a --reload that stops once the index is recorded; both together
    // mean the same, so a copied command line with an extra --reload still works.
    let reload = raw.reload || raw.reload_only;
    if raw.dry_run && !reload {
        return Err(usage(
            "--dry-run only makes sense with --reload or --reload-only".into(),
        ));
    }
    if raw.force && !reload {
        return Err(usage(
            "--force only makes sense with --reload or --reload-only".into(),
        ));
    }
    let check = check_options(raw.check, raw.check_wait, raw.json, raw.reload)?;
    let keys = KeyMap {
        src_prefix: prefix("--src-prefix", raw.src_prefix, "/")?,
        dst_prefix: prefix("--dst-prefix", raw.dst_prefix, "/replica")?,
        strip: raw.strip,
        ignore,
    };
    let watch_timeout = seconds(
        "--watch-timeout",
        raw.watch_timeout,
        Duration::from_secs(15),
    )?;
    if watch_timeout < MIN_WATCH_TIMEOUT {
        return Err(usage(format!(
            "--watch-timeout must be at least {} s: a shorter silence is no proof that no event \
             is on its way (a delayed segment takes longer)",
            MIN_WATCH_TIMEOUT.as_secs()
        )));
    }
    let retry_timeout = seconds(
        "--retry-timeout",
        raw.retry_timeout,
        Duration::from_secs(60),
    )?;
    let (src, dst) = match raw.positional.as_slice() {
        [s, d] => (
            endpoint("SRC", s)?
                .secure(&merged(&raw.src, &raw.both), "src")
                .map_err(usage)?,
            endpoint("DST", d)?
                .secure(&merged(&raw.dst, &raw.both), "dst")
                .map_err(usage)?,
        ),
        [] | [_] => {
            return Err(usage(
                "missing argument: etcdmirror [OPTIONS] SRC DST (see --help)".into(),
            ))
        }
        [_, _, extra, ..] => {
            return Err(usage(format!(
                "unexpected argument {extra:?}: only SRC and DST are positional"
            )))
        }
    };
    let (src_api, dst_api) = (
        api("--src-api", raw.src_api)?,
        api("--dst-api", raw.dst_api)?,
    );
    if (src_api, dst_api) == (Api::V3, Api::V2) {
        return Err(usage(
            "--src-api v3 with --dst-api v2 is not supported: a v3 source is mirrored into a \
             v3 destination (--dst-api v3); the combinations are v2 to v2, v2 to v3 and v3 to v3"
                .into(),
        ));
    }
    Ok(Config {
        src_api,
        dst_api,
        src,
        dst,
        keys,
        reload,
        reload_only: raw.reload_only,
        dry_run: raw.dry_run,
        force: raw.force,
        debug: raw.debug,
        metrics,
        watch_timeout,
        retry_timeout,
        check,
    })
}

/// `--src-api` or `--dst-api`: v2 unless given.
fn api(flag: &str, value: Option<String>) -> Result<Api> {
    match value.as_deref() {
        None | Some("v2") => Ok(Api::V2),
        Some("v3") => Ok(Api::V3),
        Some(other) => Err(usage(format!("{flag} takes v2 or v3, got {other:?}"))),
    }
}

/// `--check` and its flags; it reads only, so it does not combine with a reload.
fn check_options(
    check: bool,
    wait: Option<String>,
    json: bool,
    reload: bool,
) -> Result<Option<crate::check::Options>> {
    if !check {
        return match (wait.is_some(), json) {
            (true, _) => Err(usage("--check-wait only makes sense with --check".into())),
            (_, true) => Err(usage("--json only makes sense with --check".into())),
            _ => Ok(None),
        };
    }
    if reload {
        return Err(usage(
            "--check only reads: it does not combine with --reload".into(),
        ));
    }
    Ok(Some(crate::check::Options {
        wait: seconds("--check-wait", wait, crate::check::DEFAULT_WAIT)?,
        json,
    }))
}

/// Whether the words ask for `--check` (or `--json`), looked at before they are parsed: a
/// command line that does not parse is then reported as a check result (UNKNOWN).
pub fn asks_for_check(args: &[OsString]) -> (bool, bool) {
    let words = args.iter().take_while(|a| *a != "--");
    let (mut check, mut json) = (false, false);
    for a in words {
        check |= a == "--check";
        json |= a == "--json";
    }
    (check, json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Config {
        match parse(args.iter().copied()).unwrap() {
            Command::Run(c) => *c,
            other => panic!("expected a run, got {other:?}"),
        }
    }

    fn usage_error(args: &[&str]) -> String {
        match parse(args.iter().copied()) {
            Err(Error::Usage(m)) => {
                assert!(!m.contains('\n'), "one line: {m}");
                m
            }
            other => panic!("expected a usage error for {args:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_old_tool() {
        let c = run(&["http://a:2379", "http://b:2379"]);
        assert_eq!(c.keys.src_prefix, "/");
        assert_eq!(c.keys.dst_prefix, "/replica");
        assert!(!c.keys.strip && !c.reload && !c.debug);
        assert_eq!(c.metrics, Some("0.0.0.0:8000".parse().unwrap()));
        assert_eq!(c.watch_timeout, Duration::from_secs(15));
        assert_eq!(c.retry_timeout, Duration::from_secs(60));
    }

    #[test]
    fn all_flags() {
        let c = run(&[
            "-d",
            "--strip",
            "--src-prefix",
            "/conftool/",
            "--dst-prefix=/",
            "--src-ignore-keys-regex",
            "/conftool/x(/.*)?",
            "--reload",
            "--dry-run",
            "--force",
            "--port",
            "0",
            "--watch-timeout",
            "7.5",
            "--retry-timeout",
            "5",
            "https://u:p@a:1",
            "http://b:2",
        ]);
        assert!(c.debug && c.keys.strip && c.reload && c.dry_run && c.force);
        assert_eq!(c.keys.src_prefix, "/conftool");
        assert_eq!(c.keys.dst_prefix, "/");
        assert_eq!(c.metrics, None);
        assert_eq!(c.watch_timeout, Duration::from_millis(7500));
        let re = c.keys.ignore.unwrap();
        assert!(re.is_match("/conftool/x/y") && !re.is_match("/conftool/xy"));
        assert_eq!(c.src.base, "https://a:1");
    }

    #[test]
    fn reload_only_implies_reload() {
        let c = run(&["--reload-only", "http://a:1", "http://b:2"]);
        assert!(c.reload && c.reload_only && !c.dry_run);
        let c = run(&[
            "--reload",
            "--reload-only",
            "--dry-run",
            "--force",
            "http://a:1",
            "http://b:2",
        ]);
        assert!(c.reload && c.reload_only && c.dry_run && c.force);
        // Metrics stay configured (startup skips them); --port in the unit's arguments is fine.
        let c = run(&[
            "--reload-only",
            "--port",
            "8000",
            "http://a:1",
            "http://b:2",
        ]);
        assert!(c.reload_only && c.metrics.is_some());
        let c = run(&["--reload", "http://a:1", "http://b:2"]);
        assert!(c.reload && !c.reload_only);
        assert!(HELP.contains("--reload-only"));
    }

    #[test]
    fn check_flags() {
        let ends = ["http://a:1", "http://b:2"];
        fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
            let mut v: Vec<&str> = extra.to_vec();
            v.extend(["http://a:1", "http://b:2"]);
            v
        }
        assert_eq!(run(&ends).check, None);
        let c = run(&with(&["--check"]));
        let wait = crate::check::DEFAULT_WAIT;
        assert_eq!(c.check, Some(crate::check::Options { wait, json: false }));
        // The mirror's own flags are accepted, so that $ETCDMIRROR_ARGS can follow --check.
        let c = run(&with(&[
            "--check",
            "--check-wait=2.5",
            "--json",
            "--port",
            "8000",
            "--watch-timeout",
            "30",
        ]));
        assert_eq!(
            c.check,
            Some(crate::check::Options {
                wait: Duration::from_millis(2500),
                json: true
            })
        );
        assert!(usage_error(&with(&["--check-wait", "3"])).contains("--check"));
        assert!(usage_error(&with(&["--json"])).contains("--check"));
        assert!(usage_error(&with(&["--check", "--reload"])).contains("--reload"));
        assert!(usage_error(&with(&["--check", "--dry-run"])).contains("--reload"));
        assert!(usage_error(&with(&["--check", "--check-wait", "0"])).contains("--check-wait"));
        assert!(usage_error(&with(&["--check", "--check-wait"])).contains("--check-wait"));
        let words = |w: &[&str]| w.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            asks_for_check(&words(&["--bogus", "--check"])),
            (true, false)
        );
        assert_eq!(asks_for_check(&words(&["--json", "--check"])), (true, true));
        assert_eq!(asks_for_check(&words(&["--checks", "x"])), (false, false));
        assert_eq!(asks_for_check(&words(&["--", "--check"])), (false, false));
    }

    #[test]
    fn decimal_seconds_are_exact_and_refuse_anything_else() {
        let ok = |v: &str| decimal_seconds(v);
        assert_eq!(ok("15"), Some(Duration::from_secs(15)));
        assert_eq!(ok("7.5"), Some(Duration::from_millis(7500)));
        assert_eq!(ok(".5"), Some(Duration::from_millis(500)));
        assert_eq!(ok("5."), Some(Duration::from_secs(5)));
        assert_eq!(ok("0.1"), Some(Duration::from_millis(100)));
        assert_eq!(ok("0.0000000019"), Some(Duration::from_nanos(1)));
        assert_eq!(
            ok("999999.999999999"),
            Some(Duration::new(999_999, 999_999_999))
        );
        assert_eq!(ok("0"), Some(Duration::ZERO));
        for bad in [
            "",
            ".",
            "1e3",
            "-1",
            "+5",
            " 5",
            "5 ",
            "5.5.5",
            "1000000",
            "inf",
            "NaN",
            "0x10",
            "99999999999999999999999",
            "1.x",
            "١",
        ] {
            assert_eq!(ok(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Any digits, any length: never a panic, and the value of what fits.
        #[test]
        fn decimal_seconds_is_total(whole in "[0-9]{0,25}", frac in proptest::option::of("[0-9]{0,25}")) {
            let v = match &frac { Some(f) => format!("{whole}.{f}"), None => whole.clone() };
            let got = decimal_seconds(&v);
            let w: Option<u128> = if whole.is_empty() { Some(0) } else { whole.parse().ok() };
            let f = frac.unwrap_or_default();
            let nanos: u128 = format!("{:0<9}", &f[..f.len().min(9)]).parse().unwrap();
            let want = w
                .filter(|w| *w < 1_000_000 && !(v.is_empty() || v == "."))
                .map(|w| Duration::from_nanos((w * 1_000_000_000 + nanos) as u64));
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn help_and_version() {
        assert!(matches!(parse(["--help"]), Ok(Command::Help)));
        assert!(matches!(parse(["-h", "x"]), Ok(Command::Help)));
        assert!(matches!(parse(["--version"]), Ok(Command::Version)));
        assert!(HELP.contains("5  another writer"));
        assert!(HELP.contains("With --check the exit codes"));
    }

    #[test]
    fn bad_input_names_the_flag() {
        let ok = ["http://a:1", "http://b:2"];
        let with = |extra: &[&str]| {
            let mut v: Vec<&str> = extra.to_vec();
            v.extend(ok);
            usage_error(&v)
        };
        assert!(with(&["--bogus"]).contains("--bogus"));
        assert!(with(&["--src-prefix", "conftool"]).contains("--src-prefix"));
        assert!(with(&["--dst-prefix", "x/"]).contains("--dst-prefix"));
        assert!(with(&["--dst-prefix", "/__replication/x"]).contains("--dst-prefix"));
        assert!(with(&["--src-prefix", "//__replication"]).contains("--src-prefix"));
        assert!(with(&["--src-ignore-keys-regex", "(unclosed"]).contains("--src-ignore-keys-regex"));
        assert!(with(&["--port", "abc"]).contains("--port"));
        assert!(with(&["--port", "70000"]).contains("--port"));
        assert!(with(&["--listen", "localhost"]).contains("--listen"));
        assert!(with(&["--watch-timeout", "0"]).contains("--watch-timeout"));
        assert!(with(&["--watch-timeout", "4.9"]).contains("at least 5 s"));
        assert!(with(&["--retry-timeout", "x"]).contains("--retry-timeout"));
        assert!(with(&["--dry-run"]).contains("--reload"));
        assert!(with(&["--port"]).contains("--port"));
        assert!(usage_error(&["http://a:1"]).contains("missing"));
        assert!(usage_error(&["http://a:1", "b:2"]).contains("DST"));
        assert!(usage_error(&["ftp://a", "http://b:2"]).contains("SRC"));
        assert!(usage_error(&["http://a:1", "http://b:2", "c"]).contains("\"c\""));
    }

    #[test]
    fn tls_flags_have_sides() {
        assert_eq!(security_flag("ca-file"), Some(("", "ca-file")));
        assert_eq!(security_flag("dst-key-file"), Some(("dst", "key-file")));
        assert_eq!(security_flag("src-user"), Some(("src", "user")));
        assert_eq!(security_flag("user"), None);
        assert_eq!(security_flag("password-file"), None);
        assert_eq!(security_flag("src-bogus"), None);
        let m = usage_error(&[
            "--src-cert-file",
            "/nonexistent.pem",
            "https://a:1",
            "http://b:2",
        ]);
        assert!(m.contains("--src-cert-file"), "{m}");
        let m = usage_error(&[
            "--ca-file",
            "/nonexistent.pem",
            "https://a:1",
            "https://b:2",
        ]);
        assert!(
            m.contains("--src-ca-file") && m.contains("/nonexistent.pem"),
            "{m}"
        );
    }

    #[test]
    fn messages_escape_what_was_typed() {
        let m = usage_error(&["--ca-file", "/x\ny\u{1b}[2J", "https://a:1", "https://b:2"]);
        assert!(m.contains("/x\\ny\\u{1b}[2J"), "{m}");
        let m = usage_error(&["--a\nb", "http://a:1", "http://b:2"]);
        assert!(m.contains("a\\nb"), "{m}");
    }

    #[test]
    fn url_errors_do_not_leak_passwords() {
        let m = usage_error(&["http://u:hunter2@a:x", "http://b:2"]);
        assert!(!m.contains("hunter2"), "{m}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::os::unix::ffi::OsStringExt;

        const SWITCHES: [&str; 11] = [
            "-d",
            "--debug",
            "-h",
            "--help",
            "--version",
            "--strip",
            "--reload",
            "--dry-run",
            "--force",
            "--check",
            "--json",
        ];
        const VALUED: [&str; 24] = [
            "--src-prefix",
            "--dst-prefix",
            "--src-ignore-keys-regex",
            "--watch-timeout",
            "--retry-timeout",
            "--check-wait",
            "--port",
            "--listen",
            "--ca-file",
            "--cert-file",
            "--key-file",
            "--src-ca-file",
            "--src-cert-file",
            "--src-key-file",
            "--src-user",
            "--src-password-file",
            "--dst-ca-file",
            "--dst-cert-file",
            "--dst-key-file",
            "--dst-user",
            "--dst-password-file",
            "--user",
            "--password-file",
            "--src-bogus",
        ];

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[/a-z_.:0-9\n\r\t -]{0,12}",
                Just("/nonexistent/x.pem".to_string()),
            ]
        }

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                text(),
                proptest::sample::select(vec![
                    "/",
                    "/a//b/",
                    "a",
                    "/__replication",
                    "//__replication/x",
                    "0",
                    "5",
                    "0.5",
                    "-1",
                    "1e6",
                    "NaN",
                    "inf",
                    "70000",
                    "::1",
                    "[::1]",
                    "0.0.0.0",
                    "(",
                    ".*",
                    "http://a:1",
                    "https://u:p@a:1",
                    "http://u@a",
                    "ftp://a",
                    "http://a:x",
                    "http://[::1",
                    "http://a/b",
                    "http://a\nb:1",
                ])
                .prop_map(String::from),
            ]
        }

        fn non_utf8() -> impl Strategy<Value = OsString> {
            (text(), proptest::collection::vec(0x80u8..=0xff, 1..3)).prop_map(|(t, bad)| {
                let mut b = t.into_bytes();
                b.extend(bad);
                OsString::from_vec(b)
            })
        }

        /// One command-line word, or a flag with its value in the next word.
        fn word() -> impl Strategy<Value = Vec<OsString>> {
            fn one(s: String) -> Vec<OsString> {
                vec![OsString::from(s)]
            }
            prop_oneof![
                3 => proptest::sample::select(SWITCHES.to_vec()).prop_map(|f| one(f.into())),
                4 => (proptest::sample::select(VALUED.to_vec()), value())
                    .prop_map(|(f, v)| vec![f.into(), v.into()]),
                2 => (proptest::sample::select(VALUED.to_vec()), value())
                    .prop_map(|(f, v)| one(format!("{f}={v}"))),
                1 => (proptest::sample::select(VALUED.to_vec()), non_utf8())
                    .prop_map(|(f, v)| vec![f.into(), v]),
                1 => non_utf8().prop_map(|v| vec![v]),
                2 => value().prop_map(one),
                1 => "-[a-zA-Z-]{1,3}".prop_map(one),
                1 => text().prop_map(|v| one(format!("--{v}"))),
            ]
        }

        fn command_line() -> impl Strategy<Value = Vec<OsString>> {
            proptest::collection::vec(word(), 0..8).prop_map(|w| w.into_iter().flatten().collect())
        }

        /// A command line that must be accepted, and what it asks for.
        #[derive(Debug, Clone)]
        struct Valid {
            src_prefix: Option<String>,
            dst_prefix: Option<String>,
            strip: bool,
            reload: bool,
            dry_run: bool,
            force: bool,
            debug: bool,
            ignore: Option<String>,
            /// Milliseconds, written as decimal seconds.
            retry: Option<u64>,
            watch: Option<u64>,
            port: Option<u16>,
            listen: Option<std::net::IpAddr>,
            src: (String, u16),
            dst: (String, u16),
        }

        fn prefix_arg() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![Just(String::new()), "[a-z_]{1,3}", "[^/\\x00]{1,3}"],
                0..4,
            )
            .prop_map(|segs| format!("/{}", segs.join("/")))
            .prop_filter("not the replication dir", |p| {
                crate::keys::below(&normalize_prefix(p), crate::keys::REPLICATION_DIR).is_none()
            })
        }

        fn host() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("127.0.0.1".to_string()),
                Just("[::1]".to_string()),
                "[a-z][a-z0-9.-]{0,8}",
            ]
        }

        fn valid() -> impl Strategy<Value = Valid> {
            let flags = (
                proptest::option::of(prefix_arg()),
                proptest::option::of(prefix_arg()),
                any::<[bool; 5]>(),
                proptest::option::of(proptest::sample::select(vec![
                    "/a(/.*)?", ".*", "x|y", "[^/]*", "é+",
                ])),
            );
            let numbers = (
                proptest::option::of(1u64..999_999_000),
                proptest::option::of(5_000u64..600_000),
                proptest::option::of(any::<u16>()),
                proptest::option::of(any::<std::net::IpAddr>()),
            );
            let ends = ((host(), any::<u16>()), (host(), any::<u16>()));
            (flags, numbers, ends).prop_map(
                |(
                    (src_prefix, dst_prefix, b, ignore),
                    (retry, watch, port, listen),
                    (src, dst),
                )| {
                    Valid {
                        src_prefix,
                        dst_prefix,
                        strip: b[0],
                        reload: b[1],
                        dry_run: b[1] && b[2],
                        force: b[1] && b[3],
                        debug: b[4],
                        ignore: ignore.map(String::from),
                        retry,
                        watch,
                        port,
                        listen,
                        src,
                        dst,
                    }
                },
            )
        }

        /// Its words, in an order and a flag syntax given by `seed`.
        fn words(v: &Valid, seed: &[bool]) -> Vec<String> {
            let mut groups: Vec<Vec<String>> = Vec::new();
            let mut flag = |name: &str, value: Option<String>| {
                if let Some(value) = value {
                    groups.push(vec![name.to_string(), value]);
                }
            };
            flag("--src-prefix", v.src_prefix.clone());
            flag("--dst-prefix", v.dst_prefix.clone());
            flag("--src-ignore-keys-regex", v.ignore.clone());
            let secs = |ms: u64| format!("{}.{:03}", ms / 1000, ms % 1000);
            flag("--retry-timeout", v.retry.map(secs));
            flag("--watch-timeout", v.watch.map(secs));
            flag("--port", v.port.map(|p| p.to_string()));
            flag("--listen", v.listen.map(|ip| ip.to_string()));
            for (on, name) in [
                (v.strip, "--strip"),
                (v.reload, "--reload"),
                (v.dry_run, "--dry-run"),
                (v.force, "--force"),
                (v.debug, "-d"),
            ] {
                if on {
                    groups.push(vec![name.to_string()]);
                }
            }
            let mut seed = seed.iter().copied().cycle();
            // Positionals may stand anywhere between the flags, in their own order.
            let mut at = |n: usize| (0..n).filter(|_| seed.next().unwrap_or(false)).count();
            let url = |(h, p): &(String, u16)| vec![format!("http://{h}:{p}")];
            let i = at(groups.len());
            groups.insert(i, url(&v.src));
            let j = i + 1 + at(groups.len() - i - 1);
            groups.insert(j, url(&v.dst));
            let mut out: Vec<String> = Vec::new();
            for mut g in groups {
                match g.as_slice() {
                    [name, value] if at(1) == 1 => out.push(format!("{name}={value}")),
                    _ => out.append(&mut g),
                }
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_command_line_is_a_result_or_a_one_line_usage_error(args in command_line()) {
                match parse(args.clone()) {
                    Ok(_) => {}
                    Err(Error::Usage(m)) => {
                        prop_assert!(!m.contains(char::is_control), "{:?}", m);
                        prop_assert!(!m.is_empty());
                    }
                    Err(e) => prop_assert!(false, "{:?} gave {:?} (exit {})", args, e, e.exit_code()),
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Random words slipped into a valid command line reach the later checks.
            #[test]
            fn damaged_valid_command_lines_fail_on_one_line(
                v in valid(),
                seed in proptest::collection::vec(any::<bool>(), 1..16),
                extra in proptest::collection::vec((word(), any::<proptest::sample::Index>()), 1..4),
                https in any::<(bool, bool)>(),
            ) {
                let mut args: Vec<OsString> = words(&v, &seed).into_iter().map(OsString::from).collect();
                for a in &mut args {
                    let s = a.to_string_lossy();
                    if let Some(rest) = s.strip_prefix("http://").filter(|_| https.0) {
                        *a = format!("https://u{}@{rest}", if https.1 { ":p" } else { "" }).into();
                    }
                }
                for (w, at) in extra {
                    let i = at.index(args.len() + 1);
                    args.splice(i..i, w);
                }
                match parse(args.clone()) {
                    Ok(_) => {}
                    Err(Error::Usage(m)) => prop_assert!(!m.contains(char::is_control), "{:?}", m),
                    Err(e) => prop_assert!(false, "{:?} gave {:?}", args, e),
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn valid_command_lines_give_their_config(v in valid(), seed in proptest::collection::vec(any::<bool>(), 1..16)) {
                let args = words(&v, &seed);
                let c = match parse(&args) {
                    Ok(Command::Run(c)) => *c,
                    other => return Err(TestCaseError::fail(format!("{args:?}: {other:?}"))),
                };
                let prefix = |p: &Option<String>, d: &str| normalize_prefix(p.as_deref().unwrap_or(d));
                prop_assert_eq!(&c.keys.src_prefix, &prefix(&v.src_prefix, "/"));
                prop_assert_eq!(&c.keys.dst_prefix, &prefix(&v.dst_prefix, "/replica"));
                prop_assert_eq!(
                    (c.keys.strip, c.reload, c.dry_run, c.force, c.debug),
                    (v.strip, v.reload, v.dry_run, v.force, v.debug)
                );
                prop_assert_eq!(c.keys.ignore.map(|r| r.as_str().to_string()), v.ignore.map(|r| format!("^(?:{r})$")));
                prop_assert_eq!(c.retry_timeout, Duration::from_millis(v.retry.unwrap_or(60_000)));
                if let Some(w) = v.watch {
                    prop_assert_eq!(c.watch_timeout, Duration::from_millis(w));
                }
                let ip = v.listen.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
                let port = v.port.unwrap_or(8000);
                prop_assert_eq!(c.metrics, (port != 0).then(|| std::net::SocketAddr::new(ip, port)));
                prop_assert_eq!(c.src.base, format!("http://{}:{}", v.src.0, v.src.1));
                prop_assert_eq!(c.dst.base, format!("http://{}:{}", v.dst.0, v.dst.1));
                // --help or --version wins over a valid command line.
                let mut help = args.clone();
                // (At either end: in between it could become a flag's value.)
                let at = if seed.first() == Some(&true) { 0 } else { help.len() };
                help.insert(at, "--help".into());
                prop_assert!(matches!(parse(&help), Ok(Command::Help)));
                let mut version = args;
                version.push("--version".into());
                prop_assert!(matches!(parse(&version), Ok(Command::Version)));
            }
        }
    }
}
