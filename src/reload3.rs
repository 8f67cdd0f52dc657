//! `--reload` onto a v3 destination, from a v2 or a v3 source: read the source at one index
//! or revision, diff it with the keys the mirror owns on the destination, write only the
//! differences in transactions conditioned on what was listed, and record the index.
//!
//! Why replication from the recorded index loses nothing and writes nothing twice: the
//! argument at the top of `reload.rs`, with v3's stronger reads.
//! - The destination is read first, at one revision (every page pinned to it), then the
//!   source: a v2 recursive GET is the state at exactly its `X-Etcd-Index`; a v3 range
//!   read at one revision `R` (every page pinned to it) is the state at exactly `R`.
//! - Each transaction compares every key it writes with its listed mod_revision (0: absent)
//!   and writes up to `flat::MAX_CHANGES` keys; once all are done, the owned keys hold the
//!   source's state at the listing, mapped. A failed compare whose key already holds what
//!   was wanted is a retried request whose first attempt landed; anything else is another
//!   writer (exit 3).
//! - A v3 source needs one pass: the snapshot at `R` is exact, and replication resumes with
//!   the events after `R`. Should the source compact past `R` before the mirror's watch is
//!   registered, the mirror exits 4 (compacted: run --reload again). A v2 source is listed
//!   again until a pass ends within `reload::MARGIN` events of its listing, as for a v2
//!   destination (its 1000-event history).
//! - The index goes before the first write of the tree, so a reload stopped midway leaves
//!   no index and only another `--reload` can follow, which diffs whatever state this one
//!   left. When nothing differs, the index is replaced in one write.
//!
//! Keys on the destination that map back to source keys the mirror never copies (ignored,
//! or hidden in a v2 source) are not owned: the reload leaves them alone and the guard does
//! not count them, as on a v2 destination.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use log::info;

use crate::cli::{Api, Config};
use crate::dest3::describe;
use crate::error::{Error, Result};
use crate::etcd::{Client, GrpcError};
use crate::flat;
use crate::keys::{KeyMap, Route};
use crate::reload::{after_pass, go_on, head, mass_delete, mirrored, Next, MARGIN, MAX_PASSES};
use crate::v3::{self, show, Compare, Kv, TxnOutcome, Write};

/// A source key as the destination must hold it, keyed by its destination key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrcKv {
    /// The source key, for messages.
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Its modifiedIndex (v2) or mod_revision (v3).
    pub modified: u64,
}

/// The source state mapped to destination keys.
pub type Want = BTreeMap<Vec<u8>, SrcKv>;

/// The owned destination keys: value and mod_revision.
pub type Have = BTreeMap<Vec<u8>, (Vec<u8>, u64)>;

/// One destination write: `key` from its listed mod_revision (0: absent) to `new`
/// (`None`: deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub key: Vec<u8>,
    pub listed: u64,
    pub new: Option<Vec<u8>>,
}

/// What a failed transaction's read-back says about one of its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    /// Its compare holds: it still has to be written.
    Pending,
    /// The key already holds what the step wanted: an earlier attempt landed.
    Landed,
    /// Someone else changed the key.
    Conflict,
}

impl Step {
    fn compare(&self) -> Compare<'_> {
        if self.listed == 0 {
            Compare::Absent(&self.key)
        } else {
            Compare::Mod(&self.key, self.listed)
        }
    }

    fn write(&self) -> Write<'_> {
        match &self.new {
            Some(v) => Write::Put(&self.key, v),
            None => Write::Delete(&self.key),
        }
    }

    /// The bytes it puts in a request.
    fn weight(&self) -> usize {
        self.key
            .len()
            .saturating_add(self.new.as_ref().map_or(0, Vec::len))
    }

    /// Judge the step by what its key holds now (`found`, read in the failed transaction).
    pub fn judge(&self, found: Option<&Kv>) -> Judged {
        if found.map_or(0, |k| k.mod_revision) == self.listed {
            return Judged::Pending;
        }
        match (&self.new, found) {
            (None, None) => Judged::Landed,
            (Some(v), Some(k)) if k.value == *v => Judged::Landed,
            _ => Judged::Conflict,
        }
    }

    /// What the step expects to find, for messages.
    fn expects(&self) -> String {
        if self.listed == 0 {
            describe(None)
        } else {
            format!("a key with mod_revision {}", self.listed)
        }
    }
}

/// What the reload will write, each list in key order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub creates: Vec<Step>,
    pub updates: Vec<Step>,
    pub deletes: Vec<Step>,
}

impl Diff {
    /// True when the plan writes nothing.
    pub fn is_empty(&self) -> bool {
        self.creates.is_empty() && self.updates.is_empty() && self.deletes.is_empty()
    }

    /// True when the plan deletes more than half of the destination's `existing` keys.
    pub fn deletes_too_much(&self, existing: usize) -> bool {
        existing > 0 && self.deletes.len().saturating_mul(2) > existing
    }

    /// The writes in the order they are made: new and changed keys before old ones go.
    pub fn steps(&self) -> Vec<&Step> {
        self.creates
            .iter()
            .chain(&self.updates)
            .chain(&self.deletes)
            .collect()
    }

    /// The same words as a v2 reload's plan (v3 has no directories, so nothing is replaced).
    pub fn summary(&self) -> String {
        format!(
            "{} creates, {} updates, 0 replaces, {} deletes",
            self.creates.len(),
            self.updates.len(),
            self.deletes.len()
        )
    }
}

/// Compare the wanted keys with the destination's.
pub fn diff(want: &Want, have: &Have) -> Diff {
    let mut d = Diff::default();
    for (key, src) in want {
        let new = Some(src.value.clone());
        match have.get(key) {
            None => d.creates.push(Step {
                key: key.clone(),
                listed: 0,
                new,
            }),
            Some((old, _)) if *old == src.value => {}
            Some((_, listed)) => d.updates.push(Step {
                key: key.clone(),
                listed: *listed,
                new,
            }),
        }
    }
    for (key, (_, listed)) in have {
        if !want.contains_key(key) {
            d.deletes.push(Step {
                key: key.clone(),
                listed: *listed,
                new: None,
            });
        }
    }
    d
}

/// Steps grouped into transactions (`flat::MAX_CHANGES` keys, about `flat::MAX_BYTES`).
pub fn chunks<'a>(steps: &'a [&'a Step]) -> Vec<&'a [&'a Step]> {
    flat::chunks_by(steps, |s| s.weight())
}

/// True when the mirror writes `dst_key` (below the destination root): it maps back to a
/// source key that is copied (not ignored, not hidden in a v2 source).
pub fn owns(keys: &KeyMap, src_api: Api, dst_key: &[u8]) -> bool {
    match src_api {
        Api::V2 => match std::str::from_utf8(dst_key).ok().map(|k| keys.source_of(k)) {
            Some(Some(src)) => matches!(keys.route(&src), Route::Mirror(_)),
            // No v2 source key maps there: nothing protects it.
            _ => true,
        },
        Api::V3 => source_of_v3(keys, dst_key).is_none_or(|src| flat::route_v3(keys, &src).is_ok()),
    }
}

/// The v3 source key a destination key below the root mirrors (the inverse of
/// `flat::route_v3`), if it is below the root.
pub fn source_of_v3(keys: &KeyMap, dst_key: &[u8]) -> Option<Vec<u8>> {
    let root = keys.dst_root();
    let root = if root == "/" {
        b"/".to_vec()
    } else {
        format!("{root}/").into_bytes()
    };
    let rest = dst_key.strip_prefix(root.as_slice())?;
    let (mut src, _) = flat::src_range(keys);
    src.extend_from_slice(rest);
    Some(src)
}

/// Read `[from, to)` on `c`, every page at revision `at` (0: now, then pinned); a refusal
/// other than a compacted revision stops the reload.
fn range(
    c: &Client,
    from: &[u8],
    to: &[u8],
    at: u64,
) -> Result<std::result::Result<v3::Found, GrpcError>> {
    let found = v3::Range {
        key: from,
        end: to,
        at,
        keys_only: false,
        min_mod: 0,
        limit: 0,
    }
    .read(c)?;
    match found {
        Err(e) if !v3::compacted(&e) => Err(c.v3_refusal(&format!("range {}", show(from)), &e)),
        other => Ok(other),
    }
}

/// The destination keys the mirror owns, read at revision `at` (0: now), with the revision
/// they were read at.
pub fn read_have(dst: &Client, keys: &KeyMap, src_api: Api, at: u64) -> Result<(Have, u64)> {
    let mut have = Have::new();
    let mut rev = at;
    for (from, to) in flat::owned(keys) {
        let found = range(dst, &from, &to, rev)?.map_err(|e| {
            Error::Transient(format!(
                "the destination {} compacted revision {rev} while it was being listed ({}); \
                 run again",
                dst.name(),
                e.message
            ))
        })?;
        rev = found.revision;
        for kv in found.kvs {
            if owns(keys, src_api, &kv.key) {
                have.insert(kv.key, (kv.value, kv.mod_revision));
            }
        }
    }
    Ok((have, rev))
}

/// The source as one read saw it.
#[derive(Debug, Default)]
pub struct Source {
    pub want: Want,
    /// The v2 `X-Etcd-Index` or v3 revision `want` is the state at.
    pub index: u64,
    /// v3: every key in the source range at `index`, mirrored or not.
    pub listed: u64,
    /// v2: the prefix is a directory (the index probe goes below it).
    pub dir: bool,
}

/// Read the mirrored source keys: v2, a recursive GET now; v3, a range at `at` (0: now). A
/// v3 revision compacted meanwhile comes back for the caller to judge.
pub fn read_source(
    keys: &KeyMap,
    src_api: Api,
    src: &Client,
    at: u64,
) -> Result<std::result::Result<Source, GrpcError>> {
    if src_api == Api::V2 {
        let got = src.get(&keys.src_prefix, true)?;
        let dir = got.node.as_ref().is_some_and(crate::etcd::Node::is_dir);
        let want = mirrored(keys, got.node)
            .filter_map(|(dst, node)| {
                let modified = node.modified_index;
                node.value.map(|v| {
                    let src = SrcKv {
                        key: node.key.into_bytes(),
                        value: v.into_bytes(),
                        modified,
                    };
                    (dst.into_bytes(), src)
                })
            })
            .collect();
        return Ok(Ok(Source {
            want,
            index: got.index,
            listed: 0,
            dir,
        }));
    }
    let (from, to) = flat::src_range(keys);
    let found = match range(src, &from, &to, at)? {
        Ok(f) => f,
        Err(e) => return Ok(Err(e)),
    };
    let listed = u64::try_from(found.kvs.len()).unwrap_or(u64::MAX);
    let want = found
        .kvs
        .into_iter()
        .filter_map(|kv| {
            let dst = flat::route_v3(keys, &kv.key).ok()?;
            Some((
                dst,
                SrcKv {
                    key: kv.key,
                    value: kv.value,
                    modified: kv.mod_revision,
                },
            ))
        })
        .collect();
    Ok(Ok(Source {
        want,
        index: found.revision,
        listed,
        dir: false,
    }))
}

/// Both sides as one pass saw them.
struct Listing {
    source: Source,
    have: Have,
}

/// The destination, then the source (see the top of this file). A v3 snapshot compacted
/// while its pages were read is read again at the new revision.
fn list(cfg: &Config, src: &Client, dst: &Client) -> Result<Listing> {
    let (have, _) = read_have(dst, &cfg.keys, cfg.src_api, 0)?;
    let mut tries = 0u32;
    loop {
        match read_source(&cfg.keys, cfg.src_api, src, 0)? {
            Ok(source) => return Ok(Listing { source, have }),
            Err(e) if tries < 3 => {
                info!(
                    "the source compacted the revision being listed ({}): reading again",
                    e.message
                );
                tries = tries.saturating_add(1);
            }
            Err(e) => return Err(src.v3_refusal("range of the source prefix", &e)),
        }
    }
}

/// Why the guards refuse this reload without `--force`, if they do. Two v3 sides of one
/// cluster are one store, refused as two v2 sides are (a range that overlaps is refused
/// earlier, with no override); a v2 source and a v3 destination never share a store, so
/// the same cluster is the in-place migration and is allowed.
fn guard(
    cfg: &Config,
    l: &Listing,
    d: &Diff,
    src: &Client,
    dst: &Client,
) -> Result<Option<String>> {
    if cfg.force {
        return Ok(None);
    }
    if cfg.src_api == Api::V3 {
        let id = v3::cluster_id(src)?;
        if id == v3::cluster_id(dst)? {
            return Ok(Some(format!(
                "{} and {} are the same cluster (cluster id {id}); add --force if this is \
                 really what you want",
                src.name(),
                dst.name()
            )));
        }
    }
    Ok(d.deletes_too_much(l.have.len()).then(|| {
        mass_delete(
            d.deletes.len(),
            l.have.len(),
            &cfg.keys.dst_root(),
            dst.name(),
            &cfg.keys.src_prefix,
        )
    }))
}

fn print_plan(d: &Diff) {
    println!("reload plan: {}", d.summary());
    for (verb, steps) in [
        ("create", &d.creates),
        ("update", &d.updates),
        ("delete", &d.deletes),
    ] {
        for s in steps {
            println!("{verb} {}", show(&s.key));
        }
    }
}

/// Run the reload. Returns the source index (v2) or revision (v3) to replicate from, or
/// `None` for a dry run.
pub fn reload(cfg: &Config, src: &Client, dst: &Client) -> Result<Option<u64>> {
    let started = Instant::now();
    let index_key = cfg.keys.index_key();
    // The index found at start, still in place: (value, mod_revision).
    let mut stale: Option<(Vec<u8>, u64)> = None;
    let mut pass: u32 = 1;
    loop {
        let l = list(cfg, src, dst)?;
        let d = diff(&l.source.want, &l.have);
        let index = l.source.index;
        info!(
            "reload of {} from {} at {} {index} onto {}{} (pass {pass}): {}",
            cfg.keys.src_prefix,
            src.name(),
            if cfg.src_api == Api::V3 {
                "revision"
            } else {
                "index"
            },
            dst.name(),
            cfg.keys.dst_root(),
            d.summary()
        );
        if pass == 1 {
            let refusal = guard(cfg, &l, &d, src, dst)?;
            if !go_on(cfg, refusal, || print_plan(&d))? {
                return Ok(None);
            }
            stale = v3::get(dst, index_key.as_bytes())?.map(|kv| (kv.value, kv.mod_revision));
        }
        // See the top of this file: the index goes before the first write of the tree.
        if !d.is_empty() {
            if let Some((old, mi)) = stale.take() {
                info!(
                    "removing the replication index {index_key} (was {}) before reloading",
                    show(&old)
                );
                set_index(dst, &index_key, mi, None)?;
            }
        }
        apply(dst, &d, index, pass)?;
        let next = if cfg.src_api == Api::V3 {
            // The snapshot is exact: replication resumes with the events after it.
            Next::Replicate
        } else {
            let now = head(src, &cfg.keys.src_prefix, l.source.dir)?;
            after_pass(pass, index, now)
        };
        match next {
            Next::Replicate => {
                if let Some((old, _)) = &stale {
                    info!(
                        "nothing to write: replacing the replication index {index_key} (was {}) \
                         in one write",
                        show(old)
                    );
                }
                set_index(
                    dst,
                    &index_key,
                    stale.as_ref().map_or(0, |s| s.1),
                    Some(index),
                )?;
                info!(
                    "reload done in {:.1?}, passes: {pass} (the last one: {})",
                    started.elapsed(),
                    d.summary()
                );
                crate::metrics::update(|s| s.observe_load(started.elapsed()));
                return Ok(Some(index));
            }
            Next::Again => {
                info!(
                    "the source moved more than {MARGIN} events past index {index} during pass \
                     {pass}: listing again"
                );
                pass = pass.saturating_add(1);
            }
            Next::GiveUp => {
                let old = match &stale {
                    None => "no replication index".to_string(),
                    Some((old, _)) => format!("its old replication index {}, untouched", show(old)),
                };
                return Err(Error::IndexCleared(format!(
                    "--reload could not catch up with {}: after {MAX_PASSES} passes the source \
                     was still more than {MARGIN} events past the last listing (index {index}), \
                     which leaves replication no time to start inside the source's 1000-event \
                     history. The replica holds the source's state at index {index} and {old}; \
                     run the reload again when the source is quieter",
                    src.name()
                )));
            }
        }
    }
}

/// Write a pass's plan in transactions, with a progress line every 10 s for big ones.
fn apply(dst: &Client, d: &Diff, listed: u64, pass: u32) -> Result<()> {
    let steps = d.steps();
    let total = steps.len();
    let mut said = Instant::now();
    let mut done = 0usize;
    for chunk in chunks(&steps) {
        if said.elapsed() >= Duration::from_secs(10) {
            info!("reload pass {pass}: {done} of {total} keys written");
            said = Instant::now();
        }
        write_chunk(dst, chunk, listed)?;
        done = done.saturating_add(chunk.len());
    }
    Ok(())
}

/// One transaction of steps. When a compare fails, the steps whose keys already hold what
/// they wanted are done, those whose compare holds are sent again, and any other is a
/// conflict (exit 3).
fn write_chunk(dst: &Client, chunk: &[&Step], listed: u64) -> Result<()> {
    let mut pending: Vec<&Step> = chunk.to_vec();
    while let Some(first) = pending.first() {
        let what = format!(
            "reload txn of {} keys from {}",
            pending.len(),
            show(&first.key)
        );
        let compares: Vec<Compare> = pending.iter().map(|s| s.compare()).collect();
        let writes: Vec<Write> = pending.iter().map(|s| s.write()).collect();
        let (outcome, _) = v3::txn(dst, &compares, &writes, &what)?;
        let TxnOutcome::Failed(found) = outcome else {
            return Ok(());
        };
        let before = pending.len();
        let mut still = Vec::with_capacity(before);
        for (step, now) in pending.into_iter().zip(&found) {
            match step.judge(now.as_ref()) {
                Judged::Pending => still.push(step),
                Judged::Landed => info!(
                    "{} already holds {} (a failed compare): an earlier attempt landed; going on",
                    show(&step.key),
                    describe(step.new.as_deref())
                ),
                Judged::Conflict => {
                    return Err(Error::Inconsistency {
                        key: format!("{} (during --reload)", show(&step.key)),
                        source: format!("{} at index {listed}", describe(step.new.as_deref())),
                        destination: format!(
                            "{} while the reload expected {}; another writer changed it during \
                             the reload",
                            describe(now.as_ref().map(|k| k.value.as_slice())),
                            step.expects()
                        ),
                    })
                }
            }
        }
        if still.len() == before {
            return Err(Error::Refused(format!(
                "--reload: {} failed a transaction whose compares all hold as read back ({what})",
                dst.name()
            )));
        }
        pending = still;
    }
    Ok(())
}

/// Replace the index key, listed at mod_revision `listed` (0: absent), by `value` (`None`:
/// delete it). A failed compare that already finds the wanted state is a retried request;
/// anything else is another writer (exit 5).
fn set_index(dst: &Client, key: &str, listed: u64, value: Option<u64>) -> Result<()> {
    let step = Step {
        key: key.as_bytes().to_vec(),
        listed,
        new: value.map(|v| v.to_string().into_bytes()),
    };
    let what = match value {
        Some(v) => format!("record the replication index {v} at {key}"),
        None => format!("remove the replication index {key}"),
    };
    let (outcome, _) = v3::txn(dst, &[step.compare()], &[step.write()], &what)?;
    let TxnOutcome::Failed(found) = outcome else {
        return Ok(());
    };
    let now = found.first().and_then(Option::as_ref);
    if step.judge(now) == Judged::Landed {
        return Ok(());
    }
    Err(Error::OtherWriter(format!(
        "--reload could not {what} on {}: it holds {} while the reload expected {}",
        dst.name(),
        describe(now.map(|k| k.value.as_slice())),
        step.expects()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::map;

    fn want(items: &[(&str, &str)]) -> Want {
        items
            .iter()
            .map(|(k, v)| {
                let src = SrcKv {
                    key: k.as_bytes().to_vec(),
                    value: v.as_bytes().to_vec(),
                    modified: 1,
                };
                (k.as_bytes().to_vec(), src)
            })
            .collect()
    }

    fn have(items: &[(&str, &str, u64)]) -> Have {
        items
            .iter()
            .map(|(k, v, m)| (k.as_bytes().to_vec(), (v.as_bytes().to_vec(), *m)))
            .collect()
    }

    fn step(key: &str, listed: u64, new: Option<&str>) -> Step {
        Step {
            key: key.as_bytes().to_vec(),
            listed,
            new: new.map(|v| v.as_bytes().to_vec()),
        }
    }

    fn kv(key: &str, value: &str, m: u64) -> Kv {
        Kv {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            create_revision: m,
            mod_revision: m,
        }
    }

    #[test]
    fn diff_writes_only_differences_each_under_its_listed_state() {
        let d = diff(
            &want(&[
                ("/r/a", "1"),
                ("/r/b", "same"),
                ("/r/c", "new"),
                ("/r/e", ""),
            ]),
            &have(&[("/r/b", "same", 3), ("/r/c", "old", 4), ("/r/z", "x", 7)]),
        );
        assert_eq!(
            d.creates,
            vec![step("/r/a", 0, Some("1")), step("/r/e", 0, Some(""))]
        );
        assert_eq!(d.updates, vec![step("/r/c", 4, Some("new"))]);
        assert_eq!(d.deletes, vec![step("/r/z", 7, None)]);
        assert_eq!(d.summary(), "2 creates, 1 updates, 0 replaces, 1 deletes");
        let order: Vec<&[u8]> = d.steps().iter().map(|s| s.key.as_slice()).collect();
        assert_eq!(order, [b"/r/a".as_slice(), b"/r/e", b"/r/c", b"/r/z"]);
        assert_eq!(d.creates[0].compare(), Compare::Absent(b"/r/a".as_slice()));
        assert_eq!(d.deletes[0].compare(), Compare::Mod(b"/r/z".as_slice(), 7));
        assert_eq!(d.deletes[0].write(), Write::Delete(b"/r/z".as_slice()));
        // One of three existing keys goes: no guard.
        assert!(!d.deletes_too_much(3));
        // Equal sides write nothing.
        assert!(diff(&want(&[("/r/b", "x")]), &have(&[("/r/b", "x", 9)])).is_empty());
    }

    #[test]
    fn the_guard_counts_deletes_against_the_owned_keys() {
        let d = diff(
            &want(&[("/r/a", "1")]),
            &have(&[("/r/b", "1", 1), ("/r/c", "1", 2)]),
        );
        assert!(d.deletes_too_much(2));
        let half = diff(
            &want(&[("/r/a", "1")]),
            &have(&[("/r/a", "1", 1), ("/r/b", "1", 2)]),
        );
        assert!(!half.deletes_too_much(2));
        assert!(!diff(&Want::new(), &Have::new()).deletes_too_much(0));
    }

    #[test]
    fn a_failed_compare_is_judged_by_what_the_key_holds() {
        let create = step("/k", 0, Some("v"));
        assert_eq!(create.judge(None), Judged::Pending);
        assert_eq!(create.judge(Some(&kv("/k", "v", 9))), Judged::Landed);
        assert_eq!(create.judge(Some(&kv("/k", "w", 9))), Judged::Conflict);
        let update = step("/k", 5, Some("v"));
        assert_eq!(update.judge(Some(&kv("/k", "old", 5))), Judged::Pending);
        assert_eq!(update.judge(Some(&kv("/k", "v", 8))), Judged::Landed);
        assert_eq!(update.judge(None), Judged::Conflict);
        let delete = step("/k", 5, None);
        assert_eq!(delete.judge(None), Judged::Landed);
        assert_eq!(delete.judge(Some(&kv("/k", "x", 5))), Judged::Pending);
        assert_eq!(delete.judge(Some(&kv("/k", "x", 6))), Judged::Conflict);
        assert!(update.expects().contains("mod_revision 5"));
        assert_eq!(create.expects(), "no key");
    }

    #[test]
    fn transactions_hold_at_most_100_keys_and_about_a_mebibyte() {
        let small: Vec<Step> = (0..230)
            .map(|i| step(&format!("/k{i}"), 0, Some("v")))
            .collect();
        let refs: Vec<&Step> = small.iter().collect();
        let sizes: Vec<usize> = chunks(&refs).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [100, 100, 30]);
        let big = "x".repeat(600 * 1024);
        let large: Vec<Step> = (0..3)
            .map(|i| step(&format!("/b{i}"), 0, Some(&big)))
            .collect();
        let refs: Vec<&Step> = large.iter().collect();
        assert_eq!(chunks(&refs).len(), 3);
        let deletes: Vec<Step> = (0..101).map(|i| step(&format!("/d{i}"), 3, None)).collect();
        let refs: Vec<&Step> = deletes.iter().collect();
        assert_eq!(chunks(&refs).len(), 2);
    }

    #[test]
    fn owned_keys_map_back_to_copied_source_keys() {
        let v2 = map("/app", "/replica", false, Some("/app/skip.*"));
        assert!(owns(&v2, Api::V2, b"/replica/app/x"));
        assert!(!owns(&v2, Api::V2, b"/replica/app/_hidden/x"));
        assert!(!owns(&v2, Api::V2, b"/replica/app/skipme"));
        assert!(owns(&v2, Api::V2, b"/replica/app/\xff"));
        // v3 has no hidden keys; the ignore rule still holds.
        assert!(owns(&v2, Api::V3, b"/replica/app/_hidden/x"));
        assert!(!owns(&v2, Api::V3, b"/replica/app/skipme"));
        let strip = map("/app", "/replica", true, None);
        assert_eq!(
            source_of_v3(&strip, b"/replica/a\xffb"),
            Some(b"/app/a\xffb".to_vec())
        );
        assert_eq!(source_of_v3(&strip, b"/elsewhere"), None);
        let root = map("/", "/", false, None);
        assert_eq!(source_of_v3(&root, b"/x"), Some(b"/x".to_vec()));
        for k in [b"/replica/app/a".as_slice(), b"/replica/app/_h\xff"] {
            let src = source_of_v3(&v2, k).unwrap();
            assert_eq!(
                flat::route_v3(&map("/app", "/replica", false, None), &src),
                Ok(k.to_vec())
            );
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn side() -> impl Strategy<Value = BTreeMap<String, String>> {
            proptest::collection::btree_map(
                proptest::sample::select(vec!["/r/a", "/r/b", "/r/c", "/r/d"])
                    .prop_map(str::to_string),
                proptest::sample::select(vec!["", "1", "2"]).prop_map(str::to_string),
                0..4,
            )
        }

        proptest! {
            /// Run on a model of the destination, the steps turn `have` into `want`, each
            /// finding its key in the listed state; and a rerun after a lost response
            /// (every step already applied) judges every step landed.
            #[test]
            fn steps_turn_have_into_want(w in side(), h in side()) {
                let want: Want = w.iter().map(|(k, v)| (k.as_bytes().to_vec(), SrcKv {
                    key: k.as_bytes().to_vec(), value: v.as_bytes().to_vec(), modified: 1,
                })).collect();
                let have: Have = h.iter().zip(1u64..).map(|((k, v), m)| {
                    (k.as_bytes().to_vec(), (v.as_bytes().to_vec(), m))
                }).collect();
                let d = diff(&want, &have);
                let mut now: BTreeMap<Vec<u8>, Kv> = have.iter().map(|(k, (v, m))| {
                    (k.clone(), Kv { key: k.clone(), value: v.clone(), create_revision: *m, mod_revision: *m })
                }).collect();
                for (rev, s) in (101u64..).zip(d.steps()) {
                    prop_assert_eq!(s.judge(now.get(&s.key)), Judged::Pending);
                    match &s.new {
                        Some(v) => now.insert(s.key.clone(), Kv { key: s.key.clone(), value: v.clone(), create_revision: rev, mod_revision: rev }),
                        None => now.remove(&s.key),
                    };
                }
                for s in d.steps() {
                    prop_assert_eq!(s.judge(now.get(&s.key)), Judged::Landed);
                }
                let end: BTreeMap<Vec<u8>, Vec<u8>> = now.into_iter().map(|(k, kv)| (k, kv.value)).collect();
                let wanted: BTreeMap<Vec<u8>, Vec<u8>> = want.into_iter().map(|(k, s)| (k, s.value)).collect();
                prop_assert_eq!(end, wanted);
                prop_assert_eq!(d.is_empty(), w == h);
            }
        }
    }
}
