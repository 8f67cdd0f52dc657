//! A lean reader for etcd's GET responses: a recursive listing of 100,000 keys parsed into
//! `serde_json::Value` costs about 1 KB per key, parsed straight into `Node`s a tenth of that.
//! Only the structure is scanned here; every string is decoded by serde_json.

use crate::etcd::Node;

/// How deeply objects and arrays may nest: about 250 key levels, far more than any real
/// tree, and few enough that the recursion stays well inside a thread's stack.
const MAX_DEPTH: usize = 512;

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    /// Objects and arrays open at `i`.
    depth: usize,
}

type Parsed<T> = Result<T, String>;

impl Scanner<'_> {
    /// Step into an object or array (the caller has consumed its opening byte).
    fn enter(&mut self) -> Parsed<()> {
        self.depth = self.depth.saturating_add(1);
        if self.depth > MAX_DEPTH {
            return Err(format!(
                "nested more than {MAX_DEPTH} deep at byte {}",
                self.i
            ));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> Parsed<()> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", c as char, self.i))
        }
    }

    /// The raw bytes of the string starting here, quotes included.
    fn raw_string(&mut self) -> Parsed<&[u8]> {
        self.ws();
        let start = self.i;
        self.expect(b'"')?;
        loop {
            match self.b.get(self.i) {
                None => return Err("unterminated string".into()),
                Some(b'\\') => self.i = self.i.saturating_add(2),
                Some(b'"') => {
                    self.i += 1;
                    return self.b.get(start..self.i).ok_or_else(|| "bad string".into());
                }
                Some(_) => self.i += 1,
            }
        }
    }

    fn string(&mut self) -> Parsed<String> {
        let raw = self.raw_string()?;
        serde_json::from_slice(raw).map_err(|e| format!("bad string: {e}"))
    }

    fn scalar(&mut self) -> Parsed<&[u8]> {
        self.ws();
        let start = self.i;
        while self
            .b
            .get(self.i)
            .is_some_and(|c| c.is_ascii_alphanumeric() || b"+-.".contains(c))
        {
            self.i += 1;
        }
        match self.b.get(start..self.i) {
            Some(raw) if !raw.is_empty() => Ok(raw),
            _ => Err(format!("unexpected byte at {start}")),
        }
    }

    /// Walk over any JSON value.
    fn skip(&mut self) -> Parsed<()> {
        match self.peek() {
            Some(b'"') => self.raw_string().map(drop),
            Some(open @ (b'{' | b'[')) => {
                self.i += 1;
                self.enter()?;
                let close = if open == b'{' { b'}' } else { b']' };
                if self.peek() == Some(close) {
                    self.i += 1;
                    self.leave();
                    return Ok(());
                }
                loop {
                    if open == b'{' {
                        self.raw_string()?;
                        self.expect(b':')?;
                    }
                    self.skip()?;
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(c) if c == close => {
                            self.i += 1;
                            self.leave();
                            return Ok(());
                        }
                        _ => return Err(format!("bad container at byte {}", self.i)),
                    }
                }
            }
            _ => self.scalar().map(drop),
        }
    }

    /// Call `field` for each member of an object.
    fn object(&mut self, mut field: impl FnMut(&mut Self, String) -> Parsed<()>) -> Parsed<()> {
        self.expect(b'{')?;
        self.enter()?;
        if self.peek() == Some(b'}') {
            self.i += 1;
            self.leave();
            return Ok(());
        }
        loop {
            let name = self.string()?;
            self.expect(b':')?;
            field(self, name)?;
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    self.leave();
                    return Ok(());
                }
                _ => return Err(format!("bad object at byte {}", self.i)),
            }
        }
    }

    fn node(&mut self) -> Parsed<Node> {
        let mut n = Node {
            key: "/".into(),
            value: None,
            modified_index: 0,
            nodes: Vec::new(),
        };
        let mut dir = false;
        self.object(|s, name| {
            match name.as_str() {
                "key" => n.key = s.string()?,
                "value" => n.value = Some(s.string()?),
                "dir" => dir = s.scalar()? == b"true",
                "modifiedIndex" => {
                    let raw = s.scalar()?;
                    n.modified_index = std::str::from_utf8(raw)
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .ok_or("bad modifiedIndex")?;
                }
                "nodes" if s.peek() == Some(b'[') => {
                    s.i += 1;
                    s.enter()?;
                    if s.peek() == Some(b']') {
                        s.i += 1;
                        s.leave();
                        return Ok(());
                    }
                    loop {
                        n.nodes.push(s.node()?);
                        match s.peek() {
                            Some(b',') => s.i += 1,
                            Some(b']') => {
                                s.i += 1;
                                s.leave();
                                return Ok(());
                            }
                            _ => return Err(format!("bad nodes array at byte {}", s.i)),
                        }
                    }
                }
                _ => s.skip()?,
            }
            Ok(())
        })?;
        if dir {
            n.value = None;
        } else if n.value.is_none() {
            n.value = Some(String::new());
        }
        Ok(n)
    }
}

/// The `node` of a GET response body.
pub fn parse_get(body: &[u8]) -> Result<Node, String> {
    let mut s = Scanner {
        b: body,
        i: 0,
        depth: 0,
    };
    let mut node = None;
    s.object(|s, name| {
        if name == "node" {
            node = Some(s.node()?);
            Ok(())
        } else {
            s.skip()
        }
    })?;
    if s.peek().is_some() {
        return Err(format!("trailing bytes at {}", s.i));
    }
    node.ok_or_else(|| "no node in the response".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_listing_like_etcd_writes_it() {
        let body = r#"{"action":"get","node":{"dir":true,"nodes":[{"key":"/a","dir":true,"nodes":[{"key":"/a/x y\u0026z","value":"\u003cv\u003e \"q\" \\ \n\u00e9 \ud83d\ude00 ü","modifiedIndex":7,"createdIndex":7},{"key":"/a/e","value":"","expiration":"2026-01-01T00:00:00Z","ttl":5,"modifiedIndex":8,"createdIndex":8}],"modifiedIndex":4,"createdIndex":4},{"key":"/b","dir":true,"modifiedIndex":9,"createdIndex":9}]}}"#;
        let n = parse_get(body.as_bytes()).unwrap();
        assert_eq!(n.key, "/");
        assert!(n.is_dir());
        let a = &n.nodes[0];
        assert_eq!(
            (a.key.as_str(), a.is_dir(), a.modified_index),
            ("/a", true, 4)
        );
        assert_eq!(a.nodes[0].key, "/a/x y&z");
        assert_eq!(a.nodes[0].value.as_deref(), Some("<v> \"q\" \\ \né 😀 ü"));
        assert_eq!(a.nodes[0].modified_index, 7);
        assert_eq!(a.nodes[1].value.as_deref(), Some(""));
        assert!(n.nodes[1].is_dir() && n.nodes[1].nodes.is_empty());
    }

    #[test]
    fn reads_a_single_key_and_empty_dirs() {
        let n = parse_get(br#"{"action":"get","node":{"key":"/k","value":"1","modifiedIndex":3,"createdIndex":3}}"#).unwrap();
        assert_eq!((n.key.as_str(), n.value.as_deref()), ("/k", Some("1")));
        let n = parse_get(
            br#" { "action" : "get" , "node" : { "key" : "/d" , "dir" : true , "nodes" : [ ] } } "#,
        )
        .unwrap();
        assert!(n.is_dir() && n.nodes.is_empty());
    }

    #[test]
    fn refuses_what_is_not_a_listing() {
        for bad in [
            &b"{not json"[..],
            b"{\"node\":{\"key\":\"/a\"",
            b"{\"action\":\"get\"}",
            b"{\"node\":{\"key\":\"/a\"}} x",
            b"{\"node\":{\"key\":\"bad \\u12\"}}",
            b"",
        ] {
            assert!(parse_get(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        let deep = |n: usize| {
            let mut b = "{\"node\":{\"dir\":true,\"nodes\":[".to_string();
            b.push_str(&"{\"dir\":true,\"nodes\":[".repeat(n));
            b.push_str(&"]}".repeat(n));
            b.push_str("]}}");
            b
        };
        // 1 + 2 per level: the deepest tree that fits in MAX_DEPTH parses.
        let n = parse_get(deep(MAX_DEPTH / 2 - 2).as_bytes()).unwrap();
        assert_eq!(n.nodes.len(), 1);
        assert!(parse_get(deep(MAX_DEPTH).as_bytes()).is_err());
        assert!(parse_get(deep(100_000).as_bytes()).is_err());
        for open in ["[", "{\"a\":"] {
            let unknown = format!("{{\"x\":{}", open.repeat(100_000));
            assert!(parse_get(unknown.as_bytes()).is_err());
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        /// The fields `parse_get` reads; unknown fields never use these names.
        const KNOWN: [&str; 5] = ["key", "value", "dir", "nodes", "modifiedIndex"];

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[\"\\\\/\u{0}-\u{1f}\u{7f}aé😀\u{2028}]{0,8}",
                Just(String::new()),
            ]
        }

        fn number() -> impl Strategy<Value = Value> {
            prop_oneof![
                any::<u64>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_filter_map("finite", |f| {
                    serde_json::Number::from_f64(f).map(Value::Number)
                }),
            ]
        }

        fn any_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                number(),
                text().prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    proptest::collection::btree_map(text(), inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn unknown_fields() -> impl Strategy<Value = Vec<(String, Value)>> {
            proptest::collection::vec(
                (
                    prop_oneof![
                        proptest::sample::select(vec![
                            "createdIndex",
                            "ttl",
                            "expiration",
                            "action",
                            "prevNode",
                            "Key",
                            "keys"
                        ])
                        .prop_map(String::from),
                        text(),
                    ]
                    .prop_filter("known field", |k| !KNOWN.contains(&k.as_str())),
                    any_json(),
                ),
                0..3,
            )
        }

        /// A node as etcd writes one, with optional fields left out and unknown ones added.
        fn node_json() -> impl Strategy<Value = Value> {
            fn common() -> impl Strategy<Value = (Option<String>, Option<u64>, Vec<(String, Value)>)>
            {
                (
                    proptest::option::of(text()),
                    proptest::option::of(any::<u64>()),
                    unknown_fields(),
                )
            }
            let leaf = (common(), proptest::option::of(text()), any::<bool>()).prop_map(
                |((key, mi, extra), value, explicit_false)| {
                    let mut o = Map::new();
                    extra.into_iter().for_each(|(k, v)| drop(o.insert(k, v)));
                    key.map(|k| o.insert("key".into(), k.into()));
                    mi.map(|m| o.insert("modifiedIndex".into(), m.into()));
                    value.map(|v| o.insert("value".into(), v.into()));
                    if explicit_false {
                        o.insert("dir".into(), false.into());
                    }
                    Value::Object(o)
                },
            );
            leaf.prop_recursive(4, 40, 5, |inner| {
                (
                    common(),
                    proptest::option::of(proptest::collection::vec(inner, 0..5)),
                )
                    .prop_map(|((key, mi, extra), nodes)| {
                        let mut o = Map::new();
                        extra.into_iter().for_each(|(k, v)| drop(o.insert(k, v)));
                        key.map(|k| o.insert("key".into(), k.into()));
                        mi.map(|m| o.insert("modifiedIndex".into(), m.into()));
                        o.insert("dir".into(), true.into());
                        nodes.map(|n| o.insert("nodes".into(), Value::Array(n)));
                        Value::Object(o)
                    })
            })
        }

        fn body_json() -> impl Strategy<Value = Value> {
            (node_json(), unknown_fields()).prop_map(|(node, extra)| {
                let mut o: Map<String, Value> = extra.into_iter().collect();
                o.insert("node".into(), node);
                Value::Object(o)
            })
        }

        /// The conversion `parse_get` must agree with, written from the protocol facts on
        /// `serde_json::Value`.
        fn reference(v: &Value) -> Node {
            let field = |name: &str| v.get(name);
            let dir = field("dir") == Some(&Value::Bool(true));
            let text = |name: &str| field(name).and_then(Value::as_str).map(str::to_string);
            Node {
                key: text("key").unwrap_or_else(|| "/".into()),
                value: (!dir).then(|| text("value").unwrap_or_default()),
                modified_index: field("modifiedIndex").and_then(Value::as_u64).unwrap_or(0),
                nodes: field("nodes")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(reference).collect())
                    .unwrap_or_default(),
            }
        }

        /// Write JSON with whitespace and member order driven by `seed`, and strings either
        /// as serde_json writes them or with every character past ASCII letters escaped as
        /// `\\uXXXX` (surrogate pairs included), as Go's encoder does for some.
        struct Writer<'a> {
            seed: &'a [u8],
            n: usize,
            out: String,
        }

        impl Writer<'_> {
            fn roll(&mut self) -> u8 {
                self.n += 1;
                self.seed
                    .get(self.n % self.seed.len().max(1))
                    .copied()
                    .unwrap_or(0)
            }

            fn ws(&mut self) {
                let pick = self.roll();
                self.out
                    .push_str([" ", "", "\n", "\t ", "", "\r\n  "][usize::from(pick % 6)]);
            }

            fn string(&mut self, s: &str) {
                if self.roll() % 2 == 0 {
                    self.out.push_str(&serde_json::to_string(s).unwrap());
                    return;
                }
                self.out.push('"');
                for c in s.chars() {
                    match c {
                        'a'..='z' | 'A'..='Z' | '0'..='9' | ' ' => self.out.push(c),
                        '/' => self.out.push_str("\\/"),
                        _ => {
                            let mut buf = [0u16; 2];
                            for unit in c.encode_utf16(&mut buf) {
                                self.out.push_str(&format!("\\u{unit:04x}"));
                            }
                        }
                    }
                }
                self.out.push('"');
            }

            fn value(&mut self, v: &Value) {
                self.ws();
                match v {
                    Value::String(s) => self.string(s),
                    Value::Array(a) => {
                        self.out.push('[');
                        for (i, x) in a.iter().enumerate() {
                            if i > 0 {
                                self.out.push(',');
                            }
                            self.value(x);
                        }
                        self.ws();
                        self.out.push(']');
                    }
                    Value::Object(o) => {
                        self.out.push('{');
                        let mut members: Vec<_> = o.iter().collect();
                        let turn = usize::from(self.roll()) % members.len().max(1);
                        members.rotate_left(turn);
                        for (i, (k, x)) in members.into_iter().enumerate() {
                            if i > 0 {
                                self.out.push(',');
                            }
                            self.ws();
                            self.string(k);
                            self.ws();
                            self.out.push(':');
                            self.value(x);
                        }
                        self.ws();
                        self.out.push('}');
                    }
                    other => self.out.push_str(&other.to_string()),
                }
                self.ws();
            }
        }

        fn write(v: &Value, seed: &[u8]) -> String {
            let mut w = Writer {
                seed,
                n: 0,
                out: String::new(),
            };
            w.value(v);
            w.out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn agrees_with_serde_json(body in body_json(), seed in proptest::collection::vec(any::<u8>(), 0..16)) {
                let text = write(&body, &seed);
                // The text is JSON to serde_json, and the reference reads the tree from it.
                let back: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
                let want = reference(&back["node"]);
                // (Unknown fields may differ in a float's last digit, known ones not at all.)
                prop_assert_eq!(&want, &reference(&body["node"]));
                prop_assert_eq!(parse_get(text.as_bytes()), Ok(want));
            }

            #[test]
            fn cut_or_damaged_bodies_never_panic(body in body_json(), seed in proptest::collection::vec(any::<u8>(), 0..16),
                                                 cut in any::<proptest::sample::Index>(), flip in any::<(proptest::sample::Index, u8)>()) {
                let text = write(&body, &seed);
                let bytes = text.trim_end().as_bytes();
                let end = cut.index(bytes.len());
                // A cut object never closes: always an error.
                prop_assert!(parse_get(&bytes[..end]).is_err(), "{}", String::from_utf8_lossy(&bytes[..end]));
                let mut damaged = bytes.to_vec();
                let at = flip.0.index(damaged.len().max(1));
                if let Some(b) = damaged.get_mut(at) {
                    *b = flip.1;
                }
                let _ = parse_get(&damaged);
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]

            #[test]
            fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                                     json_ish in "[{}\\[\\]\":,a-z0-9\\\\ ]{0,40}") {
                let _ = parse_get(&bytes);
                let _ = parse_get(json_ish.as_bytes());
                let framed = format!("{{\"node\":{json_ish}}}");
                if let Ok(n) = parse_get(framed.as_bytes()) {
                    // Whatever is accepted reads as the same tree as serde_json's reading,
                    // where serde_json reads it at all.
                    if let Ok(v) = serde_json::from_str::<Value>(&framed) {
                        prop_assert_eq!(n, reference(&v["node"]));
                    }
                }
            }
        }
    }
}
