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
etcdmirror: mirror an etcd v2 cluster (SRC) into a read-only replica (DST)

Usage: etcdmirror [OPTIONS] SRC DST
  SRC, DST are URLs like https://user:pass@host:2379

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
      --watch-timeout SECS         renew a quiet watch at least this often [default: 0.5]
      --retry-timeout SECS         retry transient faults this long, then exit 1 [default: 60]
Reload:
      --reload                     make DST an exact copy of SRC by writing only the
                                   differences, then replicate
      --dry-run                    with --reload: print the plan and exit without writing
      --force                      with --reload: allow SRC and DST to be the same cluster, and a
                                   plan that deletes more than half of the destination's keys
Metrics:
      --port PORT                  serve /metrics and /lag on this port, 0 = off [default: 8000]
      --listen ADDR                address for the metrics endpoint [default: 0.0.0.0]
Logging:
  -d, --debug                      debug logging (RUST_LOG is also honoured)
  -h, --help                       print this help
      --version                    print the version

Exit codes:
  0  --help, --version, or a finished --reload --dry-run (replication runs until stopped)
  1  transient failure, retries exhausted (safe to restart)
  2  usage or configuration error, or a refused --reload
  3  inconsistency on the destination (needs a human)
  4  source index cleared: history window lost (run with --reload)
  5  another writer changed the replication index (stop the other mirror)

Signals: SIGTERM and SIGINT end the process at once by the signal itself, without an exit
code (a shell shows 143 or 130); systemd counts that as a clean stop and does not restart
it. A stop or a SIGKILL at any moment is safe: the next start carries on from the index.
";

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
    pub dry_run: bool,
    pub force: bool,
    pub debug: bool,
    /// Where to serve metrics; `None` with `--port 0`.
    pub metrics: Option<std::net::SocketAddr>,
    pub watch_timeout: Duration,
    pub retry_timeout: Duration,
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
    dry_run: bool,
    force: bool,
    port: Option<String>,
    listen: Option<String>,
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
    let raw = parse_raw(args).map_err(|e| Error::Usage(e.to_string()))?;
    if raw.help {
        return Ok(Command::Help);
    }
    if raw.version {
        return Ok(Command::Version);
    }
    validate(raw).map(|c| Command::Run(Box::new(c)))
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
            Long("dry-run") => raw.dry_run = true,
            Long("force") => raw.force = true,
            Long("src-prefix") => raw.src_prefix = Some(p.value()?.string()?),
            Long("dst-prefix") => raw.dst_prefix = Some(p.value()?.string()?),
            Long("src-ignore-keys-regex") => raw.ignore = Some(p.value()?.string()?),
            Long("watch-timeout") => raw.watch_timeout = Some(p.value()?.string()?),
            Long("retry-timeout") => raw.retry_timeout = Some(p.value()?.string()?),
            Long("port") => raw.port = Some(p.value()?.string()?),
            Long("listen") => raw.listen = Some(p.value()?.string()?),
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

fn seconds(flag: &str, value: Option<String>, default: f64) -> Result<Duration> {
    let Some(v) = value else {
        return Ok(Duration::from_secs_f64(default));
    };
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s < 1e6 => Ok(Duration::from_secs_f64(s)),
        _ => Err(usage(format!(
            "{flag} takes a positive number of seconds, got {v:?}"
        ))),
    }
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
    if raw.dry_run && !raw.reload {
        return Err(usage("--dry-run only makes sense with --reload".into()));
    }
    if raw.force && !raw.reload {
        return Err(usage("--force only makes sense with --reload".into()));
    }
    let keys = KeyMap {
        src_prefix: prefix("--src-prefix", raw.src_prefix, "/")?,
        dst_prefix: prefix("--dst-prefix", raw.dst_prefix, "/replica")?,
        strip: raw.strip,
        ignore,
    };
    let watch_timeout = seconds("--watch-timeout", raw.watch_timeout, 0.5)?;
    let retry_timeout = seconds("--retry-timeout", raw.retry_timeout, 60.0)?;
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
    Ok(Config {
        src,
        dst,
        keys,
        reload: raw.reload,
        dry_run: raw.dry_run,
        force: raw.force,
        debug: raw.debug,
        metrics,
        watch_timeout,
        retry_timeout,
    })
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
        assert_eq!(c.watch_timeout, Duration::from_millis(500));
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
            "0.25",
            "--retry-timeout",
            "5",
            "https://u:p@a:1",
            "http://b:2",
        ]);
        assert!(c.debug && c.keys.strip && c.reload && c.dry_run && c.force);
        assert_eq!(c.keys.src_prefix, "/conftool");
        assert_eq!(c.keys.dst_prefix, "/");
        assert_eq!(c.metrics, None);
        assert_eq!(c.watch_timeout, Duration::from_millis(250));
        let re = c.keys.ignore.unwrap();
        assert!(re.is_match("/conftool/x/y") && !re.is_match("/conftool/xy"));
        assert_eq!(c.src.base, "https://a:1");
    }

    #[test]
    fn help_and_version() {
        assert!(matches!(parse(["--help"]), Ok(Command::Help)));
        assert!(matches!(parse(["-h", "x"]), Ok(Command::Help)));
        assert!(matches!(parse(["--version"]), Ok(Command::Version)));
        assert!(HELP.contains("5  another writer"));
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
    fn url_errors_do_not_leak_passwords() {
        let m = usage_error(&["http://u:hunter2@a:x", "http://b:2"]);
        assert!(!m.contains("hunter2"), "{m}");
    }
}
