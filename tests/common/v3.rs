//! A small client for etcd's v3 JSON gateway (`POST /v3/...`, base64 keys and values), for
//! the tests of the v2-to-v3 and v3-to-v3 mirrors, plus `etcdctl` for the cross-checks.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{index_key, poll_until, rel_tree, tail, tree_diff, Etcd, Mirror};

use serde_json::{json, Value};

/// Standard padded base64, as the gateway wants it.
pub fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The inverse of `b64`; panics on anything else.
pub fn unb64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {s:?}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// The key just after every key that starts with `prefix` (a v3 `range_end`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A client for one etcd server's v3 gateway. Cheap to clone, usable from threads.
#[derive(Clone)]
pub struct V3 {
    pub base: String,
    agent: ureq::Agent,
}

impl V3 {
    pub fn new(base: &str) -> V3 {
        Self::with_tls(base, None)
    }

    /// A client for an https:// server: trusts only `tls.ca` and presents `tls.client_*`.
    pub fn with_tls(base: &str, tls: Option<&super::TlsFiles>) -> V3 {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)));
        if let Some(t) = tls {
            config = config.tls_config(t.ureq_config());
        }
        V3 {
            base: base.trim_end_matches('/').to_string(),
            agent: ureq::Agent::new_with_config(config.build()),
        }
    }

    /// POST `body` to `/v3/<path>`: (HTTP status, JSON answer). Retries only connection
    /// failures of reads; a write is sent once.
    pub fn call(&self, path: &str, body: &Value) -> (u16, Value) {
        let url = format!("{}/v3/{path}", self.base);
        let read_only = path == "kv/range" || path == "maintenance/status";
        let mut last = String::new();
        for _ in 0..5 {
            match self.agent.post(&url).send(body.to_string()) {
                Ok(mut r) => {
                    let status = r.status().as_u16();
                    let text = r
                        .body_mut()
                        .with_config()
                        .limit(512 * 1024 * 1024)
                        .read_to_string()
                        .unwrap_or_default();
                    return (status, serde_json::from_str(&text).unwrap_or(Value::Null));
                }
                Err(e) => {
                    last = e.to_string();
                    if !read_only {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        panic!("POST {url} failed: {last}");
    }

    /// `call`, which must answer 200.
    #[track_caller]
    pub fn ok(&self, path: &str, body: &Value) -> Value {
        let (status, v) = self.call(path, body);
        assert_eq!(status, 200, "POST /v3/{path} {body}: {v}");
        v
    }

    /// Put `value` at `key`; the new revision.
    #[track_caller]
    pub fn put(&self, key: &str, value: &str) -> u64 {
        self.put_bytes(key.as_bytes(), value.as_bytes())
    }

    #[track_caller]
    pub fn put_bytes(&self, key: &[u8], value: &[u8]) -> u64 {
        let v = self.ok("kv/put", &json!({"key": b64(key), "value": b64(value)}));
        revision(&v)
    }

    /// Put under a lease.
    #[track_caller]
    pub fn put_lease(&self, key: &str, value: &str, lease: i64) -> u64 {
        let v = self.ok(
            "kv/put",
            &json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes()), "lease": lease.to_string()}),
        );
        revision(&v)
    }

    /// Grant a lease of `ttl` seconds; its id.
    #[track_caller]
    pub fn lease(&self, ttl: u64) -> i64 {
        let v = self.ok("lease/grant", &json!({"TTL": ttl.to_string()}));
        v["ID"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("lease id")
    }

    /// Revoke a lease (its keys are deleted in one revision).
    #[track_caller]
    pub fn revoke(&self, lease: i64) {
        self.ok("lease/revoke", &json!({"ID": lease.to_string()}));
    }

    /// Delete one key; how many were deleted.
    #[track_caller]
    pub fn delete(&self, key: &str) -> u64 {
        let v = self.ok("kv/deleterange", &json!({"key": b64(key.as_bytes())}));
        v["deleted"].as_str().map_or(0, |s| s.parse().unwrap())
    }

    /// Delete every key starting with `prefix` in one revision; how many were deleted.
    #[track_caller]
    pub fn delete_prefix(&self, prefix: &str) -> u64 {
        let v = self.ok(
            "kv/deleterange",
            &json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix.as_bytes()))}),
        );
        v["deleted"].as_str().map_or(0, |s| s.parse().unwrap())
    }

    /// A transaction with no compare: `ops` are `("put", key, value)` or `("del", key, "")`;
    /// all land in one revision, which is returned.
    #[track_caller]
    pub fn txn(&self, ops: &[(&str, &str, &str)]) -> u64 {
        let success: Vec<Value> = ops
            .iter()
            .map(|(op, k, v)| match *op {
                "put" => {
                    json!({"request_put": {"key": b64(k.as_bytes()), "value": b64(v.as_bytes())}})
                }
                "del" => json!({"request_delete_range": {"key": b64(k.as_bytes())}}),
                o => panic!("unknown txn op {o}"),
            })
            .collect();
        let v = self.ok("kv/txn", &json!({"success": success}));
        assert_eq!(v["succeeded"], json!(true), "txn {ops:?}: {v}");
        revision(&v)
    }

    /// The current revision of the store.
    #[track_caller]
    pub fn revision(&self) -> u64 {
        let v = self.ok("maintenance/status", &json!({}));
        revision(&v)
    }

    /// The cluster id, as v2's X-Etcd-Cluster-Id writes it (hex).
    #[track_caller]
    pub fn cluster_id(&self) -> String {
        let v = self.ok("maintenance/status", &json!({}));
        let id: u64 = v["header"]["cluster_id"].as_str().unwrap().parse().unwrap();
        format!("{id:x}")
    }

    /// Compact the history up to `rev` (waits for it).
    #[track_caller]
    pub fn compact(&self, rev: u64) {
        self.ok(
            "kv/compaction",
            &json!({"revision": rev.to_string(), "physical": true}),
        );
    }

    /// One key's value, if present.
    #[track_caller]
    pub fn get(&self, key: &str) -> Option<String> {
        let v = self.ok("kv/range", &json!({"key": b64(key.as_bytes())}));
        v["kvs"].as_array().and_then(|kvs| kvs.first()).map(|kv| {
            String::from_utf8(unb64(kv["value"].as_str().unwrap_or(""))).expect("utf-8 value")
        })
    }

    /// One key's mod_revision, if present.
    #[track_caller]
    pub fn mod_revision(&self, key: &str) -> Option<u64> {
        let v = self.ok("kv/range", &json!({"key": b64(key.as_bytes())}));
        v["kvs"]
            .as_array()
            .and_then(|kvs| kvs.first())
            .map(|kv| kv["mod_revision"].as_str().unwrap().parse().unwrap())
    }

    /// Every key starting with `prefix`, with its value, as bytes.
    #[track_caller]
    pub fn range_bytes(&self, prefix: &[u8]) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let end = if prefix.is_empty() {
            vec![0]
        } else {
            prefix_end(prefix)
        };
        let key = if prefix.is_empty() {
            vec![0]
        } else {
            prefix.to_vec()
        };
        let v = self.ok(
            "kv/range",
            &json!({"key": b64(&key), "range_end": b64(&end)}),
        );
        v["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| {
                        (
                            unb64(kv["key"].as_str().unwrap()),
                            unb64(kv["value"].as_str().unwrap_or("")),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every key starting with `prefix`, with `prefix` removed, and its value (UTF-8).
    #[track_caller]
    pub fn rel_range(&self, prefix: &str) -> BTreeMap<String, String> {
        self.range_bytes(prefix.as_bytes())
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8(k[prefix.len()..].to_vec()).expect("utf-8 key"),
                    String::from_utf8(v).expect("utf-8 value"),
                )
            })
            .collect()
    }
}

/// The header revision of a gateway answer.
pub fn revision(v: &Value) -> u64 {
    v["header"]["revision"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no header.revision in {v}"))
}

/// The replication index stored in a v3 destination for `dst_prefix`, if any.
pub fn replication_index(dst: &V3, dst_prefix: &str) -> Option<u64> {
    dst.get(&super::index_key(dst_prefix))
        .map(|v| v.trim().parse().expect("replication index is a number"))
}

/// A v2 tree as a v3 mirror holds it: values only (directories have no key in v3), keys
/// relative to the listed prefix.
pub fn flat(tree: &BTreeMap<String, Option<String>>) -> BTreeMap<String, String> {
    tree.iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.clone(), v.clone())))
        .collect()
}

/// `etcdctl get --prefix` on a v3 server (ETCDCTL_API=3): the keys and values it prints.
/// Values must not contain newlines.
pub fn etcdctl_prefix(base: &str, prefix: &str) -> BTreeMap<String, String> {
    super::require_tool("etcdctl", "etcd-client");
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", base, "get", "--prefix", prefix])
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 from etcdctl");
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .map(|kv| (kv[0].to_string(), kv.get(1).unwrap_or(&"").to_string()))
        .collect()
}

/// The mirrored source prefix, the destination prefix, and where the source prefix lands.
pub const SRC: &str = "/app";
pub const DST: &str = "/replica";
pub const SUB: &str = "/replica/app";

/// The tests `NAME::v2_to_v3` and `NAME::v3_to_v3`, each calling `body(mode)`.
#[allow(unused_macros)]
macro_rules! both_modes {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn v2_to_v3() {
                super::$body($crate::common::v3::Mode::V2ToV3);
            }

            #[test]
            fn v3_to_v3() {
                super::$body($crate::common::v3::Mode::V3ToV3);
            }
        }
    };
}

/// Which APIs the two sides speak.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    V2ToV3,
    V3ToV3,
}

/// A source and a destination etcd, with v3 clients for both, mirrored in `mode`.
pub struct Setup {
    pub mode: Mode,
    pub src: Etcd,
    pub dst: Etcd,
    /// The source's v3 gateway (v3 to v3 only).
    pub s3: V3,
    /// The destination's v3 gateway.
    pub d3: V3,
}

impl Setup {
    pub fn start(tag: &str, mode: Mode) -> Setup {
        let tag = format!("{tag}-{mode:?}");
        let src = Etcd::start(&format!("{tag}-src"));
        let dst = Etcd::start(&format!("{tag}-dst"));
        Setup {
            mode,
            s3: V3::new(&src.url),
            d3: V3::new(&dst.url),
            src,
            dst,
        }
    }

    /// The mirror's arguments: the API flags of `mode`, `--src-prefix /app`, then `extra`.
    pub fn args<'a>(&self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut all = match self.mode {
            Mode::V2ToV3 => vec!["--dst-api", "v3"],
            Mode::V3ToV3 => vec!["--src-api", "v3", "--dst-api", "v3"],
        };
        all.extend(["--src-prefix", SRC]);
        all.extend(extra);
        all
    }

    /// Start a mirror reading the source directly and writing to `dst_url`.
    pub fn mirror(&self, extra: &[&str], dst_url: &str) -> Mirror {
        Mirror::start(&self.args(extra), &self.src.url, dst_url)
    }

    /// Run the binary (`extra` after the mode's flags) to its end: (exit code, stdout + stderr).
    #[track_caller]
    pub fn run(&self, extra: &[&str]) -> (i32, String) {
        let mut m = self.mirror(extra, &self.dst.url);
        let code = m.wait_exit(Duration::from_secs(90));
        (code, m.stdout() + &m.stderr())
    }

    /// The source's index (v2) or revision (v3): what the stored index must end at.
    pub fn src_index(&self) -> u64 {
        match self.mode {
            Mode::V2ToV3 => self.src.current_index(),
            Mode::V3ToV3 => self.s3.revision(),
        }
    }

    /// The replication index stored in the destination.
    pub fn stored(&self) -> Option<u64> {
        replication_index(&self.d3, DST)
    }

    /// Store the source's current index: a mirror started now replicates what comes next.
    pub fn set_index_now(&self) {
        self.d3.put(&index_key(DST), &self.src_index().to_string());
    }

    /// The mirrored source keys and values, relative to `/app` (a v2 directory has no key).
    pub fn src_tree(&self) -> BTreeMap<String, String> {
        match self.mode {
            Mode::V2ToV3 => flat(&rel_tree(&self.src, SRC)),
            Mode::V3ToV3 => below(&self.s3, SRC),
        }
    }

    /// The replica's keys and values, relative to `/replica/app`.
    pub fn dst_tree(&self) -> BTreeMap<String, String> {
        below(&self.d3, SUB)
    }

    /// Put `value` at the source key `key` (under `/app`) with the mode's API.
    pub fn src_put(&self, key: &str, value: &str) {
        match self.mode {
            Mode::V2ToV3 => drop(self.src.set(key, value)),
            Mode::V3ToV3 => {
                self.s3.put(key, value);
            }
        }
    }

    /// Wait (up to `bound`, the mirror alive throughout) until the stored index reaches the
    /// source's, then until the trees are equal; the stored index must then be exactly the
    /// source's.
    #[track_caller]
    pub fn synced(&self, m: &mut Mirror, bound: Duration, what: &str) {
        let target = self.src_index();
        m.wait_for(bound, &format!("index {target} stored ({what})"), || {
            self.stored().is_some_and(|i| i >= target)
        });
        if !poll_until(Duration::from_secs(10), || {
            self.src_tree() == self.dst_tree()
        }) {
            panic!(
                "after {what}: source {SRC} and replica {SUB} differ (left = source): {}\n\
                 etcdmirror stderr tail:\n{}",
                map_diff(&self.src_tree(), &self.dst_tree()),
                tail(&m.stderr(), 30)
            );
        }
        assert_eq!(
            self.stored(),
            Some(self.src_index()),
            "the stored index is not the source's ({what})"
        );
        m.assert_alive(what);
    }

    /// Every key of the destination (inside and outside the replica) with its value.
    pub fn dst_everything(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.d3.range_bytes(b"")
    }
}

/// The keys of `c` below `prefix` + "/", with `prefix` removed (so they start with "/").
pub fn below(c: &V3, prefix: &str) -> BTreeMap<String, String> {
    c.range_bytes(format!("{prefix}/").as_bytes())
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8(k[prefix.len()..].to_vec()).expect("utf-8 key"),
                String::from_utf8(v).expect("utf-8 value"),
            )
        })
        .collect()
}

/// `tree_diff` for flat trees.
pub fn map_diff(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> String {
    let opt = |m: &BTreeMap<String, String>| -> BTreeMap<String, Option<String>> {
        m.iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect()
    };
    tree_diff(&opt(a), &opt(b))
}
