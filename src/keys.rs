//! Key mapping: which source keys are mirrored, where they land, and where the index lives.

use regex_lite::Regex;

/// Where the replication index of a destination prefix is stored.
pub const REPLICATION_DIR: &str = "/__replication";

/// Why a key outside the source prefix is not mirrored (the root watch sees every key).
pub const OUTSIDE: &str = "outside the source prefix";
/// Why a key under `/__replication` is not mirrored.
pub const REPLICATION_STATE: &str = "replication state of the source";

/// What to do with a source key.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Mirror it to this destination key.
    Mirror(String),
    /// The key is the src prefix itself or one of its ancestors: the whole mirrored
    /// subtree is affected (a recursive delete or expiry of a parent).
    Subtree,
    /// Not mirrored, with the reason for the debug log.
    Skip(&'static str),
}

/// The pure mapping between source and destination keyspaces.
#[derive(Debug, Clone)]
pub struct KeyMap {
    /// Source prefix, normalised: "/" or "/a/b" without a trailing slash.
    pub src_prefix: String,
    /// Destination prefix, normalised like `src_prefix`.
    pub dst_prefix: String,
    /// Remove the source prefix before adding the destination prefix.
    pub strip: bool,
    /// Source keys that are watched but never written; compiled anchored (`^(?:RE)$`)
    /// so that it is a full match, as the old tool's `re.fullmatch`.
    pub ignore: Option<Regex>,
}

/// Trim trailing slashes and collapse repeated ones; "" and "///" become "/".
pub fn normalize_prefix(prefix: &str) -> String {
    let parts: Vec<&str> = prefix.split('/').filter(|s| !s.is_empty()).collect();
    format!("/{}", parts.join("/"))
}

/// Join two absolute paths without ever producing a double slash.
pub fn join(base: &str, rest: &str) -> String {
    let base = base.trim_end_matches('/');
    let rest = rest.trim_start_matches('/');
    match (base.is_empty(), rest.is_empty()) {
        (true, true) => "/".to_string(),
        (true, false) => format!("/{rest}"),
        (false, true) => base.to_string(),
        (false, false) => format!("{base}/{rest}"),
    }
}

/// The part of `key` below `prefix` (starting with "/", or "" for the prefix itself),
/// if `prefix` is a whole-segment prefix of `key`.
pub fn below<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix == "/" {
        return Some(if key == "/" { "" } else { key });
    }
    let rest = key.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

impl KeyMap {
    /// The destination key holding the replication index for this destination prefix.
    pub fn index_key(&self) -> String {
        if self.dst_prefix == "/" {
            format!("{REPLICATION_DIR}/__ROOT__")
        } else {
            join(REPLICATION_DIR, &self.dst_prefix)
        }
    }

    /// The destination key that mirrors the source prefix itself.
    pub fn dst_root(&self) -> String {
        if self.strip {
            self.dst_prefix.clone()
        } else {
            join(&self.dst_prefix, &self.src_prefix)
        }
    }

    /// Map a source key that is known to be at or below the source prefix.
    fn map_below(&self, rest: &str) -> String {
        join(&self.dst_root(), rest)
    }

    /// Decide what happens to an event on source key `key`.
    pub fn route(&self, key: &str) -> Route {
        let Some(rest) = below(key, &self.src_prefix) else {
            return if below(&self.src_prefix, key).is_some() {
                Route::Subtree
            } else {
                Route::Skip(OUTSIDE)
            };
        };
        if rest.is_empty() {
            return Route::Subtree;
        }
        if below(key, REPLICATION_DIR).is_some() {
            return Route::Skip(REPLICATION_STATE);
        }
        if rest.split('/').any(|seg| seg.starts_with('_')) {
            return Route::Skip("hidden key");
        }
        if self.ignore.as_ref().is_some_and(|re| re.is_match(key)) {
            return Route::Skip("matches --src-ignore-keys-regex");
        }
        Route::Mirror(self.map_below(rest))
    }

    /// For a key that is not mirrored itself (hidden or ignored), the destination key of
    /// its nearest mirrored ancestor directory: writing the key created that directory on
    /// the source, so the replica must have it too. `None` when that is the root.
    pub fn mirrored_parent(&self, key: &str) -> Option<String> {
        let mut parent = key;
        while let Some((up, _)) = parent.rsplit_once('/') {
            parent = if up.is_empty() { "/" } else { up };
            match self.route(parent) {
                Route::Mirror(dst) => return Some(dst),
                Route::Subtree => {
                    let root = self.dst_root();
                    return (root != "/").then_some(root);
                }
                Route::Skip(_) if parent == "/" => return None,
                Route::Skip(_) => {}
            }
        }
        None
    }

    /// True when, on one cluster, the mirror's writes would land in the subtree it watches.
    pub fn feeds_itself(&self) -> bool {
        let root = self.dst_root();
        below(&root, &self.src_prefix).is_some() || below(&self.src_prefix, &root).is_some()
    }

    /// The source key a destination key below `dst_root()` mirrors (used by `--reload`).
    pub fn source_of(&self, dst_key: &str) -> Option<String> {
        below(dst_key, &self.dst_root()).map(|rest| join(&self.src_prefix, rest))
    }
}

/// A key map for tests, as the command line would build it.
#[cfg(test)]
pub fn map(src: &str, dst: &str, strip: bool, ignore: Option<&str>) -> KeyMap {
    KeyMap {
        src_prefix: normalize_prefix(src),
        dst_prefix: normalize_prefix(dst),
        strip,
        ignore: ignore.map(|r| Regex::new(&format!("^(?:{r})$")).unwrap()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(k: &str) -> Route {
        Route::Mirror(k.to_string())
    }

    #[test]
    fn default_mapping_prepends_the_destination_prefix() {
        let m = map("/", "/replica", false, None);
        assert_eq!(m.route("/conftool/a"), mirror("/replica/conftool/a"));
        assert_eq!(m.index_key(), "/__replication/replica");
    }

    #[test]
    fn strip_removes_the_source_prefix() {
        let m = map("/conftool", "/x/", true, None);
        assert_eq!(m.route("/conftool/a/b"), mirror("/x/a/b"));
        assert_eq!(
            m.route("/conftool2/a"),
            Route::Skip("outside the source prefix")
        );
        assert_eq!(m.route("/conftool"), Route::Subtree);
        assert_eq!(m.route("/"), Route::Subtree);
        assert_eq!(m.index_key(), "/__replication/x");
        assert_eq!(m.source_of("/x/a/b").as_deref(), Some("/conftool/a/b"));
        assert_eq!(m.source_of("/xy/a"), None);
    }

    #[test]
    fn root_prefixes_never_give_double_slashes() {
        let m = map("/", "/", false, None);
        assert_eq!(m.route("/a"), mirror("/a"));
        assert_eq!(m.index_key(), "/__replication/__ROOT__");
        let m = map("/a", "/", true, None);
        assert_eq!(m.route("/a/b"), mirror("/b"));
        assert_eq!(m.dst_root(), "/");
        assert_eq!(m.source_of("/b").as_deref(), Some("/a/b"));
        let m = map("/a", "/", false, None);
        assert_eq!(m.route("/a/b"), mirror("/a/b"));
        let m = map("/", "/r", true, None);
        assert_eq!(m.route("/a/b"), mirror("/r/a/b"));
    }

    #[test]
    fn nested_destination_prefix_index_key() {
        assert_eq!(
            map("/", "/a/b//", false, None).index_key(),
            "/__replication/a/b"
        );
    }

    #[test]
    fn hidden_and_replication_keys_are_skipped() {
        let m = map("/", "/replica", false, None);
        assert_eq!(
            m.route("/__replication/x"),
            Route::Skip("replication state of the source")
        );
        assert_eq!(m.route("/a/_hidden/b"), Route::Skip("hidden key"));
        assert_eq!(m.route("/a/b_c"), mirror("/replica/a/b_c"));
        // A hidden segment *above* the prefix is the operator's choice, not a hidden key.
        let m = map("/_p", "/r", true, None);
        assert_eq!(m.route("/_p/a"), mirror("/r/a"));
    }

    #[test]
    fn ignore_regex_is_a_full_match_on_the_source_key() {
        let m = map("/", "/", false, Some("/spicerack/locks/etcd(/.*)?"));
        assert_eq!(
            m.route("/spicerack/locks/etcd/x"),
            Route::Skip("matches --src-ignore-keys-regex")
        );
        assert_eq!(
            m.route("/spicerack/locks/etcd"),
            Route::Skip("matches --src-ignore-keys-regex")
        );
        assert_eq!(
            m.route("/spicerack/locks/etcdx"),
            mirror("/spicerack/locks/etcdx")
        );
        assert_eq!(
            m.route("/a/spicerack/locks/etcd"),
            mirror("/a/spicerack/locks/etcd")
        );
    }

    #[test]
    fn the_nearest_mirrored_directory_above_a_skipped_key() {
        let m = map("/s", "/replica", false, Some(".*/leaf"));
        assert_eq!(
            m.mirrored_parent("/s/a/b/_lock").as_deref(),
            Some("/replica/s/a/b")
        );
        assert_eq!(
            m.mirrored_parent("/s/a/_x/_y/z").as_deref(),
            Some("/replica/s/a")
        );
        assert_eq!(m.mirrored_parent("/s/_lock").as_deref(), Some("/replica/s"));
        assert_eq!(
            m.mirrored_parent("/s/d/leaf").as_deref(),
            Some("/replica/s/d")
        );
        let m = map("/s", "/", true, None);
        assert_eq!(m.mirrored_parent("/s/_lock"), None);
        assert_eq!(m.mirrored_parent("/s/a/_lock").as_deref(), Some("/a"));
        let m = map("/", "/", false, None);
        assert_eq!(m.mirrored_parent("/_hidden"), None);
        assert_eq!(m.mirrored_parent("/a/_h").as_deref(), Some("/a"));
    }

    #[test]
    fn overlapping_subtrees_feed_themselves() {
        assert!(map("/", "/replica", false, None).feeds_itself());
        assert!(map("/a", "/", true, None).feeds_itself());
        assert!(!map("/a", "/b", false, None).feeds_itself());
        assert!(!map("/a", "/b", true, None).feeds_itself());
        assert!(map("/a", "/a/copy", true, None).feeds_itself());
    }

    #[test]
    fn normalize_and_join() {
        assert_eq!(normalize_prefix("/a//b/"), "/a/b");
        assert_eq!(normalize_prefix("/"), "/");
        assert_eq!(join("/", "/"), "/");
        assert_eq!(join("/a/", "/b"), "/a/b");
        assert_eq!(below("/a/b", "/a"), Some("/b"));
        assert_eq!(below("/ab", "/a"), None);
        assert_eq!(below("/a", "/a"), Some(""));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn segment() -> impl Strategy<Value = String> {
            prop_oneof![
                proptest::sample::select(vec![
                    "a",
                    "b",
                    "ab",
                    "_x",
                    "__replication",
                    "__ROOT__",
                    "é",
                    "x y",
                    "replica"
                ])
                .prop_map(String::from),
                "[ab_]{1,3}",
                "[^/]{1,4}",
            ]
        }

        fn segments() -> impl Strategy<Value = Vec<String>> {
            proptest::collection::vec(segment(), 0..5)
        }

        fn path(segs: &[String]) -> String {
            format!("/{}", segs.join("/"))
        }

        /// Prefixes as an operator may type them: empty segments, trailing slashes.
        fn raw_prefix() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => proptest::collection::vec(prop_oneof![segment(), Just(String::new())], 0..4)
                    .prop_map(|s| format!("/{}", s.join("/"))),
                1 => any::<String>(),
            ]
        }

        fn keymap() -> impl Strategy<Value = KeyMap> {
            let ignore = proptest::option::of(proptest::sample::select(vec![
                "/a(/.*)?",
                ".*/_?b",
                "/a/b",
                "(/[^/]*)*",
            ]));
            (raw_prefix(), raw_prefix(), any::<bool>(), ignore).prop_map(|(s, d, strip, re)| {
                KeyMap {
                    src_prefix: normalize_prefix(&s),
                    dst_prefix: normalize_prefix(&d),
                    strip,
                    ignore: re.map(|r| Regex::new(&format!("^(?:{r})$")).unwrap()),
                }
            })
        }

        fn nonempty_segments(s: &str) -> Vec<&str> {
            s.split('/').filter(|p| !p.is_empty()).collect()
        }

        fn is_clean(k: &str) -> bool {
            k.starts_with('/') && !k.contains("//") && (k == "/" || !k.ends_with('/'))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn normalized_prefixes_are_clean(raw in prop_oneof![raw_prefix(), any::<String>()]) {
                let n = normalize_prefix(&raw);
                prop_assert!(is_clean(&n), "{:?}", n);
                prop_assert_eq!(nonempty_segments(&n), nonempty_segments(&raw));
                prop_assert_eq!(normalize_prefix(&n), n);
            }

            #[test]
            fn join_adds_exactly_one_slash(a in any::<String>(), b in any::<String>()) {
                let j = join(&a, &b);
                let mut segs = nonempty_segments(&a);
                segs.extend(nonempty_segments(&b));
                prop_assert_eq!(nonempty_segments(&j), segs);
                if a.starts_with('/') || a.trim_end_matches('/').is_empty() {
                    prop_assert!(j.starts_with('/'), "{:?}", j);
                }
                if !a.contains("//") && !b.contains("//") {
                    prop_assert!(!j.contains("//"), "{:?}", j);
                }
            }

            #[test]
            fn below_is_whole_segments(key in prop_oneof![segments().prop_map(|s| path(&s)), any::<String>()],
                                       prefix in prop_oneof![raw_prefix().prop_map(|p| normalize_prefix(&p)), any::<String>()]) {
                if let Some(rest) = below(&key, &prefix) {
                    prop_assert!(rest.is_empty() || rest.starts_with('/') || prefix == "/", "{:?}", rest);
                    if prefix == "/" {
                        prop_assert!(rest == key || (key == "/" && rest.is_empty()));
                    } else {
                        prop_assert_eq!(format!("{prefix}{rest}"), key.clone());
                    }
                }
                if is_clean(&key) && is_clean(&prefix) {
                    let (k, p) = (nonempty_segments(&key), nonempty_segments(&prefix));
                    prop_assert_eq!(below(&key, &prefix).is_some(), k.starts_with(&p));
                }
            }

            #[test]
            fn below_undoes_join(p in raw_prefix(), rest in segments()) {
                let p = normalize_prefix(&p);
                let rest = if rest.is_empty() { String::new() } else { path(&rest) };
                let joined = join(&p, &rest);
                prop_assert_eq!(below(&joined, &p), Some(rest.as_str()));
            }

            /// Keys as etcd sends them (cleaned: no empty segment, no trailing slash).
            #[test]
            fn routes_of_source_keys(m in keymap(), segs in segments()) {
                let key = path(&segs);
                let route = m.route(&key);
                let (k, src) = (nonempty_segments(&key), nonempty_segments(&m.src_prefix));
                if !k.starts_with(&src) {
                    let want = if src.starts_with(&k) {
                        Route::Subtree
                    } else {
                        Route::Skip("outside the source prefix")
                    };
                    prop_assert_eq!(route, want);
                    return Ok(());
                }
                let rest = k.get(src.len()..).unwrap_or_default();
                let hidden = rest.iter().any(|s| s.starts_with('_'))
                    || below(&key, REPLICATION_DIR).is_some();
                let ignored = m.ignore.as_ref().is_some_and(|re| re.is_match(&key));
                match route {
                    Route::Subtree => prop_assert!(rest.is_empty()),
                    Route::Skip(_) => prop_assert!(!rest.is_empty() && (hidden || ignored)),
                    Route::Mirror(dst) => {
                        prop_assert!(!rest.is_empty() && !hidden && !ignored);
                        prop_assert!(is_clean(&dst), "{:?}", dst);
                        let root = m.dst_root();
                        prop_assert!(below(&dst, &root).is_some_and(|r| !r.is_empty()), "{:?} not below {:?}", dst, root);
                        prop_assert_eq!(m.source_of(&dst), Some(key.clone()));
                        // The mirror never writes over replication state, its own or another's.
                        let valid = below(&m.src_prefix, REPLICATION_DIR).is_none()
                            && below(&m.dst_prefix, REPLICATION_DIR).is_none();
                        if valid {
                            prop_assert!(below(&dst, REPLICATION_DIR).is_none(), "{:?}", dst);
                        }
                        // On one cluster, a mirror that does not feed itself never sees its writes.
                        if !m.feeds_itself() {
                            prop_assert_eq!(m.route(&dst), Route::Skip("outside the source prefix"));
                        }
                    }
                }
            }

            /// Any string, as a broken server might send: no panic, and nothing outside
            /// the prefix or hidden below it is ever mirrored.
            #[test]
            fn routes_of_any_string(m in keymap(), key in any::<String>(), hidden in segment()) {
                if let Route::Mirror(dst) = m.route(&key) {
                    prop_assert!(below(&key, &m.src_prefix).is_some());
                    prop_assert!(below(&dst, &m.dst_root()).is_some(), "{:?}", dst);
                }
                let under = join(&m.src_prefix, &key);
                if below(&under, &m.src_prefix).is_some_and(|r| !r.is_empty()) {
                    let in_hidden = join(&m.src_prefix, &format!("_{hidden}/{key}"));
                    prop_assert!(matches!(m.route(&in_hidden), Route::Skip(_)), "{:?}", in_hidden);
                }
            }

            #[test]
            fn index_keys_are_clean_and_distinct(a in raw_prefix(), b in raw_prefix()) {
                let map = |d: &str| KeyMap { src_prefix: "/".into(), dst_prefix: normalize_prefix(d), strip: false, ignore: None };
                let (ma, mb) = (map(&a), map(&b));
                let (ia, ib) = (ma.index_key(), mb.index_key());
                prop_assert!(is_clean(&ia) && ia.starts_with("/__replication/"), "{:?}", ia);
                // "/" and "/__ROOT__" share one index key, but they overlap anyway.
                let root_pair = [&ma.dst_prefix, &mb.dst_prefix].into_iter().any(|p| p == "/");
                if ma.dst_prefix != mb.dst_prefix && !root_pair {
                    prop_assert_ne!(ia, ib);
                }
            }
        }
    }
}
