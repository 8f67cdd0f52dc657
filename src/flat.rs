//! What to write on a v3 destination for a source event (v2 or v3): a pure plan of key
//! changes, each with the state the key must be in before it.
//!
//! v3 has no directories. A v2 value becomes a key with the same bytes; a v2 directory has
//! no key of its own (its values are the keys below it), so creating one writes nothing and
//! an empty one is not carried; deleting one deletes every key below it.

use crate::etcd;
use crate::keys::{KeyMap, Route, REPLICATION_DIR};
use crate::v3::{self, prefix_end};

/// The state a destination key must hold before a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    Absent,
    Value(Vec<u8>),
    /// Unknown: the source no longer had the previous value (a v3 `prev_kv` lost to a
    /// compaction). The key is written without a condition on it.
    Any,
}

/// One key's change on the destination: from `expect` to `new` (`None`: deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: Vec<u8>,
    pub expect: Expect,
    pub new: Option<Vec<u8>>,
}

/// Everything one source event (v2) or revision (v3) asks of the destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// The source index (v2) or revision (v3) the destination holds once this is applied.
    pub index: u64,
    pub changes: Vec<Change>,
    /// Ranges `[from, to)` to empty (a deleted v2 directory, or the mirrored root):
    /// whatever is below is removed, conditioned on the index only.
    pub clear: Vec<(Vec<u8>, Vec<u8>)>,
    /// For the log and the metrics: the v2 action, or "put"/"delete"/"txn" for v3.
    pub action: String,
    /// The source key(s), for messages.
    pub source: String,
    /// How many later revisions were merged into this one (`merge`).
    pub merged: u64,
}

impl Batch {
    /// True when nothing is written but the index.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.clear.is_empty()
    }
}

/// Every destination key at or below `dir` (a mapped path): `[dir/, dir0)`, and for the
/// root every key starting with "/" except the replication state.
pub fn below(dir: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    if dir == "/" {
        let rep = format!("{REPLICATION_DIR}/").into_bytes();
        let rep_end = prefix_end(&rep);
        return vec![(b"/".to_vec(), rep.clone()), (rep_end, prefix_end(b"/"))];
    }
    let from = format!("{dir}/").into_bytes();
    let to = prefix_end(&from);
    vec![(from, to)]
}

/// The destination keys this mirror owns: everything below its root.
pub fn owned(keys: &KeyMap) -> Vec<(Vec<u8>, Vec<u8>)> {
    below(&keys.dst_root())
}

/// The source keys a v3 source mirrors: `[src_prefix/, src_prefix0)` (with prefix "/",
/// every key that starts with "/").
pub fn src_range(keys: &KeyMap) -> (Vec<u8>, Vec<u8>) {
    let from = if keys.src_prefix == "/" {
        b"/".to_vec()
    } else {
        format!("{}/", keys.src_prefix).into_bytes()
    };
    let to = prefix_end(&from);
    (from, to)
}

/// Where a v3 source key lands, or why it does not. v3 has no hidden keys, so a `_`
/// segment is mirrored; keys are bytes, and only the prefix part is rewritten.
pub fn route_v3(keys: &KeyMap, key: &[u8]) -> Result<Vec<u8>, &'static str> {
    let (from, _) = src_range(keys);
    let Some(rest) = key.strip_prefix(from.as_slice()) else {
        return Err(crate::keys::OUTSIDE);
    };
    if key.starts_with(format!("{REPLICATION_DIR}/").as_bytes()) {
        return Err(crate::keys::REPLICATION_STATE);
    }
    if let Some(re) = &keys.ignore {
        if re.is_match(&String::from_utf8_lossy(key)) {
            return Err("matches --src-ignore-keys-regex");
        }
    }
    let root = keys.dst_root();
    let mut dst = if root == "/" {
        b"/".to_vec()
    } else {
        format!("{root}/").into_bytes()
    };
    dst.extend_from_slice(rest);
    Ok(dst)
}

/// The value of a v2 node, as bytes (`None` for a directory).
fn v2_value(node: Option<&etcd::Node>) -> Option<Vec<u8>> {
    node.and_then(|n| n.value.as_ref())
        .map(|v| v.as_bytes().to_vec())
}

/// Plan a v2 event on a v3 destination.
pub fn from_v2(ev: &etcd::Event, keys: &KeyMap) -> Batch {
    let mut batch = Batch {
        index: ev.node.modified_index,
        action: ev.action.clone(),
        source: ev.node.key.clone(),
        ..Batch::default()
    };
    let deletes = matches!(ev.action.as_str(), "delete" | "compareAndDelete" | "expire");
    let dst = match keys.route(&ev.node.key) {
        Route::Skip(_) => return batch,
        Route::Subtree if deletes => {
            batch.clear = owned(keys);
            return batch;
        }
        // The mirrored root itself is (re)created: nothing to write in v3.
        Route::Subtree => return batch,
        Route::Mirror(dst) => dst,
    };
    let before = v2_value(ev.prev.as_ref());
    let was_dir = ev.prev.as_ref().is_some_and(etcd::Node::is_dir);
    let expect = match &before {
        Some(v) => Expect::Value(v.clone()),
        None => Expect::Absent,
    };
    if deletes {
        if ev.node.is_dir() || was_dir {
            batch.clear = below(&dst);
        } else {
            batch.changes.push(Change {
                key: dst.into_bytes(),
                expect: if ev.prev.is_some() {
                    expect
                } else {
                    Expect::Any
                },
                new: None,
            });
        }
        return batch;
    }
    match (before, v2_value(Some(&ev.node))) {
        // A directory created, or its TTL changed: no key in v3.
        (None, None) => {}
        // A value replaced by a directory: the value goes.
        (Some(_), None) => batch.changes.push(Change {
            key: dst.into_bytes(),
            expect,
            new: None,
        }),
        (_, Some(value)) => batch.changes.push(Change {
            key: dst.into_bytes(),
            expect,
            new: Some(value),
        }),
    }
    batch
}

/// Plan one v3 source revision's events (those under the prefix are planned; the others
/// only move the index).
pub fn from_v3(revision: u64, events: &[v3::Event], keys: &KeyMap) -> Batch {
    let mut batch = Batch {
        index: revision,
        ..Batch::default()
    };
    let mut sources = Vec::new();
    let (mut puts, mut deletes) = (0usize, 0usize);
    for ev in events {
        let Ok(dst) = route_v3(keys, &ev.kv.key) else {
            continue;
        };
        sources.push(v3::show(&ev.kv.key));
        let expect = match &ev.prev {
            Some(p) => Expect::Value(p.value.clone()),
            // A put that created the key had nothing before it.
            None if !ev.delete && ev.kv.create_revision == ev.kv.mod_revision => Expect::Absent,
            None => Expect::Any,
        };
        if ev.delete {
            deletes = deletes.saturating_add(1);
        } else {
            puts = puts.saturating_add(1);
        }
        batch.changes.push(Change {
            key: dst,
            expect,
            new: (!ev.delete).then(|| ev.kv.value.clone()),
        });
    }
    batch.action = match (puts, deletes) {
        (1, 0) => "put",
        (0, 1) => "delete",
        (_, 0) if puts > 0 => "put",
        (0, _) if deletes > 0 => "delete",
        (0, 0) => "",
        _ => "txn",
    }
    .to_string();
    batch.source = match sources.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [first, ..] => format!("{first} and {} more keys", sources.len().saturating_sub(1)),
    };
    batch
}

/// At most this many key changes go in one transaction (etcd allows 128 operations per
/// branch, and the index takes one).
pub const MAX_CHANGES: usize = 100;
/// And at most about this many bytes of values (etcd refuses requests over 1.5 MiB); a
/// single larger change still goes alone.
pub const MAX_BYTES: usize = 1024 * 1024;

/// The bytes a change puts in a request: its new value and a compared previous value.
pub fn weight(c: &Change) -> usize {
    let new = c.new.as_ref().map_or(0, Vec::len);
    let old = match &c.expect {
        Expect::Value(v) => v.len(),
        _ => 0,
    };
    new.saturating_add(old).saturating_add(c.key.len())
}

/// Split changes into transactions of at most `MAX_CHANGES` and about `MAX_BYTES` each.
pub fn chunks(changes: &[Change]) -> Vec<&[Change]> {
    chunks_by(changes, weight)
}

/// Split any writes into transactions as `chunks` does, each weighed by `weight` (bytes).
pub fn chunks_by<T>(items: &[T], weight: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let mut n = 0usize;
        let mut bytes = 0usize;
        for c in rest.iter().take(MAX_CHANGES) {
            let w = weight(c);
            if n > 0 && bytes.saturating_add(w) > MAX_BYTES {
                break;
            }
            bytes = bytes.saturating_add(w);
            n = n.saturating_add(1);
        }
        let (head, tail) = rest.split_at(n.max(1).min(rest.len()));
        out.push(head);
        rest = tail;
    }
    out
}

/// Append the next revision's batch to `into`, as one step from the state before `into` to
/// the state after `next`, when the result still fits one transaction: a key both touch
/// keeps its first expected state and takes its last new one. `false` (and `into`
/// unchanged) when it would not fit, or when either clears ranges (v2 directory deletes,
/// which are never merged).
pub fn merge(into: &mut Batch, next: &Batch) -> bool {
    if !into.clear.is_empty() || !next.clear.is_empty() || next.index <= into.index {
        return false;
    }
    let fresh: Vec<&Change> = next
        .changes
        .iter()
        .filter(|c| !into.changes.iter().any(|d| d.key == c.key))
        .collect();
    let bytes = into
        .changes
        .iter()
        .chain(next.changes.iter())
        .map(weight)
        .fold(0usize, usize::saturating_add);
    if into.changes.len().saturating_add(fresh.len()) > MAX_CHANGES || bytes > MAX_BYTES {
        return false;
    }
    for c in &next.changes {
        match into.changes.iter_mut().find(|d| d.key == c.key) {
            Some(d) => d.new.clone_from(&c.new),
            None => into.changes.push(c.clone()),
        }
    }
    into.index = next.index;
    if into.action != next.action && !next.action.is_empty() {
        into.action = if into.action.is_empty() {
            next.action.clone()
        } else {
            "txn".to_string()
        };
    }
    if into.source.is_empty() {
        into.source.clone_from(&next.source);
    } else if !next.source.is_empty() {
        into.source = format!(
            "{} (and up to index {})",
            into.source.split(" (and up to").next().unwrap_or_default(),
            next.index
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::{Event, Node};

    fn map(src: &str, dst: &str, strip: bool) -> KeyMap {
        crate::keys::map(src, dst, strip, None)
    }

    fn node(key: &str, value: Option<&str>, index: u64) -> Node {
        Node {
            key: key.into(),
            value: value.map(str::to_string),
            modified_index: index,
            nodes: vec![],
        }
    }

    fn ev(action: &str, n: Node, prev: Option<Node>) -> Event {
        Event {
            action: action.into(),
            node: n,
            prev,
        }
    }

    fn change(key: &str, expect: Expect, new: Option<&str>) -> Change {
        Change {
            key: key.as_bytes().to_vec(),
            expect,
            new: new.map(|v| v.as_bytes().to_vec()),
        }
    }

    #[test]
    fn v2_values_become_keys_and_directories_nothing() {
        let k = map("/app", "/replica", false);
        let set = from_v2(&ev("set", node("/app/a", Some("1"), 7), None), &k);
        assert_eq!(set.index, 7);
        assert_eq!(
            set.changes,
            vec![change("/replica/app/a", Expect::Absent, Some("1"))]
        );
        let over = from_v2(
            &ev(
                "compareAndSwap",
                node("/app/a", Some("2"), 8),
                Some(node("/app/a", Some("1"), 7)),
            ),
            &k,
        );
        assert_eq!(
            over.changes,
            vec![change(
                "/replica/app/a",
                Expect::Value(b"1".to_vec()),
                Some("2")
            )]
        );
        let mkdir = from_v2(&ev("set", node("/app/d", None, 9), None), &k);
        assert!(mkdir.is_empty());
        let rmdir = from_v2(
            &ev(
                "delete",
                node("/app/d", None, 10),
                Some(node("/app/d", None, 9)),
            ),
            &k,
        );
        assert_eq!(rmdir.clear, below("/replica/app/d"));
        assert_eq!(rmdir.clear[0].0, b"/replica/app/d/");
        assert_eq!(rmdir.clear[0].1, b"/replica/app/d0");
        let to_dir = from_v2(
            &ev(
                "set",
                node("/app/a", None, 11),
                Some(node("/app/a", Some("2"), 8)),
            ),
            &k,
        );
        assert_eq!(
            to_dir.changes,
            vec![change("/replica/app/a", Expect::Value(b"2".to_vec()), None)]
        );
        let expire = from_v2(
            &ev(
                "expire",
                node("/app/t", Some(""), 12),
                Some(node("/app/t", Some("x"), 3)),
            ),
            &k,
        );
        assert_eq!(
            expire.changes,
            vec![change("/replica/app/t", Expect::Value(b"x".to_vec()), None)]
        );
        assert!(from_v2(&ev("set", node("/app/_h", Some("1"), 13), None), &k).is_empty());
        assert!(from_v2(&ev("set", node("/other", Some("1"), 14), None), &k).is_empty());
        let root = from_v2(&ev("delete", node("/app", None, 15), None), &k);
        assert_eq!(root.clear, below("/replica/app"));
    }

    #[test]
    fn the_root_clears_all_but_the_replication_state() {
        let r = below("/");
        assert_eq!(r[0], (b"/".to_vec(), b"/__replication/".to_vec()));
        assert_eq!(r[1], (b"/__replication0".to_vec(), b"0".to_vec()));
    }

    fn v3ev(
        key: &[u8],
        delete: bool,
        value: &[u8],
        created: u64,
        rev: u64,
        prev: Option<&[u8]>,
    ) -> v3::Event {
        v3::Event {
            delete,
            kv: v3::Kv {
                key: key.to_vec(),
                value: value.to_vec(),
                create_revision: created,
                mod_revision: rev,
            },
            prev: prev.map(|p| v3::Kv {
                key: key.to_vec(),
                value: p.to_vec(),
                create_revision: created,
                mod_revision: rev.saturating_sub(1),
            }),
        }
    }

    #[test]
    fn v3_revisions_map_bytes_under_the_prefix() {
        let k = map("/app", "/replica", true);
        let b = from_v3(
            20,
            &[
                v3ev(b"/app/a", false, b"1", 20, 20, None),
                v3ev(b"/app/_h\xff", false, b"\x00", 3, 20, Some(b"old")),
                v3ev(b"/app/gone", true, b"", 0, 20, Some(b"v")),
                v3ev(b"/other/x", false, b"1", 20, 20, None),
                v3ev(b"/app", false, b"1", 20, 20, None),
                v3ev(b"/app/lost", false, b"2", 5, 20, None),
            ],
            &k,
        );
        assert_eq!(b.index, 20);
        assert_eq!(b.action, "txn");
        let keys: Vec<&[u8]> = b.changes.iter().map(|c| c.key.as_slice()).collect();
        assert_eq!(
            keys,
            vec![
                b"/replica/a".as_slice(),
                b"/replica/_h\xff",
                b"/replica/gone",
                b"/replica/lost"
            ]
        );
        assert_eq!(b.changes[0].expect, Expect::Absent);
        assert_eq!(b.changes[1].expect, Expect::Value(b"old".to_vec()));
        assert_eq!(b.changes[2].new, None);
        assert_eq!(b.changes[3].expect, Expect::Any);
        let root = map("/", "/", false);
        assert_eq!(route_v3(&root, b"/x"), Ok(b"/x".to_vec()));
        assert!(route_v3(&root, b"x").is_err());
        assert!(route_v3(&root, b"/__replication/r").is_err());
        let nostrip = map("/app", "/replica", false);
        assert_eq!(
            route_v3(&nostrip, b"/app/x"),
            Ok(b"/replica/app/x".to_vec())
        );
    }

    #[test]
    fn merged_revisions_go_from_the_first_state_to_the_last() {
        let k = map("/", "/", false);
        let mut b = from_v3(10, &[v3ev(b"/a", false, b"1", 10, 10, None)], &k);
        let next = from_v3(
            11,
            &[
                v3ev(b"/a", false, b"2", 10, 11, Some(b"1")),
                v3ev(b"/b", true, b"", 3, 11, Some(b"x")),
            ],
            &k,
        );
        assert!(merge(&mut b, &next));
        assert_eq!(b.index, 11);
        assert_eq!(
            b.changes,
            vec![
                change("/a", Expect::Absent, Some("2")),
                change("/b", Expect::Value(b"x".to_vec()), None)
            ]
        );
        assert_eq!(b.action, "txn");
        // Never backwards, never past one transaction, never with a range delete.
        assert!(!merge(&mut b.clone(), &next));
        let many: Vec<v3::Event> = (0..MAX_CHANGES)
            .map(|i| v3ev(format!("/m{i}").as_bytes(), false, b"v", 12, 12, None))
            .collect();
        assert!(!merge(&mut b.clone(), &from_v3(12, &many, &k)));
        let mut cleared = b.clone();
        cleared.clear = below("/x");
        assert!(!merge(&mut cleared, &from_v3(13, &[], &k)));
    }

    #[test]
    fn chunks_bound_count_and_bytes() {
        let small: Vec<Change> = (0..250)
            .map(|i| change(&format!("/k{i}"), Expect::Absent, Some("v")))
            .collect();
        let c = chunks(&small);
        assert_eq!(
            c.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![100, 100, 50]
        );
        let big = vec![0u8; 700 * 1024];
        let large: Vec<Change> = (0..3)
            .map(|i| Change {
                key: format!("/b{i}").into_bytes(),
                expect: Expect::Absent,
                new: Some(big.clone()),
            })
            .collect();
        assert_eq!(chunks(&large).len(), 3);
        assert!(chunks(&[]).is_empty());
    }
}
