//! Start-up: logging, the metrics endpoint, the checks before any write, and the index to
//! replicate from (read, or made by `--reload`).

use std::io::Write;
use std::time::Duration;

use crate::cli::{Api, Config};
use crate::endpoint::Endpoint;
use crate::error::{Error, Result};
use crate::etcd::{encode, Client};
use crate::{dest, dest3, keys, metrics, mirror, mirror3, reload, reload3};

/// Log to stderr; under systemd (`JOURNAL_STREAM`) with syslog priorities and no timestamps.
/// Whatever `RUST_LOG` says, other crates log at info and above only (see `OwnDetail`).
pub fn init_logging(debug: bool) {
    init_logging_from(debug, "info");
}

/// Logging for `--check`, whose result is its one line on stdout: errors only on stderr
/// unless `-d` or `RUST_LOG` ask for more (some monitoring systems show stderr too).
pub fn init_quiet_logging(debug: bool) {
    init_logging_from(debug, "error");
}

fn init_logging_from(debug: bool, level: &str) {
    // -d is about the mirror's own decisions, not the HTTP library's internals.
    let default = if debug {
        "info,etcdmirror=debug".to_string()
    } else {
        level.to_string()
    };
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // journald adds timestamps; a <N> syslog prefix lets `journalctl -p err` filter.
        builder.format(|buf, record| {
            let prio = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(buf, "<{prio}>{}", record.args())
        });
    } else {
        builder.format_target(false);
    }
    let inner = builder.build();
    let max = inner.filter();
    // Leaked once: the logger lives as long as the process, as `log` requires.
    let logger: &'static OwnDetail = Box::leak(Box::new(OwnDetail(inner)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(max);
    }
}

/// Passes the mirror's own records at every level, and other crates' records only at info
/// and above.
///
/// Why by target and not by content: at debug and trace, ureq and ureq-proto log every
/// request as a hex dump, 16 bytes a record, so the `Authorization: Basic ...` header is
/// split over several records ("...authorizatio" / "n: Basic cm9vdDp" / "yb290...") and its
/// password is base64. No filter on a record's text can recognise that, and any other
/// crate added under ureq (TLS, proxies) may dump bytes the same way. The mirror's own
/// records never hold a credential (endpoints display without them), so they need no
/// filter, and a key that happens to contain "authorization" is still logged. Nothing is
/// lost for operators: the libraries' warnings and errors still pass, and the mirror logs
/// every request failure itself.
struct OwnDetail(env_logger::Logger);

impl OwnDetail {
    fn allows(metadata: &log::Metadata) -> bool {
        let target = metadata.target();
        let own = target == "etcdmirror" || target.starts_with("etcdmirror::");
        own || metadata.level() <= log::Level::Info
    }
}

impl log::Log for OwnDetail {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        Self::allows(metadata) && self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if Self::allows(record.metadata()) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Everything between a valid configuration and the replication loop: metrics endpoint,
/// safety checks, then `--reload` or the stored index. `--reload-only` and `--dry-run` end
/// here.
pub fn run(cfg: &Config) -> Result<()> {
    for (side, ep) in [("SRC", &cfg.src), ("DST", &cfg.dst)] {
        if ep.password_in_url {
            log::warn!("the {side} URL holds a password, which `ps` shows to every user; use --{}-password-file", side.to_lowercase());
        }
    }
    metrics::update(|s| {
        s.url = cfg.dst.base.clone();
        s.prefix = cfg.keys.dst_prefix.clone();
    });
    // A one-shot run serves no metrics: nothing scrapes it, and an operator runs it next
    // to (or just before) the unit, whose port it must not need.
    if let Some(addr) = cfg.metrics.filter(|_| !cfg.dry_run && !cfg.reload_only) {
        let bound = metrics::serve(addr).map_err(|e| {
            Error::Usage(format!(
                "--port/--listen: cannot serve metrics on {addr}: {e}"
            ))
        })?;
        log::info!("serving /metrics and /lag on http://{bound}");
    }
    // Bounded by the retry budget too, so that an unreachable side is not waited on longer
    // here than the client would retry it.
    let probe_timeout = cfg.retry_timeout.min(Duration::from_secs(10));
    // A v3 side's credentials are checked by its first request (a token is needed first).
    if cfg.src_api == Api::V2 {
        check_access(
            &cfg.src,
            "source",
            "src",
            &cfg.keys.src_prefix,
            probe_timeout,
        )?;
    }
    if cfg.dst_api == Api::V2 {
        check_access(
            &cfg.dst,
            "destination",
            "dst",
            &cfg.keys.index_key(),
            probe_timeout,
        )?;
    }
    let (src, dst) = clients(cfg, cfg.retry_timeout, probe_timeout)?;
    // The v2 and v3 stores of one cluster are apart: only the same API can feed itself.
    if cfg.keys.feeds_itself() && cfg.src_api == cfg.dst_api {
        let (s, d) = (cluster_id(&src)?, cluster_id(&dst)?);
        if s.is_some() && s == d {
            return Err(Error::Usage(format!(
                "SRC and DST are the same cluster and {} lies inside or above the mirrored {}: \
                 the mirror would replicate its own writes (no flag overrides this)",
                cfg.keys.dst_root(),
                cfg.keys.src_prefix
            )));
        }
    }
    // The index to replicate from, and its text as the destination holds it (a v3
    // destination compares it byte for byte; an index written by hand may hold "42\n").
    let (index, stored) = if cfg.reload {
        let reloaded = match cfg.dst_api {
            Api::V2 => reload::reload(cfg, &src, &dst)?,
            Api::V3 => reload3::reload(cfg, &src, &dst)?,
        };
        match reloaded {
            Some(index) if cfg.reload_only => {
                log::info!(
                    "replication index {index} recorded at {} on {}; exiting without \
                     replicating (--reload-only): start the mirror without --reload",
                    cfg.keys.index_key(),
                    dst.name()
                );
                return Ok(());
            }
            Some(index) => (index, index.to_string().into_bytes()),
            None => return Ok(()),
        }
    } else {
        let key = cfg.keys.index_key();
        let found = match cfg.dst_api {
            Api::V2 => dest::read_index(&dst, &key)?.map(|(i, _)| (i, Vec::new())),
            Api::V3 => dest3::read_index(&dst, &key)?,
        };
        let found = found.ok_or_else(|| {
            Error::Usage(format!(
                "no replication index at {key} on {}: the destination was never loaded; run with --reload",
                dst.name()
            ))
        })?;
        log::info!("Current index read from {key}");
        found
    };
    match cfg.dst_api {
        Api::V2 => mirror::Mirror::new(cfg, &src, &dst, index).run(),
        Api::V3 => mirror3::run(cfg, &src, &dst, index, stored),
    }
}

/// The cluster id a side reports (hex, as v2's `X-Etcd-Cluster-Id`).
fn cluster_id(c: &Client) -> Result<Option<String>> {
    match c.api() {
        Api::V2 => Ok(c.get("/", false)?.cluster_id),
        Api::V3 => crate::v3::cluster_id(c).map(Some),
    }
}

/// Exit 2 at start when a side refuses the credentials (etcd's own v2 auth answers 401,
/// errorCode 110, both for a wrong password and for a user without read access to `key`),
/// naming the side and the flags to check. One HEAD of the first key the mirror reads on
/// that side, on its members in turn until one answers (users are cluster-wide); any other
/// outcome (unreachable, TLS, 404) is left to the client, which retries or reports it.
fn check_access(ep: &Endpoint, role: &str, side: &str, key: &str, timeout: Duration) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(timeout))
        .user_agent(concat!("etcdmirror/", env!("CARGO_PKG_VERSION")))
        .tls_config(ep.tls.clone())
        .build()
        .into();
    let answer = ep.members.iter().find_map(|member| {
        let url = format!("{member}/v2/keys{}", encode(key, true));
        let mut req = agent.head(&url);
        if let Some(auth) = ep.auth_header() {
            req = req.header("Authorization", &auth);
        }
        req.call().ok().map(|resp| resp.status().as_u16())
    });
    let Some(status) = answer else {
        return Ok(());
    };
    if status != 401 && status != 403 {
        return Ok(());
    }
    let check = if ep.password_in_url {
        format!(
            "check the user and password in the {} URL",
            side.to_uppercase()
        )
    } else {
        format!("check --{side}-user and --{side}-password-file")
    };
    Err(Error::Usage(match ep.user() {
        Some(user) => format!(
            "the {role} {ep} refused user {user:?} (HTTP {status}): authentication failed \
             (wrong user or password), or the user may not read {key}; {check}"
        ),
        None => format!(
            "the {role} {ep} requires authentication (HTTP {status}) to read {key}: \
             give a user with --{side}-user and its password with --{side}-password-file"
        ),
    }))
}

/// The source and destination clients, each member surveyed (cluster ids agree) when a side
/// lists several; `budget` is the retry budget, `probe` how long a member may take to answer.
pub fn clients(cfg: &Config, budget: Duration, probe: Duration) -> Result<(Client, Client)> {
    // What a member is checked with before its first use (several members): a key each
    // side's credentials may read, small whatever the tree holds. On the source, a key
    // nobody writes under the prefix (its absence is answer enough); on the destination,
    // the replication index.
    let src = Client::new(
        &cfg.src,
        cfg.src_api,
        "source",
        &keys::join(&cfg.keys.src_prefix, "_etcdmirror_member_check"),
        budget,
        cfg.watch_timeout,
    );
    let dst = Client::new(
        &cfg.dst,
        cfg.dst_api,
        "destination",
        &cfg.keys.index_key(),
        budget,
        cfg.watch_timeout,
    );
    // A member that does not answer this soon is checked when the mirror moves to it.
    let survey_timeout = probe.min(Duration::from_secs(3));
    src.survey(survey_timeout)?;
    dst.survey(survey_timeout)?;
    Ok((src, dst))
}
