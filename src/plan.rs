//! What to write on the destination for one source event: a pure decision, tested here.

use crate::etcd::{Event, Node};

/// The state of one key, as the source saw it or the destination holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Absent,
    Value(String),
    Dir,
}

impl State {
    pub fn of(node: Option<&Node>) -> State {
        match node {
            None => State::Absent,
            Some(n) => match &n.value {
                None => State::Dir,
                Some(v) => State::Value(v.clone()),
            },
        }
    }

    /// A short description for logs and inconsistency messages.
    pub fn describe(&self) -> String {
        match self {
            State::Absent => "no key".to_string(),
            State::Dir => "a directory".to_string(),
            State::Value(v) if v.chars().count() > 200 => {
                let head: String = v.chars().take(200).collect();
                format!("value {head:?}… ({} bytes)", v.len())
            }
            State::Value(v) => format!("value {v:?}"),
        }
    }
}

/// One destination operation. `expect` is the pre-state the operation asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write a value (`Some`) or create a directory (`None`).
    Put {
        key: String,
        value: Option<String>,
        expect: State,
    },
    /// Delete a value, or a directory with everything below it.
    Delete { key: String, expect: State },
    /// Nothing to write, but the destination must hold `expect`.
    Check { key: String, expect: State },
    /// The mirrored subtree rooted here is gone on the source: remove it entirely.
    ClearSubtree { key: String },
    /// The directory must exist (a hidden or ignored key was written below it).
    EnsureDir { key: String },
}

impl Op {
    /// The state of the key this operation asserts before it runs, if it asserts one.
    pub fn pre(&self) -> Option<&State> {
        match self {
            Op::Put { expect, .. } | Op::Delete { expect, .. } | Op::Check { expect, .. } => {
                Some(expect)
            }
            Op::ClearSubtree { .. } | Op::EnsureDir { .. } => None,
        }
    }
}

/// The operations for one event and the destination state they lead to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
    /// The state of the key once the event is applied: how a restart recognises an event
    /// that was applied just before a crash, without its index write.
    pub post: State,
}

/// Plan an event on a mirrored key `dst`.
pub fn plan_event(ev: &Event, dst: &str) -> Result<Plan, String> {
    let pre = State::of(ev.prev.as_ref());
    match ev.action.as_str() {
        "delete" | "compareAndDelete" | "expire" => {
            let was_dir = ev.node.is_dir() || pre == State::Dir;
            let expect = if was_dir { State::Dir } else { pre };
            let op = if dst == "/" {
                Op::ClearSubtree {
                    key: dst.to_string(),
                }
            } else {
                Op::Delete {
                    key: dst.to_string(),
                    expect,
                }
            };
            Ok(Plan {
                ops: vec![op],
                post: State::Absent,
            })
        }
        "set" | "create" | "update" | "compareAndSwap" => {
            let post = State::of(Some(&ev.node));
            let key = dst.to_string();
            let ops = match (&pre, &post) {
                // The destination root always exists and cannot be written.
                (_, State::Dir) if dst == "/" => vec![],
                // A directory update only changes its TTL, which is not mirrored.
                (State::Dir, State::Dir) => vec![Op::Check {
                    key,
                    expect: State::Dir,
                }],
                (State::Value(_), State::Dir) | (State::Dir, State::Value(_)) => vec![
                    Op::Delete {
                        key: key.clone(),
                        expect: pre.clone(),
                    },
                    Op::Put {
                        key,
                        value: ev.node.value.clone(),
                        expect: State::Absent,
                    },
                ],
                _ => vec![Op::Put {
                    key,
                    value: ev.node.value.clone(),
                    expect: pre.clone(),
                }],
            };
            Ok(Plan { ops, post })
        }
        other => Err(format!("unknown action {other:?}")),
    }
}

/// Plan a skipped (hidden or ignored) write: its nearest mirrored directory must exist.
pub fn plan_parent(dst_dir: &str) -> Plan {
    Plan {
        ops: vec![Op::EnsureDir {
            key: dst_dir.to_string(),
        }],
        post: State::Dir,
    }
}

/// Where to go on after op `at` of `plan` found `found` instead of its pre-state, when the
/// plan may already have been partly applied (the first event after a restart, or a write
/// retried after a lost response): the index of the op whose pre-state `found` is, or
/// `ops.len()` when `found` is the plan's end state. `None`: no state of this plan.
pub fn resume_at(plan: &Plan, at: usize, found: &State) -> Option<usize> {
    let later = plan.ops.iter().enumerate().skip(at.saturating_add(1));
    for (i, op) in later {
        if op.pre() == Some(found) {
            return Some(i);
        }
    }
    (*found == plan.post).then_some(plan.ops.len())
}

/// Plan an event on the source prefix's parent (a recursive delete or expiry above it).
pub fn plan_subtree_event(ev: &Event, dst_root: &str) -> Plan {
    match ev.action.as_str() {
        "delete" | "compareAndDelete" | "expire" => Plan {
            ops: vec![Op::ClearSubtree {
                key: dst_root.to_string(),
            }],
            post: State::Absent,
        },
        // Creating a directory above the prefix leaves the mirrored subtree as it was.
        _ => Plan {
            ops: vec![],
            post: State::Absent,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(key: &str, value: Option<&str>) -> Node {
        Node {
            key: key.into(),
            value: value.map(str::to_string),
            modified_index: 10,
            nodes: vec![],
        }
    }

    fn ev(action: &str, now: Option<&str>, prev: Option<Option<&str>>) -> Event {
        Event {
            action: action.into(),
            node: node("/a", now),
            prev: prev.map(|p| node("/a", p)),
        }
    }

    fn put(value: Option<&str>, expect: State) -> Op {
        Op::Put {
            key: "/r/a".into(),
            value: value.map(str::to_string),
            expect,
        }
    }

    #[test]
    fn creates_assert_absence() {
        for action in ["set", "create"] {
            let p = plan_event(&ev(action, Some("v"), None), "/r/a").unwrap();
            assert_eq!(p.ops, vec![put(Some("v"), State::Absent)]);
            assert_eq!(p.post, State::Value("v".into()));
        }
        let p = plan_event(&ev("create", None, None), "/r/a").unwrap();
        assert_eq!(p.ops, vec![put(None, State::Absent)]);
        assert_eq!(p.post, State::Dir);
    }

    #[test]
    fn overwrites_assert_the_previous_value_even_empty() {
        for action in ["set", "update", "compareAndSwap"] {
            let p = plan_event(&ev(action, Some("new"), Some(Some("old"))), "/r/a").unwrap();
            assert_eq!(p.ops, vec![put(Some("new"), State::Value("old".into()))]);
        }
        let p = plan_event(&ev("set", Some(""), Some(Some(""))), "/r/a").unwrap();
        assert_eq!(p.ops, vec![put(Some(""), State::Value(String::new()))]);
    }

    #[test]
    fn deletes_assert_the_previous_state() {
        for action in ["delete", "compareAndDelete", "expire"] {
            let p = plan_event(&ev(action, Some(""), Some(Some("x"))), "/r/a").unwrap();
            assert_eq!(
                p.ops,
                vec![Op::Delete {
                    key: "/r/a".into(),
                    expect: State::Value("x".into())
                }]
            );
            assert_eq!(p.post, State::Absent);
        }
        let p = plan_event(&ev("delete", None, Some(None)), "/r/a").unwrap();
        assert_eq!(
            p.ops,
            vec![Op::Delete {
                key: "/r/a".into(),
                expect: State::Dir
            }]
        );
        let p = plan_event(&ev("delete", None, Some(None)), "/").unwrap();
        assert_eq!(p.ops, vec![Op::ClearSubtree { key: "/".into() }]);
    }

    #[test]
    fn directory_ttl_updates_only_check() {
        let p = plan_event(&ev("update", None, Some(None)), "/r/a").unwrap();
        assert_eq!(
            p.ops,
            vec![Op::Check {
                key: "/r/a".into(),
                expect: State::Dir
            }]
        );
        let p = plan_event(&ev("create", None, None), "/").unwrap();
        assert!(p.ops.is_empty());
    }

    #[test]
    fn a_directory_replacing_a_value_deletes_then_creates() {
        let p = plan_event(&ev("set", None, Some(Some("v"))), "/r/a").unwrap();
        assert_eq!(
            p.ops,
            vec![
                Op::Delete {
                    key: "/r/a".into(),
                    expect: State::Value("v".into())
                },
                put(None, State::Absent)
            ]
        );
    }

    #[test]
    fn unknown_actions_are_refused() {
        assert!(plan_event(&ev("get", Some("v"), None), "/r/a").is_err());
    }

    #[test]
    fn parent_deletes_clear_the_subtree() {
        let p = plan_subtree_event(&ev("delete", None, Some(None)), "/r/p");
        assert_eq!(p.ops, vec![Op::ClearSubtree { key: "/r/p".into() }]);
        assert!(plan_subtree_event(&ev("set", None, None), "/r/p")
            .ops
            .is_empty());
    }

    #[test]
    fn every_intermediate_state_of_a_type_change_is_recognised() {
        let p = plan_event(&ev("set", None, Some(Some("v"))), "/r/a").unwrap();
        // Killed between the delete and the create: the key is absent.
        assert_eq!(resume_at(&p, 0, &State::Absent), Some(1));
        assert_eq!(resume_at(&p, 0, &State::Dir), Some(2));
        assert_eq!(resume_at(&p, 0, &State::Value("w".into())), None);
        assert_eq!(resume_at(&p, 1, &State::Dir), Some(2));
        let p = plan_event(&ev("set", Some("v"), Some(None)), "/r/a").unwrap();
        assert_eq!(resume_at(&p, 0, &State::Absent), Some(1));
        assert_eq!(resume_at(&p, 0, &State::Value("v".into())), Some(2));
        let p = plan_event(&ev("set", Some("new"), Some(Some("old"))), "/r/a").unwrap();
        assert_eq!(resume_at(&p, 0, &State::Value("new".into())), Some(1));
        assert_eq!(resume_at(&p, 0, &State::Absent), None);
        assert_eq!(plan_parent("/r/d").post, State::Dir);
    }

    #[test]
    fn descriptions_are_short() {
        assert_eq!(State::Value("a\nb".into()).describe(), "value \"a\\nb\"");
        assert!(State::Value("x".repeat(1000)).describe().len() < 260);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const SET_LIKE: [&str; 4] = ["set", "create", "update", "compareAndSwap"];
        const DELETE_LIKE: [&str; 3] = ["delete", "compareAndDelete", "expire"];

        fn action() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => proptest::sample::select(SET_LIKE.to_vec()).prop_map(String::from),
                3 => proptest::sample::select(DELETE_LIKE.to_vec()).prop_map(String::from),
                1 => Just("get".to_string()),
                1 => any::<String>(),
            ]
        }

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("/".to_string()),
                "(/[a-z_é]{0,3}){1,3}",
                any::<String>()
            ]
        }

        fn value() -> impl Strategy<Value = Option<String>> {
            proptest::option::of(prop_oneof![
                Just(String::new()),
                "[ab]{1,2}",
                any::<String>()
            ])
        }

        fn node() -> impl Strategy<Value = Node> {
            (key(), value(), any::<u64>()).prop_map(|(key, value, modified_index)| Node {
                key,
                value,
                modified_index,
                nodes: vec![],
            })
        }

        fn event() -> impl Strategy<Value = Event> {
            (action(), node(), proptest::option::of(node()))
                .prop_map(|(action, node, prev)| Event { action, node, prev })
        }

        fn op_key(op: &Op) -> &str {
            match op {
                Op::Put { key, .. }
                | Op::Delete { key, .. }
                | Op::Check { key, .. }
                | Op::ClearSubtree { key }
                | Op::EnsureDir { key } => key,
            }
        }

        /// Run the ops on a one-key model of the destination starting at `start`: every
        /// op's expected state must hold when it runs. Returns the state at the end.
        fn run(ops: &[Op], start: State) -> Result<State, String> {
            ops.iter().try_fold(start, |now, op| match op {
                Op::Put { value, expect, .. } if *expect == now => {
                    Ok(value.clone().map_or(State::Dir, State::Value))
                }
                Op::Delete { expect, .. } if *expect == now => Ok(State::Absent),
                Op::Check { expect, .. } if *expect == now => Ok(now),
                Op::ClearSubtree { .. } => Ok(State::Absent),
                Op::EnsureDir { .. } if now != State::Absent && now != State::Dir => {
                    Err(format!("{op:?} on {now:?}"))
                }
                Op::EnsureDir { .. } => Ok(State::Dir),
                _ => Err(format!("{op:?} on {now:?}")),
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// A restart that finds the key in the state left after any number of the plan's
            /// writes goes on from an op whose run ends in the plan's end state.
            #[test]
            fn every_state_a_plan_passes_through_is_resumable(ev in event(), dst in key()) {
                let Ok(p) = plan_event(&ev, &dst) else { return Ok(()) };
                let Some(first) = p.ops.first().and_then(Op::pre).cloned() else {
                    return Ok(());
                };
                let mut now = first;
                for done in 0..=p.ops.len() {
                    if done > 0 {
                        now = run(p.ops.get(done - 1..done).unwrap_or_default(), now)
                            .map_err(TestCaseError::fail)?;
                    }
                    if done == 0 {
                        continue;
                    }
                    let at = resume_at(&p, 0, &now);
                    prop_assert!(at.is_some(), "state {now:?} after {done} ops not recognised");
                    let rest = p.ops.get(at.unwrap_or(0)..).unwrap_or_default();
                    prop_assert_eq!(run(rest, now.clone()), Ok(p.post.clone()));
                }
            }

            #[test]
            fn plans_follow_the_event(ev in event(), dst in key()) {
                let planned = plan_event(&ev, &dst);
                let set_like = SET_LIKE.contains(&ev.action.as_str());
                let delete_like = DELETE_LIKE.contains(&ev.action.as_str());
                let Ok(p) = planned else {
                    prop_assert!(!set_like && !delete_like, "known action refused");
                    return Ok(());
                };
                prop_assert!(set_like || delete_like, "unknown action {:?} planned", ev.action);
                for op in &p.ops {
                    prop_assert_eq!(op_key(op), dst.as_str());
                    if let Op::Put { value, .. } = op {
                        prop_assert_eq!(value, &ev.node.value);
                    }
                }
                let pre = State::of(ev.prev.as_ref());
                // A delete of a directory expects a directory, whatever prevNode said.
                let start = if delete_like && ev.node.is_dir() { State::Dir } else { pre };
                match p.ops.first() {
                    Some(Op::Put { expect, .. } | Op::Delete { expect, .. } | Op::Check { expect, .. }) => {
                        prop_assert_eq!(expect, &start)
                    }
                    Some(Op::ClearSubtree { .. }) => prop_assert!(delete_like && dst == "/"),
                    Some(Op::EnsureDir { .. }) => prop_assert!(false, "only for skipped keys"),
                    None => prop_assert!(set_like && dst == "/" && ev.node.is_dir()),
                }
                if delete_like {
                    prop_assert_eq!(&p.post, &State::Absent);
                    prop_assert_eq!(p.ops.len(), 1);
                } else {
                    prop_assert_eq!(&p.post, &State::of(Some(&ev.node)));
                }
                // The destination root always exists; otherwise the ops lead to `post`.
                if !p.ops.is_empty() {
                    let end = run(&p.ops, start).map_err(TestCaseError::fail)?;
                    prop_assert_eq!(end, p.post);
                }
            }

            #[test]
            fn subtree_plans_clear_only_on_deletes(ev in event(), root in key()) {
                let p = plan_subtree_event(&ev, &root);
                prop_assert_eq!(&p.post, &State::Absent);
                if DELETE_LIKE.contains(&ev.action.as_str()) {
                    prop_assert_eq!(p.ops, vec![Op::ClearSubtree { key: root }]);
                } else {
                    prop_assert!(p.ops.is_empty());
                }
            }

            #[test]
            fn descriptions_stay_short(v in any::<String>()) {
                let d = State::Value(v).describe();
                // 200 characters, each escaped to at most 10 bytes, and the framing.
                prop_assert!(d.len() <= 200 * 10 + 40, "{}", d.len());
            }
        }
    }
}
