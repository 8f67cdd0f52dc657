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
}
