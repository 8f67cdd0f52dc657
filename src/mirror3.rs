//! The replication loop into a v3 destination: take what the source delivers (a v2 event
//! or a v3 revision), plan it as key changes, write them with the index in one transaction.

use std::time::Instant;

use log::{debug, info};

use crate::cli::{Api, Config};
use crate::dest3::Dest3;
use crate::error::Result;
use crate::etcd::Client;
use crate::flat::{self, Batch};
use crate::metrics;
use crate::pace::Recorder;
use crate::watch::{self, Watch};
use crate::watch3::{self, Watch3};

/// Where batches come from: a v2 source's events or a v3 source's revisions.
// One value for the whole run: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Feed<'a> {
    V2(Watch<'a>),
    V3(Watch3<'a>),
}

/// What the feed gave: a batch to apply, or a proof that nothing changed up to an index.
enum Arrival {
    Batch(Batch),
    Quiet(u64),
}

impl Feed<'_> {
    /// What the source delivered after `after`, if it is already here (no waiting).
    fn ready(&mut self, after: u64, cfg: &Config) -> Result<Option<Arrival>> {
        Ok(match self {
            Feed::V2(w) if w.ready() => Some(match w.next(after)? {
                watch::Arrival::Event(ev) => Arrival::Batch(flat::from_v2(&ev, &cfg.keys)),
                watch::Arrival::Quiet(x) => Arrival::Quiet(x),
            }),
            Feed::V2(_) => None,
            Feed::V3(w) => w
                .queued(after)
                .map(|(rev, events)| Arrival::Batch(flat::from_v3(rev, &events, &cfg.keys))),
        })
    }

    fn next(&mut self, index: u64, cfg: &Config) -> Result<Arrival> {
        Ok(match self {
            Feed::V2(w) => match w.next(index)? {
                watch::Arrival::Event(ev) => Arrival::Batch(flat::from_v2(&ev, &cfg.keys)),
                watch::Arrival::Quiet(x) => Arrival::Quiet(x),
            },
            Feed::V3(w) => match w.next(index)? {
                watch3::Arrival::Revision(rev, events) => {
                    Arrival::Batch(flat::from_v3(rev, &events, &cfg.keys))
                }
                watch3::Arrival::Quiet(x) => Arrival::Quiet(x),
            },
        })
    }
}

/// Replicate from `index` until an error stops us.
/// `stored` is the index key's value as the destination holds it.
pub fn run(cfg: &Config, src: &Client, dst: &Client, index: u64, stored: Vec<u8>) -> Result<()> {
    info!("Starting replication into v3 at {index}");
    metrics::update(|s| s.replicated_index = index);
    let mut dest = Dest3::new(dst, &cfg.keys.index_key(), index, stored);
    let mut feed = match cfg.src_api {
        Api::V2 => Feed::V2(Watch::new(src, &cfg.keys.src_prefix, cfg.watch_timeout)),
        Api::V3 => {
            let (from, to) = flat::src_range(&cfg.keys);
            Feed::V3(Watch3::new(src, from, to, cfg.watch_timeout))
        }
    };
    let mut index = index;
    let mut recorder = Recorder::new(index, Instant::now());
    // An arrival taken while looking for more that did not fit the last transaction.
    let mut carry: Option<Arrival> = None;
    loop {
        let arrival = match carry.take() {
            Some(a) => a,
            None => feed.next(index, cfg)?,
        };
        // For the metrics: the batch written (its action, events and write time).
        let mut written = None;
        match arrival {
            Arrival::Batch(b) if b.is_empty() => {
                debug!("index {}: nothing under the prefix", b.index);
                index = index.max(b.index);
            }
            Arrival::Batch(mut b) => {
                // Events or revisions already received go in the same transaction while it
                // has room: a replica that fell behind catches up many per write.
                while let Some(next) = feed.ready(b.index, cfg)? {
                    match next {
                        Arrival::Batch(n) if flat::merge(&mut b, &n) => {}
                        other => {
                            carry = Some(other);
                            break;
                        }
                    }
                }
                info!(
                    "Replicating {} at index {} ({}: {} keys{}{})",
                    b.source,
                    b.index,
                    b.action,
                    b.changes.len(),
                    if b.clear.is_empty() {
                        ""
                    } else {
                        ", and a range delete"
                    },
                    if b.merged > 0 {
                        format!(
                            ", {} revisions in one transaction",
                            b.merged.saturating_add(1)
                        )
                    } else {
                        String::new()
                    }
                );
                let started = Instant::now();
                dest.apply(&b)?;
                index = index.max(b.index);
                recorder.recorded(index, Instant::now());
                written = Some((b.action, b.merged.saturating_add(1), started.elapsed()));
            }
            Arrival::Quiet(x) => {
                if x > index {
                    debug!("no event under the watched range up to {x}");
                    index = x;
                }
            }
        }
        let now = Instant::now();
        let idle = recorder.due(index, false, now);
        if idle {
            dest.record(index)?;
            recorder.recorded(index, now);
            debug!("recorded index {index} without an event");
        }
        // What /lag shows: everything up to here is applied; an index without an event is
        // stored at most a second or 100 events later. One update per arrival.
        metrics::update(|s| {
            if let Some((action, events, took)) = written.take() {
                s.observe_write(took);
                let n = s.events_by_action.entry(action).or_default();
                *n = n.saturating_add(events);
            }
            s.idle_advances = s.idle_advances.saturating_add(u64::from(idle));
            s.replicated_index = index;
            s.source_index = s.source_index.max(index);
            s.last_watch = Some(now);
        });
    }
}
