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
}

/// Read the replication index stored at `key` on a v3 destination, if there is one.
pub fn read_index(dst: &Client, key: &str) -> Result<Option<u64>> {
    let Some(kv) = v3::get(dst, key.as_bytes())? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&kv.value);
    text.trim().parse().map(Some).map_err(|_| {
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

impl<'a> Dest3<'a> {
    pub fn new(dst: &'a Client, index_key: &str, written: u64) -> Dest3<'a> {
        Dest3 {
            dst,
            index_key: index_key.as_bytes().to_vec(),
            written,
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
        let mut pending: Vec<Change> = changes.to_vec();
        for _ in 0..TRIES {
            let mut compares = vec![Compare::Value(
                self.index_key.clone(),
                self.written.to_string().into_bytes(),
            )];
            // The change each compare after the index is about.
            let mut compared: Vec<&Change> = Vec::new();
            let mut writes = Vec::new();
            let mut skip = vec![false; pending.len()];
            for (c, skipped) in pending.iter().zip(skip.iter_mut()) {
                let cmp = match &c.expect {
                    Expect::Any => None,
                    Expect::Absent => Some(Compare::Absent(c.key.clone())),
                    Expect::Value(v) if v.len() <= SMALL_VALUE => {
                        Some(Compare::Value(c.key.clone(), v.clone()))
                    }
                    Expect::Value(_) => {
                        let found = v3::get(self.dst, &c.key)?;
                        if at_start(c, found.as_ref()) {
                            found.map(|kv| Compare::Mod(c.key.clone(), kv.mod_revision))
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
                    Some(v) => Write::Put(c.key.clone(), v.clone()),
                    None => Write::Delete(c.key.clone()),
                });
            }
            writes.extend(
                clear
                    .iter()
                    .map(|(from, to)| Write::DeleteRange(from.clone(), to.clone())),
            );
            if ends {
                writes.push(Write::Put(
                    self.index_key.clone(),
                    batch.index.to_string().into_bytes(),
                ));
            }
            let (outcome, _) = v3::txn(self.dst, &compares, &writes, &what)?;
            let found = match outcome {
                TxnOutcome::Done(_) => {
                    if ends {
                        self.written = batch.index;
                    }
                    return Ok(());
                }
                TxnOutcome::Failed(found) => found,
            };
            let mut found = found.into_iter();
            let index_now = found
                .next()
                .flatten()
                .map(|kv| String::from_utf8_lossy(&kv.value).trim().parse::<u64>());
            let keys_found: Vec<Option<Kv>> = found.collect();
            let index_now = match index_now {
                Some(Ok(i)) => Some(i),
                Some(Err(_)) | None => None,
            };
            if ends
                && index_now == Some(batch.index)
                && compared
                    .iter()
                    .zip(&keys_found)
                    .all(|(c, f)| at_end(c, f.as_ref()))
            {
                // An earlier attempt landed and only its answer was lost.
                info!(
                    "the destination already holds index {} and its writes (a lost answer)",
                    batch.index
                );
                self.written = batch.index;
                return Ok(());
            }
            if index_now != Some(self.written) {
                return Err(self.other_writer(index_now));
            }
            let mut done = Vec::new();
            for (c, f) in compared.iter().zip(&keys_found) {
                if at_start(c, f.as_ref()) {
                    continue;
                }
                if at_end(c, f.as_ref()) {
                    done.push(c.key.clone());
                    continue;
                }
                return Err(self.mismatch(batch, c, f.as_ref()));
            }
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
