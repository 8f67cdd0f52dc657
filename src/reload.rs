//! `--reload`: make the destination subtree an exact copy of the source by writing only the
//! differences, each under a condition, so that readers never see the replica emptied; on a
//! busy source, repeat the copy until it ends close enough to the source for replication to
//! take over.
//!
//! Why replicating from the last pass's listing index `L` loses nothing and breaks nothing:
//! - A pass lists the destination, then the source. A recursive GET is served under the
//!   store's lock, so the source listing is the state at exactly its `X-Etcd-Index` `L`.
//!   The destination is listed first because only this process writes there: its listing
//!   is still true when the source is read, and the time it takes does not age `L`.
//! - The pass writes the difference, each write conditional on the destination listing.
//!   When every write succeeds, the keys the reload owns on the destination equal the
//!   source's state at `L` (mapped and filtered). A later pass diffs again against a fresh
//!   listing of both sides, so whatever an earlier pass wrote from an older listing is
//!   either still right at the new `L` or rewritten by it: after the last pass, every owned
//!   key holds its source state at the last `L`, none holds a state from after it.
//! - Replication then starts at that `L`: it applies the source events after `L` in order,
//!   each conditional on the key's state just before the event. For the first event on a
//!   key that state is its state at `L`, which the destination holds, so every condition
//!   holds, and every change after `L` is replayed, none twice.
//! - Replication can only read events after `L` while they are in the source's history (its
//!   last 1000 events, whole store). A pass ends by reading the source's index: at most
//!   `MARGIN` events past `L` and replication starts from `L` (with the rest of the window
//!   left for writing the index and registering the watch, a few requests); more, and
//!   another pass lists again. Each later pass writes only what changed during the one
//!   before, so passes get shorter until one ends inside the margin; after `MAX_PASSES`
//!   the reload gives up (exit 4) rather than loop.
//! - Exception, warned in the log: a destination directory the source lacks that still
//!   holds keys the reload does not own (hidden or ignored) is left in place.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::cli::Config;
use crate::dest::read_index;
use crate::error::{Error, Result};
use crate::etcd::{Client, Cond, Node, Written};
use crate::keys::{below, join, KeyMap, Route, REPLICATION_DIR};
use crate::plan::State;

/// How many source events a pass may end past its listing for replication to start from
/// that listing. The source keeps its last 1000 events; the other half of that window is
/// for writing the index and registering the watch.
pub const MARGIN: u64 = 500;

/// Passes a reload makes before it gives up on a source that moves too fast.
pub const MAX_PASSES: u32 = 20;

/// A hidden key below the source prefix, read only for the `X-Etcd-Index` of the answer: it
/// is normally absent, so the read is small whatever the size of the subtree.
const PROBE: &str = "_etcdmirror_index_probe";

/// etcd's "directory not empty".
const DIR_NOT_EMPTY: u64 = 108;

/// A key as seen in a tree listing: a value, or a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    Value(String),
}

impl Entry {
    pub(crate) fn of(node: Node) -> Entry {
        match node.value {
            None => Entry::Dir,
            Some(v) => Entry::Value(v),
        }
    }
}

/// A key's state (`None`: no key) in the words of the replication messages.
fn describe(e: Option<&Entry>) -> String {
    match e {
        None => State::Absent,
        Some(Entry::Dir) => State::Dir,
        Some(Entry::Value(v)) => State::Value(v.clone()),
    }
    .describe()
}

/// What the reload will do, keyed by destination key. `modified` is the destination's
/// modifiedIndex, used as the condition of updates and deletes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub creates: Vec<(String, Entry)>,
    pub updates: Vec<(String, Entry, u64)>,
    /// A value that becomes a directory or the reverse: deleted, then created.
    pub replaces: Vec<(String, Entry, Entry, u64)>,
    pub deletes: Vec<(String, Entry, u64)>,
}

/// One destination write of a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    /// Create a key that must be absent (`prevExist=false`).
    Create(&'a str, &'a Entry),
    /// Overwrite a value whose modifiedIndex must still be the one listed.
    Update(&'a str, &'a Entry, u64),
    /// Delete a value (under its modifiedIndex) or an empty directory (non-recursively).
    Delete(&'a str, &'a Entry, u64),
    /// Delete a directory that becomes a value, with whatever is still below it: only keys
    /// the reload does not own (hidden or ignored), since its own were deleted before. A
    /// value cannot have children, and replication deletes such a directory the same way.
    DeleteTree(&'a str),
}

impl Step<'_> {
    pub fn key(&self) -> &str {
        match self {
            Step::Create(k, _) | Step::Update(k, _, _) | Step::Delete(k, _, _) => k,
            Step::DeleteTree(k) => k,
        }
    }

    /// What the key holds once the step is done (`None`: no key).
    pub fn wants(&self) -> Option<&Entry> {
        match self {
            Step::Create(_, e) | Step::Update(_, e, _) => Some(e),
            Step::Delete(..) | Step::DeleteTree(_) => None,
        }
    }

    /// What the step expects to find, for messages.
    fn expects(&self) -> String {
        match self {
            Step::Create(..) => describe(None),
            Step::Update(_, _, mi) => format!("a value with modifiedIndex {mi}"),
            Step::Delete(_, Entry::Value(_), mi) => format!("a value with modifiedIndex {mi}"),
            Step::Delete(_, Entry::Dir, _) | Step::DeleteTree(_) => describe(Some(&Entry::Dir)),
        }
    }
}

impl Diff {
    /// True when the plan writes nothing.
    pub fn is_empty(&self) -> bool {
        self.creates.is_empty()
            && self.updates.is_empty()
            && self.replaces.is_empty()
            && self.deletes.is_empty()
    }

    /// Keys the plan removes or replaces.
    pub fn removed(&self) -> usize {
        self.deletes.len().saturating_add(self.replaces.len())
    }

    /// True when the plan deletes more than half of the destination's `existing` keys.
    pub fn deletes_too_much(&self, existing: usize) -> bool {
        existing > 0 && self.removed().saturating_mul(2) > existing
    }

    /// The writes in the order `reload` performs them. On a destination that holds exactly
    /// the listed keys, each step's condition holds when it runs and the result is `want`:
    /// a value becoming a directory goes first, since keys are created below it; creates
    /// go parents first; a directory becoming a value goes last, once the deletes (children
    /// first) have emptied it of the keys the reload owns. New keys appear before old ones
    /// go. Every intermediate state is a tree that a new listing diffs again, so a reload
    /// stopped after any step is finished by running it again.
    pub fn steps(&self) -> Vec<Step<'_>> {
        let (to_dirs, to_values): (Vec<_>, Vec<_>) = self
            .replaces
            .iter()
            .partition(|(_, _, new, _)| *new == Entry::Dir);
        let mut steps = Vec::new();
        steps.extend(
            to_dirs
                .into_iter()
                .flat_map(|(k, old, new, mi)| [Step::Delete(k, old, *mi), Step::Create(k, new)]),
        );
        steps.extend(self.creates.iter().map(|(k, e)| Step::Create(k, e)));
        steps.extend(
            self.updates
                .iter()
                .map(|(k, e, mi)| Step::Update(k, e, *mi)),
        );
        steps.extend(
            self.deletes
                .iter()
                .map(|(k, e, mi)| Step::Delete(k, e, *mi)),
        );
        steps.extend(
            to_values
                .into_iter()
                .flat_map(|(k, _, new, _)| [Step::DeleteTree(k), Step::Create(k, new)]),
        );
        steps
    }

    pub fn summary(&self) -> String {
        format!(
            "{} creates, {} updates, {} replaces, {} deletes",
            self.creates.len(),
            self.updates.len(),
            self.replaces.len(),
            self.deletes.len()
        )
    }
}

/// Compare the wanted tree with the destination's. Each list is in key order, so creates
/// come parents first; deletes come children first. `Diff::steps` orders the writes.
pub fn diff(want: &BTreeMap<String, Entry>, have: &BTreeMap<String, (Entry, u64)>) -> Diff {
    let mut d = Diff::default();
    for (key, entry) in want {
        match have.get(key) {
            None => d.creates.push((key.clone(), entry.clone())),
            Some((old, _)) if old == entry => {}
            Some((old, mi)) if std::mem::discriminant(old) == std::mem::discriminant(entry) => {
                d.updates.push((key.clone(), entry.clone(), *mi))
            }
            Some((old, mi)) => d
                .replaces
                .push((key.clone(), old.clone(), entry.clone(), *mi)),
        }
    }
    for (key, (entry, mi)) in have.iter().rev() {
        if !want.contains_key(key) {
            d.deletes.push((key.clone(), entry.clone(), *mi));
        }
    }
    d
}

/// What follows a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Record the pass's listing index and replicate from it.
    Replicate,
    /// List and diff again.
    Again,
    /// The source moves too fast for a reload to catch up.
    GiveUp,
}

/// What follows pass number `pass` (from 1), whose source listing was at index `listed`,
/// when the source's index was `head` once its writes were done. A head below the listing
/// (a source restored meanwhile) replicates: the watch then stops on the index ahead.
pub fn after_pass(pass: u32, listed: u64, head: u64) -> Next {
    if head.saturating_sub(listed) <= MARGIN {
        Next::Replicate
    } else if pass >= MAX_PASSES {
        Next::GiveUp
    } else {
        Next::Again
    }
}

/// True for the etcd error codes that describe the key's state: not found (100), compare
/// failed (101), not a file (102), not a directory (104), already exists (105), directory
/// not empty (108). Any other refusal (a value too large, credentials, a malformed request)
/// says nothing about the key, so it is no inconsistency.
pub fn about_state(code: u64) -> bool {
    matches!(code, 100 | 101 | 102 | 104 | 105 | DIR_NOT_EMPTY)
}

/// Why the mass-delete guard refuses a plan that removes `removed` of the `existing` keys.
pub(crate) fn mass_delete(
    removed: usize,
    existing: usize,
    root: &str,
    dst: &str,
    prefix: &str,
) -> String {
    format!(
        "the plan deletes {removed} of the {existing} keys under {root} on \
         {dst} (more than half). This looks like the source lost most of its keys (a mass TTL \
         expiry, a restore from an old backup) or like a wrong --src-prefix (now {prefix}). \
         Run with --reload --dry-run to see the plan; add --force to run it anyway"
    )
}

/// The source nodes below `root` that are mirrored, each with its destination key, as the
/// listing is taken apart (shared with `--check`, so that both read a tree the same way).
pub(crate) fn mirrored(
    keys: &KeyMap,
    root: Option<Node>,
) -> impl Iterator<Item = (String, Node)> + '_ {
    root.into_iter()
        .flat_map(Node::into_descendants)
        .filter_map(|node| match keys.route(&node.key) {
            Route::Mirror(dst) => Some((dst, node)),
            _ => None,
        })
}

/// The destination nodes below `root` that the reload owns: what is not ignored and not
/// replication state, with its state and modifiedIndex (shared with `--check`).
pub(crate) fn owned(
    keys: &KeyMap,
    root: Option<Node>,
) -> impl Iterator<Item = (String, (Entry, u64))> + '_ {
    root.into_iter()
        .flat_map(Node::into_descendants)
        .filter_map(|mut node| {
            if below(&node.key, REPLICATION_DIR).is_some() {
                return None;
            }
            // Keys that map back to ignored or hidden source keys are left alone.
            let owned = keys
                .source_of(&node.key)
                .is_some_and(|src| matches!(keys.route(&src), Route::Mirror(_)));
            owned.then(|| {
                let (key, mi) = (std::mem::take(&mut node.key), node.modified_index);
                (key, (Entry::of(node), mi))
            })
        })
}

/// The source tree as it must appear on the destination (mapped keys, filtered).
fn wanted(cfg: &Config, root: Option<Node>) -> BTreeMap<String, Entry> {
    mirrored(&cfg.keys, root)
        .map(|(dst, node)| (dst, Entry::of(node)))
        .collect()
}

/// The destination tree that the reload owns.
fn existing(cfg: &Config, root: Option<Node>) -> BTreeMap<String, (Entry, u64)> {
    owned(&cfg.keys, root).collect()
}

/// Both sides as one pass sees them.
struct Listing {
    want: BTreeMap<String, Entry>,
    have: BTreeMap<String, (Entry, u64)>,
    /// The source's `X-Etcd-Index`: `want` is its state at exactly this index.
    index: u64,
    src_cluster: Option<String>,
    dst_cluster: Option<String>,
    /// The source prefix was a directory (where the index probe can go below it).
    src_dir: bool,
}

/// List the destination, then the source (see the top of this file for why in this order).
/// One listing at a time: each is reduced to a flat map before the next is read.
fn list(cfg: &Config, src: &Client, dst: &Client) -> Result<Listing> {
    let mut current = dst.get(&cfg.keys.dst_root(), true)?;
    let have = existing(cfg, current.node.take());
    let mut snapshot = src.get(&cfg.keys.src_prefix, true)?;
    let src_dir = snapshot.node.as_ref().is_some_and(Node::is_dir);
    Ok(Listing {
        want: wanted(cfg, snapshot.node.take()),
        have,
        index: snapshot.index,
        src_cluster: snapshot.cluster_id,
        dst_cluster: current.cluster_id,
        src_dir,
    })
}

/// The source's current index, without listing the subtree again.
pub(crate) fn head(src: &Client, prefix: &str, prefix_is_dir: bool) -> Result<u64> {
    let key = if prefix_is_dir {
        join(prefix, PROBE)
    } else {
        prefix.to_string()
    };
    Ok(src.get(&key, false)?.index)
}

fn print_plan(d: &Diff) {
    println!("reload plan: {}", d.summary());
    for (k, _) in &d.creates {
        println!("create {k}");
    }
    for (k, _, _) in &d.updates {
        println!("update {k}");
    }
    for (k, _, _, _) in &d.replaces {
        println!("replace {k}");
    }
    for (k, _, _) in &d.deletes {
        println!("delete {k}");
    }
}

/// Why the guards refuse this reload without `--force`, if they do.
fn guard(cfg: &Config, l: &Listing, d: &Diff, src: &Client, dst: &Client) -> Option<String> {
    if cfg.force {
        return None;
    }
    if l.src_cluster.is_some() && l.src_cluster == l.dst_cluster {
        return Some(format!(
            "{} and {} are the same cluster (X-Etcd-Cluster-Id {}); \
             add --force if this is really what you want",
            src.name(),
            dst.name(),
            l.src_cluster.as_deref().unwrap_or_default()
        ));
    }
    d.deletes_too_much(l.have.len()).then(|| {
        mass_delete(
            d.removed(),
            l.have.len(),
            &cfg.keys.dst_root(),
            dst.name(),
            &cfg.keys.src_prefix,
        )
    })
}

/// After the first pass's plan and guard: with `--dry-run`, print the plan and what a guard
/// would refuse, and stop (`false`); otherwise a refusal is exit 2, and `true` goes on.
pub(crate) fn go_on(
    cfg: &Config,
    refusal: Option<String>,
    print_plan: impl FnOnce(),
) -> Result<bool> {
    if cfg.dry_run {
        print_plan();
        if let Some(why) = refusal {
            println!("--reload without --force would refuse: {why}");
        }
        return Ok(false);
    }
    match refusal {
        Some(why) => Err(Error::Usage(format!("refusing to --reload: {why}"))),
        None => Ok(true),
    }
}

/// Run the reload. Returns the source index to replicate from, or `None` for a dry run.
pub fn reload(cfg: &Config, src: &Client, dst: &Client) -> Result<Option<u64>> {
    let started = Instant::now();
    let index_key = cfg.keys.index_key();
    // The index found at start, still in place: (value, modifiedIndex).
    let mut stale: Option<(u64, u64)> = None;
    let mut pass: u32 = 1;
    loop {
        let l = list(cfg, src, dst)?;
        let d = diff(&l.want, &l.have);
        info!(
            "reload of {} from {} at index {} onto {}{} (pass {pass}): {}",
            cfg.keys.src_prefix,
            src.name(),
            l.index,
            dst.name(),
            cfg.keys.dst_root(),
            d.summary()
        );
        if pass == 1 {
            let refusal = guard(cfg, &l, &d, src, dst);
            if !go_on(cfg, refusal, || print_plan(&d))? {
                return Ok(None);
            }
            stale = read_index(dst, &index_key)?;
        }
        // Before the first write of the tree, the index goes: from then on a crash leaves
        // no index, so only another --reload can follow, and it finishes the job, since it
        // diffs whatever state this one left. Until then the destination is as it was
        // before the reload, index included. When no pass writes anything (two equal
        // clusters, a switchover), the index is replaced in one write below.
        if !d.is_empty() {
            if let Some((old, mi)) = stale.take() {
                info!("removing the replication index {index_key} (was {old}) before reloading");
                let old = Entry::Value(old.to_string());
                write(dst, Step::Delete(&index_key, &old, mi), l.index)?;
            }
        }
        apply(dst, &d, l.index, pass)?;
        let now = head(src, &cfg.keys.src_prefix, l.src_dir)?;
        let behind = now.saturating_sub(l.index);
        match after_pass(pass, l.index, now) {
            Next::Replicate => {
                let value = Entry::Value(l.index.to_string());
                let step = match stale {
                    Some((old, mi)) => {
                        info!(
                            "nothing to write: replacing the replication index {index_key} \
                             (was {old}) in one write"
                        );
                        Step::Update(&index_key, &value, mi)
                    }
                    None => Step::Create(&index_key, &value),
                };
                write(dst, step, l.index)?;
                info!(
                    "reload done in {:.1?}, passes: {pass} (the last one: {}; the source was \
                     {behind} events past its listing)",
                    started.elapsed(),
                    d.summary()
                );
                crate::metrics::update(|s| s.observe_load(started.elapsed()));
                return Ok(Some(l.index));
            }
            Next::Again => {
                info!(
                    "the source moved {behind} events past index {} during pass {pass} (more \
                     than {MARGIN}): listing again",
                    l.index
                );
                pass = pass.saturating_add(1);
            }
            Next::GiveUp => {
                let index = match stale {
                    None => "no replication index".to_string(),
                    Some((old, _)) => format!("its old replication index {old}, untouched"),
                };
                return Err(Error::IndexCleared(format!(
                    "--reload could not catch up with {}: after {MAX_PASSES} passes the source \
                     was still {behind} events past the last listing (index {}), more than the \
                     {MARGIN} that leave replication time to start inside the source's \
                     1000-event history. The replica holds the source's state at index {} and \
                     {index}; run the reload again when the source is quieter",
                    src.name(),
                    l.index,
                    l.index
                )));
            }
        }
    }
}

/// Write a pass's plan, with a progress line every 10 s for big ones.
fn apply(dst: &Client, d: &Diff, listed: u64, pass: u32) -> Result<()> {
    let steps = d.steps();
    let mut said = Instant::now();
    for (done, step) in steps.iter().enumerate() {
        if said.elapsed() >= Duration::from_secs(10) {
            info!("reload pass {pass}: {done} of {} writes done", steps.len());
            said = Instant::now();
        }
        write(dst, *step, listed)?;
    }
    Ok(())
}

/// Perform one step. A refusal is accepted when the key already holds what the step wanted:
/// a write retried after a lost response finds its own first attempt.
fn write(dst: &Client, step: Step, listed: u64) -> Result<()> {
    let (written, _) = match step {
        Step::Create(key, entry) => put(dst, key, entry, &Cond::Absent)?,
        Step::Update(key, entry, mi) => put(dst, key, entry, &Cond::Index(mi))?,
        Step::Delete(key, Entry::Value(_), mi) => {
            dst.delete(key, false, false, &Cond::Index(mi))?
        }
        Step::Delete(key, Entry::Dir, _) => dst.delete(key, true, false, &Cond::None)?,
        Step::DeleteTree(key) => dst.delete(key, true, true, &Cond::None)?,
    };
    let Written::Rejected { code, message } = written else {
        return Ok(());
    };
    let key = step.key();
    if let (Step::Delete(_, Entry::Dir, _), DIR_NOT_EMPTY) = (step, code) {
        warn!(
            "left directory {key} in place: it still holds keys the reload does not own \
             (hidden or ignored): {message} (etcd {code})"
        );
        return Ok(());
    }
    if !about_state(code) {
        return Err(Error::Refused(format!(
            "--reload: {} refused the write of {key} with etcd error {code}: {message}; run \
             --reload again once it is fixed",
            dst.name()
        )));
    }
    let found = dst.get(key, false)?.node.map(Entry::of);
    if found.as_ref() == step.wants() {
        info!(
            "{key} already holds {} (etcd {code} on the write): an earlier attempt landed; \
             going on",
            describe(found.as_ref())
        );
        return Ok(());
    }
    Err(Error::Inconsistency {
        key: format!("{key} (during --reload)"),
        source: format!("{} at index {listed}", describe(step.wants())),
        destination: format!(
            "{} while the reload expected {} (etcd {code}: {message}); another writer \
             changed it during the reload",
            describe(found.as_ref()),
            step.expects()
        ),
    })
}

fn put(dst: &Client, key: &str, entry: &Entry, cond: &Cond) -> Result<(Written, bool)> {
    let value = match entry {
        Entry::Dir => None,
        Entry::Value(v) => Some(v.as_str()),
    };
    dst.put(key, value, cond)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Entry {
        Entry::Value(s.into())
    }

    #[test]
    fn diff_writes_only_differences_in_a_safe_order() {
        let want: BTreeMap<String, Entry> = [
            ("/r/a", Entry::Dir),
            ("/r/a/x", v("1")),
            ("/r/b", v("same")),
            ("/r/c", v("new")),
            ("/r/d", Entry::Dir),
        ]
        .into_iter()
        .map(|(k, e)| (k.to_string(), e))
        .collect();
        let have: BTreeMap<String, (Entry, u64)> = [
            ("/r/b", (v("same"), 3)),
            ("/r/c", (v("old"), 4)),
            ("/r/d", (v("was a value"), 5)),
            ("/r/z", (Entry::Dir, 6)),
            ("/r/z/y", (v(""), 7)),
        ]
        .into_iter()
        .map(|(k, e)| (k.to_string(), e))
        .collect();
        let d = diff(&want, &have);
        assert_eq!(
            d.creates,
            vec![("/r/a".into(), Entry::Dir), ("/r/a/x".into(), v("1"))]
        );
        assert_eq!(d.updates, vec![("/r/c".into(), v("new"), 4)]);
        assert_eq!(
            d.replaces,
            vec![("/r/d".into(), v("was a value"), Entry::Dir, 5)]
        );
        assert_eq!(
            d.deletes,
            vec![("/r/z/y".into(), v(""), 7), ("/r/z".into(), Entry::Dir, 6)]
        );
        // Three of five destination keys go away: that needs --force.
        assert!(d.deletes_too_much(have.len()));
    }

    #[test]
    fn guard_counts_deletes_against_the_destination() {
        let want = BTreeMap::new();
        let have: BTreeMap<String, (Entry, u64)> = [
            ("/r/a".to_string(), (v("1"), 1)),
            ("/r/b".to_string(), (v("2"), 2)),
        ]
        .into();
        let d = diff(&want, &have);
        assert!(d.deletes_too_much(have.len()));
        // Both sides empty: a new pair of clusters needs no --force.
        assert!(!diff(&want, &BTreeMap::new()).deletes_too_much(0));
        // Deleting exactly half is allowed.
        let want: BTreeMap<String, Entry> = [("/r/a".to_string(), v("1"))].into();
        assert!(!diff(&want, &have).deletes_too_much(have.len()));
    }

    #[test]
    fn a_directory_that_becomes_a_value_goes_with_what_is_left_below_it() {
        let want: BTreeMap<String, Entry> = [("/r/e".to_string(), v("2"))].into();
        let have: BTreeMap<String, (Entry, u64)> = [
            ("/r/e".to_string(), (Entry::Dir, 1)),
            ("/r/e/y".to_string(), (Entry::Dir, 2)),
            ("/r/e/y/z".to_string(), (v("1"), 3)),
        ]
        .into();
        let d = diff(&want, &have);
        let two = v("2");
        let (dir, one) = (Entry::Dir, v("1"));
        assert_eq!(
            d.steps(),
            vec![
                Step::Delete("/r/e/y/z", &one, 3),
                Step::Delete("/r/e/y", &dir, 2),
                Step::DeleteTree("/r/e"),
                Step::Create("/r/e", &two),
            ]
        );
    }

    #[test]
    fn what_each_step_wants() {
        let (dir, one) = (Entry::Dir, v("1"));
        assert_eq!(Step::Create("/k", &dir).wants(), Some(&dir));
        assert_eq!(Step::Update("/k", &one, 4).wants(), Some(&one));
        assert_eq!(Step::Delete("/k", &one, 4).wants(), None);
        assert_eq!(Step::DeleteTree("/k").wants(), None);
        assert_eq!(Step::DeleteTree("/k").key(), "/k");
        assert!(Step::Update("/k", &one, 4).expects().contains('4'));
    }

    #[test]
    fn only_state_refusals_can_be_inconsistencies() {
        for code in [100, 101, 102, 104, 105, 108] {
            assert!(about_state(code), "{code}");
        }
        // bad form, POST too large, unauthorized, raft/internal, index cleared
        for code in [0, 103, 106, 107, 110, 201, 209, 210, 300, 400, 401] {
            assert!(!about_state(code), "{code}");
        }
    }

    #[test]
    fn a_pass_ends_inside_the_margin_or_goes_again_until_the_bound() {
        assert_eq!(after_pass(1, 1000, 1000), Next::Replicate);
        assert_eq!(after_pass(1, 1000, 1000 + MARGIN), Next::Replicate);
        assert_eq!(after_pass(1, 1000, 1001 + MARGIN), Next::Again);
        assert_eq!(after_pass(MAX_PASSES - 1, 0, 5000), Next::Again);
        assert_eq!(after_pass(MAX_PASSES, 0, 5000), Next::GiveUp);
        assert_eq!(after_pass(MAX_PASSES, 0, 10), Next::Replicate);
        assert_eq!(after_pass(3, 5000, 10), Next::Replicate);
    }

    #[test]
    fn the_mass_delete_refusal_says_why_and_what_to_run() {
        let m = mass_delete(30, 40, "/replica", "http://dst:2379", "/app");
        for needle in [
            "30 of the 40 keys",
            "/replica",
            "http://dst:2379",
            "TTL expiry",
            "--src-prefix",
            "/app",
            "--reload --dry-run",
            "--force",
        ] {
            assert!(m.contains(needle), "{needle:?} missing from {m:?}");
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeSet;

        const ROOT: &str = "/r";

        fn entry() -> impl Strategy<Value = Entry> {
            prop_oneof![
                1 => Just(Entry::Dir),
                3 => proptest::sample::select(vec!["", "1", "2"]).prop_map(v),
            ]
        }

        /// Keys from a small alphabet, so that the two sides share many; "a-b" sorts
        /// between "a" and "a/…".
        fn key() -> impl Strategy<Value = String> {
            proptest::collection::vec(proptest::sample::select(vec!["a", "b", "a-b"]), 1..4)
                .prop_map(|segs| format!("{ROOT}/{}", segs.join("/")))
        }

        fn parent(key: &str) -> &str {
            key.rsplit_once('/').map_or(ROOT, |(p, _)| p)
        }

        fn is_ancestor(a: &str, b: &str) -> bool {
            b.strip_prefix(a).is_some_and(|r| r.starts_with('/'))
        }

        /// A tree as etcd holds one: every parent below the root is a directory.
        fn tree() -> impl Strategy<Value = BTreeMap<String, Entry>> {
            proptest::collection::vec((key(), entry()), 0..12).prop_map(|items| {
                let mut t = BTreeMap::new();
                for (k, e) in items {
                    let mut p = parent(&k);
                    while p != ROOT {
                        t.insert(p.to_string(), Entry::Dir);
                        p = parent(p);
                    }
                    t.entry(k).or_insert(e);
                }
                t
            })
        }

        fn with_indexes(t: BTreeMap<String, Entry>) -> BTreeMap<String, (Entry, u64)> {
            t.into_iter()
                .zip(1u64..)
                .map(|((k, e), mi)| (k, (e, mi)))
                .collect()
        }

        fn any_maps(
        ) -> impl Strategy<Value = (BTreeMap<String, Entry>, BTreeMap<String, (Entry, u64)>)>
        {
            (
                proptest::collection::btree_map(key(), entry(), 0..10),
                proptest::collection::btree_map(key(), (entry(), any::<u64>()), 0..10),
            )
        }

        fn tree_pair(
        ) -> impl Strategy<Value = (BTreeMap<String, Entry>, BTreeMap<String, (Entry, u64)>)>
        {
            (tree(), tree().prop_map(with_indexes))
        }

        /// The diff applied to `have` as plain maps gives `want`; each list touches a key
        /// in the state it says it finds.
        fn check_map_model(
            want: &BTreeMap<String, Entry>,
            have: &BTreeMap<String, (Entry, u64)>,
            d: &Diff,
        ) -> std::result::Result<(), TestCaseError> {
            let mut now = have.clone();
            for (k, e) in &d.creates {
                prop_assert!(
                    now.insert(k.clone(), (e.clone(), 0)).is_none(),
                    "created {} twice or over a key",
                    k
                );
            }
            for (k, e, mi) in &d.updates {
                let (old, old_mi) = now
                    .get(k)
                    .cloned()
                    .ok_or_else(|| TestCaseError::fail(format!("update of absent {k}")))?;
                prop_assert_eq!(old_mi, *mi);
                prop_assert!(
                    old != *e && std::mem::discriminant(&old) == std::mem::discriminant(e)
                );
                now.insert(k.clone(), (e.clone(), 0));
            }
            for (k, old, e, mi) in &d.replaces {
                prop_assert_eq!(now.get(k), Some(&(old.clone(), *mi)));
                prop_assert!(std::mem::discriminant(old) != std::mem::discriminant(e));
                now.insert(k.clone(), (e.clone(), 0));
            }
            for (k, e, mi) in &d.deletes {
                prop_assert_eq!(now.remove(k), Some((e.clone(), *mi)));
            }
            let now: BTreeMap<String, Entry> = now.into_iter().map(|(k, (e, _))| (k, e)).collect();
            prop_assert_eq!(&now, want);
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn diff_turns_have_into_want((want, have) in prop_oneof![any_maps(), tree_pair()]) {
                let d = diff(&want, &have);
                check_map_model(&want, &have, &d)?;
                let mut seen = std::collections::BTreeSet::new();
                let keys = d.creates.iter().map(|c| &c.0)
                    .chain(d.updates.iter().map(|u| &u.0))
                    .chain(d.replaces.iter().map(|r| &r.0))
                    .chain(d.deletes.iter().map(|x| &x.0));
                for k in keys {
                    prop_assert!(seen.insert(k.clone()), "{} planned twice", k);
                }
                for (i, (a, _)) in d.creates.iter().enumerate() {
                    for (b, _) in d.creates.iter().skip(i + 1) {
                        prop_assert!(!is_ancestor(b, a), "created {} before its parent {}", a, b);
                    }
                }
                for (i, (a, _, _)) in d.deletes.iter().enumerate() {
                    for (b, _, _) in d.deletes.iter().skip(i + 1) {
                        prop_assert!(!is_ancestor(a, b), "deleted {} before its child {}", a, b);
                    }
                }
                for n in [0, 1, have.len(), have.len() * 2, usize::MAX] {
                    let removed = d.deletes.len() + d.replaces.len();
                    prop_assert_eq!(d.deletes_too_much(n), n > 0 && removed.saturating_mul(2) > n);
                }
                if d.deletes.is_empty() && d.replaces.is_empty() {
                    prop_assert!(!d.deletes_too_much(have.len()));
                }
                // Empty exactly when the destination already holds what is wanted.
                let same = want.len() == have.len()
                    && want.iter().all(|(k, e)| have.get(k).is_some_and(|(h, _)| h == e));
                prop_assert_eq!(d.is_empty(), same);
                prop_assert_eq!(d.is_empty(), d.steps().is_empty());
            }

            /// The steps, run on a model of etcd (a key needs its parent directory, a
            /// directory goes only once empty, conditions checked), end in `want`, even
            /// where a directory that becomes a value holds keys the reload does not own.
            #[test]
            fn steps_run_on_a_tree((want, have) in tree_pair()) {
                let d = diff(&want, &have);
                let mut now = have.clone();
                let mut unowned: BTreeSet<String> = have
                    .iter()
                    .filter(|(k, (e, _))| *e == Entry::Dir && matches!(want.get(*k), Some(Entry::Value(_))))
                    .map(|(k, _)| format!("{k}/_hidden"))
                    .collect();
                run_steps(&mut now, &mut unowned, &d.steps())?;
                prop_assert!(unowned.is_empty(), "left {:?}", unowned);
                let now: BTreeMap<String, Entry> = now.into_iter().map(|(k, (e, _))| (k, e)).collect();
                prop_assert_eq!(now, want);
            }

            /// The argument at the top of the file, on a model: passes list the source at
            /// ever later indexes and write their diffs; replication from the last pass's
            /// listing index then finds every event's pre-state and ends equal to the source.
            #[test]
            fn replication_from_the_last_listing_finds_every_pre_state(
                history in proptest::collection::vec((flat_key(), proptest::option::of(value())), 0..40),
                start in proptest::collection::btree_map(flat_key(), value(), 0..4),
                cuts in proptest::collection::vec(0..=40usize, 1..5),
            ) {
                let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(history.len())).collect();
                cuts.sort_unstable();
                let mut dst = with_indexes(start.into_iter().map(|(k, v)| (k, Entry::Value(v))).collect());
                let mut unowned = BTreeSet::new();
                for &listed in &cuts {
                    let want = source_at(&history, listed);
                    let d = diff(&want, &dst);
                    run_steps(&mut dst, &mut unowned, &d.steps())?;
                }
                let last = cuts.last().copied().unwrap_or(0);
                for (i, (key, new)) in history.iter().enumerate().skip(last) {
                    let pre = source_at(&history, i).get(key).cloned();
                    let found = dst.get(key).map(|(e, _)| e.clone());
                    prop_assert_eq!(&found, &pre, "event {} on {} finds the wrong pre-state", i + 1, key);
                    match new {
                        Some(v) => dst.insert(key.clone(), (Entry::Value(v.clone()), 0)),
                        None => dst.remove(key),
                    };
                }
                let end: BTreeMap<String, Entry> = dst.into_iter().map(|(k, (e, _))| (k, e)).collect();
                prop_assert_eq!(end, source_at(&history, history.len()));
            }

            #[test]
            fn a_pass_replicates_only_inside_the_margin(pass in 1..=MAX_PASSES + 2, listed: u64, ahead in 0..2000u64) {
                let head = listed.saturating_add(ahead);
                let next = after_pass(pass, listed, head);
                let inside = head - listed <= MARGIN;
                prop_assert_eq!(next == Next::Replicate, inside);
                prop_assert_eq!(next == Next::GiveUp, !inside && pass >= MAX_PASSES);
                // A head below the listing (a restored source) is left to the watch.
                prop_assert_eq!(after_pass(pass, listed, listed.saturating_sub(ahead)), Next::Replicate);
            }
        }

        fn flat_key() -> impl Strategy<Value = String> {
            proptest::sample::select(vec!["a", "b", "c"]).prop_map(|k| format!("{ROOT}/{k}"))
        }

        fn value() -> impl Strategy<Value = String> {
            proptest::sample::select(vec!["", "1", "2"]).prop_map(str::to_string)
        }

        /// The source after its first `n` events.
        fn source_at(history: &[(String, Option<String>)], n: usize) -> BTreeMap<String, Entry> {
            let mut s = BTreeMap::new();
            for (k, v) in history.iter().take(n) {
                match v {
                    Some(v) => s.insert(k.clone(), Entry::Value(v.clone())),
                    None => s.remove(k),
                };
            }
            s
        }

        /// Run steps on a model of etcd: `now` the keys the reload owns, `unowned` keys
        /// below them that it does not (hidden or ignored).
        fn run_steps(
            now: &mut BTreeMap<String, (Entry, u64)>,
            unowned: &mut BTreeSet<String>,
            steps: &[Step<'_>],
        ) -> std::result::Result<(), TestCaseError> {
            let mut next_mi = u64::MAX / 2;
            for &step in steps {
                match step {
                    Step::Create(k, e) => {
                        prop_assert!(!now.contains_key(k), "{:?}: exists", step);
                        let p = parent(k);
                        prop_assert!(
                            p == ROOT || now.get(p).is_some_and(|(e, _)| *e == Entry::Dir),
                            "{:?}: parent {} is {:?}",
                            step,
                            p,
                            now.get(p)
                        );
                        next_mi += 1;
                        now.insert(k.to_string(), (e.clone(), next_mi));
                    }
                    Step::Update(k, e, mi) => {
                        prop_assert!(
                            matches!(now.get(k), Some((Entry::Value(_), m)) if *m == mi),
                            "{:?}: found {:?}",
                            step,
                            now.get(k)
                        );
                        next_mi += 1;
                        now.insert(k.to_string(), (e.clone(), next_mi));
                    }
                    Step::Delete(k, Entry::Dir, _) => {
                        prop_assert!(
                            now.get(k).is_some_and(|(e, _)| *e == Entry::Dir),
                            "{:?}: found {:?}",
                            step,
                            now.get(k)
                        );
                        let child = now.keys().chain(unowned.iter()).find(|c| is_ancestor(k, c));
                        prop_assert!(child.is_none(), "{:?}: {:?} still below", step, child);
                        now.remove(k);
                    }
                    Step::Delete(k, e, mi) => {
                        prop_assert_eq!(now.remove(k), Some((e.clone(), mi)), "{:?}", step);
                    }
                    Step::DeleteTree(k) => {
                        prop_assert!(
                            now.get(k).is_some_and(|(e, _)| *e == Entry::Dir),
                            "{:?}: found {:?}",
                            step,
                            now.get(k)
                        );
                        // Its own keys were deleted before, one by one under their conditions.
                        let child = now.keys().find(|c| is_ancestor(k, c));
                        prop_assert!(child.is_none(), "{:?}: owned {:?} still below", step, child);
                        now.remove(k);
                        unowned.retain(|c| !is_ancestor(k, c));
                    }
                }
            }
            Ok(())
        }
    }
}
