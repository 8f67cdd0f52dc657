//! `--check` for a v3 destination (source v2 or v3): the audit of `check.rs` (same line,
//! `--json` document and exit codes), with the proofs that a v3 destination allows.
//!
//! Each read takes the replica at one revision: the replication index `R` (stored at
//! mod_revision `M`) and the keys the mirror owns, all as they were at one moment. A batch
//! is one transaction with its index, except one too large for a transaction: its chunks go
//! first and only the last one moves the index, so a key written after `M` (or deleted,
//! which leaves no trace) may belong to a batch in flight, which is a source revision after
//! `R`. The source is read after the replica, at `S`. A difference is reported (confirmed)
//! only by one of these proofs; any other may be lag:
//! - **Exact** (v3 source, `R` still readable): the source is read at revision `R`, the
//!   state the replica must hold, and its keys (without values) again at `S`. A difference
//!   is confirmed when the replica key was written at or before `M` (no batch in flight
//!   wrote it), or when the source key has not changed from `R` to `S` (no batch after `R`
//!   touches it).
//! - **Settled** (v2 source, or a v3 source whose revision `R` was compacted): the source is
//!   read now; a source key last modified at or before `R` held that state over `[R, S]`,
//!   so the replica, which holds `R` and no batch in flight on it, must hold it.
//! - **Held still**, as in `check.rs`: a replica key with the same mod_revision in two
//!   reads, the second after the index passed the first read's `S`, held its state while
//!   the source was at `S`, which a correct mirror does only if the source held it too; so
//!   it is confirmed when the source is known to have differed at `S` (read now; or, read
//!   at `R`, unchanged since `R` or gone from `S`).
//!
//! The model in the tests checks these proofs against a mirror stopped anywhere, in the
//! middle of a chunked batch included, and a check reading at any later moment, exact or
//! not. Open differences are read again once the index moves (for a v2 source, once it
//! reaches the last read's `S`; for a v3 source, whose index moves only with the prefix,
//! once it moves at all), for at most `--check-wait`; what is still open then is a WARNING.
//! "Caught up" is the index reaching the first read's `S`, or, for a v3 source, nothing
//! under the prefix having changed after `R` (the proof `watch3.rs` uses to move a quiet
//! index; with `R` compacted: no mirrored key modified after `R`).

use std::collections::BTreeMap;
use std::time::Instant;

use log::debug;

use crate::check::{Difference, Options, Report, Seen, POLL};
use crate::cli::{Api, Config};
use crate::error::{Error, Result};
use crate::etcd::Client;
use crate::flat;
use crate::keys::KeyMap;
use crate::reload::Entry;
use crate::reload3::{read_have, read_source, Have, SrcKv, Want};
use crate::v3::{self, show};

/// A key's state on one side: value and modifiedIndex (v2) or mod_revision (v3).
pub type State = Option<(Vec<u8>, u64)>;

/// A key whose two sides differ in one read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The replica key.
    pub key: Vec<u8>,
    /// The source key it mirrors.
    pub source_key: Vec<u8>,
    pub source: State,
    pub replica: State,
    pub confirmed: bool,
    /// The source at the read's `S` is known to differ from `replica` (for "held still").
    pub differs_now: bool,
}

/// What a read knows beyond the two sides, for the proofs at the top of this file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Basis {
    /// The source was read at the replica's index `R`; `now` holds each mirrored source
    /// key's mod_revision at `S`.
    Exact {
        index_mod: u64,
        index: u64,
        now: BTreeMap<Vec<u8>, u64>,
    },
    /// The source was read now; the replica's index is `index`.
    Now { index: u64 },
}

/// The differences between the wanted keys and the replica's, in key order, each
/// confirmed or not by the read's own proofs.
pub fn compare(
    keys: &KeyMap,
    src_api: Api,
    want: Want,
    mut have: Have,
    basis: &Basis,
) -> Vec<Found> {
    let mut out = Vec::new();
    for (key, src) in want {
        let replica = have.remove(&key);
        if replica.as_ref().map(|r| &r.0) != Some(&src.value) {
            let SrcKv {
                key: source_key,
                value,
                modified,
            } = src;
            out.push(Found {
                key,
                source_key,
                source: Some((value, modified)),
                replica,
                confirmed: false,
                differs_now: false,
            });
        }
    }
    // What is left is on the replica only.
    out.extend(have.into_iter().map(|(key, state)| Found {
        source_key: source_of(keys, src_api, &key),
        key,
        source: None,
        replica: Some(state),
        confirmed: false,
        differs_now: false,
    }));
    out.sort_by(|a, b| a.key.cmp(&b.key));
    for d in &mut out {
        d.confirmed = proven(d, basis);
        d.differs_now = differs_now(d, basis);
    }
    out
}

/// The source key of a replica key, for messages.
fn source_of(keys: &KeyMap, src_api: Api, key: &[u8]) -> Vec<u8> {
    match src_api {
        Api::V3 => crate::reload3::source_of_v3(keys, key).unwrap_or_default(),
        Api::V2 => std::str::from_utf8(key)
            .ok()
            .and_then(|k| keys.source_of(k))
            .unwrap_or_default()
            .into_bytes(),
    }
}

/// The proofs a single read gives (see the top of this file).
fn proven(d: &Found, basis: &Basis) -> bool {
    match basis {
        Basis::Exact {
            index_mod,
            index,
            now,
        } => {
            d.replica.as_ref().is_some_and(|(_, m)| m <= index_mod)
                || (d.source.is_some() && now.get(&d.key).is_some_and(|m| m <= index))
        }
        Basis::Now { index } => d.source.as_ref().is_some_and(|(_, m)| m <= index),
    }
}

/// Whether the source at the read's `S` is known to differ from the replica: a source read
/// now differs by definition; read at `R`, it is known at `S` when the key is unchanged
/// since `R`, or gone while the replica has it.
fn differs_now(d: &Found, basis: &Basis) -> bool {
    match basis {
        Basis::Now { .. } => true,
        Basis::Exact { index, now, .. } => match now.get(&d.key) {
            Some(m) => d.source.is_some() && m <= index,
            None => d.replica.is_some(),
        },
    }
}

/// A later read `now` of a key that differed in the read before (`before`, whose source was
/// read at `before_source_index`), with the replica's index `index` at this read: confirmed
/// too when the replica key held still while the source was at that index, and the source
/// was known to differ there.
pub fn held_still(mut now: Found, before: &Found, before_source_index: u64, index: u64) -> Found {
    let still = index >= before_source_index
        && before.differs_now
        && matches!((&before.replica, &now.replica), (Some((_, was)), Some((_, is))) if was == is);
    now.confirmed |= still;
    now
}

/// One read of both sides.
#[derive(Debug)]
struct Read {
    /// The replication index `R`.
    index: u64,
    /// The source's index (v2) or current revision (v3) `S`.
    source_index: u64,
    /// Mirrored source keys.
    keys: usize,
    /// v3: nothing under the prefix changed after `R`.
    quiet: bool,
    diffs: Vec<Found>,
}

/// The replication index, its mod_revision and the revision it was read at.
fn replica_index(dst: &Client, key: &str) -> Result<(u64, u64, u64)> {
    let found = v3::Range {
        key: key.as_bytes(),
        end: &[],
        at: 0,
        keys_only: false,
        min_mod: 0,
        limit: 1,
    }
    .read(dst)?
    .map_err(|e| dst.v3_refusal(&format!("range {key}"), &e))?;
    let Some(kv) = found.kvs.into_iter().find(|k| k.key == key.as_bytes()) else {
        return Err(Error::Usage(format!(
            "no replication index at {key} on {}: the replica was never loaded, or a --reload \
             is under way",
            dst.name()
        )));
    };
    let index = crate::dest3::parse_index(dst, key, &kv.value)?;
    Ok((index, kv.mod_revision, found.revision))
}

/// The source range now, read without values.
struct Now {
    /// Each mirrored key's mod_revision, by replica key.
    mods: BTreeMap<Vec<u8>, u64>,
    /// Keys in the range, mirrored or not.
    count: u64,
    /// The highest mod_revision among them.
    newest: u64,
    /// The revision read (`S`).
    revision: u64,
}

fn source_now(keys: &KeyMap, src: &Client) -> Result<Now> {
    let (from, to) = flat::src_range(keys);
    let found = v3::Range {
        key: &from,
        end: &to,
        at: 0,
        keys_only: true,
        min_mod: 0,
        limit: 0,
    }
    .read(src)?
    .map_err(|e| src.v3_refusal(&format!("range {}", show(&from)), &e))?;
    Ok(Now {
        count: u64::try_from(found.kvs.len()).unwrap_or(u64::MAX),
        newest: found.kvs.iter().map(|k| k.mod_revision).max().unwrap_or(0),
        revision: found.revision,
        mods: found
            .kvs
            .into_iter()
            .filter_map(|k| Some((flat::route_v3(keys, &k.key).ok()?, k.mod_revision)))
            .collect(),
    })
}

/// Read the replica, then the source, and compare.
fn read(cfg: &Config, src: &Client, dst: &Client) -> Result<Read> {
    let keys = &cfg.keys;
    let (index, index_mod, at) = replica_index(dst, &keys.index_key())?;
    let (have, _) = read_have(dst, keys, cfg.src_api, at)?;
    if cfg.src_api == Api::V3 {
        let now = source_now(keys, src)?;
        // A replica ahead of the source cannot be read at its index: compared with now.
        if index <= now.revision {
            match read_source(keys, Api::V3, src, index)? {
                Ok(at_r) => {
                    let quiet = now.newest <= index && now.count == at_r.listed;
                    let source_index = now.revision;
                    let basis = Basis::Exact {
                        index_mod,
                        index,
                        now: now.mods,
                    };
                    return Ok(Read {
                        index,
                        source_index,
                        keys: at_r.want.len(),
                        quiet,
                        diffs: compare(keys, Api::V3, at_r.want, have, &basis),
                    });
                }
                Err(e) => debug!(
                    "the source compacted the replica's revision {index} ({}): comparing with \
                     its current state",
                    e.message
                ),
            }
        }
    }
    let source = read_source(keys, cfg.src_api, src, 0)?
        .map_err(|e| src.v3_refusal("range of the source prefix", &e))?;
    let quiet = source.want.values().all(|s| s.modified <= index);
    Ok(Read {
        index,
        source_index: source.index,
        keys: source.want.len(),
        quiet,
        diffs: compare(keys, cfg.src_api, source.want, have, &Basis::Now { index }),
    })
}

/// Read the replication index until it reaches `target` or `deadline` passes (at least once).
fn wait_for(dst: &Client, key: &str, target: u64, deadline: Instant) -> Result<u64> {
    loop {
        let (r, _, _) = replica_index(dst, key)?;
        let now = Instant::now();
        if r >= target || now >= deadline {
            return Ok(r);
        }
        std::thread::sleep(POLL.min(deadline.saturating_duration_since(now)));
    }
}

/// A state as `check.rs` reports it.
fn seen(s: State) -> Seen {
    s.map(|(v, m)| (Entry::Value(show(&v)), m))
}

fn difference(d: Found) -> Difference {
    Difference {
        key: show(&d.key),
        source_key: show(&d.source_key),
        source: seen(d.source),
        replica: seen(d.replica),
        confirmed: d.confirmed,
    }
}

/// The reads and waits (see the top of this file), as a report for `check.rs` to print.
pub fn audit(cfg: &Config, opts: Options) -> Result<Report> {
    let started = Instant::now();
    // A side that does not answer is UNKNOWN within the wait, whatever the mirror's budget.
    let budget = opts.wait.min(cfg.retry_timeout);
    let (src, dst) = crate::startup::clients(cfg, budget, budget)?;
    let index_key = cfg.keys.index_key();
    let deadline = started.checked_add(opts.wait).unwrap_or(started);
    let mut last = read(cfg, &src, &dst)?;
    let mut took = started.elapsed();
    let first = last.diffs.len();
    let mut report = Report {
        keys: last.keys,
        source_index: last.source_index,
        first_replica_index: last.index,
        replica_index: last.index,
        reads: 1,
        ..Report::default()
    };
    loop {
        report.replica_index = last.index;
        report.caught_up |=
            last.index >= report.source_index || (cfg.src_api == Api::V3 && last.quiet);
        debug!(
            "read {}: {} of {} keys differ ({} confirmed); replication index {}, source index {}",
            report.reads,
            last.diffs.len(),
            last.keys,
            last.diffs.iter().filter(|d| d.confirmed).count(),
            last.index,
            last.source_index
        );
        let confirmed = last.diffs.iter().any(|d| d.confirmed);
        let settled = last.diffs.is_empty() && report.caught_up;
        if report.ahead() || confirmed || settled || Instant::now() >= deadline {
            break;
        }
        // The next read needs the index at the source index read (v2); for a v3 source,
        // whose index moves only with the prefix, past the revision compared will do.
        let target = match cfg.src_api {
            Api::V2 => last.source_index,
            Api::V3 => last.index.saturating_add(1).min(last.source_index),
        };
        let waiting = Instant::now();
        let r = wait_for(&dst, &index_key, target, deadline)?;
        if r < target {
            break;
        }
        // Reads are apart by at least as long as one takes, so that on a busy source the
        // check spends at most half its time reading whole subtrees.
        let pause = POLL.max(took).saturating_sub(waiting.elapsed());
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        let began = Instant::now();
        let next = read(cfg, &src, &dst)?;
        took = began.elapsed();
        let before: BTreeMap<&[u8], &Found> =
            last.diffs.iter().map(|d| (d.key.as_slice(), d)).collect();
        let diffs = next
            .diffs
            .into_iter()
            .map(|d| match before.get(d.key.as_slice()) {
                Some(b) => held_still(d, b, last.source_index, next.index),
                None => d,
            })
            .collect();
        last = Read { diffs, ..next };
        report.reads = report.reads.saturating_add(1);
    }
    report.lagging = first.saturating_sub(last.diffs.len());
    report.differences = last.diffs.into_iter().map(difference).collect();
    report.waited = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::normalize_prefix;

    fn keymap() -> KeyMap {
        KeyMap {
            src_prefix: normalize_prefix("/app"),
            dst_prefix: normalize_prefix("/replica"),
            strip: true,
            ignore: None,
        }
    }

    fn want(items: &[(&str, &str, u64)]) -> Want {
        items
            .iter()
            .map(|(k, v, m)| {
                let src = SrcKv {
                    key: format!("/app/{k}").into_bytes(),
                    value: v.as_bytes().to_vec(),
                    modified: *m,
                };
                (format!("/replica/{k}").into_bytes(), src)
            })
            .collect()
    }

    fn have(items: &[(&str, &str, u64)]) -> Have {
        items
            .iter()
            .map(|(k, v, m)| {
                (
                    format!("/replica/{k}").into_bytes(),
                    (v.as_bytes().to_vec(), *m),
                )
            })
            .collect()
    }

    /// (key, confirmed) of each difference.
    fn verdicts(found: &[Found]) -> Vec<(String, bool)> {
        found.iter().map(|d| (show(&d.key), d.confirmed)).collect()
    }

    fn exact(index_mod: u64, index: u64, now: &[(&str, u64)]) -> Basis {
        Basis::Exact {
            index_mod,
            index,
            now: now
                .iter()
                .map(|(k, m)| (format!("/replica/{k}").into_bytes(), *m))
                .collect(),
        }
    }

    #[test]
    fn an_exact_read_confirms_what_no_batch_in_flight_can_explain() {
        // The replica's index 10 was written at its revision 50.
        let source = want(&[
            ("same", "1", 3),
            ("old", "new", 4),
            ("late", "new", 5),
            ("moved", "x", 6),
            ("gone", "g", 7),
            ("gone2", "g", 8),
        ]);
        let replica = have(&[
            ("same", "1", 20),
            ("old", "old", 40),
            ("late", "other", 51),
            ("moved", "y", 52),
            ("extra", "e", 53),
            ("extra2", "e", 30),
        ]);
        // Now: "moved" and "gone2" changed after 10 (a batch in flight may have written them).
        let now = [
            ("same", 3),
            ("old", 4),
            ("late", 5),
            ("moved", 11),
            ("gone", 7),
            ("gone2", 12),
        ];
        let found = compare(&keymap(), Api::V3, source, replica, &exact(50, 10, &now));
        assert_eq!(
            verdicts(&found),
            [
                // Written after the index, but its source key has not changed since 10.
                ("/replica/extra".to_string(), false),
                ("/replica/extra2".to_string(), true),
                ("/replica/gone".to_string(), true),
                ("/replica/gone2".to_string(), false),
                ("/replica/late".to_string(), true),
                ("/replica/moved".to_string(), false),
                ("/replica/old".to_string(), true),
            ]
        );
        assert_eq!(found[0].source, None);
        assert_eq!(found[0].source_key, b"/app/extra");
        assert_eq!(found[2].replica, None);
        // What a later read may confirm if the replica key holds still: the source is known
        // to differ at S where the key is gone, or unchanged since R.
        let differs: Vec<bool> = found.iter().map(|d| d.differs_now).collect();
        assert_eq!(differs, [true, true, true, false, true, false, true]);
    }

    #[test]
    fn a_read_of_the_source_now_confirms_keys_settled_before_the_index() {
        let found = compare(
            &keymap(),
            Api::V2,
            want(&[("settled", "1", 9), ("fresh", "2", 11), ("equal", "3", 2)]),
            have(&[
                ("settled", "0", 5),
                ("fresh", "1", 6),
                ("equal", "3", 4),
                ("extra", "e", 7),
            ]),
            &Basis::Now { index: 10 },
        );
        assert_eq!(
            verdicts(&found),
            [
                ("/replica/extra".to_string(), false),
                ("/replica/fresh".to_string(), false),
                ("/replica/settled".to_string(), true),
            ]
        );
        assert_eq!(found[0].source_key, b"/app/extra");
    }

    #[test]
    fn a_replica_key_that_held_still_past_the_source_index_is_confirmed() {
        let d = |replica: Option<(&str, u64)>, source: Option<(&str, u64)>| Found {
            key: b"/replica/k".to_vec(),
            source_key: b"/app/k".to_vec(),
            source: source.map(|(v, m)| (v.as_bytes().to_vec(), m)),
            replica: replica.map(|(v, m)| (v.as_bytes().to_vec(), m)),
            confirmed: false,
            differs_now: true,
        };
        let before = d(Some(("old", 7)), Some(("new", 12)));
        assert!(held_still(d(Some(("old", 7)), Some(("new", 12))), &before, 12, 12).confirmed);
        // The index has not passed the source's yet.
        assert!(!held_still(d(Some(("old", 7)), Some(("new", 12))), &before, 12, 11).confirmed);
        // The replica key was written meanwhile.
        assert!(!held_still(d(Some(("old", 9)), Some(("new", 12))), &before, 12, 12).confirmed);
        // Absent on both reads proves nothing.
        let gone = d(None, Some(("new", 12)));
        assert!(!held_still(d(None, Some(("new", 12))), &gone, 12, 13).confirmed);
        // An exact read that could not tell the source's state at its S.
        let unknown = Found {
            differs_now: false,
            ..d(Some(("v", 7)), Some(("w", 3)))
        };
        assert!(!held_still(d(Some(("v", 7)), None), &unknown, 12, 13).confirmed);
    }

    #[test]
    fn differences_are_reported_as_text() {
        let d = difference(Found {
            key: b"/replica/\xff".to_vec(),
            source_key: b"/app/\xff".to_vec(),
            source: Some((b"a\xfe".to_vec(), 3)),
            replica: None,
            confirmed: true,
            differs_now: true,
        });
        assert_eq!(d.key, "/replica/\\xff");
        assert_eq!(d.source, Some((Entry::Value("a\\xfe".into()), 3)));
        assert_eq!(d.kind(), crate::check::Kind::MissingOnReplica);
    }

    /// A correct mirror, stopped anywhere (in the middle of a batch too large for one
    /// transaction included), read by the check at any later moment of the source: no
    /// difference is ever confirmed, with any of the proofs, in one read or two (each exact
    /// or not: the source's revision `R` may be compacted between them).
    mod model {
        use super::*;
        use proptest::prelude::*;

        /// Keys a revision changes (value, or `None`: deleted), at most once each.
        type Revision = Vec<(u8, Option<u8>)>;

        /// Changes per transaction in the model (`flat::MAX_CHANGES` in the mirror).
        const CHUNK: usize = 1;

        fn dst(k: u8) -> Vec<u8> {
            format!("/replica/k{k}").into_bytes()
        }

        fn revision() -> impl Strategy<Value = Revision> {
            proptest::collection::btree_map(0u8..4, proptest::option::of(0u8..3), 1..5)
                .prop_map(|m| m.into_iter().collect())
        }

        /// The source at revision `r` (1-based revisions): each key's value and mod.
        fn source_at(history: &[Revision], r: usize) -> Want {
            let mut w = Want::new();
            for (i, rev) in history.iter().take(r).enumerate() {
                for (k, v) in rev {
                    match v {
                        Some(v) => w.insert(
                            dst(*k),
                            SrcKv {
                                key: format!("/app/k{k}").into_bytes(),
                                value: vec![*v],
                                modified: u64::try_from(i + 1).unwrap(),
                            },
                        ),
                        None => w.remove(&dst(*k)),
                    };
                }
            }
            w
        }

        /// The replica after `done` whole batches and `chunks` intermediate chunks of the
        /// next: (index, index mod_revision, keys). The reload wrote index 0 at revision 1.
        fn replica_at(history: &[Revision], done: usize, chunks: usize) -> (u64, u64, Have) {
            let (mut rev, mut index_mod) = (1u64, 1u64);
            let mut have = Have::new();
            let apply = |changes: &[(u8, Option<u8>)], rev: u64, have: &mut Have| {
                for (k, v) in changes {
                    match v {
                        Some(v) => have.insert(dst(*k), (vec![*v], rev)),
                        None => have.remove(&dst(*k)),
                    };
                }
            };
            for b in history.iter().take(done) {
                for c in b.chunks(CHUNK) {
                    rev += 1;
                    apply(c, rev, &mut have);
                }
                index_mod = rev;
            }
            if let Some(next) = history.get(done) {
                for c in next.chunks(CHUNK).take(chunks) {
                    rev += 1;
                    apply(c, rev, &mut have);
                }
            }
            (u64::try_from(done).unwrap(), index_mod, have)
        }

        /// One read: the replica at progress (done, chunks), the source at `s` (and at the
        /// replica's index when `exact`).
        fn read(
            history: &[Revision],
            done: usize,
            chunks: usize,
            s: usize,
            exact: bool,
        ) -> (u64, Vec<Found>) {
            let (index, index_mod, have) = replica_at(history, done, chunks);
            if !exact {
                let basis = Basis::Now { index };
                return (
                    index,
                    compare(&keymap(), Api::V3, source_at(history, s), have, &basis),
                );
            }
            let now = source_at(history, s)
                .into_iter()
                .map(|(k, v)| (k, v.modified))
                .collect();
            let basis = Basis::Exact {
                index_mod,
                index,
                now,
            };
            (
                index,
                compare(&keymap(), Api::V3, source_at(history, done), have, &basis),
            )
        }

        /// A moment of the mirror no later than source revision `head` and no earlier than
        /// `from`: (whole batches, chunks of the next).
        fn progress(
            history: &[Revision],
            head: usize,
            from: (usize, usize),
            pick: (usize, usize),
        ) -> (usize, usize) {
            let done = from.0 + pick.0 % (head.saturating_sub(from.0) + 1);
            let least = if done == from.0 { from.1 } else { 0 };
            let chunks = match history.get(done) {
                Some(next) if done < head => {
                    let n = next.len().div_ceil(CHUNK);
                    least + pick.1 % (n - least)
                }
                _ => least,
            };
            (done, chunks)
        }

        /// Read 1 (exact) sees a key written by a batch in flight, whose source changed
        /// after the index; read 2 (the revision compacted meanwhile: the source read now)
        /// finds the batch done and the source changed again. The key held still past the
        /// first read's source revision, but the source was not known to differ there.
        #[test]
        fn held_still_needs_a_known_difference() {
            let history: Vec<Revision> = vec![
                vec![(0, Some(0))],
                vec![(0, Some(1)), (1, Some(1)), (2, Some(1))],
                vec![(0, Some(2))],
            ];
            let (_, first) = read(&history, 1, 1, 2, true);
            let (index, second) = read(&history, 2, 0, 3, false);
            let k0 = dst(0);
            let before = first.iter().find(|d| d.key == k0).unwrap();
            let after = second.into_iter().find(|d| d.key == k0).unwrap();
            assert!(!before.confirmed && !after.confirmed);
            assert_eq!(before.replica, after.replica);
            assert!(!held_still(after, before, 2, index).confirmed);
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]

            #[test]
            fn a_correct_mirror_is_never_reported(
                history in proptest::collection::vec(revision(), 0..8),
                s1 in 0usize..9, later in 0usize..4,
                p1 in (0usize..9, 0usize..3), p2 in (0usize..9, 0usize..3),
                exact: (bool, bool),
            ) {
                let n = history.len();
                let s1 = s1.min(n);
                let s2 = (s1 + later).min(n);
                // Read 1: replica at a moment when the source was at most s1.
                let (d1, c1) = progress(&history, s1, (0, 0), p1);
                let (_, first) = read(&history, d1, c1, s1, exact.0);
                for d in &first {
                    prop_assert!(!d.confirmed, "read 1 confirmed {:?}", d);
                }
                // Read 2: the replica read after the source read at s1 (so the source was at
                // s1 or later), and the source at s2 after that.
                let (d2, c2) = progress(&history, s2, (d1, c1), p2);
                let (index, second) = read(&history, d2, c2, s2, exact.1);
                let before: BTreeMap<&[u8], &Found> = first.iter().map(|d| (d.key.as_slice(), d)).collect();
                for d in second {
                    let d = match before.get(d.key.as_slice()) {
                        Some(b) => held_still(d, b, u64::try_from(s1).unwrap(), index),
                        _ => d,
                    };
                    prop_assert!(!d.confirmed, "read 2 confirmed {:?}", d);
                }
            }

            /// A replica key written by hand after the mirror caught up is confirmed by an
            /// exact read, at once when the source has it, else by a second read.
            #[test]
            fn a_key_changed_by_hand_is_confirmed(
                history in proptest::collection::vec(revision(), 1..6),
                k in 0u8..5,
            ) {
                let n = history.len();
                let (index, index_mod, mut have) = replica_at(&history, n, 0);
                have.insert(dst(k), (vec![9], index_mod + 1));
                let at_r = source_at(&history, n);
                let now: BTreeMap<Vec<u8>, u64> =
                    at_r.iter().map(|(k, v)| (k.clone(), v.modified)).collect();
                let basis = Basis::Exact { index_mod, index, now };
                let first = compare(&keymap(), Api::V3, at_r.clone(), have.clone(), &basis);
                prop_assert_eq!(first.len(), 1);
                prop_assert_eq!(first[0].confirmed, at_r.contains_key(&dst(k)));
                let again = compare(&keymap(), Api::V3, at_r, have, &basis);
                let n = u64::try_from(n).unwrap();
                for d in again {
                    prop_assert!(held_still(d, &first[0], n, index).confirmed);
                }
            }
        }
    }
}
