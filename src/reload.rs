//! `--reload`: make the destination subtree an exact copy of the source by writing only the
//! differences, each under a condition, so that readers never see the replica emptied.

use std::collections::BTreeMap;

use log::{info, warn};

use crate::cli::Config;
use crate::dest::read_index;
use crate::error::{Error, Result};
use crate::etcd::{Client, Cond, Node, Written};
use crate::keys::{below, Route, REPLICATION_DIR};

/// A key as seen in a tree listing: a value, or a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    Value(String),
}

impl Entry {
    fn of(node: Node) -> Entry {
        match node.value {
            None => Entry::Dir,
            Some(v) => Entry::Value(v),
        }
    }
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
}

impl Diff {
    /// True when the plan deletes more than half of the destination's `existing` keys.
    pub fn deletes_too_much(&self, existing: usize) -> bool {
        let removed = self.deletes.len().saturating_add(self.replaces.len());
        existing > 0 && removed.saturating_mul(2) > existing
    }

    /// The writes in the order `reload` performs them. On a destination that holds exactly
    /// the listed keys, each step's condition holds when it runs and the result is `want`:
    /// a value becoming a directory goes first, since keys are created below it; creates
    /// go parents first; a directory becoming a value goes last, once the deletes (children
    /// first) have emptied it. New keys appear before old ones go.
    pub fn steps(&self) -> Vec<Step<'_>> {
        fn replace((key, old, new, mi): &(String, Entry, Entry, u64)) -> [Step<'_>; 2] {
            [Step::Delete(key, old, *mi), Step::Create(key, new)]
        }
        let (to_dirs, to_values): (Vec<_>, Vec<_>) = self
            .replaces
            .iter()
            .partition(|(_, _, new, _)| *new == Entry::Dir);
        let mut steps = Vec::new();
        steps.extend(to_dirs.into_iter().flat_map(replace));
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
        steps.extend(to_values.into_iter().flat_map(replace));
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

/// The source tree as it must appear on the destination (mapped keys, filtered).
fn wanted(cfg: &Config, root: Option<Node>) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    for node in root.into_iter().flat_map(Node::into_descendants) {
        if let Route::Mirror(dst) = cfg.keys.route(&node.key) {
            out.insert(dst, Entry::of(node));
        }
    }
    out
}

/// The destination tree that the reload owns: what is not ignored and not replication state.
fn existing(cfg: &Config, root: Option<Node>) -> BTreeMap<String, (Entry, u64)> {
    let mut out = BTreeMap::new();
    for mut node in root.into_iter().flat_map(Node::into_descendants) {
        if below(&node.key, REPLICATION_DIR).is_some() {
            continue;
        }
        // Keys that map back to ignored or hidden source keys are left alone.
        let owned = cfg
            .keys
            .source_of(&node.key)
            .is_some_and(|src| matches!(cfg.keys.route(&src), Route::Mirror(_)));
        if owned {
            let (key, mi) = (std::mem::take(&mut node.key), node.modified_index);
            out.insert(key, (Entry::of(node), mi));
        }
    }
    out
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

fn refused(why: String) -> Error {
    Error::Usage(format!(
        "refusing to --reload: {why}; add --force if this is really what you want"
    ))
}

fn check(dst: &Client, key: &str, w: (Written, bool)) -> Result<()> {
    match w.0 {
        Written::Done => Ok(()),
        Written::Rejected { code, message } => Err(Error::Inconsistency {
            key: key.to_string(),
            source: "the state read at the start of the reload".into(),
            destination: format!(
                "changed during the reload (etcd {code}: {message}) on {}",
                dst.name()
            ),
        }),
    }
}

fn write_entry(dst: &Client, key: &str, entry: &Entry, cond: &Cond) -> Result<()> {
    let value = match entry {
        Entry::Dir => None,
        Entry::Value(v) => Some(v.as_str()),
    };
    check(dst, key, dst.put(key, value, cond)?)
}

/// Run the reload. Returns the source snapshot index to replicate from, or `None` for a dry run.
pub fn reload(cfg: &Config, src: &Client, dst: &Client) -> Result<Option<u64>> {
    let started = std::time::Instant::now();
    let dst_root = cfg.keys.dst_root();
    // One listing at a time: each is reduced to a flat map before the next is read.
    let mut snapshot = src.get(&cfg.keys.src_prefix, true)?;
    let want = wanted(cfg, snapshot.node.take());
    let mut current = dst.get(&dst_root, true)?;
    let have = existing(cfg, current.node.take());
    let d = diff(&want, &have);
    info!(
        "reload of {} from {} at index {} onto {}{dst_root}: {}",
        cfg.keys.src_prefix,
        src.name(),
        snapshot.index,
        dst.name(),
        d.summary()
    );
    if cfg.dry_run {
        print_plan(&d);
    }
    if !cfg.force {
        if snapshot.cluster_id.is_some() && snapshot.cluster_id == current.cluster_id {
            return Err(refused(format!(
                "{} and {} are the same cluster (X-Etcd-Cluster-Id {})",
                src.name(),
                dst.name(),
                snapshot.cluster_id.unwrap_or_default()
            )));
        }
        if d.deletes_too_much(have.len()) {
            return Err(refused(format!(
                "the plan deletes {} of the {} keys under {dst_root} on the destination (more than half)",
                d.deletes.len().saturating_add(d.replaces.len()),
                have.len()
            )));
        }
    }
    if cfg.dry_run {
        return Ok(None);
    }
    // From here on a crash leaves no index: only another --reload can follow.
    let index_key = cfg.keys.index_key();
    if let Some((old, mi)) = read_index(dst, &index_key)? {
        info!("removing the replication index {index_key} (was {old}) before reloading");
        check(
            dst,
            &index_key,
            dst.delete(&index_key, false, false, &Cond::Index(mi))?,
        )?;
    }
    for step in d.steps() {
        match step {
            Step::Create(key, entry) => write_entry(dst, key, entry, &Cond::Absent)?,
            Step::Update(key, entry, mi) => write_entry(dst, key, entry, &Cond::Index(mi))?,
            Step::Delete(key, entry, mi) => delete_entry(dst, key, entry, mi)?,
        }
    }
    write_entry(
        dst,
        &index_key,
        &Entry::Value(snapshot.index.to_string()),
        &Cond::Absent,
    )?;
    info!("reload done in {:.1?}: {}", started.elapsed(), d.summary());
    crate::metrics::update(|s| s.observe_load(started.elapsed()));
    Ok(Some(snapshot.index))
}

/// Delete one key. Directories go non-recursively (children were deleted first), so one that
/// still holds hidden or ignored keys stays, with a warning.
fn delete_entry(dst: &Client, key: &str, entry: &Entry, mi: u64) -> Result<()> {
    match entry {
        Entry::Value(_) => check(dst, key, dst.delete(key, false, false, &Cond::Index(mi))?),
        Entry::Dir => match dst.delete(key, true, false, &Cond::None)?.0 {
            Written::Done => Ok(()),
            Written::Rejected { code, message } => {
                warn!("left directory {key} in place: {message} (etcd {code})");
                Ok(())
            }
        },
    }
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

    mod props {
        use super::*;
        use proptest::prelude::*;

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
            }

            /// The steps, run on a model of etcd (a key needs its parent directory, a
            /// directory goes only once empty, conditions checked), end in `want`.
            #[test]
            fn steps_run_on_a_tree((want, have) in tree_pair()) {
                let d = diff(&want, &have);
                let mut now = have.clone();
                let mut next_mi = u64::MAX / 2;
                for step in d.steps() {
                    match step {
                        Step::Create(k, e) => {
                            prop_assert!(!now.contains_key(k), "{:?}: exists", step);
                            let p = parent(k);
                            prop_assert!(p == ROOT || now.get(p).is_some_and(|(e, _)| *e == Entry::Dir), "{:?}: parent {} is {:?}", step, p, now.get(p));
                            next_mi += 1;
                            now.insert(k.to_string(), (e.clone(), next_mi));
                        }
                        Step::Update(k, e, mi) => {
                            prop_assert!(matches!(now.get(k), Some((Entry::Value(_), m)) if *m == mi), "{:?}: found {:?}", step, now.get(k));
                            next_mi += 1;
                            now.insert(k.to_string(), (e.clone(), next_mi));
                        }
                        Step::Delete(k, Entry::Dir, _) => {
                            prop_assert!(now.get(k).is_some_and(|(e, _)| *e == Entry::Dir), "{:?}: found {:?}", step, now.get(k));
                            let child = now.keys().find(|c| is_ancestor(k, c));
                            prop_assert!(child.is_none(), "{:?}: {:?} still below", step, child);
                            now.remove(k);
                        }
                        Step::Delete(k, e, mi) => {
                            prop_assert_eq!(now.remove(k), Some((e.clone(), mi)), "{:?}", step);
                        }
                    }
                }
                let now: BTreeMap<String, Entry> = now.into_iter().map(|(k, (e, _))| (k, e)).collect();
                prop_assert_eq!(now, want);
            }
        }
    }
}
