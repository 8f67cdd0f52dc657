//! The replication loop: watch the source, apply each event with its condition, record the index.

use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::cli::Config;
use crate::error::{Error, Result};
use crate::etcd::{Client, Cond, Event, Next, Opened, Stream, Written};
use crate::keys::{KeyMap, Route};
use crate::metrics;
use crate::plan::{plan_event, plan_subtree_event, Op, State};

/// How often an index that moved without an applied event is written to the destination.
/// Sooner when the source is busy elsewhere, so that a restart finds its index inside the
/// source's 1000-event history.
const IDLE_RECORD_EVERY: Duration = Duration::from_secs(1);
const IDLE_RECORD_EVENTS: u64 = 100;

/// Read the state of a destination key.
pub fn read_state(dst: &Client, key: &str) -> Result<(State, u64)> {
    let got = dst.get(key, false)?;
    let mi = got.node.as_ref().map_or(0, |n| n.modified_index);
    Ok((State::of(got.node.as_ref()), mi))
}

/// Read the replication index stored at `key`, if there is one.
pub fn read_index(dst: &Client, key: &str) -> Result<Option<(u64, u64)>> {
    match read_state(dst, key)? {
        (State::Absent, _) => Ok(None),
        (State::Value(v), mi) => v.trim().parse().map(|i| Some((i, mi))).map_err(|_| {
            Error::Usage(format!(
                "the replication index {key} on {} holds {v:?}, not a number; run with --reload",
                dst.name()
            ))
        }),
        (State::Dir, _) => Err(Error::Usage(format!(
            "the replication index {key} on {} is a directory; run with --reload",
            dst.name()
        ))),
    }
}

/// What one destination operation found.
enum Outcome {
    Done,
    /// The destination did not hold the expected pre-state; it holds this instead.
    Mismatch(State),
}

/// Turn an expected pre-state into a condition etcd can check, reading the key where it cannot.
fn condition(dst: &Client, key: &str, expect: &State) -> Result<std::result::Result<Cond, State>> {
    Ok(match expect {
        State::Absent => Ok(Cond::Absent),
        State::Value(v) if !v.is_empty() => Ok(Cond::Value(v.clone())),
        _ => match read_state(dst, key)? {
            (found, mi) if found == *expect => Ok(match found {
                State::Value(_) => Cond::Index(mi),
                _ => Cond::None,
            }),
            (found, _) => Err(found),
        },
    })
}

/// Apply one operation; the flag says whether a request was retried after a transient fault.
fn exec(dst: &Client, op: &Op) -> Result<(Outcome, bool)> {
    let (key, written) = match op {
        Op::Check { key, expect } => {
            let (found, _) = read_state(dst, key)?;
            let outcome = if found == *expect {
                Outcome::Done
            } else {
                Outcome::Mismatch(found)
            };
            return Ok((outcome, false));
        }
        Op::ClearSubtree { key } => return clear_subtree(dst, key).map(|r| (Outcome::Done, r)),
        Op::Put { key, value, expect } => match condition(dst, key, expect)? {
            Ok(cond) => (key, dst.put(key, value.as_deref(), &cond)?),
            Err(found) => return Ok((Outcome::Mismatch(found), false)),
        },
        Op::Delete { key, expect } => match condition(dst, key, expect)? {
            Ok(cond) => {
                let dir = *expect == State::Dir;
                (key, dst.delete(key, dir, dir, &cond)?)
            }
            Err(found) => return Ok((Outcome::Mismatch(found), false)),
        },
    };
    match written {
        (Written::Done, retried) => Ok((Outcome::Done, retried)),
        (Written::Rejected { code, message }, retried) => {
            debug!("{key}: etcd refused the write: {code} {message}");
            Ok((Outcome::Mismatch(read_state(dst, key)?.0), retried))
        }
    }
}

/// Remove everything mirrored at or below `key`; the destination root itself stays.
fn clear_subtree(dst: &Client, key: &str) -> Result<bool> {
    if key != "/" {
        let (w, retried) = dst.delete(key, true, true, &Cond::None)?;
        return match w {
            Written::Done => Ok(retried),
            // Already gone, or a plain value: either way nothing is left to mirror here.
            Written::Rejected { .. } => match read_state(dst, key)? {
                (State::Absent, _) => Ok(retried),
                (_, mi) => dst
                    .delete(key, false, false, &Cond::Index(mi))
                    .map(|(_, r)| r),
            },
        };
    }
    let mut retried = false;
    let root = dst.get("/", false)?.node;
    for child in root.iter().flat_map(|n| n.nodes.iter()) {
        if child.key.starts_with("/_") {
            continue;
        }
        retried |= dst
            .delete(&child.key, child.is_dir(), child.is_dir(), &Cond::None)?
            .1;
    }
    Ok(retried)
}

/// Paces watch renewals so that fewer than about `EVENTS_PER_ROUND` source events pass
/// between two registrations, and at least once per `quiet` interval.
pub struct Pacer {
    quiet: Duration,
    last: Option<(Instant, u64)>,
    /// Estimated source write rate, events per second; `None` until two samples.
    rate: Option<f64>,
}

const EVENTS_PER_ROUND: f64 = 250.0;

impl Pacer {
    pub fn new(quiet: Duration) -> Pacer {
        Pacer {
            quiet,
            last: None,
            rate: None,
        }
    }

    /// Feed the `X-Etcd-Index` of a response received at `now`.
    pub fn observe(&mut self, now: Instant, index: Option<u64>) {
        let Some(index) = index else { return };
        match self.last {
            None => self.last = Some((now, index)),
            Some((t, i)) => {
                let dt = now.duration_since(t).as_secs_f64();
                if dt < 0.05 {
                    return;
                }
                let sample = index.saturating_sub(i) as f64 / dt;
                // Rise at once, decay slowly: under-estimating the rate is what loses the window.
                self.rate = Some(match self.rate {
                    Some(r) if sample <= r => 0.7 * r + 0.3 * sample,
                    _ => sample,
                });
                self.last = Some((now, index));
            }
        }
    }

    /// How long the next long poll may wait for an event.
    pub fn poll_timeout(&self) -> Duration {
        let by_rate = match self.rate {
            // Until the rate is known, assume a busy source.
            None => Duration::from_millis(100),
            Some(r) if r > 0.0 => Duration::from_secs_f64(EVENTS_PER_ROUND / r),
            Some(_) => self.quiet,
        };
        by_rate.min(self.quiet).max(Duration::from_millis(25))
    }
}

/// The running mirror: everything it knows is the index, the rest lives in the clusters.
pub struct Mirror<'a> {
    src: &'a Client,
    dst: &'a Client,
    keys: &'a KeyMap,
    index_key: String,
    /// Every source event up to here is applied (or needed nothing).
    index: u64,
    /// What the destination's index key holds, as far as this process knows.
    written: u64,
    last_record: Instant,
    /// The first applied event after start may already be on the destination (crash
    /// between its write and its index write).
    first: bool,
    pacer: Pacer,
    retry_timeout: Duration,
}

/// Why a watch ended.
enum End {
    /// Renew it from the next index.
    Renew,
    /// It replayed an event from the history: the mirror is behind the source's head.
    Behind,
    /// It broke (reset, garbage): a transient fault.
    Broken(String),
}

impl<'a> Mirror<'a> {
    pub fn new(cfg: &'a Config, src: &'a Client, dst: &'a Client, index: u64) -> Mirror<'a> {
        Mirror {
            src,
            dst,
            keys: &cfg.keys,
            index_key: cfg.keys.index_key(),
            index,
            written: index,
            last_record: Instant::now(),
            first: true,
            pacer: Pacer::new(cfg.watch_timeout),
            retry_timeout: cfg.retry_timeout,
        }
    }

    /// Replicate until an error stops us.
    pub fn run(&mut self) -> Result<()> {
        info!("Starting replication at {}", self.index);
        metrics::update(|s| s.replicated_index = self.index);
        let mut broken_since: Option<Instant> = None;
        loop {
            let stream = self.open(Some(self.index + 1), true)?;
            let end = match self.follow(stream)? {
                End::Behind => self.catch_up()?,
                end => end,
            };
            match end {
                End::Renew | End::Behind => broken_since = None,
                End::Broken(why) => {
                    // A stream that opens but then breaks (reset, garbage) is a transient
                    // fault too: retry it within the same budget.
                    let since = *broken_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.retry_timeout {
                        return Err(Error::Transient(format!(
                            "watch on {}: {why}",
                            self.src.name()
                        )));
                    }
                    warn!("watch on {} broke ({why}); reconnecting", self.src.name());
                    metrics::update(|s| s.retries += 1);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Open a watch from `from` (or from now, with `None`), as a stream or a long poll.
    fn open(&mut self, from: Option<u64>, streamed: bool) -> Result<Stream> {
        let idle = self.pacer.poll_timeout();
        match self
            .src
            .watch(&self.keys.src_prefix, from, idle, streamed)?
        {
            Opened::Stream(s) => {
                self.pacer.observe(Instant::now(), s.registered);
                self.saw_source(s.registered);
                Ok(s)
            }
            Opened::Cleared(msg) => Err(Error::IndexCleared(format!(
                "watch from index {} on {}: {msg}",
                self.index + 1,
                self.src.name()
            ))),
        }
    }

    /// Behind the source's head. etcd replays only one history event per request, so
    /// register a live stream first: then only the events before its registration index
    /// `x` cost a round trip each (keep-alive long polls), and everything after arrives on
    /// the stream, however far away the source is.
    fn catch_up(&mut self) -> Result<End> {
        let live = self.open(None, true)?;
        let Some(x) = live.registered else {
            return Ok(End::Renew);
        };
        debug!(
            "catching up from {} to {x} while a live stream waits",
            self.index + 1
        );
        while self.index < x {
            let mut poll = self.open(Some(self.index + 1), false)?;
            match poll.next() {
                Err(why) => return Ok(End::Broken(why)),
                Ok(Next::Event(ev)) if ev.node.modified_index <= x => {
                    self.take(ev, true)?;
                    poll.finish();
                }
                // Live already: the stream holds this event and everything after it.
                Ok(Next::Event(_)) => {
                    poll.finish();
                    break;
                }
                // No event from here up to the poll's registration, which is after `x`.
                Ok(Next::Quiet | Next::Closed) if poll.registered.is_some_and(|y| y >= x) => break,
                Ok(Next::Quiet | Next::Closed) => return Ok(End::Renew),
            }
        }
        self.index = self.index.max(x);
        self.record(false)?;
        self.follow(live)
    }

    /// Apply what one stream delivers until it must be renewed.
    fn follow(&mut self, mut stream: Stream) -> Result<End> {
        let mut delivered = false;
        loop {
            let next = match stream.next() {
                Ok(n) => n,
                Err(why) => return Ok(End::Broken(why)),
            };
            match next {
                Next::Event(ev) => {
                    delivered = true;
                    let replayed = stream.replayed(&ev);
                    self.take(ev, replayed)?;
                    // After a replayed event the stream sends nothing more.
                    if replayed {
                        return Ok(End::Behind);
                    }
                }
                // A stream that ends with no event at all (a proxy closing the poll early) says
                // as much as a quiet one; pause so that such a proxy cannot make us spin.
                Next::Closed if delivered => return Ok(End::Renew),
                Next::Closed | Next::Quiet => {
                    if matches!(next, Next::Closed) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    // The headers were sent when the watch was registered: no event under
                    // the prefix up to that index, so it counts as replicated.
                    if let Some(x) = stream.registered.filter(|&x| x > self.index) {
                        debug!("no event under {} up to {x}", self.keys.src_prefix);
                        self.index = x;
                    }
                    self.record(false)?;
                    return Ok(End::Renew);
                }
            }
        }
    }

    /// Apply one watched event, noting where it came from.
    fn take(&mut self, ev: Event, replayed: bool) -> Result<()> {
        let idx = ev.node.modified_index;
        if replayed {
            debug!("index {idx} was replayed from the history");
        } else {
            debug!("index {idx} arrived live");
        }
        self.saw_source(Some(idx));
        self.apply(ev)
    }

    fn saw_source(&self, index: Option<u64>) {
        metrics::update(|s| {
            s.source_index = s.source_index.max(index.unwrap_or(0));
            s.last_watch = Some(Instant::now());
        });
    }

    fn apply(&mut self, ev: Event) -> Result<()> {
        let idx = ev.node.modified_index;
        let src_key = ev.node.key.clone();
        let (plan, dst_key) = match self.keys.route(&src_key) {
            Route::Skip(why) => {
                debug!(
                    "Skipping key {src_key} at index {idx} ({}): {why}",
                    ev.action
                );
                self.index = idx.max(self.index);
                metrics::update(|s| s.ignored_events += 1);
                return self.record(false);
            }
            Route::Subtree => {
                let root = self.keys.dst_root();
                (plan_subtree_event(&ev, &root), root)
            }
            Route::Mirror(dst) => {
                let plan = plan_event(&ev, &dst).map_err(|why| Error::Inconsistency {
                    key: src_key.clone(),
                    source: why,
                    destination: "nothing written".into(),
                })?;
                (plan, dst)
            }
        };
        info!(
            "Replicating key {src_key} at index {idx} ({} -> {dst_key})",
            ev.action
        );
        let started = Instant::now();
        let mut retried = false;
        for op in &plan.ops {
            let (outcome, r) = exec(self.dst, op)?;
            retried |= r;
            if let Outcome::Mismatch(found) = outcome {
                if (self.first || retried) && read_state(self.dst, &dst_key)?.0 == plan.post {
                    info!("{dst_key} already holds the result of index {idx}; accepting it");
                    break;
                }
                self.ensure_sole_writer()?;
                let pre = State::of(ev.prev.as_ref());
                return Err(Error::Inconsistency {
                    key: format!(
                        "{dst_key} (source key {src_key}, {} at index {idx})",
                        ev.action
                    ),
                    source: pre.describe(),
                    destination: found.describe(),
                });
            }
        }
        self.first = false;
        self.index = idx;
        self.record(true)?;
        metrics::update(|s| {
            s.observe_write(started.elapsed());
            *s.events_by_action.entry(ev.action.clone()).or_default() += 1;
        });
        Ok(())
    }

    /// Fail with `OtherWriter` when the stored index is not the one we last wrote.
    fn ensure_sole_writer(&self) -> Result<()> {
        let now = read_index(self.dst, &self.index_key)?.map(|(i, _)| i);
        if now != Some(self.written) {
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
            self.written
        ))
    }

    /// Write the index (compare-and-swap on our last write); `now` = an event was applied.
    fn record(&mut self, now: bool) -> Result<()> {
        let soon = self.last_record.elapsed() < IDLE_RECORD_EVERY
            && self.index - self.written < IDLE_RECORD_EVENTS;
        if self.index == self.written || (!now && soon) {
            return Ok(());
        }
        let value = self.index.to_string();
        let cond = Cond::Value(self.written.to_string());
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
        self.written = self.index;
        metrics::update(|s| {
            s.replicated_index = self.written;
            s.idle_advances += u64::from(!now);
        });
        self.last_record = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_starts_short_then_follows_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::from_secs(1));
        assert_eq!(p.poll_timeout(), Duration::from_millis(100));
        p.observe(t0, Some(1000));
        assert_eq!(p.poll_timeout(), Duration::from_millis(100));
        // 1000 events per second: renew every quarter second.
        p.observe(t0 + Duration::from_secs(1), Some(2000));
        assert_eq!(p.poll_timeout(), Duration::from_millis(250));
        // A faster source shortens it at once.
        p.observe(t0 + Duration::from_millis(1100), Some(2500));
        assert_eq!(p.poll_timeout(), Duration::from_millis(50));
        // A quiet source lengthens it gradually, never past the quiet interval.
        for s in 2..40 {
            p.observe(t0 + Duration::from_secs(s), Some(2500));
        }
        assert_eq!(p.poll_timeout(), Duration::from_secs(1));
    }

    #[test]
    fn pacer_ignores_missing_headers_and_bursts_within_50ms() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::from_millis(500));
        p.observe(t0, None);
        p.observe(t0, Some(10));
        p.observe(t0 + Duration::from_millis(10), Some(10_000));
        assert_eq!(p.poll_timeout(), Duration::from_millis(100));
        p.observe(t0 + Duration::from_millis(100), Some(10));
        assert_eq!(p.poll_timeout(), Duration::from_millis(500));
    }
}
