//! `--check`: a read-only audit that compares the mirrored source subtree with the replica
//! key by key, tells replication lag from real differences, and reports in the convention of
//! monitoring plugins (one line, exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).
//!
//! Both trees are read as `--reload` reads them (`reload::mirrored`, `reload::owned`: the
//! same mapping, hidden keys, `/__replication` and ignore rules), the replica into a flat
//! map, the source compared against it while its listing is taken apart. Only GETs are sent.
//!
//! Why a reported difference is real, with a correct mirror running or not. The mirror
//! applies source events in index order and writes the replication index R only once every
//! event up to R is applied; so a replica read after R was read holds, for every key, the
//! source's state at some index I with R <= I <= the source's index at that moment. Each
//! read of the check goes in this order: R, then the replica, then the source (at index S).
//! A difference on a key is confirmed, and reported, only by one of two proofs:
//! - **The source key settled before R**: the source holds it with modifiedIndex m <= R (any
//!   change, a delete and re-create included, gives a key a new modifiedIndex). It held that
//!   state over [m, S], which contains I, so the replica must hold it too.
//! - **The replica key held still across a lag**: a difference seen in one read (source at
//!   S') is read again after the replica's index has reached S', and the replica key has the
//!   same modifiedIndex as before (every mirror write on it, or on a parent, changes that).
//!   The replica then held that state from before S' (its first read came before the source
//!   read at S') until after S' (its index had passed S'), which a correct mirror does only
//!   if the source held it at S' too; the source did not.
//!
//! Any other difference may be lag: it is read again once the replica's index has passed
//! the source index of the previous read, for at most `--check-wait`. What is still open
//! then is not reported as a difference (WARNING, listed in `--json` as unconfirmed). The
//! model in the tests below checks both proofs against a mirror that lags, stops and
//! catches up in any interleaving with the check's reads.
//!
//! Memory: at most what `--reload` holds (the replica's flat map plus the source listing),
//! and a second read looks only at the directories that hold open differences.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use log::debug;
use serde_json::{json, Value};

use crate::cli::{one_line, Api, Config};
use crate::dest::read_index;
use crate::error::{Error, Result};
use crate::etcd::{Client, Node};
use crate::keys::KeyMap;
use crate::reload::{mirrored, owned, Entry};

/// What `--check` was asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// `--check-wait`: how long differences may take to turn out as replication lag.
    pub wait: Duration,
    /// `--json`: one JSON document on stdout instead of the status line.
    pub json: bool,
}

/// `--check-wait` when not given.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// Open differences are read again with one GET per directory that holds them, on each side,
/// as long as they lie in at most this many directories; beyond that, the two subtrees are
/// listed again (the cost of two listings rather than of thousands of requests).
pub const DIR_LIMIT: usize = 256;

/// How often the replication index is read while waiting for it, and the pause between two
/// reads of keys that keep changing.
pub(crate) const POLL: Duration = Duration::from_millis(100);

/// Differences named in the status line; `--json` lists them all.
const NAMED: usize = 5;

/// A key's state on one side and its modifiedIndex there; `None`: no such key.
pub type Seen = Option<(Entry, u64)>;

fn entry(s: &Seen) -> Option<&Entry> {
    s.as_ref().map(|(e, _)| e)
}

/// A key as one GET or listing returned it.
fn seen(node: Option<Node>) -> Seen {
    node.map(|n| {
        let mi = n.modified_index;
        (Entry::of(n), mi)
    })
}

/// How the two sides of a key differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ValueDiffers,
    MissingOnReplica,
    ExtraOnReplica,
    /// A value on one side, a directory on the other.
    ValueVsDirectory,
}

impl Kind {
    /// How `source` and `replica` differ; `None` when they are equal (values byte for byte).
    pub fn of(source: Option<&Entry>, replica: Option<&Entry>) -> Option<Kind> {
        match (source, replica) {
            (None, None) => None,
            (Some(_), None) => Some(Kind::MissingOnReplica),
            (None, Some(_)) => Some(Kind::ExtraOnReplica),
            (Some(a), Some(b)) if a == b => None,
            (Some(Entry::Value(_)), Some(Entry::Value(_))) => Some(Kind::ValueDiffers),
            (Some(_), Some(_)) => Some(Kind::ValueVsDirectory),
        }
    }

    /// For the status line.
    pub fn words(self) -> &'static str {
        match self {
            Kind::ValueDiffers => "value differs",
            Kind::MissingOnReplica => "missing on the replica",
            Kind::ExtraOnReplica => "extra on the replica",
            Kind::ValueVsDirectory => "value vs directory",
        }
    }

    /// For `--json`.
    pub fn id(self) -> &'static str {
        match self {
            Kind::ValueDiffers => "value_differs",
            Kind::MissingOnReplica => "missing_on_replica",
            Kind::ExtraOnReplica => "extra_on_replica",
            Kind::ValueVsDirectory => "value_vs_directory",
        }
    }
}

/// A key whose two sides differed at the last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The replica key.
    pub key: String,
    /// The source key it mirrors.
    pub source_key: String,
    pub source: Seen,
    pub replica: Seen,
    /// Proven by one of the two proofs at the top of this file: it is not lag.
    pub confirmed: bool,
}

impl Difference {
    pub fn kind(&self) -> Kind {
        // A difference is only ever made of two states that differ.
        Kind::of(entry(&self.source), entry(&self.replica)).unwrap_or(Kind::ValueDiffers)
    }
}

/// The first proof: the source key has not changed since before the replica's index.
fn source_settled(source: &Seen, replica_index: u64) -> bool {
    matches!(source, Some((_, mi)) if *mi <= replica_index)
}

/// The first read. `source`: the mirrored source nodes with their replica keys; `replica`:
/// the keys the mirror owns on the replica, read after `replica_index` and before the source.
/// Returns how many keys the source holds under the prefix, and the differences in key order.
pub fn compare(
    keys: &KeyMap,
    source: impl IntoIterator<Item = (String, Node)>,
    mut replica: BTreeMap<String, (Entry, u64)>,
    replica_index: u64,
) -> (usize, Vec<Difference>) {
    let mut count: usize = 0;
    let mut out = Vec::new();
    for (key, mut node) in source {
        count = count.saturating_add(1);
        let source_key = std::mem::take(&mut node.key);
        let source = seen(Some(node));
        let replica = replica.remove(&key);
        if Kind::of(entry(&source), entry(&replica)).is_some() {
            out.push(Difference {
                key,
                source_key,
                confirmed: source_settled(&source, replica_index),
                source,
                replica,
            });
        }
    }
    // What is left is on the replica only.
    out.extend(replica.into_iter().map(|(key, state)| Difference {
        source_key: keys.source_of(&key).unwrap_or_default(),
        key,
        source: None,
        replica: Some(state),
        confirmed: false,
    }));
    out.sort_by(|a, b| a.key.cmp(&b.key));
    (count, out)
}

/// A later read of an open difference `d`, found at a read whose source index was `after`:
/// `replica_index` was read before `replica`, which was read before `source`. `None` when
/// the two sides are now equal (it was lag); else the difference, confirmed when a proof holds.
pub fn reread(
    d: Difference,
    after: u64,
    replica_index: u64,
    replica: Seen,
    source: Seen,
) -> Option<Difference> {
    Kind::of(entry(&source), entry(&replica))?;
    let held_still = replica_index >= after
        && matches!((&d.replica, &replica), (Some((_, was)), Some((_, now))) if was == now)
        && entry(&d.source) != entry(&replica);
    Some(Difference {
        confirmed: d.confirmed || held_still || source_settled(&source, replica_index),
        key: d.key,
        source_key: d.source_key,
        source,
        replica,
    })
}

/// What a check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Keys the source holds under the prefix (mirrored ones) at the first read.
    pub keys: usize,
    /// The source index of the first read.
    pub source_index: u64,
    /// The replication index read before the first read.
    pub first_replica_index: u64,
    /// The replication index at the last read.
    pub replica_index: u64,
    /// The replication index reached the first read's source index within the wait.
    pub caught_up: bool,
    /// Differences of the first read that turned out to be lag.
    pub lagging: usize,
    /// What still differs, confirmed or open, in key order.
    pub differences: Vec<Difference>,
    /// Reads of the differing keys, the first one included.
    pub reads: u32,
    pub waited: Duration,
}

impl Report {
    /// The replica claims events the source does not have.
    pub fn ahead(&self) -> bool {
        self.first_replica_index > self.source_index
    }

    fn confirmed(&self) -> impl Iterator<Item = &Difference> {
        self.differences.iter().filter(|d| d.confirmed)
    }

    fn open(&self) -> impl Iterator<Item = &Difference> {
        self.differences.iter().filter(|d| !d.confirmed)
    }
}

/// A monitoring plugin's result; the discriminant is the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Critical => "CRITICAL",
            Status::Unknown => "UNKNOWN",
        }
    }
}

/// CRITICAL for a confirmed difference or an index ahead of the source; WARNING when
/// something could not be compared within the wait (open differences, or the replica's index
/// never reached the source's); OK otherwise.
pub fn status(r: &Report) -> Status {
    if r.ahead() || r.confirmed().next().is_some() {
        Status::Critical
    } else if r.open().next().is_some() || !r.caught_up {
        Status::Warning
    } else {
        Status::Ok
    }
}

/// Names of the sides, for messages.
#[derive(Debug, Clone)]
pub struct Sides {
    pub source: String,
    pub prefix: String,
    pub replica: String,
    pub root: String,
    pub index_key: String,
}

impl Sides {
    fn of(cfg: &Config) -> Sides {
        Sides {
            source: cfg.src.base.clone(),
            prefix: cfg.keys.src_prefix.clone(),
            replica: cfg.dst.base.clone(),
            root: cfg.keys.dst_root(),
            index_key: cfg.keys.index_key(),
        }
    }
}

/// "1 key", "2 keys".
fn keys(n: usize) -> String {
    if n == 1 {
        "1 key".into()
    } else {
        format!("{n} keys")
    }
}

/// "1 key differs", "2 keys differ".
fn keys_differ(n: usize) -> String {
    format!("{} {}", keys(n), if n == 1 { "differs" } else { "differ" })
}

fn named<'a>(ds: impl Iterator<Item = &'a Difference>, n: usize) -> String {
    let mut words: Vec<String> = ds
        .take(NAMED)
        .map(|d| format!("{:?} {}", d.key, d.kind().words()))
        .collect();
    if n > NAMED {
        words.push(format!("and {} more", n.saturating_sub(NAMED)));
    }
    words.join(", ")
}

/// The status line, with performance data after `|`; always one line.
pub fn line(r: &Report, sides: &Sides, wait: Duration) -> String {
    let confirmed = r.confirmed().count();
    let open = r.open().count();
    let lag = r.source_index.saturating_sub(r.replica_index);
    let what = format!(
        "{}{} (replication index {}) against {}{} (index {})",
        sides.replica, sides.root, r.replica_index, sides.source, sides.prefix, r.source_index
    );
    let wait = wait.as_secs_f64();
    let text = if r.ahead() {
        format!(
            "the replication index {} at {} on {} is ahead of the source {}, whose index is {} \
             (the source was rebuilt or restored, or is another cluster); {}",
            r.first_replica_index,
            sides.index_key,
            sides.replica,
            sides.source,
            r.source_index,
            keys_differ(r.differences.len())
        )
    } else if confirmed > 0 {
        format!(
            "{}: {}; {what}",
            keys_differ(confirmed),
            named(r.confirmed(), confirmed)
        )
    } else if open > 0 {
        format!(
            "{} but could not be told from replication lag within {wait} s (the replica's \
             index did not pass the source's, or the keys kept changing): {}; {what}",
            keys_differ(open),
            named(r.open(), open)
        )
    } else if !r.caught_up {
        format!(
            "no difference in {}, but the replication index {} did not reach the source index \
             {} within {wait} s: replication is stopped or slow; {what}",
            keys(r.keys),
            r.replica_index,
            r.source_index
        )
    } else {
        let caught = if r.lagging > 0 {
            format!(" ({} caught up during the check)", keys(r.lagging))
        } else {
            String::new()
        };
        format!(
            "{} {}{caught}; {what}",
            keys(r.keys),
            if r.keys == 1 { "is equal" } else { "equal" }
        )
    };
    one_line(format!(
        "{}: {text} | keys={} differences={confirmed} unconfirmed={open} lag={lag}",
        status(r).word(),
        r.keys
    ))
}

fn state_json(s: &Seen) -> Value {
    match s {
        None => Value::Null,
        Some((Entry::Dir, mi)) => json!({"dir": true, "modifiedIndex": mi}),
        Some((Entry::Value(v), mi)) => json!({"value": v, "modifiedIndex": mi}),
    }
}

fn difference_json(d: &Difference) -> Value {
    json!({
        "key": d.key,
        "source_key": d.source_key,
        "kind": d.kind().id(),
        "confirmed": d.confirmed,
        "source": state_json(&d.source),
        "replica": state_json(&d.replica),
    })
}

/// Write the `--json` document of a finished check: one object, whose differences are
/// written one per line as they are turned into JSON, so that a report of 100,000 of them is
/// never held a second time as a JSON tree.
pub fn write_document(
    r: &Report,
    sides: &Sides,
    wait: Duration,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let status = status(r);
    let fields = [
        ("status", json!(status.word())),
        ("code", json!(status as u8)),
        ("message", json!(line(r, sides, wait))),
        (
            "source",
            json!({"url": sides.source, "prefix": sides.prefix, "index": r.source_index}),
        ),
        (
            "replica",
            json!({
                "url": sides.replica,
                "root": sides.root,
                "index_key": sides.index_key,
                "index_at_start": r.first_replica_index,
                "index": r.replica_index,
            }),
        ),
        ("keys", json!(r.keys)),
        ("caught_up", json!(r.caught_up)),
        ("lagging", json!(r.lagging)),
        ("reads", json!(r.reads)),
        ("waited_seconds", json!(r.waited.as_secs_f64())),
    ];
    out.write_all(b"{\n")?;
    for (name, value) in fields {
        writeln!(out, "  {}: {value},", json!(name))?;
    }
    out.write_all(b"  \"differences\": [")?;
    for (i, d) in r.differences.iter().enumerate() {
        out.write_all(if i == 0 { b"\n    " } else { b",\n    " })?;
        serde_json::to_writer(&mut *out, &difference_json(d))?;
    }
    if !r.differences.is_empty() {
        out.write_all(b"\n  ")?;
    }
    out.write_all(b"]\n}\n")?;
    out.flush()
}

/// What a check that could not compare prints.
fn unknown(e: &Error, json: bool) -> ExitCode {
    let line = one_line(format!("UNKNOWN: {e}"));
    let doc = json!({
        "status": "UNKNOWN",
        "code": Status::Unknown as u8,
        "message": line,
        "differences": [],
    });
    print_result(if json { pretty(&doc) } else { line }, Status::Unknown)
}

/// A command line that asks for `--check` but is not valid.
pub fn refused(e: &Error, json: bool) -> ExitCode {
    unknown(e, json)
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v)
        .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
}

fn print_result(text: String, status: Status) -> ExitCode {
    // A closed stdout must not turn a result into a panic; the exit code still tells.
    let _ = writeln!(std::io::stdout().lock(), "{text}");
    ExitCode::from(status as u8)
}

/// Run the check, print its result, and give its exit code.
pub fn run(cfg: &Config, opts: Options) -> ExitCode {
    let sides = Sides::of(cfg);
    let report = match cfg.dst_api {
        Api::V2 => audit(cfg, opts),
        Api::V3 => crate::check3::audit(cfg, opts),
    };
    match report {
        Ok(r) if opts.json => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            // A closed stdout must not turn a result into a panic; the exit code still tells.
            let _ = write_document(&r, &sides, opts.wait, &mut out);
            ExitCode::from(status(&r) as u8)
        }
        Ok(r) => print_result(line(&r, &sides, opts.wait), status(&r)),
        Err(e) => unknown(&e, opts.json),
    }
}

/// The replication index, which the check cannot do without.
fn replica_index(dst: &Client, key: &str) -> Result<u64> {
    match read_index(dst, key)? {
        Some((index, _)) => Ok(index),
        None => Err(Error::Usage(format!(
            "no replication index at {key} on {}: the replica was never loaded, or a --reload \
             is under way",
            dst.name()
        ))),
    }
}

/// Read the replication index until it reaches `target` or `deadline` passes (at least once).
fn wait_for(dst: &Client, key: &str, target: u64, deadline: Instant) -> Result<u64> {
    loop {
        let r = replica_index(dst, key)?;
        let now = Instant::now();
        if r >= target || now >= deadline {
            return Ok(r);
        }
        std::thread::sleep(POLL.min(deadline.saturating_duration_since(now)));
    }
}

/// Both sides of each open difference now (replica first), and the highest source index of
/// the reads.
type Reread = (BTreeMap<String, (Seen, Seen)>, u64);

/// The directory holding `key` ("/" for a top-level key).
fn parent(key: &str) -> &str {
    match key.rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((dir, _)) => dir,
    }
}

/// The open differences grouped by the directories that hold them on each side: for each
/// replica directory, its open keys; for each source directory, the open keys' (source key,
/// replica key).
type Dirs<'a> = (
    BTreeMap<&'a str, Vec<&'a str>>,
    BTreeMap<&'a str, Vec<(&'a str, &'a str)>>,
);

fn parents(open: &[(String, String)]) -> Dirs<'_> {
    let (mut replica, mut source): Dirs = (BTreeMap::new(), BTreeMap::new());
    for (key, source_key) in open {
        replica.entry(parent(key)).or_default().push(key.as_str());
        source
            .entry(parent(source_key))
            .or_default()
            .push((source_key.as_str(), key.as_str()));
    }
    (replica, source)
}

/// The children of a directory as a non-recursive GET returns them, by key.
fn children(node: Option<Node>) -> BTreeMap<String, Node> {
    node.filter(Node::is_dir)
        .map(|dir| dir.nodes.into_iter().map(|n| (n.key.clone(), n)).collect())
        .unwrap_or_default()
}

/// One GET of each directory that holds an open key (a directory's children come with their
/// states and modifiedIndex), all on the replica, then all on the source.
fn read_dirs(src: &Client, dst: &Client, dirs: &Dirs) -> Result<Reread> {
    let mut out = BTreeMap::new();
    for (dir, keys) in &dirs.0 {
        let mut found = children(dst.get(dir, false)?.node);
        for key in keys {
            out.insert(key.to_string(), (seen(found.remove(*key)), None));
        }
    }
    let mut index = 0;
    for (dir, keys) in &dirs.1 {
        let got = src.get(dir, false)?;
        index = index.max(got.index);
        let mut found = children(got.node);
        for (source_key, key) in keys {
            if let Some(slot) = out.get_mut(*key) {
                slot.1 = seen(found.remove(*source_key));
            }
        }
    }
    Ok((out, index))
}

/// Both subtrees listed again, keeping only the open keys.
fn read_listings(
    keys: &KeyMap,
    src: &Client,
    dst: &Client,
    open: &[(String, String)],
) -> Result<Reread> {
    let mut out: BTreeMap<String, (Seen, Seen)> = open
        .iter()
        .map(|(key, _)| (key.clone(), (None, None)))
        .collect();
    for (key, state) in owned(keys, dst.get(&keys.dst_root(), true)?.node) {
        if let Some(slot) = out.get_mut(&key) {
            slot.0 = Some(state);
        }
    }
    let got = src.get(&keys.src_prefix, true)?;
    for (key, node) in mirrored(keys, got.node) {
        if let Some(slot) = out.get_mut(&key) {
            slot.1 = seen(Some(node));
        }
    }
    Ok((out, got.index))
}

/// The reads and waits; see the top of this file.
fn audit(cfg: &Config, opts: Options) -> Result<Report> {
    let started = Instant::now();
    // A side that does not answer is UNKNOWN within the wait, whatever the mirror's budget.
    let budget = opts.wait.min(cfg.retry_timeout);
    let (src, dst) = crate::startup::clients(cfg, budget, budget)?;
    let keys = &cfg.keys;
    let index_key = keys.index_key();

    let first_replica_index = replica_index(&dst, &index_key)?;
    let have: BTreeMap<String, (Entry, u64)> =
        owned(keys, dst.get(&keys.dst_root(), true)?.node).collect();
    let listing = src.get(&keys.src_prefix, true)?;
    let source_index = listing.index;
    let (count, mut differences) = compare(
        keys,
        mirrored(keys, listing.node),
        have,
        first_replica_index,
    );
    let first = differences.len();
    debug!(
        "first read: {first} of {count} keys differ ({} confirmed); replication index \
         {first_replica_index}, source index {source_index}",
        differences.iter().filter(|d| d.confirmed).count()
    );
    let mut report = Report {
        keys: count,
        source_index,
        first_replica_index,
        replica_index: first_replica_index,
        reads: 1,
        ..Report::default()
    };
    let deadline = started.checked_add(opts.wait).unwrap_or(started);
    let mut after = source_index;
    while !report.ahead() {
        let r = wait_for(&dst, &index_key, after, deadline)?;
        report.replica_index = r;
        report.caught_up |= r >= source_index;
        let open: Vec<(String, String)> = differences
            .iter()
            .filter(|d| !d.confirmed)
            .map(|d| (d.key.clone(), d.source_key.clone()))
            .collect();
        // However long the first read took, the differences get one more read once the
        // replica has passed it.
        let late = report.reads > 1 && Instant::now() >= deadline;
        if r < after || open.is_empty() || late {
            break;
        }
        let dirs = parents(&open);
        let by_dir = dirs.0.len().max(dirs.1.len()) <= DIR_LIMIT;
        let (mut now, index) = if by_dir {
            read_dirs(&src, &dst, &dirs)?
        } else {
            read_listings(keys, &src, &dst, &open)?
        };
        differences = differences
            .into_iter()
            .filter_map(|d| match now.remove(&d.key) {
                Some((replica, source)) if !d.confirmed => reread(d, after, r, replica, source),
                _ => Some(d),
            })
            .collect();
        report.reads = report.reads.saturating_add(1);
        debug!(
            "read {} ({}): {} keys still differ ({} confirmed); replication index {r}, source \
             index {index}",
            report.reads,
            if by_dir {
                format!("{} directories", dirs.0.len().saturating_add(dirs.1.len()))
            } else {
                "two listings".to_string()
            },
            differences.len(),
            differences.iter().filter(|d| d.confirmed).count()
        );
        after = index.max(after);
        if differences.iter().any(|d| !d.confirmed) {
            std::thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
        }
    }
    report.lagging = first.saturating_sub(differences.len());
    report.differences = differences;
    report.waited = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Entry {
        Entry::Value(s.into())
    }

    fn keymap() -> KeyMap {
        KeyMap {
            src_prefix: "/app".into(),
            dst_prefix: "/replica".into(),
            strip: false,
            ignore: None,
        }
    }

    fn node(key: &str, e: &Entry, mi: u64) -> Node {
        Node {
            key: key.into(),
            value: match e {
                Entry::Dir => None,
                Entry::Value(v) => Some(v.clone()),
            },
            modified_index: mi,
            nodes: Vec::new(),
        }
    }

    fn diff(key: &str, source: Seen, replica: Seen, confirmed: bool) -> Difference {
        Difference {
            key: format!("/replica/app{key}"),
            source_key: format!("/app{key}"),
            source,
            replica,
            confirmed,
        }
    }

    #[test]
    fn kinds_of_difference() {
        let (d, a, b) = (Entry::Dir, v("a"), v("b"));
        assert_eq!(Kind::of(None, None), None);
        assert_eq!(Kind::of(Some(&a), Some(&a)), None);
        assert_eq!(Kind::of(Some(&d), Some(&d)), None);
        assert_eq!(Kind::of(Some(&a), Some(&b)), Some(Kind::ValueDiffers));
        // Byte for byte: a trailing newline or an empty value is a difference.
        assert_eq!(
            Kind::of(Some(&v("x")), Some(&v("x\n"))),
            Some(Kind::ValueDiffers)
        );
        assert_eq!(
            Kind::of(Some(&v("")), Some(&v(" "))),
            Some(Kind::ValueDiffers)
        );
        assert_eq!(Kind::of(Some(&a), None), Some(Kind::MissingOnReplica));
        assert_eq!(Kind::of(None, Some(&d)), Some(Kind::ExtraOnReplica));
        assert_eq!(Kind::of(Some(&a), Some(&d)), Some(Kind::ValueVsDirectory));
        assert_eq!(Kind::of(Some(&d), Some(&a)), Some(Kind::ValueVsDirectory));
    }

    #[test]
    fn the_first_read_finds_each_kind_and_confirms_what_settled_before_the_index() {
        let source = vec![
            ("/replica/app/same", node("/app/same", &v("1"), 3)),
            ("/replica/app/old", node("/app/old", &v("new"), 5)),
            ("/replica/app/fresh", node("/app/fresh", &v("new"), 21)),
            ("/replica/app/missing", node("/app/missing", &v("m"), 6)),
            ("/replica/app/d", node("/app/d", &Entry::Dir, 7)),
        ]
        .into_iter()
        .map(|(k, n)| (k.to_string(), n));
        let replica: BTreeMap<String, (Entry, u64)> = [
            ("/replica/app/same", (v("1"), 100)),
            ("/replica/app/old", (v("old"), 101)),
            ("/replica/app/fresh", (v("old"), 102)),
            ("/replica/app/d", (v("x"), 103)),
            ("/replica/app/extra", (v("e"), 104)),
        ]
        .into_iter()
        .map(|(k, s)| (k.to_string(), s))
        .collect();
        let (count, found) = compare(&keymap(), source, replica, 20);
        assert_eq!(count, 5);
        assert_eq!(
            found,
            vec![
                diff("/d", Some((Entry::Dir, 7)), Some((v("x"), 103)), true),
                diff("/extra", None, Some((v("e"), 104)), false),
                // Written on the source after the replication index: may be lag.
                diff("/fresh", Some((v("new"), 21)), Some((v("old"), 102)), false),
                diff("/missing", Some((v("m"), 6)), None, true),
                diff("/old", Some((v("new"), 5)), Some((v("old"), 101)), true),
            ]
        );
        let kinds: Vec<Kind> = found.iter().map(Difference::kind).collect();
        assert_eq!(
            kinds,
            [
                Kind::ValueVsDirectory,
                Kind::ExtraOnReplica,
                Kind::ValueDiffers,
                Kind::MissingOnReplica,
                Kind::ValueDiffers
            ]
        );
    }

    #[test]
    fn a_later_read_resolves_lag_or_confirms_with_either_proof() {
        let lagging = diff("/k", Some((v("new"), 30)), Some((v("old"), 9)), false);
        // The replica caught up.
        assert_eq!(
            reread(
                lagging.clone(),
                30,
                31,
                Some((v("new"), 12)),
                Some((v("new"), 30))
            ),
            None
        );
        // The replica moved, the source too: still open.
        let moved = reread(
            lagging.clone(),
            30,
            31,
            Some((v("newer"), 12)),
            Some((v("newest"), 33)),
        )
        .unwrap();
        assert!(!moved.confirmed);
        assert_eq!(moved.source, Some((v("newest"), 33)));
        // The source settled before the index read before the replica: confirmed.
        let settled = reread(
            lagging.clone(),
            30,
            31,
            Some((v("newer"), 12)),
            Some((v("new"), 30)),
        )
        .unwrap();
        assert!(settled.confirmed);
        // The replica key held still while the index passed the last source read.
        let extra = diff("/k", None, Some((v("e"), 9)), false);
        let held = reread(extra.clone(), 30, 30, Some((v("e"), 9)), None).unwrap();
        assert!(held.confirmed);
        // ... but not when the index had not passed it, or the key was rewritten.
        assert!(
            !reread(extra.clone(), 30, 29, Some((v("e"), 9)), None)
                .unwrap()
                .confirmed
        );
        assert!(
            !reread(extra.clone(), 30, 30, Some((v("e"), 10)), None)
                .unwrap()
                .confirmed
        );
        // A key absent from the replica proves nothing by staying absent.
        let missing = diff("/k", Some((v("m"), 40)), None, false);
        assert!(
            !reread(missing, 40, 40, None, Some((v("m"), 41)))
                .unwrap()
                .confirmed
        );
        // Once confirmed, always confirmed.
        let done = diff("/k", Some((v("a"), 1)), Some((v("b"), 2)), true);
        assert!(
            reread(done, 0, 0, Some((v("c"), 3)), Some((v("d"), 4)))
                .unwrap()
                .confirmed
        );
    }

    #[test]
    fn open_keys_are_read_again_by_directory() {
        assert_eq!(parent("/a/b/c"), "/a/b");
        assert_eq!(parent("/a"), "/");
        assert_eq!(parent("/"), "/");
        let open: Vec<(String, String)> = [
            ("/r/x/1", "/x/1"),
            ("/r/x/2", "/x/2"),
            ("/r/y", "/y"),
            ("/top", "/s/top"),
        ]
        .iter()
        .map(|(k, s)| (k.to_string(), s.to_string()))
        .collect();
        let (replica, source) = parents(&open);
        let replica: Vec<(&str, Vec<&str>)> = replica.into_iter().collect();
        assert_eq!(
            replica,
            [
                ("/", vec!["/top"]),
                ("/r", vec!["/r/y"]),
                ("/r/x", vec!["/r/x/1", "/r/x/2"])
            ]
        );
        let source: Vec<(&str, Vec<(&str, &str)>)> = source.into_iter().collect();
        assert_eq!(
            source,
            [
                ("/", vec![("/y", "/r/y")]),
                ("/s", vec![("/s/top", "/top")]),
                ("/x", vec![("/x/1", "/r/x/1"), ("/x/2", "/r/x/2")])
            ]
        );
        // A directory's children by key; a value or no key has none.
        let mut dir = node("/x", &Entry::Dir, 1);
        dir.nodes = vec![node("/x/1", &v("a"), 2), node("/x/d", &Entry::Dir, 3)];
        let found = children(Some(dir));
        assert_eq!(found.keys().collect::<Vec<_>>(), ["/x/1", "/x/d"]);
        assert_eq!(seen(found.get("/x/d").cloned()), Some((Entry::Dir, 3)));
        assert!(children(Some(node("/x", &v("a"), 1))).is_empty());
        assert!(children(None).is_empty());
    }

    fn report(differences: Vec<Difference>, caught_up: bool) -> Report {
        Report {
            keys: 10,
            source_index: 50,
            first_replica_index: 40,
            replica_index: if caught_up { 55 } else { 45 },
            caught_up,
            differences,
            reads: 2,
            ..Report::default()
        }
    }

    fn document(r: &Report, sides: &Sides, wait: Duration) -> Value {
        let mut out = Vec::new();
        write_document(r, sides, wait, &mut out).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn sides() -> Sides {
        Sides {
            source: "http://src:2379".into(),
            prefix: "/app".into(),
            replica: "http://dst:2379".into(),
            root: "/replica/app".into(),
            index_key: "/__replication/replica".into(),
        }
    }

    #[test]
    fn what_each_outcome_reports() {
        let wait = Duration::from_secs(10);
        let real = diff("/a", Some((v("1"), 5)), None, true);
        let open = diff("/b", Some((v("2"), 49)), None, false);
        let cases = [
            (report(vec![], true), Status::Ok, "OK: 10 keys equal;"),
            (
                report(vec![], false),
                Status::Warning,
                "WARNING: no difference in 10 keys, but the replication index 45 did not reach",
            ),
            (
                report(vec![open.clone()], true),
                Status::Warning,
                "WARNING: 1 key differs but could not be told from replication lag",
            ),
            (
                report(vec![real.clone(), open], false),
                Status::Critical,
                "CRITICAL: 1 key differs: \"/replica/app/a\" missing on the replica;",
            ),
        ];
        for (r, want, start) in cases {
            assert_eq!(status(&r), want);
            let l = line(&r, &sides(), wait);
            assert!(l.starts_with(start), "{l}");
            assert!(l.contains("| keys=10 differences="), "{l}");
            assert!(!l.contains('\n'));
            let doc = document(&r, &sides(), wait);
            assert_eq!(doc["code"], want as u8);
            assert_eq!(doc["status"], want.word());
            assert_eq!(doc["message"], l);
            assert_eq!(
                doc["differences"].as_array().map(Vec::len),
                Some(r.differences.len())
            );
        }
        let mut ahead = report(vec![], true);
        ahead.first_replica_index = 60;
        assert_eq!(status(&ahead), Status::Critical);
        assert!(line(&ahead, &sides(), wait).contains("is ahead of the source"));
        let mut lag = report(vec![], true);
        lag.lagging = 3;
        assert!(line(&lag, &sides(), wait).contains("(3 keys caught up during the check)"));
    }

    #[test]
    fn the_line_stays_one_line_and_names_a_few_keys() {
        let many: Vec<Difference> = (0..8)
            .map(|i| diff(&format!("/k{i}\n\u{1b}[2J"), Some((v("x"), 1)), None, true))
            .collect();
        let l = line(&report(many, true), &sides(), Duration::from_secs(1));
        assert!(!l.contains(char::is_control), "{l:?}");
        assert!(
            l.contains("8 keys differ") && l.contains("and 3 more"),
            "{l}"
        );
        assert!(l.contains("differences=8 unconfirmed=0"), "{l}");
    }

    #[test]
    fn json_shows_both_states_of_every_difference() {
        let r = report(
            vec![
                diff("/a", Some((Entry::Dir, 5)), Some((v("x\"y"), 9)), true),
                diff("/b", None, Some((v(""), 10)), false),
            ],
            true,
        );
        let mut text = Vec::new();
        write_document(&r, &sides(), Duration::from_secs(1), &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        // One difference a line, each as serde_json writes it.
        for d in &r.differences {
            let one = serde_json::to_string(&difference_json(d)).unwrap();
            assert!(
                text.lines()
                    .any(|l| l.trim_start().trim_end_matches(',') == one),
                "{text}"
            );
        }
        let doc: Value = serde_json::from_str(&text).unwrap();
        let d = &doc["differences"];
        assert_eq!(d[0]["key"], "/replica/app/a");
        assert_eq!(d[0]["source_key"], "/app/a");
        assert_eq!(d[0]["kind"], "value_vs_directory");
        assert_eq!(d[0]["source"], json!({"dir": true, "modifiedIndex": 5}));
        assert_eq!(
            d[0]["replica"],
            json!({"value": "x\"y", "modifiedIndex": 9})
        );
        assert_eq!(d[1]["source"], Value::Null);
        assert_eq!(d[1]["confirmed"], false);
        assert_eq!(doc["replica"]["index_key"], "/__replication/replica");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn state() -> impl Strategy<Value = Entry> {
            prop_oneof![
                1 => Just(Entry::Dir),
                3 => proptest::sample::select(vec!["", "1", "2", "1 "]).prop_map(v),
            ]
        }

        fn name() -> impl Strategy<Value = String> {
            proptest::sample::select(vec!["a", "b", "c", "a/b", "d/e/f"]).prop_map(String::from)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// The first read reports exactly the keys whose states differ, each once and in
            /// key order, and confirms exactly those whose source key settled before the index.
            #[test]
            fn the_first_read_finds_exactly_the_differing_keys(
                source in proptest::collection::btree_map(name(), (state(), 1..100u64), 0..6),
                replica in proptest::collection::btree_map(name(), (state(), 1..100u64), 0..6),
                index in 0..100u64,
            ) {
                let km = keymap();
                let nodes = source.iter().map(|(k, (e, mi))| {
                    (format!("/replica/app/{k}"), node(&format!("/app/{k}"), e, *mi))
                });
                let have = replica.iter().map(|(k, s)| (format!("/replica/app/{k}"), s.clone())).collect();
                let (count, found) = compare(&km, nodes, have, index);
                prop_assert_eq!(count, source.len());
                let mut want = Vec::new();
                let names: std::collections::BTreeSet<&String> = source.keys().chain(replica.keys()).collect();
                for k in names {
                    let (s, r) = (source.get(k).cloned(), replica.get(k).cloned());
                    if Kind::of(entry(&s), entry(&r)).is_some() {
                        let confirmed = source_settled(&s, index);
                        want.push(Difference {
                            key: format!("/replica/app/{k}"),
                            source_key: format!("/app/{k}"),
                            source: s,
                            replica: r,
                            confirmed,
                        });
                    }
                }
                want.sort_by(|a, b| a.key.cmp(&b.key));
                prop_assert_eq!(found, want);
            }
        }

        /// A model of a source, a mirror that applies its events in order and records its
        /// index when it likes, and the check's reads interleaved with both.
        mod model {
            use super::*;

            const KEYS: usize = 3;
            const BASE: u64 = 10;

            #[derive(Debug, Clone)]
            pub enum Step {
                /// A source write on key k (`None`: delete).
                Write(usize, Option<Entry>),
                /// A source write outside the mirrored keys.
                Noise,
                /// The mirror applies the next event.
                Apply,
                /// The mirror records its index.
                Record,
            }

            fn step() -> impl Strategy<Value = Step> {
                prop_oneof![
                    3 => (0..KEYS, proptest::option::of(state())).prop_map(|(k, e)| Step::Write(k, e)),
                    1 => Just(Step::Noise),
                    4 => Just(Step::Apply),
                    2 => Just(Step::Record),
                ]
            }

            struct World {
                events: Vec<Option<(usize, Option<Entry>)>>,
                source: BTreeMap<usize, (Entry, u64)>,
                replica: BTreeMap<usize, (Entry, u64)>,
                dst_index: u64,
                applied: u64,
                recorded: u64,
                stopped: bool,
                /// A key the source never writes.
                frozen: Option<usize>,
                script: Vec<Step>,
                gaps: Vec<usize>,
                at: usize,
            }

            impl World {
                fn head(&self) -> u64 {
                    BASE + self.events.len() as u64
                }

                fn act(&mut self, s: Step) {
                    match s {
                        Step::Write(k, _) if Some(k) == self.frozen => {}
                        Step::Write(k, None) if !self.source.contains_key(&k) => {}
                        Step::Write(k, e) => {
                            self.events.push(Some((k, e.clone())));
                            let h = self.head();
                            match e {
                                Some(e) => drop(self.source.insert(k, (e, h))),
                                None => drop(self.source.remove(&k)),
                            }
                        }
                        Step::Noise => self.events.push(None),
                        Step::Apply if !self.stopped && self.applied < self.head() => {
                            let ev = self.events[(self.applied - BASE) as usize].clone();
                            self.applied += 1;
                            if let Some((k, e)) = ev {
                                self.dst_index += 1;
                                match e {
                                    Some(e) => drop(self.replica.insert(k, (e, self.dst_index))),
                                    None => drop(self.replica.remove(&k)),
                                }
                            }
                        }
                        Step::Record if !self.stopped => self.recorded = self.applied,
                        Step::Apply | Step::Record => {}
                    }
                }

                /// What happens between two reads of the check.
                fn meanwhile(&mut self) {
                    let n = self
                        .gaps
                        .get(self.at % self.gaps.len().max(1))
                        .copied()
                        .unwrap_or(0);
                    self.at += 1;
                    for _ in 0..n {
                        if self.script.is_empty() {
                            return;
                        }
                        let s = self.script.remove(0);
                        self.act(s);
                    }
                }

                /// The mirror runs until its recorded index reaches `target`, unless stopped.
                fn wait(&mut self, target: u64) -> u64 {
                    self.meanwhile();
                    while !self.stopped && self.recorded < target {
                        self.act(Step::Apply);
                        self.act(Step::Record);
                    }
                    self.recorded
                }
            }

            fn src_key(k: usize) -> String {
                format!("/app/k{k}")
            }

            fn dst_key(k: usize) -> String {
                format!("/replica/app/k{k}")
            }

            fn index_of(key: &str) -> usize {
                key.rsplit('k').next().and_then(|n| n.parse().ok()).unwrap()
            }

            /// The check's reads in `audit`'s order, on the model; every difference of every read.
            fn check(w: &mut World) -> Vec<Vec<Difference>> {
                let mut rounds = Vec::new();
                let r0 = w.recorded;
                w.meanwhile();
                let have = w
                    .replica
                    .iter()
                    .map(|(k, s)| (dst_key(*k), s.clone()))
                    .collect();
                w.meanwhile();
                let s1 = w.head();
                let nodes: Vec<(String, Node)> = w
                    .source
                    .iter()
                    .map(|(k, (e, mi))| (dst_key(*k), node(&src_key(*k), e, *mi)))
                    .collect();
                let (_, mut ds) = compare(&keymap(), nodes, have, r0);
                rounds.push(ds.clone());
                let mut after = s1;
                for _ in 0..5 {
                    let r = w.wait(after);
                    if r < after || ds.iter().all(|d| d.confirmed) {
                        break;
                    }
                    let mut now: BTreeMap<String, (Seen, Seen)> = BTreeMap::new();
                    for d in ds.iter().filter(|d| !d.confirmed) {
                        w.meanwhile();
                        now.insert(
                            d.key.clone(),
                            (w.replica.get(&index_of(&d.key)).cloned(), None),
                        );
                    }
                    let mut index = 0;
                    for d in ds.iter().filter(|d| !d.confirmed) {
                        w.meanwhile();
                        index = index.max(w.head());
                        if let Some(slot) = now.get_mut(&d.key) {
                            slot.1 = w.source.get(&index_of(&d.key)).cloned();
                        }
                    }
                    ds = ds
                        .into_iter()
                        .filter_map(|d| match now.remove(&d.key) {
                            Some((replica, source)) if !d.confirmed => {
                                reread(d, after, r, replica, source)
                            }
                            _ => Some(d),
                        })
                        .collect();
                    rounds.push(ds.clone());
                    after = after.max(index);
                }
                rounds
            }

            fn world(
                start: Vec<Option<Entry>>,
                script: Vec<Step>,
                gaps: Vec<usize>,
                stopped: bool,
                frozen: Option<usize>,
            ) -> World {
                let source: BTreeMap<usize, (Entry, u64)> = start
                    .into_iter()
                    .enumerate()
                    .filter_map(|(k, e)| e.map(|e| (k, (e, k as u64 + 1))))
                    .collect();
                World {
                    replica: source
                        .iter()
                        .map(|(k, (e, _))| (*k, (e.clone(), 100 + *k as u64)))
                        .collect(),
                    source,
                    events: Vec::new(),
                    dst_index: 200,
                    applied: BASE,
                    recorded: BASE,
                    stopped,
                    frozen,
                    script,
                    gaps,
                    at: 0,
                }
            }

            fn start() -> impl Strategy<Value = Vec<Option<Entry>>> {
                proptest::collection::vec(proptest::option::of(state()), KEYS)
            }

            proptest! {
                #![proptest_config(ProptestConfig::with_cases(1024))]

                /// However the source, the mirror (running, slow or stopped) and the check's
                /// reads interleave, a correct mirror is never reported.
                #[test]
                fn a_correct_mirror_is_never_reported(
                    start in start(),
                    script in proptest::collection::vec(step(), 0..60),
                    gaps in proptest::collection::vec(0..6usize, 1..8),
                    stopped in any::<bool>(),
                ) {
                    let mut w = world(start, script, gaps, false, None);
                    // The mirror may stop at any point of the script.
                    if stopped {
                        let cut = w.script.len() / 2;
                        let before: Vec<Step> = w.script.drain(..cut).collect();
                        before.into_iter().for_each(|s| w.act(s));
                        w.stopped = true;
                    }
                    for (i, ds) in check(&mut w).iter().enumerate() {
                        let wrong: Vec<&Difference> = ds.iter().filter(|d| d.confirmed).collect();
                        prop_assert!(wrong.is_empty(), "read {}: {:?}", i + 1, wrong);
                    }
                }

                /// A replica key that differs from a source key the source leaves alone is
                /// confirmed by the second read at the latest, and nothing else is.
                #[test]
                fn a_wrong_replica_key_is_confirmed(
                    start in start(),
                    wrong in (0..KEYS, proptest::option::of(state())),
                    script in proptest::collection::vec(step(), 0..60),
                    gaps in proptest::collection::vec(0..6usize, 1..8),
                ) {
                    let (k, bad) = wrong;
                    let mut w = world(start, script, gaps, false, Some(k));
                    let good = w.replica.get(&k).map(|(e, _)| e.clone());
                    prop_assume!(bad != good);
                    match bad {
                        Some(e) => drop(w.replica.insert(k, (e, 150))),
                        None => drop(w.replica.remove(&k)),
                    }
                    let rounds = check(&mut w);
                    let last = rounds.iter().take(2).next_back().cloned().unwrap_or_default();
                    let confirmed: Vec<String> = last.iter().filter(|d| d.confirmed).map(|d| d.key.clone()).collect();
                    prop_assert_eq!(confirmed, vec![dst_key(k)], "{:?}", rounds);
                }
            }
        }
    }
}
