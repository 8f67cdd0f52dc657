//! etcd's v3 JSON gateway: the messages the mirror sends and reads (ranges at a revision,
//! transactions, watches), over the client's transport and its one retry policy.
//!
//! Facts this relies on (checked on etcd 3.4.23, see the README): keys and values are
//! standard base64; numbers come back as strings; fields at their default value are left
//! out; a failed txn has no `succeeded`; a watch answers one JSON object per line, and one
//! revision's events always travel in one message.

use std::time::Duration;

use serde_json::{json, Value};

use crate::endpoint::{base64, unbase64};
use crate::error::{Error, Result};
use crate::etcd::{read_line, Answer, Client, GrpcError, Line, GRPC_OUT_OF_RANGE};

/// A key as the gateway returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: u64,
    pub mod_revision: u64,
}

/// The key just after every key that starts with `prefix` (a `range_end`); `\0` (every key
/// to the end) when no such key exists.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if let Some(next) = last.checked_add(1) {
            end.push(next);
            return end;
        }
    }
    vec![0]
}

/// An int64/uint64 field: a JSON string (or number); absent means 0.
fn num(v: &Value, field: &str) -> std::result::Result<u64, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| format!("{field} is not a number: {s:?}")),
        Some(Value::Number(n)) => n.as_u64().ok_or(format!("{field} is not a number: {n}")),
        Some(other) => Err(format!("{field} is not a number: {other}")),
    }
}

/// A bytes field (base64); absent means empty.
fn bytes(v: &Value, field: &str) -> std::result::Result<Vec<u8>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => unbase64(s).ok_or(format!("{field} is not base64: {s:?}")),
        Some(other) => Err(format!("{field} is not base64 text: {other}")),
    }
}

fn kv(v: &Value) -> std::result::Result<Kv, String> {
    Ok(Kv {
        key: bytes(v, "key")?,
        value: bytes(v, "value")?,
        create_revision: num(v, "create_revision")?,
        mod_revision: num(v, "mod_revision")?,
    })
}

/// `header.revision` of an answer.
pub fn revision(v: &Value) -> std::result::Result<u64, String> {
    num(v.get("header").unwrap_or(&Value::Null), "revision")
}

/// The text of a key for messages: as it is when it is text, escaped otherwise.
pub fn show(key: &[u8]) -> String {
    String::from_utf8(key.to_vec()).unwrap_or_else(|_| key.escape_ascii().to_string())
}

/// Add a field to a request body (an object).
fn set(body: &mut Value, field: &str, value: Value) {
    if let Value::Object(m) = body {
        m.insert(field.to_string(), value);
    }
}

/// A malformed answer: the server is not the etcd we know, or a proxy mangled it.
fn malformed(c: &Client, what: &str, why: &str) -> Error {
    Error::Refused(format!(
        "{what} on {}: the answer cannot be read ({why})",
        c.name()
    ))
}

/// A refusal that says a revision has been compacted.
pub fn compacted(e: &GrpcError) -> bool {
    e.code == GRPC_OUT_OF_RANGE && e.message.contains("compacted")
}

/// Keys in `[key, end)` read at one revision (`at` = 0: the current one), every page of
/// them, with the revision they were read at. `keys_only` leaves the values out; `count`
/// asks only for the number of keys, `min_mod` only for keys modified at or after it.
pub struct Range<'a> {
    pub key: &'a [u8],
    pub end: &'a [u8],
    pub at: u64,
    pub keys_only: bool,
    pub min_mod: u64,
    pub limit: u64,
}

/// What a range read found: its keys (or only their number) at `revision`.
#[derive(Debug, Default)]
pub struct Found {
    pub kvs: Vec<Kv>,
    pub count: u64,
    pub revision: u64,
}

/// Keys per page of a full read: small enough that a page of large values stays a
/// reasonable answer, large enough that 100k keys take 100 requests.
const PAGE: u64 = 1000;

impl Range<'_> {
    /// Read every page (or, with `limit`, the first `limit` keys); refusals (a compacted
    /// revision) are returned for the caller to judge.
    pub fn read(&self, c: &Client) -> Result<std::result::Result<Found, GrpcError>> {
        let what = format!("range {}", show(self.key));
        let mut found = Found {
            revision: self.at,
            ..Found::default()
        };
        let mut from = self.key.to_vec();
        loop {
            let mut body = json!({
                "key": base64(&from),
                "range_end": base64(self.end),
                "limit": if self.limit > 0 { self.limit } else { PAGE },
            });
            if found.revision > 0 {
                set(&mut body, "revision", json!(found.revision.to_string()));
            }
            if self.keys_only {
                set(&mut body, "keys_only", json!(true));
            }
            if self.min_mod > 0 {
                set(
                    &mut body,
                    "min_mod_revision",
                    json!(self.min_mod.to_string()),
                );
            }
            // A page of up to 1000 values is a listing; a limit is set only for a few keys.
            let size = if self.limit > 0 {
                Answer::Small
            } else {
                Answer::Listing
            };
            let (answer, _) = c.call_v3("kv/range", &body.to_string(), size, &what)?;
            let v = match answer {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            let r = revision(&v).map_err(|e| malformed(c, &what, &e))?;
            if found.revision == 0 {
                found.revision = r;
            }
            let page = match v.get("kvs") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(kv)
                    .collect::<std::result::Result<Vec<Kv>, String>>()
                    .map_err(|e| malformed(c, &what, &e))?,
                _ => Vec::new(),
            };
            let more = v.get("more").and_then(Value::as_bool).unwrap_or(false);
            if found.count == 0 {
                found.count = num(&v, "count").map_err(|e| malformed(c, &what, &e))?;
            }
            let last = page.last().map(|k| k.key.clone());
            found.kvs.extend(page);
            match last {
                Some(mut next) if more && self.limit == 0 => {
                    // The next page starts just after the last key.
                    next.push(0);
                    from = next;
                }
                _ => return Ok(Ok(found)),
            }
        }
    }
}

/// The number of keys in `[key, end)` at revision `at` (0: now), with that revision.
pub fn count(
    c: &Client,
    key: &[u8],
    end: &[u8],
    at: u64,
) -> Result<std::result::Result<(u64, u64), GrpcError>> {
    let what = format!("count {}", show(key));
    let mut body = json!({"key": base64(key), "range_end": base64(end), "count_only": true});
    if at > 0 {
        set(&mut body, "revision", json!(at.to_string()));
    }
    let (answer, _) = c.call_v3("kv/range", &body.to_string(), Answer::Small, &what)?;
    Ok(match answer {
        Ok(v) => Ok((
            num(&v, "count").map_err(|e| malformed(c, &what, &e))?,
            revision(&v).map_err(|e| malformed(c, &what, &e))?,
        )),
        Err(e) => Err(e),
    })
}

/// One key now (a linearizable read), if it exists.
pub fn get(c: &Client, key: &[u8]) -> Result<Option<Kv>> {
    let found = Range {
        key,
        end: &[],
        at: 0,
        keys_only: false,
        min_mod: 0,
        limit: 1,
    }
    .read(c)?
    .map_err(|e| c.v3_refusal(&format!("range {}", show(key)), &e))?;
    Ok(found.kvs.into_iter().find(|k| k.key == key))
}

/// The cluster's id, in hex as v2's `X-Etcd-Cluster-Id` writes it.
pub fn cluster_id(c: &Client) -> Result<String> {
    let what = "status";
    let (answer, _) = c.call_v3("maintenance/status", "{}", Answer::Small, what)?;
    let v = answer.map_err(|e| c.v3_refusal(what, &e))?;
    let id = v
        .get("header")
        .ok_or_else(|| "no header".to_string())
        .and_then(|h| num(h, "cluster_id"))
        .map_err(|e| malformed(c, what, &e))?;
    Ok(format!("{id:x}"))
}

/// What a transaction asserts about one key (borrowed: a request is built from the
/// caller's keys and values without copying them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare<'a> {
    /// The key does not exist (its mod_revision is 0).
    Absent(&'a [u8]),
    /// The key exists and holds exactly this value.
    Value(&'a [u8], &'a [u8]),
    /// The key's mod_revision is this one.
    Mod(&'a [u8], u64),
}

impl Compare<'_> {
    pub fn key(&self) -> &[u8] {
        match self {
            Compare::Absent(k) | Compare::Value(k, _) | Compare::Mod(k, _) => k,
        }
    }

    fn json(&self) -> Value {
        match self {
            Compare::Absent(k) => {
                json!({"key": base64(k), "target": "MOD", "result": "EQUAL", "mod_revision": "0"})
            }
            Compare::Value(k, v) => {
                json!({"key": base64(k), "target": "VALUE", "result": "EQUAL", "value": base64(v)})
            }
            Compare::Mod(k, r) => {
                json!({"key": base64(k), "target": "MOD", "result": "EQUAL", "mod_revision": r.to_string()})
            }
        }
    }
}

/// A write inside a transaction (borrowed, as `Compare`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write<'a> {
    Put(&'a [u8], &'a [u8]),
    Delete(&'a [u8]),
    /// Every key in `[key, end)`.
    DeleteRange(&'a [u8], &'a [u8]),
}

impl Write<'_> {
    fn json(&self) -> Value {
        match self {
            Write::Put(k, v) => json!({"request_put": {"key": base64(k), "value": base64(v)}}),
            Write::Delete(k) => json!({"request_delete_range": {"key": base64(k)}}),
            Write::DeleteRange(k, e) => {
                json!({"request_delete_range": {"key": base64(k), "range_end": base64(e)}})
            }
        }
    }
}

/// How a transaction ended.
#[derive(Debug)]
pub enum TxnOutcome {
    /// Every compare held and the writes are done.
    Done,
    /// A compare failed: what each compared key holds now, in the order of the compares,
    /// read in the same transaction.
    Failed(Vec<Option<Kv>>),
}

/// Run `if compares then writes else read the compared keys`. The flag tells whether a
/// request was retried (so an earlier attempt may have landed).
pub fn txn(
    c: &Client,
    compares: &[Compare],
    writes: &[Write],
    what: &str,
) -> Result<(TxnOutcome, bool)> {
    let failure: Vec<Value> = compares
        .iter()
        .map(|cmp| json!({"request_range": {"key": base64(cmp.key())}}))
        .collect();
    let body = json!({
        "compare": compares.iter().map(Compare::json).collect::<Vec<_>>(),
        "success": writes.iter().map(Write::json).collect::<Vec<_>>(),
        "failure": failure,
    });
    let (answer, retried) = c.call_v3("kv/txn", &body.to_string(), Answer::Small, what)?;
    let v = answer.map_err(|e| c.v3_refusal(what, &e))?;
    if v.get("succeeded").and_then(Value::as_bool).unwrap_or(false) {
        return Ok((TxnOutcome::Done, retried));
    }
    let responses = match v.get("responses") {
        Some(Value::Array(a)) => a.as_slice(),
        _ => &[],
    };
    let mut found = Vec::with_capacity(compares.len());
    for (cmp, r) in compares.iter().zip(responses) {
        let kvs = r
            .get("response_range")
            .and_then(|rr| rr.get("kvs"))
            .and_then(Value::as_array);
        let first = match kvs.and_then(|a| a.first()) {
            Some(k) => Some(kv(k).map_err(|e| malformed(c, what, &e))?),
            None => None,
        };
        found.push(first.filter(|k| k.key == cmp.key()));
    }
    if found.len() != compares.len() {
        return Err(malformed(
            c,
            what,
            "a failed transaction did not read back every compared key",
        ));
    }
    Ok((TxnOutcome::Failed(found), retried))
}

/// One source event: a put (with the key's new value) or a delete, and the key before it
/// when the server still had it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub delete: bool,
    pub kv: Kv,
    pub prev: Option<Kv>,
}

/// One message of a watch stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// The watch is registered; the store's revision then.
    Created(u64),
    /// Events, in the order the server sent them (whole revisions).
    Events(Vec<Event>),
    /// The watch was cancelled: its start revision was compacted (`compact_revision`), or
    /// for the reason given.
    Canceled {
        compact_revision: u64,
        reason: String,
    },
    /// A message with nothing in it for the mirror (a progress notification).
    Nothing,
    /// The server ended the stream with an error (it is stopping, typically).
    Error(String),
}

/// Read one line of a watch stream.
pub fn parse_message(line: &[u8]) -> std::result::Result<Message, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(err) = v.get("error") {
        return Ok(Message::Error(err.to_string()));
    }
    let r = v.get("result").ok_or("neither result nor error")?;
    if r.get("canceled").and_then(Value::as_bool).unwrap_or(false) {
        return Ok(Message::Canceled {
            compact_revision: num(r, "compact_revision")?,
            reason: r
                .get("cancel_reason")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        });
    }
    if r.get("created").and_then(Value::as_bool).unwrap_or(false) {
        return Ok(Message::Created(revision(r)?));
    }
    let Some(Value::Array(evs)) = r.get("events") else {
        return Ok(Message::Nothing);
    };
    let mut events = Vec::with_capacity(evs.len());
    for e in evs {
        let delete = match e.get("type").and_then(Value::as_str) {
            None | Some("PUT") => false,
            Some("DELETE") => true,
            Some(other) => return Err(format!("unknown event type {other:?}")),
        };
        let kv = kv(e.get("kv").ok_or("an event without kv")?)?;
        let prev = match e.get("prev_kv") {
            Some(p) => Some(self::kv(p)?),
            None => None,
        };
        events.push(Event { delete, kv, prev });
    }
    Ok(Message::Events(events))
}

/// An open watch stream.
pub struct Stream {
    reader: std::io::BufReader<ureq::BodyReader<'static>>,
}

/// What the next read of a stream gave.
#[derive(Debug)]
pub enum Next {
    Message(Message),
    /// Not one byte arrived within the read bound.
    Quiet,
    /// The server or a proxy ended the response.
    Closed,
}

/// Open a watch on `[key, end)` from revision `start` with previous values; each read of the
/// stream waits at most `idle`. A refusal before the stream starts is returned as it is.
pub fn watch(
    c: &Client,
    key: &[u8],
    end: &[u8],
    start: u64,
    idle: Duration,
) -> Result<std::result::Result<Stream, GrpcError>> {
    let body = json!({"create_request": {
        "key": base64(key),
        "range_end": base64(end),
        "start_revision": start.to_string(),
        "prev_kv": true,
    }});
    let what = format!("watch {} from revision {start}", show(key));
    Ok(c.open_v3_watch(&body.to_string(), idle, &what)?
        .map(|reader| Stream { reader }))
}

impl Stream {
    /// A whole message is already buffered: `next` will not wait.
    pub fn ready(&self) -> bool {
        self.reader.buffer().contains(&b'\n')
    }

    /// The next message. An error is a broken stream: open it again.
    pub fn next(&mut self) -> std::result::Result<Next, String> {
        Ok(match read_line(&mut self.reader)? {
            Line::Text(line) => Next::Message(parse_message(&line)?),
            Line::Quiet => Next::Quiet,
            Line::Closed => Next::Closed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/p/"), b"/p0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn reads_watch_messages_as_etcd_3_4_sends_them() {
        let created = br#"{"result":{"header":{"cluster_id":"1","member_id":"2","revision":"21","raft_term":"2"},"created":true}}"#;
        assert_eq!(parse_message(created), Ok(Message::Created(21)));
        let put = br#"{"result":{"header":{"revision":"23"},"events":[{"kv":{"key":"L3cvYQ==","create_revision":"22","mod_revision":"23","version":"2","value":"Mg=="},"prev_kv":{"key":"L3cvYQ==","create_revision":"22","mod_revision":"22","version":"1","value":"MQ=="}},{"type":"DELETE","kv":{"key":"L3cvYg==","mod_revision":"23"}}]}}"#;
        let Ok(Message::Events(evs)) = parse_message(put) else {
            panic!("events expected")
        };
        assert_eq!(evs.len(), 2);
        assert!(!evs[0].delete);
        assert_eq!(evs[0].kv.key, b"/w/a");
        assert_eq!(evs[0].kv.value, b"2");
        assert_eq!(evs[0].prev.as_ref().unwrap().value, b"1");
        assert!(evs[1].delete);
        assert_eq!(evs[1].kv.value, b"");
        assert_eq!(evs[1].prev, None);
        let cancel = br#"{"result":{"header":{},"canceled":true,"compact_revision":"200"}}"#;
        assert_eq!(
            parse_message(cancel),
            Ok(Message::Canceled {
                compact_revision: 200,
                reason: String::new()
            })
        );
        let progress = br#"{"result":{"header":{"revision":"4"}}}"#;
        assert_eq!(parse_message(progress), Ok(Message::Nothing));
        let stop = br#"{"error":{"grpc_code":14,"http_code":503,"message":"transport is closing","http_status":"Service Unavailable"}}"#;
        assert!(matches!(parse_message(stop), Ok(Message::Error(_))));
        assert!(parse_message(b"{\"result\":{\"events\":[{\"type\":\"X\",\"kv\":{}}]}}").is_err());
        assert!(parse_message(b"garbage").is_err());
    }
}
