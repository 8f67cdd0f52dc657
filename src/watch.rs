//! What arrives from the source: one watch at a time, and what each answer proves.
//!
//! The argument for why no event is skipped (the README repeats it):
//! - etcd answers a watch from `waitIndex=N` with the first event at or after N under the
//!   watched key, from its history or, once registered, live; a stream then delivers every
//!   later event in index order on one TCP connection. So an event with index M that
//!   arrives proves that no event under the key lies in [N, M): the index may move to M.
//! - By default the watched key is the source's root, so every write anywhere moves the
//!   index by an event that arrived; nothing rests on silence while the source is busy.
//! - Silence is a proof only when it is long: a registration whose headers (with
//!   `X-Etcd-Index` = x) are followed by `--watch-timeout` (at least 5 s, default 15 s) without
//!   one byte of body proves no event in [N, x]. etcd writes a history hit right after the
//!   headers, so only a body delayed longer than that could be missed; a shorter pause of the
//!   network or the server is waited out. Only invisible writes (TTL refreshes, hidden keys)
//!   and a watch limited to the prefix need this proof.
//! - Behind the source (an event came from the history, after which etcd sends nothing more
//!   on that stream), the mirror first registers a live stream from now (index x), then reads
//!   the history up to x with long polls on the prefix, one per event under the prefix (the
//!   history scan skips the rest). A poll whose first event is past x proves the rest up to
//!   x; a poll with no event is a registration, proven only by `--watch-timeout` of silence.
//!   Everything after x arrives on the live stream, so a busy source cannot outrun a distant
//!   mirror that is catching up.
//! - A live stream delivers no hidden keys (`_x`) and no TTL refreshes. When a live event
//!   arrives after a gap in the index, the history of the gap is read first (it does hold
//!   hidden keys), so that a hidden write's directories are created in order.
//! - An answer that cannot be right (an event before N or out of order, a key the watch did
//!   not ask about) is never applied: the watch is treated as broken and opened again.
//! - With several source members, a broken watch is opened again on the next member, from
//!   the index (`Client::failed`). The client checks a member with a quorum read before its
//!   first request there, so that member has applied every event the mirror saw on the one
//!   before: the proofs above hold across a move, and a registration index below the
//!   mirror's still means a restored source, not a lagging follower.

use std::time::Duration;

use log::{debug, warn};

use crate::error::{Error, Result};
use crate::etcd::{Client, Event, Failures, Next, Opened, Stream, UNAUTHORIZED};
use crate::keys::below;
use crate::metrics;

/// What the watch delivered that moves the replication index.
#[derive(Debug)]
pub enum Arrival {
    /// The next source event under the watched key, in index order.
    Event(Event),
    /// No event under the watched key up to this index (a registration held silent for
    /// the whole `--watch-timeout`); the watch is renewed.
    Quiet(u64),
}

/// What the history held between the index and a live event that arrived after a gap.
enum Gap {
    /// A write the live watch did not deliver (a hidden key), to apply first.
    Hidden(Event),
    /// Nothing but TTL refreshes: the live event is next.
    Closed,
    /// The watch broke and is opened again from the index.
    Broken,
}

/// One open watch response and what it has shown so far.
struct Open {
    stream: Stream,
    /// The `waitIndex` it was opened with.
    from: u64,
    /// `X-Etcd-Index` of its headers: the store index when the watch was registered.
    registered: u64,
    /// The last event it delivered.
    last: Option<u64>,
}

/// The source watch: opens, validates and renews watch responses.
pub struct Watch<'a> {
    src: &'a Client,
    /// The watched key: the source's root, or the prefix when the root is refused.
    key: String,
    prefix: String,
    /// How long silence must last to count as proof (`--watch-timeout`).
    hold: Duration,
    /// The stream events arrive on.
    live: Option<Open>,
    /// Catching up: the live stream was registered at this index, and the events up to it
    /// are read from the history first.
    replay_to: Option<u64>,
    /// A live event that arrived after a gap in the index, delivered once the history of
    /// the gap has been read.
    pending: Option<Event>,
    /// Breaks in a row, across members (the client's retry policy).
    broken: Option<Failures>,
}

/// What one long poll on the history gave while catching up.
enum Replay {
    /// The next event under the prefix, up to the live stream's registration.
    Event(Event),
    /// No event under the prefix up to this index (at least the registration).
    Through(u64),
    /// The watch broke and is opened again from the index.
    Broken,
}

/// Why an answer cannot be right, if it cannot.
fn implausible(ev: &Event, from: u64, last: Option<u64>, key: &str) -> Option<String> {
    let idx = ev.node.modified_index;
    let related = below(&ev.node.key, key).is_some() || below(key, &ev.node.key).is_some();
    if idx < from {
        Some(format!(
            "event at index {idx} is older than the index {from} the watch asked for"
        ))
    } else if last.is_some_and(|l| idx <= l) {
        Some(format!("event at index {idx} arrived out of order"))
    } else if !related {
        Some(format!(
            "event for {} is neither under nor above the watched {key}",
            ev.node.key
        ))
    } else {
        None
    }
}

impl<'a> Watch<'a> {
    pub fn new(src: &'a Client, prefix: &str, hold: Duration) -> Watch<'a> {
        Watch {
            src,
            key: "/".to_string(),
            prefix: prefix.to_string(),
            hold,
            live: None,
            replay_to: None,
            pending: None,
            broken: None,
        }
    }

    /// A live event is already buffered, so that `next` will not wait (nor read the
    /// history first).
    pub fn ready(&self) -> bool {
        self.replay_to.is_none()
            && self.pending.is_none()
            && self.live.as_ref().is_some_and(|o| o.stream.ready())
    }

    /// The next arrival after `index`, every source event up to which has been applied.
    pub fn next(&mut self, index: u64) -> Result<Arrival> {
        loop {
            if let Some(live) = self.pending.take() {
                if live.node.modified_index <= index.saturating_add(1) {
                    return Ok(Arrival::Event(live));
                }
                match self.fill_gap(index, &live)? {
                    Gap::Hidden(ev) => {
                        self.pending = Some(live);
                        return Ok(Arrival::Event(ev));
                    }
                    Gap::Closed => return Ok(Arrival::Event(live)),
                    Gap::Broken => continue,
                }
            }
            if let Some(x) = self.replay_to {
                if index >= x {
                    self.replay_to = None;
                    continue;
                }
                match self.replay(index, x)? {
                    Replay::Event(ev) => return Ok(Arrival::Event(ev)),
                    Replay::Through(y) => {
                        self.replay_to = None;
                        return Ok(Arrival::Quiet(y));
                    }
                    Replay::Broken => continue,
                }
            }
            let mut open = match self.live.take() {
                Some(open) => open,
                None => self.open(Some(index.saturating_add(1)), index)?,
            };
            match open.stream.next() {
                Ok(Next::Event(ev)) => {
                    if let Some(why) = implausible(&ev, open.from, open.last, &self.key) {
                        warn!("broken answer from {}, not applied: {why}", self.src.name());
                        self.broke(why)?;
                        continue;
                    }
                    self.broken = None;
                    let idx = ev.node.modified_index;
                    if idx <= index {
                        // Already proven by the history read while catching up.
                        open.last = Some(idx);
                        self.live = Some(open);
                        continue;
                    }
                    if idx <= open.registered {
                        debug!("index {idx} was replayed from the history");
                        // etcd sends nothing after a history event: catch up behind a live
                        // registration.
                        let live = self.open(None, idx)?;
                        self.replay_to = Some(live.registered);
                        self.live = Some(live);
                        return Ok(Arrival::Event(ev));
                    }
                    debug!("index {idx} arrived live");
                    open.last = Some(idx);
                    self.live = Some(open);
                    if idx > index.saturating_add(1) {
                        self.pending = Some(ev);
                        continue;
                    }
                    return Ok(Arrival::Event(ev));
                }
                Ok(Next::Quiet) => {
                    // Renewed from the next index: a new registration is also the proof for
                    // writes no live watch sees (TTL refreshes, hidden keys). With several
                    // members, the member is checked again first: one cut off from the
                    // others would be quiet forever.
                    self.broken = None;
                    self.src.recheck();
                    return Ok(Arrival::Quiet(open.registered));
                }
                Ok(Next::Closed) => {
                    // A proxy that ends watches early must not make us spin.
                    if open.last.is_none() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                Err(why) => self.broke(why)?,
            }
        }
    }

    /// One long poll on the prefix's history from `index + 1`, while the live stream
    /// registered at `x` holds everything after `x`.
    fn replay(&mut self, index: u64, x: u64) -> Result<Replay> {
        let from = index.saturating_add(1);
        let mut poll = self.history(&self.prefix, from)?;
        let why = match poll.next() {
            Ok(Next::Event(ev)) => match implausible(&ev, from, None, &self.prefix) {
                Some(why) => why,
                None if ev.node.modified_index <= x => {
                    debug!(
                        "index {} was replayed from the history",
                        ev.node.modified_index
                    );
                    poll.finish();
                    return Ok(Replay::Event(ev));
                }
                // Its first event is past `x`, so it is on the live stream as well.
                None => {
                    poll.finish();
                    return Ok(Replay::Through(x));
                }
            },
            Ok(Next::Quiet) => match poll.registered {
                Some(y) => {
                    debug!("no event under {} up to {y}", self.prefix);
                    return Ok(Replay::Through(y.max(x)));
                }
                None => "a watch answer without X-Etcd-Index".to_string(),
            },
            Ok(Next::Closed) => "the history read ended without an answer".to_string(),
            Err(why) => why,
        };
        warn!("history read on {} broke: {why}", self.src.name());
        self.broke(why)?;
        Ok(Replay::Broken)
    }

    /// Read the history between `index` and the live event `live`, which arrived after a
    /// gap: one long poll per hidden write in it (a TTL refresh is in no answer at all).
    fn fill_gap(&mut self, index: u64, live: &Event) -> Result<Gap> {
        let from = index.saturating_add(1);
        let target = live.node.modified_index;
        let mut poll = self.history(&self.key, from)?;
        let why = match poll.next() {
            Ok(Next::Event(ev)) => match implausible(&ev, from, None, &self.key) {
                Some(why) => why,
                None if ev.node.modified_index < target => {
                    debug!(
                        "index {} was invisible to the live watch ({})",
                        ev.node.modified_index, ev.node.key
                    );
                    poll.finish();
                    return Ok(Gap::Hidden(ev));
                }
                None if ev.node.modified_index == target => {
                    poll.finish();
                    return Ok(Gap::Closed);
                }
                None => format!("the history skipped index {target}, which arrived live",),
            },
            Ok(_) => format!("no history answer up to index {target}, which arrived live"),
            Err(why) => why,
        };
        self.broke(why)?;
        Ok(Gap::Broken)
    }

    /// A keep-alive long poll on `key`'s history from `from`.
    fn history(&self, key: &str, from: u64) -> Result<Stream> {
        match self.src.watch(key, Some(from), self.hold, false)? {
            Opened::Stream(poll) => Ok(poll),
            Opened::Cleared(msg) => Err(Error::IndexCleared(format!(
                "history from index {from} on {}: {msg}",
                self.src.name()
            ))),
            Opened::Refused { code, message } => Err(Error::Usage(format!(
                "watch {key} on {} refused: etcd error {code}: {message}",
                self.src.name()
            ))),
        }
    }

    /// Open a stream from `from` (from now with `None`), after checking that the source
    /// has not fallen behind `index`.
    fn open(&mut self, from: Option<u64>, index: u64) -> Result<Open> {
        loop {
            match self.src.watch(&self.key, from, self.hold, true)? {
                Opened::Stream(stream) => {
                    let Some(registered) = stream.registered else {
                        self.broke("a watch answer without X-Etcd-Index".into())?;
                        continue;
                    };
                    metrics::update(|s| {
                        s.source_index = s.source_index.max(registered);
                        s.last_watch = Some(std::time::Instant::now());
                    });
                    if registered < index {
                        return Err(Error::IndexAhead {
                            source: self.src.name().to_string(),
                            head: registered,
                            index,
                        });
                    }
                    return Ok(Open {
                        stream,
                        from: from.unwrap_or_else(|| registered.saturating_add(1)),
                        registered,
                        last: None,
                    });
                }
                Opened::Cleared(msg) => {
                    return Err(Error::IndexCleared(format!(
                        "watch from index {} on {}: {msg}",
                        index.saturating_add(1),
                        self.src.name()
                    )))
                }
                Opened::Refused { code, message }
                    if code == UNAUTHORIZED && self.key != self.prefix =>
                {
                    warn!(
                        "{} refuses a watch on its root ({message}); watching only {}, so an idle \
                         prefix advances only by silence held for --watch-timeout",
                        self.src.name(),
                        self.prefix
                    );
                    self.key = self.prefix.clone();
                }
                Opened::Refused { code, message } => {
                    return Err(Error::Usage(format!(
                        "watch {} on {} refused: etcd error {code}: {message}",
                        self.key,
                        self.src.name()
                    )))
                }
            }
        }
    }

    /// A watch broke (reset, garbage, an impossible answer): the next member is tried at
    /// once, and a whole round of breaks backs off, within the budget (`Client::failed`).
    fn broke(&mut self, why: String) -> Result<()> {
        self.live = None;
        self.replay_to = None;
        self.pending = None;
        let src = self.src;
        let failures = self.broken.get_or_insert_with(|| src.failures());
        src.failed(failures, "watch", &why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::Node;

    fn ev(key: &str, idx: u64) -> Event {
        Event {
            action: "set".into(),
            node: Node {
                key: key.into(),
                value: Some("v".into()),
                modified_index: idx,
                nodes: vec![],
            },
            prev: None,
        }
    }

    fn bad(key: &str, idx: u64, from: u64, last: Option<u64>, watched: &str) -> bool {
        implausible(&ev(key, idx), from, last, watched).is_some()
    }

    #[test]
    fn answers_that_cannot_be_right() {
        assert!(bad("/p/a", 4, 5, None, "/p"));
        assert!(bad("/p/a", 7, 5, Some(7), "/p"));
        assert!(bad("/q/a", 7, 5, None, "/p"));
        assert!(!bad("/", 7, 5, None, "/p"));
        assert!(!bad("/p/a/b", 7, 5, Some(6), "/p"));
        assert!(!bad("/anything", 7, 5, None, "/"));
    }
}
