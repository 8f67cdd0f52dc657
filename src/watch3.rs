//! What arrives from a v3 source: its revisions under the prefix, in order, each whole,
//! from the stored revision + 1; and when a quiet source may move the index without one.
//!
//! - The watch starts at the revision after the last applied one, with previous values. etcd
//!   sends a revision's events in one message, and a catch-up in messages of many
//!   revisions: they are grouped here by `mod_revision`, each group one batch.
//! - A broken or closed stream is opened again from the last applied revision + 1, so
//!   nothing is lost and nothing applied twice. A start revision the source has compacted
//!   is exit 4; a source whose current revision is below the applied one is exit 3.
//! - etcd sends nothing at all on a quiet watch, so a read that waits `--watch-timeout`
//!   without a byte renews the watch (a dead connection gives no error either). Then the
//!   index may move without an event: if no key under the prefix was modified after the
//!   applied revision `A` (a range with `min_mod_revision` A + 1 finds none, at the current
//!   revision `R`), and the prefix holds as many keys at `R` as at `A`, the prefix is the
//!   same at `R` as at `A`, and the destination, which holds `A`, holds `R` too. The index
//!   then moves to `R`, so that a quiet prefix on a busy source does not fall behind the
//!   source's compaction.

use std::collections::VecDeque;
use std::time::Duration;

use log::{debug, warn};

use crate::error::{Error, Result};
use crate::etcd::{Client, Failures};
use crate::v3::{self, Message, Next};

/// What the watch delivered.
pub enum Arrival {
    /// The events of one revision that touched the watched range.
    Revision(u64, Vec<v3::Event>),
    /// Nothing under the watched range changed up to this revision.
    Quiet(u64),
}

/// A watch on a v3 source's range, renewed and resumed as needed.
pub struct Watch3<'a> {
    src: &'a Client,
    key: Vec<u8>,
    end: Vec<u8>,
    idle: Duration,
    stream: Option<v3::Stream>,
    /// Whole revisions received and not yet handed out, oldest first.
    queue: VecDeque<(u64, Vec<v3::Event>)>,
    /// Broken streams in a row, for the one retry policy.
    failures: Failures,
    /// What the stream gave while `queued` looked for more events without waiting, to be
    /// handled by `next` first.
    stashed: Option<std::result::Result<Next, String>>,
}

impl<'a> Watch3<'a> {
    pub fn new(src: &'a Client, key: Vec<u8>, end: Vec<u8>, idle: Duration) -> Watch3<'a> {
        Watch3 {
            failures: src.failures(),
            src,
            key,
            end,
            idle,
            stream: None,
            queue: VecDeque::new(),
            stashed: None,
        }
    }

    /// The next revision after `applied`, or a proof that nothing changed up to some later
    /// revision.
    pub fn next(&mut self, applied: u64) -> Result<Arrival> {
        loop {
            if let Some((rev, events)) = self.queue.pop_front() {
                if rev > applied {
                    return Ok(Arrival::Revision(rev, events));
                }
                self.broken(&format!(
                    "revision {rev} arrived after revision {applied} was applied"
                ))?;
                continue;
            }
            let got = match (self.stashed.take(), self.stream.as_mut()) {
                (Some(got), _) => got,
                (None, Some(stream)) => stream.next(),
                (None, None) => {
                    self.open(applied)?;
                    continue;
                }
            };
            match got {
                Ok(Next::Message(Message::Events(events))) => {
                    self.failures = self.src.failures();
                    if let Err(why) = self.take(events, applied) {
                        self.broken(&why)?;
                    }
                }
                Ok(Next::Message(Message::Nothing | Message::Created(_))) => {}
                Ok(Next::Message(Message::Canceled {
                    compact_revision,
                    reason,
                })) => {
                    if compact_revision > 0 {
                        return Err(self.cleared(applied, compact_revision));
                    }
                    self.broken(&format!("the source cancelled the watch: {reason}"))?;
                }
                Ok(Next::Message(Message::Error(e))) => {
                    self.broken(&format!("the source ended the watch: {e}"))?;
                }
                Ok(Next::Closed) => self.broken("the source closed the watch")?,
                Ok(Next::Quiet) => {
                    debug!("no byte from the watch for {:?}: renewing it", self.idle);
                    self.stream = None;
                    let proof = self.quiet_until(applied)?;
                    // The source answered the proof's reads: a fault before the quiet period
                    // is over, and the next one gets the whole budget.
                    self.failures = self.src.failures();
                    if let Some(r) = proof {
                        return Ok(Arrival::Quiet(r));
                    }
                }
                Err(why) => self.broken(&why)?,
            }
        }
    }

    /// A revision already received after `after`, without waiting, so that the loop can
    /// write several in one transaction.
    pub fn queued(&mut self, after: u64) -> Option<(u64, Vec<v3::Event>)> {
        // Messages already read from the socket count too: a replica behind reads many
        // per read.
        if self.queue.is_empty() && self.stashed.is_none() {
            if let Some(stream) = self.stream.as_mut().filter(|s| s.ready()) {
                match stream.next() {
                    Ok(Next::Message(Message::Events(events))) => {
                        if let Err(why) = self.take(events, after) {
                            self.stashed = Some(Err(why));
                        }
                    }
                    other => self.stashed = Some(other),
                }
            }
        }
        match self.queue.front() {
            Some((rev, _)) if *rev > after => self.queue.pop_front(),
            _ => None,
        }
    }

    /// Queue a message's events by revision; they must be new and in order.
    fn take(&mut self, events: Vec<v3::Event>, applied: u64) -> std::result::Result<(), String> {
        let mut last = self.queue.back().map_or(applied, |(r, _)| *r);
        for ev in events {
            let rev = ev.kv.mod_revision;
            match self.queue.back_mut() {
                Some((r, evs)) if *r == rev => evs.push(ev),
                _ if rev > last => {
                    self.queue.push_back((rev, vec![ev]));
                    last = rev;
                }
                _ => {
                    self.queue.clear();
                    return Err(format!(
                        "an event of revision {rev} arrived after revision {last}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// A stream that cannot be trusted any more: drop it (and what it queued), and open
    /// again from the applied revision, within the retry budget.
    fn broken(&mut self, why: &str) -> Result<()> {
        warn!("watch on {}: {why}; watching again", self.src.name());
        self.stream = None;
        self.queue.clear();
        self.src.failed(&mut self.failures, "watch", why)
    }

    fn cleared(&self, applied: u64, compacted: u64) -> Error {
        Error::IndexCleared(format!(
            "the source {} has compacted its history up to revision {compacted}, past the \
             revision {} the mirror needs next (its replication index is {applied})",
            self.src.name(),
            applied.saturating_add(1)
        ))
    }

    /// Open the watch from `applied + 1` and read its first message.
    fn open(&mut self, applied: u64) -> Result<()> {
        let start = applied.saturating_add(1);
        let opened = v3::watch(self.src, &self.key, &self.end, start, self.idle)?;
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) if v3::compacted(&e) => return Err(self.cleared(applied, 0)),
            Err(e) => return Err(self.src.v3_refusal("watch", &e)),
        };
        match stream.next() {
            Ok(Next::Message(Message::Created(head))) if head < applied => Err(Error::IndexAhead {
                source: self.src.name().to_string(),
                head,
                index: applied,
            }),
            Ok(Next::Message(Message::Created(_))) => {
                debug!("watching {} from revision {start}", v3::show(&self.key));
                self.stream = Some(stream);
                Ok(())
            }
            Ok(Next::Message(Message::Canceled {
                compact_revision, ..
            })) if compact_revision > 0 => Err(self.cleared(applied, compact_revision)),
            Ok(Next::Message(Message::Canceled { reason, .. }))
                if reason.contains("PermissionDenied")
                    || reason.contains("InvalidArgument")
                    || reason.contains("Unauthenticated") =>
            {
                // Credentials refusals come this way, inside an HTTP 200.
                self.src.forget_token();
                Err(Error::Usage(format!(
                    "the source {} refused the watch on {}: {reason} (check --src-user and \
                     --src-password-file)",
                    self.src.name(),
                    v3::show(&self.key)
                )))
            }
            Ok(other) => self.broken(&format!("a watch began with {other:?}")),
            Err(why) => self.broken(&why),
        }
    }

    /// After a quiet period: the revision up to which nothing under the range changed, when
    /// it is past `applied` and that can be shown (see the module comment).
    fn quiet_until(&self, applied: u64) -> Result<Option<u64>> {
        let newer = v3::Range {
            key: &self.key,
            end: &self.end,
            at: 0,
            keys_only: true,
            min_mod: applied.saturating_add(1),
            limit: 1,
        }
        .read(self.src)?;
        let newer = match newer {
            Ok(f) => f,
            Err(e) => {
                debug!("no quiet proof: {}", e.message);
                return Ok(None);
            }
        };
        let now = newer.revision;
        if now <= applied || !newer.kvs.is_empty() {
            return Ok(None);
        }
        let counts = (
            v3::count(self.src, &self.key, &self.end, now)?,
            v3::count(self.src, &self.key, &self.end, applied)?,
        );
        match counts {
            (Ok((at_now, _)), Ok((at_applied, _))) if at_now == at_applied => {
                debug!("nothing under the watched range changed from {applied} to {now}");
                Ok(Some(now))
            }
            (Ok(_), Ok(_)) => Ok(None),
            (Err(e), _) | (_, Err(e)) => {
                debug!("no quiet proof: {}", e.message);
                Ok(None)
            }
        }
    }
}
