//! How an event is written on the destination: conditions etcd can check, reads where it
//! cannot, and what a refused write means.

use log::debug;

use crate::error::{Error, Result};
use crate::etcd::{Client, Cond, Written};
use crate::plan::{Op, State};

/// Read the state of a destination key and its modifiedIndex (0 when absent).
pub fn read_state(dst: &Client, key: &str) -> Result<(State, u64)> {
    let got = dst.get(key, false)?;
    let mi = got.node.as_ref().map_or(0, |n| n.modified_index);
    Ok((State::of(got.node.as_ref()), mi))
}

/// Read the replication index stored at `key`, if there is one, with its modifiedIndex.
pub fn read_index(dst: &Client, key: &str) -> Result<Option<(u64, u64)>> {
    match read_state(dst, key)? {
        (State::Absent, _) => Ok(None),
        (State::Value(v), mi) => v.trim().parse().map(|i| Some((i, mi))).map_err(|_| {
            Error::Usage(format!(
                "the replication index {key} on {} holds {v:?}, not a number; run with --reload",
                dst.name()
            ))
        }),
        (State::Dir, _) => Err(Error::Usage(format!(
            "the replication index {key} on {} is a directory; run with --reload",
            dst.name()
        ))),
    }
}

/// What one destination operation found.
pub enum Outcome {
    Done,
    /// The destination did not hold the expected pre-state; it holds this instead.
    Mismatch(State),
}

/// Values up to this size travel as `prevValue`; a larger one would make a DELETE's request
/// line too long (etcd resets lines over about 4 KiB, ureq refuses about 64 KiB) or a PUT
/// too large (etcd refuses two 6 MiB values in one form), so it is read and compared here
/// and the write conditioned on the destination's modifiedIndex instead.
const SMALL_VALUE: usize = 1024;

/// Turn an expected pre-state into a condition etcd can check, reading the key where it cannot.
fn condition(dst: &Client, key: &str, expect: &State) -> Result<std::result::Result<Cond, State>> {
    Ok(match expect {
        State::Absent => Ok(Cond::Absent),
        State::Value(v) if !v.is_empty() && v.len() <= SMALL_VALUE => Ok(Cond::Value(v.clone())),
        _ => match read_state(dst, key)? {
            (found, mi) if found == *expect => Ok(match found {
                State::Value(_) => Cond::Index(mi),
                _ => Cond::None,
            }),
            (found, _) => Err(found),
        },
    })
}

/// Apply one operation; the flag says whether a request was retried after a transient fault.
pub fn exec(dst: &Client, op: &Op) -> Result<(Outcome, bool)> {
    let (key, written) = match op {
        Op::Check { key, expect } => {
            let (found, _) = read_state(dst, key)?;
            let outcome = if found == *expect {
                Outcome::Done
            } else {
                Outcome::Mismatch(found)
            };
            return Ok((outcome, false));
        }
        Op::ClearSubtree { key } => return clear_subtree(dst, key).map(|r| (Outcome::Done, r)),
        Op::EnsureDir { key } => {
            let (w, retried) = dst.put(key, None, &Cond::Absent)?;
            let outcome = match w {
                Written::Done => Outcome::Done,
                Written::Rejected { .. } => match read_state(dst, key)?.0 {
                    State::Dir => Outcome::Done,
                    found => Outcome::Mismatch(found),
                },
            };
            return Ok((outcome, retried));
        }
        Op::Put { key, value, expect } => match condition(dst, key, expect)? {
            Ok(cond) => (key, dst.put(key, value.as_deref(), &cond)?),
            Err(found) => return Ok((Outcome::Mismatch(found), false)),
        },
        Op::Delete { key, expect } => match condition(dst, key, expect)? {
            Ok(cond) => {
                let dir = *expect == State::Dir;
                (key, dst.delete(key, dir, dir, &cond)?)
            }
            Err(found) => return Ok((Outcome::Mismatch(found), false)),
        },
    };
    match written {
        (Written::Done, retried) => Ok((Outcome::Done, retried)),
        (Written::Rejected { code, message }, retried) => {
            debug!("{key}: etcd refused the write: {code} {message}");
            Ok((Outcome::Mismatch(read_state(dst, key)?.0), retried))
        }
    }
}

/// Remove everything mirrored at or below `key`; the destination root itself stays.
fn clear_subtree(dst: &Client, key: &str) -> Result<bool> {
    if key != "/" {
        let (w, retried) = dst.delete(key, true, true, &Cond::None)?;
        return match w {
            Written::Done => Ok(retried),
            // Already gone, or a plain value: either way nothing is left to mirror here.
            Written::Rejected { .. } => match read_state(dst, key)? {
                (State::Absent, _) => Ok(retried),
                (_, mi) => dst
                    .delete(key, false, false, &Cond::Index(mi))
                    .map(|(_, r)| r),
            },
        };
    }
    let mut retried = false;
    let root = dst.get("/", false)?.node;
    for child in root.iter().flat_map(|n| n.nodes.iter()) {
        if child.key.starts_with("/_") {
            continue;
        }
        retried |= dst
            .delete(&child.key, child.is_dir(), child.is_dir(), &Cond::None)?
            .1;
    }
    Ok(retried)
}
