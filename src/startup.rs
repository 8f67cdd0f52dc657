//! Start-up: logging, the metrics endpoint, the checks before any write, and the index to
//! replicate from (read, or made by `--reload`).

use std::io::Write;

use crate::cli::Config;
use crate::error::{Error, Result};
use crate::etcd::Client;
use crate::{dest, metrics, mirror, reload};

/// Log to stderr; under systemd (`JOURNAL_STREAM`) with syslog priorities and no timestamps.
pub fn init_logging(debug: bool) {
    // -d is about the mirror's own decisions, not the HTTP library's internals.
    let default = if debug {
        "info,etcdmirror=debug"
    } else {
        "info"
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
    builder.init();
}

/// Everything between a valid configuration and the replication loop: metrics endpoint,
/// safety checks, then `--reload` or the stored index.
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
    if let Some(addr) = cfg.metrics.filter(|_| !cfg.dry_run) {
        let bound = metrics::serve(addr).map_err(|e| {
            Error::Usage(format!(
                "--port/--listen: cannot serve metrics on {addr}: {e}"
            ))
        })?;
        log::info!("serving /metrics and /lag on http://{bound}");
    }
    let src = Client::new(&cfg.src, cfg.retry_timeout);
    let dst = Client::new(&cfg.dst, cfg.retry_timeout);
    if cfg.keys.feeds_itself() {
        let (s, d) = (
            src.get("/", false)?.cluster_id,
            dst.get("/", false)?.cluster_id,
        );
        if s.is_some() && s == d {
            return Err(Error::Usage(format!(
                "SRC and DST are the same cluster and {} lies inside or above the mirrored {}: \
                 the mirror would replicate its own writes (no flag overrides this)",
                cfg.keys.dst_root(),
                cfg.keys.src_prefix
            )));
        }
    }
    let index = if cfg.reload {
        match reload::reload(cfg, &src, &dst)? {
            Some(index) => index,
            None => return Ok(()),
        }
    } else {
        let key = cfg.keys.index_key();
        let (index, _) = dest::read_index(&dst, &key)?.ok_or_else(|| {
            Error::Usage(format!(
                "no replication index at {key} on {}: the destination was never loaded; run with --reload",
                dst.name()
            ))
        })?;
        log::info!("Current index read from {key}");
        index
    };
    mirror::Mirror::new(cfg, &src, &dst, index).run()
}
