//! How a batch is written on a v3 destination: one transaction that compares each key's
//! expected state and the stored index, and writes the keys and the new index together;
//! and what a failed compare means.
//!
//! With the key and the index in one transaction there is no crash window between them:
//! after a kill the destination holds the state before the batch or after it. The one
//! exception is a batch too large for one transaction (over `flat::MAX_CHANGES` keys or
//! `flat::MAX_BYTES`): its chunks compare the old index and only the last one moves it, so
//! a kill between chunks leaves some keys already at their new state. A failed compare
//! therefore accepts a key found at its new state, and only a key at neither state is an
//! inconsistency.

use log::info;

use crate::error::{Error, Result};
use crate::etcd::Client;
use crate::flat::{chunks, Batch, Change, Expect};
use crate::v3::{self, Compare, Kv, TxnOutcome, Write};

/// Values up to this size are compared by value inside the transaction; a larger one is
/// read and compared here, and the transaction compares its mod_revision, so that a request
/// never carries a large value twice.
const SMALL_VALUE: usize = 32 * 1024;

/// A transaction whose compares keep failing on keys that change under it: someone else
/// writes there. After this many tries the mirror stops.
const TRIES: u32 = 4;

/// The destination, as far as the mirror writes it: the index key and what it holds.
pub struct Dest3<'a> {
    dst: &'a Client,
    index_key: Vec<u8>,
    /// The index the destination holds: this process's last write (or what it read at start).
    pub written: u64,
    /// Its bytes exactly as stored (an index written by hand may hold "42\n").
    stored: Vec<u8>,
}

/// Read the replication index stored at `key` on a v3 destination, if there is one, with
/// its bytes as stored.
pub fn read_index(dst: &Client, key: &str) -> Result<Option<(u64, Vec<u8>)>> {
    let Some(kv) = v3::get(dst, key.as_bytes())? else {
        return Ok(None);
    };
    Ok(Some((parse_index(dst, key, &kv.value)?, kv.value)))
}

/// The number an index key holds (an operator may have written "42\n"); exit 2 otherwise.
pub fn parse_index(dst: &Client, key: &str, value: &[u8]) -> Result<u64> {
    let text = String::from_utf8_lossy(value);
    text.trim().parse().map_err(|_| {
        Error::Usage(format!(
            "the replication index {key} on {} holds {text:?}, not a number; run with --reload",
            dst.name()
        ))
    })
}

/// A key's state for messages: absent, or its value (shortened when long).
pub fn describe(value: Option<&[u8]>) -> String {
    match value {
        None => "no key".to_string(),
        Some(v) if v.len() > 200 => format!(
            "a value of {} bytes starting {:?}",
            v.len(),
            String::from_utf8_lossy(v.get(..64).unwrap_or(v))
        ),
        Some(v) => format!("value {:?}", String::from_utf8_lossy(v)),
    }
}

fn describe_expect(e: &Expect) -> String {
    match e {
        Expect::Absent => describe(None),
        Expect::Value(v) => describe(Some(v)),
        Expect::Any => "any state".to_string(),
    }
}

/// Whether `found` is the state a change starts from.
fn at_start(c: &Change, found: Option<&Kv>) -> bool {
    match (&c.expect, found) {
        (Expect::Any, _) | (Expect::Absent, None) => true,
        (Expect::Value(v), Some(kv)) => kv.value == *v,
        _ => false,
    }
}

/// Whether `found` is the state a change leads to.
fn at_end(c: &Change, found: Option<&Kv>) -> bool {
    match (&c.new, found) {
        (None, None) => true,
        (Some(v), Some(kv)) => kv.value == *v,
        _ => false,
    }
}

/// What the read-back of a failed transaction says.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The index and every key already hold the batch's end state, and the request was
    /// sent again: an earlier attempt landed and only its answer was lost. (Without a
    /// retry, the same state is another mirror applying the same events.)
    Landed,
    /// The index is not the one this process wrote.
    OtherWriter,
    /// The compared key at this position holds neither its start nor its end state.
    Mismatch(usize),
    /// The index is ours and every key holds its start or its end state: write again the
    /// changes of the keys not in this list (those already at their end state).
    Again(Vec<Vec<u8>>),
}

/// Judge a failed transaction: `ends` = it was to move the index to `index` and was sent
/// again after a transient fault (only then can its first attempt have landed); `stored` is the
/// index this process wrote; `compared` the changes whose keys were compared, and `found`
/// what those keys hold now (same order); `index_now` what the index key holds now.
fn judge(
    ends: bool,
    index: u64,
    stored: &[u8],
    compared: &[&Change],
    index_now: Option<&Kv>,
    found: &[Option<Kv>],
) -> Verdict {
    let now = index_now.map(|kv| kv.value.as_slice());
    let ours = now == Some(stored);
    let landed = ends
        && now.is_some_and(|v| String::from_utf8_lossy(v).trim() == index.to_string())
        && compared
            .iter()
            .zip(found)
            .all(|(c, f)| at_end(c, f.as_ref()));
    if landed && !ours {
        return Verdict::Landed;
    }
    if !ours {
        return Verdict::OtherWriter;
    }
    let mut done = Vec::new();
    for (at, (c, f)) in compared.iter().zip(found).enumerate() {
        if at_start(c, f.as_ref()) {
            continue;
        }
        if !at_end(c, f.as_ref()) {
            return Verdict::Mismatch(at);
        }
        done.push(c.key.clone());
    }
    Verdict::Again(done)
}

impl<'a> Dest3<'a> {
    /// The destination whose index key holds `stored`, the text of `written`.
    pub fn new(dst: &'a Client, index_key: &str, written: u64, stored: Vec<u8>) -> Dest3<'a> {
        Dest3 {
            dst,
            index_key: index_key.as_bytes().to_vec(),
            written,
            stored,
        }
    }

    fn index_key_text(&self) -> String {
        v3::show(&self.index_key)
    }

    /// Write a batch and its index (`batch.index`).
    pub fn apply(&mut self, batch: &Batch) -> Result<()> {
        let parts = chunks(&batch.changes);
        let last = parts.len().saturating_sub(1);
        for (i, part) in parts.iter().enumerate() {
            let ends = i == last && batch.clear.is_empty();
            self.write(batch, part, &[], ends)?;
        }
        if !batch.clear.is_empty() || parts.is_empty() {
            self.write(batch, &[], &batch.clear, true)?;
        }
        Ok(())
    }

    /// Record `index` alone (the source moved without touching the mirrored keys).
    pub fn record(&mut self, index: u64) -> Result<()> {
        let batch = Batch {
            index,
            ..Batch::default()
        };
        self.write(&batch, &[], &[], true)
    }

    /// One transaction: `changes` and `clear` under their compares, and the new index when
    /// `ends`; retried on the keys still to change when some were already changed.
    fn write(
        &mut self,
        batch: &Batch,
        changes: &[Change],
        clear: &[(Vec<u8>, Vec<u8>)],
        ends: bool,
    ) -> Result<()> {
        let what = format!("txn for index {}", batch.index);
        let mut pending: Vec<&Change> = changes.iter().collect();
        let index = batch.index.to_string().into_bytes();
        for _ in 0..TRIES {
            let mut compares = vec![Compare::Value(&self.index_key, &self.stored)];
            // The change each compare after the index is about.
            let mut compared: Vec<&Change> = Vec::new();
            let mut writes = Vec::new();
            let mut skip = vec![false; pending.len()];
            for (&c, skipped) in pending.iter().zip(skip.iter_mut()) {
                let cmp = match &c.expect {
                    Expect::Any => None,
                    Expect::Absent => Some(Compare::Absent(&c.key)),
                    Expect::Value(v) if v.len() <= SMALL_VALUE => Some(Compare::Value(&c.key, v)),
                    Expect::Value(_) => {
                        let found = v3::get(self.dst, &c.key)?;
                        if at_start(c, found.as_ref()) {
                            found.map(|kv| Compare::Mod(&c.key, kv.mod_revision))
                        } else if at_end(c, found.as_ref()) {
                            *skipped = true;
                            continue;
                        } else {
                            return Err(self.mismatch(batch, c, found.as_ref()));
                        }
                    }
                };
                if let Some(cmp) = cmp {
                    compares.push(cmp);
                    compared.push(c);
                }
                writes.push(match &c.new {
                    Some(v) => Write::Put(&c.key, v),
                    None => Write::Delete(&c.key),
                });
            }
            writes.extend(clear.iter().map(|(from, to)| Write::DeleteRange(from, to)));
            if ends {
                writes.push(Write::Put(&self.index_key, &index));
            }
            let (outcome, retried) = v3::txn(self.dst, &compares, &writes, &what)?;
            let found = match outcome {
                TxnOutcome::Done => {
                    if ends {
                        self.wrote(batch.index);
                    }
                    return Ok(());
                }
                TxnOutcome::Failed(found) => found,
            };
            let index_now = found.first().cloned().flatten();
            let keys_found = found.get(1..).unwrap_or_default();
            let done = match judge(
                ends && retried,
                batch.index,
                &self.stored,
                &compared,
                index_now.as_ref(),
                keys_found,
            ) {
                Verdict::Landed => {
                    info!(
                        "the destination already holds index {} and its writes (a lost answer)",
                        batch.index
                    );
                    self.wrote(batch.index);
                    return Ok(());
                }
                Verdict::OtherWriter => {
                    let now = index_now.and_then(|kv| {
                        String::from_utf8_lossy(&kv.value)
                            .trim()
                            .parse::<u64>()
                            .ok()
                    });
                    return Err(self.other_writer(now));
                }
                Verdict::Mismatch(at) => {
                    let (c, f) = compared
                        .get(at)
                        .zip(keys_found.get(at))
                        .ok_or_else(|| self.other_writer(None))?;
                    return Err(self.mismatch(batch, c, f.as_ref()));
                }
                Verdict::Again(done) => done,
            };
            if !done.is_empty() {
                info!(
                    "{} of the keys of index {} already hold their new state (a batch cut \
                     by a restart); writing the rest",
                    done.len(),
                    batch.index
                );
            }
            pending = pending
                .into_iter()
                .zip(skip)
                .filter(|(c, skipped)| !skipped && !done.contains(&c.key))
                .map(|(c, _)| c)
                .collect();
        }
        Err(Error::OtherWriter(format!(
            "the keys of index {} on {} changed under the mirror {TRIES} times in a row: \
             something else writes there",
            batch.index,
            self.dst.name()
        )))
    }

    fn wrote(&mut self, index: u64) {
        self.written = index;
        self.stored = index.to_string().into_bytes();
    }

    fn mismatch(&self, batch: &Batch, c: &Change, found: Option<&Kv>) -> Error {
        Error::Inconsistency {
            key: format!(
                "{} (source {}, {} at index {})",
                v3::show(&c.key),
                batch.source,
                batch.action,
                batch.index
            ),
            source: describe_expect(&c.expect),
            destination: describe(found.map(|kv| kv.value.as_slice())),
        }
    }

    fn other_writer(&self, now: Option<u64>) -> Error {
        let now = now.map_or("missing or not a number".to_string(), |i| i.to_string());
        Error::OtherWriter(format!(
            "{} on {} is {now}, but this process last wrote {}",
            self.index_key_text(),
            self.dst.name(),
            self.written
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> Option<Kv> {
        Some(Kv {
            key: key.into(),
            value: value.into(),
            create_revision: 1,
            mod_revision: 1,
        })
    }

    fn put(key: &str, from: Option<&str>, to: &str) -> Change {
        Change {
            key: key.into(),
            expect: from.map_or(Expect::Absent, |v| Expect::Value(v.into())),
            new: Some(to.into()),
        }
    }

    #[test]
    fn a_failed_transaction_is_judged_by_what_it_read_back() {
        let (a, b) = (put("/a", None, "1"), put("/b", Some("x"), "y"));
        let compared = [&a, &b];
        // (retried, index as this process read it, index read back, keys read back) for a
        // batch that moves the index to 8.
        let verdict = |retried: bool, ours: &str, index: Option<&str>, keys: &[Option<Kv>]| {
            let index = index.and_then(|v| kv("/__replication/r", v));
            judge(retried, 8, ours.as_bytes(), &compared, index.as_ref(), keys)
        };
        let (at_end, at_start) = ([kv("/a", "1"), kv("/b", "y")], [None, kv("/b", "x")]);
        // A lost answer: index and keys already at the end.
        assert_eq!(verdict(true, "7", Some("8"), &at_end), Verdict::Landed);
        // Another mirror moved the index, or removed it.
        assert_eq!(verdict(true, "7", Some("9"), &at_end), Verdict::OtherWriter);
        assert_eq!(verdict(true, "7", None, &at_start), Verdict::OtherWriter);
        // A key at neither state.
        assert_eq!(
            verdict(true, "7", Some("7"), &[None, kv("/b", "z")]),
            Verdict::Mismatch(1)
        );
        assert_eq!(
            verdict(true, "7", Some("7"), &[kv("/a", "0"), kv("/b", "x")]),
            Verdict::Mismatch(0)
        );
        // A chunk of this batch landed before a restart: write the rest.
        assert_eq!(
            verdict(true, "7", Some("7"), &[kv("/a", "1"), kv("/b", "x")]),
            Verdict::Again(vec![b"/a".to_vec()])
        );
        // An index stored by hand as "7\n" is ours when that is what this process read.
        assert_eq!(
            verdict(true, "7\n", Some("7\n"), &at_start),
            Verdict::Again(vec![])
        );
        // A request sent once, or a chunk that does not move the index, never counts as
        // landed: the same state is then another mirror applying the same events.
        assert_eq!(
            verdict(false, "7", Some("8"), &at_end),
            Verdict::OtherWriter
        );
    }
}
