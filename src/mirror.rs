//! The replication loop: take what the watch delivers, plan it, write it on the destination,
//! record the index.

use std::time::Instant;

use log::{debug, info};

use crate::cli::Config;
use crate::dest::{exec, read_index, Outcome};
use crate::error::{Error, Result};
use crate::etcd::{Client, Cond, Event, Written};
use crate::keys::{KeyMap, Route, OUTSIDE, REPLICATION_STATE};
use crate::metrics;
use crate::pace::Recorder;
use crate::plan::{plan_event, plan_parent, plan_subtree_event, resume_at};
use crate::watch::{Arrival, Watch};

/// The running mirror: everything it knows is the index, the rest lives in the clusters.
pub struct Mirror<'a> {
    src: &'a Client,
    dst: &'a Client,
    keys: &'a KeyMap,
    cfg: &'a Config,
    index_key: String,
    /// Every source event up to here is applied (or needed nothing).
    index: u64,
    recorder: Recorder,
    /// The first applied event after start may already be on the destination (crash
    /// between its write and its index write).
    first: bool,
}

impl<'a> Mirror<'a> {
    pub fn new(cfg: &'a Config, src: &'a Client, dst: &'a Client, index: u64) -> Mirror<'a> {
        Mirror {
            src,
            dst,
            keys: &cfg.keys,
            cfg,
            index_key: cfg.keys.index_key(),
            index,
            recorder: Recorder::new(index, Instant::now()),
            first: true,
        }
    }

    /// Replicate until an error stops us.
    pub fn run(&mut self) -> Result<()> {
        info!("Starting replication at {}", self.index);
        metrics::update(|s| s.replicated_index = self.index);
        let mut watch = Watch::new(self.src, &self.keys.src_prefix, self.cfg.watch_timeout);
        loop {
            match watch.next(self.index)? {
                Arrival::Event(ev) => self.apply(ev)?,
                Arrival::Quiet(x) => {
                    if x > self.index {
                        debug!("no event under the watched key up to {x}");
                        self.index = x;
                    }
                    self.record(false)?;
                }
            }
            // What /lag shows: everything up to here is applied; the stored index follows
            // at most a second or 100 events later. One update per arrival.
            let index = self.index;
            metrics::update(|s| {
                s.replicated_index = index;
                s.source_index = s.source_index.max(index);
                s.last_watch = Some(Instant::now());
            });
        }
    }

    fn apply(&mut self, ev: Event) -> Result<()> {
        let idx = ev.node.modified_index;
        let src_key = ev.node.key.clone();
        // `replicated`: the event itself is written (not only a skipped key's directory).
        let (plan, dst_key, replicated) = match self.keys.route(&src_key) {
            Route::Skip(why) => {
                debug!(
                    "Skipping key {src_key} at index {idx} ({}): {why}",
                    ev.action
                );
                if why != OUTSIDE && why != REPLICATION_STATE {
                    metrics::update(|s| s.ignored_events = s.ignored_events.saturating_add(1));
                }
                // A hidden or ignored write created its directories on the source.
                let parent = (why != OUTSIDE && why != REPLICATION_STATE && writes(&ev))
                    .then(|| self.keys.mirrored_parent(&src_key))
                    .flatten();
                let Some(dir) = parent else {
                    self.index = idx.max(self.index);
                    return self.record(false);
                };
                debug!("{dir} must exist: {src_key} was written below it");
                (plan_parent(&dir), dir, false)
            }
            Route::Subtree => {
                let root = self.keys.dst_root();
                (plan_subtree_event(&ev, &root), root, true)
            }
            Route::Mirror(dst) => {
                let plan = plan_event(&ev, &dst).map_err(|why| Error::Inconsistency {
                    key: src_key.clone(),
                    source: why,
                    destination: "nothing written".into(),
                })?;
                info!(
                    "Replicating key {src_key} at index {idx} ({} -> {dst})",
                    ev.action
                );
                (plan, dst, true)
            }
        };
        let started = Instant::now();
        let mut retried = false;
        let mut at = 0;
        while let Some(op) = plan.ops.get(at) {
            let (outcome, r) = exec(self.dst, op)?;
            retried |= r;
            let Outcome::Mismatch(found) = outcome else {
                at = at.saturating_add(1);
                continue;
            };
            // A crash (or a lost response) may have left any state this plan passes through.
            if let Some(next) = (self.first || retried)
                .then(|| resume_at(&plan, at, &found))
                .flatten()
            {
                info!(
                    "{dst_key} already holds {} (a step of index {idx}); going on from there",
                    found.describe()
                );
                at = next;
                continue;
            }
            self.ensure_sole_writer()?;
            let pre = op.pre().unwrap_or(&plan.post);
            return Err(Error::Inconsistency {
                key: format!(
                    "{dst_key} (source key {src_key}, {} at index {idx})",
                    ev.action
                ),
                source: pre.describe(),
                destination: found.describe(),
            });
        }
        self.first = false;
        self.index = idx.max(self.index);
        self.record(true)?;
        if !replicated {
            return Ok(());
        }
        metrics::update(|s| {
            s.observe_write(started.elapsed());
            let n = s.events_by_action.entry(ev.action.clone()).or_default();
            *n = n.saturating_add(1);
        });
        Ok(())
    }

    /// Fail with `OtherWriter` when the stored index is not the one we last wrote.
    fn ensure_sole_writer(&self) -> Result<()> {
        let now = read_index(self.dst, &self.index_key)?.map(|(i, _)| i);
        if now != Some(self.recorder.written) {
            return Err(self.other_writer(now));
        }
        Ok(())
    }

    fn other_writer(&self, now: Option<u64>) -> Error {
        let now = now.map_or("missing".to_string(), |i| i.to_string());
        Error::OtherWriter(format!(
            "{} on {} is {now}, but this process last wrote {}",
            self.index_key,
            self.dst.name(),
            self.recorder.written
        ))
    }

    /// Write the index (compare-and-swap on our last write); `now` = an event was applied.
    fn record(&mut self, now: bool) -> Result<()> {
        if !self.recorder.due(self.index, now, Instant::now()) {
            return Ok(());
        }
        let value = self.index.to_string();
        let cond = Cond::Value(self.recorder.written.to_string());
        let (w, retried) = self.dst.put(&self.index_key, Some(&value), &cond)?;
        if let Written::Rejected { .. } = w {
            let stored = read_index(self.dst, &self.index_key)?.map(|(i, _)| i);
            // A retried write may have landed before its response was lost.
            if !(retried && stored == Some(self.index)) {
                return Err(self.other_writer(stored));
            }
        }
        if !now {
            debug!("recorded index {} without an event", self.index);
        }
        self.recorder.recorded(self.index, Instant::now());
        metrics::update(|s| {
            s.replicated_index = self.recorder.written;
            s.idle_advances = s.idle_advances.saturating_add(u64::from(!now));
        });
        Ok(())
    }
}

/// True for the actions that write a key (and so create its missing directories).
fn writes(ev: &Event) -> bool {
    matches!(
        ev.action.as_str(),
        "set" | "create" | "update" | "compareAndSwap"
    )
}
