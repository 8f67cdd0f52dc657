//! The etcd HTTP client: members, failover and the one retry policy, the v2 keys API, and the
//! transport of the v3 JSON gateway (whose messages `v3.rs` builds and reads).

use std::cell::{Cell, RefCell};
use std::io::Read;
use std::time::{Duration, Instant};

use log::{info, warn};
use serde_json::Value;

use crate::cli::Api;
use crate::endpoint::{base64, Endpoint};
use crate::error::{Error, Result};

/// etcd error codes the mirror branches on.
pub const KEY_NOT_FOUND: u64 = 100;
/// "The request requires user authentication": the credentials do not reach the key.
pub const UNAUTHORIZED: u64 = 110;
/// Refusals that describe the key's state (not found, compare failed, not a file, not a
/// directory, already exists, directory not empty): the caller reads the key and compares.
const STATE_CODES: [u64; 6] = [100, 101, 102, 104, 105, 108];
pub const EVENT_INDEX_CLEARED: u64 = 401;

/// A key or directory as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub key: String,
    /// `None` for a directory.
    pub value: Option<String>,
    pub modified_index: u64,
    pub nodes: Vec<Node>,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        self.value.is_none()
    }

    /// Convert a JSON node, consuming it so that a large listing is not held twice.
    fn from_json(v: Value) -> std::result::Result<Node, String> {
        let Value::Object(mut obj) = v else {
            return Err("node is not an object".into());
        };
        let key = match obj.remove("key") {
            Some(Value::String(k)) => k,
            _ => "/".to_string(),
        };
        let dir = obj.get("dir").and_then(Value::as_bool).unwrap_or(false);
        let value = match obj.remove("value") {
            _ if dir => None,
            Some(Value::String(s)) => Some(s),
            // An expired or deleted value node carries no value; it is still not a dir.
            None => Some(String::new()),
            Some(other) => return Err(format!("value of {key} is not a string: {other}")),
        };
        let nodes = match obj.remove("nodes") {
            Some(Value::Array(a)) => a
                .into_iter()
                .map(Node::from_json)
                .collect::<std::result::Result<_, _>>()?,
            _ => Vec::new(),
        };
        Ok(Node {
            modified_index: obj
                .get("modifiedIndex")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            key,
            value,
            nodes,
        })
    }

    /// Every node below this one, depth first (this node excluded), taken apart as it goes.
    pub fn into_descendants(self) -> impl Iterator<Item = Node> {
        let mut stack: Vec<std::vec::IntoIter<Node>> = vec![self.nodes.into_iter()];
        std::iter::from_fn(move || loop {
            let top = stack.last_mut()?;
            match top.next() {
                Some(mut n) => {
                    stack.push(std::mem::take(&mut n.nodes).into_iter());
                    return Some(n);
                }
                None => {
                    stack.pop();
                }
            }
        })
    }
}

/// One watch event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub action: String,
    pub node: Node,
    /// The node's state before the event, when it existed.
    pub prev: Option<Node>,
}

impl Event {
    /// Parse a watch response body.
    pub fn parse(body: &[u8]) -> std::result::Result<Event, String> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| format!("malformed event JSON: {e}"))?;
        let Value::Object(mut v) = v else {
            return Err("event is not an object".into());
        };
        let action = match v.remove("action") {
            Some(Value::String(a)) => a,
            _ => return Err("event without an action".into()),
        };
        let node = Node::from_json(v.remove("node").ok_or("event without a node")?)?;
        let prev = match v.remove("prevNode") {
            Some(p) if !p.is_null() => Some(Node::from_json(p)?),
            _ => None,
        };
        Ok(Event { action, node, prev })
    }
}

/// The pre-state a conditional write asserts; etcd checks it atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// No condition: used only where the state was just read and checked.
    None,
    /// `prevExist=false`.
    Absent,
    /// `prevValue=…` (never empty: etcd refuses an empty prevValue).
    Value(String),
    /// `prevIndex=…`.
    Index(u64),
}

/// How a write ended when the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Done,
    /// The server refused it, normally because the condition did not hold.
    Rejected {
        code: u64,
        message: String,
    },
}

/// What opening a watch gave.
pub enum Opened {
    Stream(Stream),
    /// The requested index has left the source's history.
    Cleared(String),
    /// The server refused the watch itself (e.g. credentials that do not reach that key).
    Refused {
        code: u64,
        message: String,
    },
}

/// A watch response: a long poll (one event) or a stream (`stream=true`: events arrive one
/// JSON line each on one response).
pub struct Stream {
    reader: std::io::BufReader<ureq::BodyReader<'static>>,
    /// The store index when the watch was registered (`X-Etcd-Index` of the headers).
    pub registered: Option<u64>,
}

/// The next thing a stream delivered.
#[derive(Debug)]
pub enum Next {
    Event(Event),
    /// Not one byte arrived for the read timeout the stream was opened with.
    Quiet,
    /// The server or a proxy ended the response.
    Closed,
}

impl Stream {
    /// A whole line is already buffered: `next` will not wait.
    pub fn ready(&self) -> bool {
        self.reader.buffer().contains(&b'\n')
    }

    /// Wait for the next event, up to the read timeout the stream was opened with.
    /// An error is a broken stream: reconnect.
    pub fn next(&mut self) -> std::result::Result<Next, String> {
        Ok(match read_line(&mut self.reader)? {
            Line::Text(line) => Next::Event(Event::parse(&line)?),
            Line::Quiet => Next::Quiet,
            Line::Closed => Next::Closed,
        })
    }

    /// Read a finished long poll to its end, so that its connection is reused.
    pub fn finish(mut self) {
        let _ = std::io::copy(&mut self.reader, &mut std::io::sink());
    }
}

/// One line of a streamed response: a v2 watch event, a v3 watch message.
pub enum Line {
    Text(Vec<u8>),
    /// Not one byte arrived within the read bound the stream was opened with.
    Quiet,
    /// The server or a proxy ended the response.
    Closed,
}

/// The next non-blank line of a stream. A last line without its newline before the end
/// counts (etcd's v3 gateway ends a stream that way). Part of a line and then nothing is
/// not silence, so it proves nothing: that, like any other failure, is an error (a broken
/// stream, to be opened again).
pub fn read_line(
    reader: &mut std::io::BufReader<ureq::BodyReader<'static>>,
) -> std::result::Result<Line, String> {
    use std::io::BufRead;
    let mut line = Vec::new();
    loop {
        match reader.read_until(b'\n', &mut line) {
            Ok(0) if line.iter().all(u8::is_ascii_whitespace) => return Ok(Line::Closed),
            Ok(0) => return Ok(Line::Text(line)),
            Ok(_) if !line.ends_with(b"\n") => {}
            Ok(_) if line.iter().all(u8::is_ascii_whitespace) => line.clear(),
            Ok(_) => return Ok(Line::Text(line)),
            Err(e) => {
                let e = ureq::Error::from(e);
                return if is_timeout(&e) && line.is_empty() {
                    Ok(Line::Quiet)
                } else if is_timeout(&e) {
                    Err(format!("a line stalled after {} bytes", line.len()))
                } else {
                    Err(e.to_string())
                };
            }
        }
    }
}

/// What a GET found, with the response's store index and cluster id.
#[derive(Debug)]
pub struct Got {
    pub node: Option<Node>,
    pub index: u64,
    pub cluster_id: Option<String>,
}

/// The one retry policy: capped exponential back-off within a time budget, counted from the
/// first failure: a request that waited its whole answer timeout in vain is one failure, and
/// still gets its retries.
pub struct Backoff {
    /// When the first failure was reported (`failed`), or the first wait.
    start: Option<Instant>,
    delay: Duration,
    budget: Duration,
}

/// The first delay, and the cap on later ones.
const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_secs(5);

impl Backoff {
    pub fn new(budget: Duration) -> Backoff {
        Backoff {
            start: None,
            delay: FIRST_DELAY,
            budget,
        }
    }

    /// The delay before the next attempt, `elapsed` after the first failure; `None` once
    /// waiting it would pass the budget. Pure: time is an argument.
    pub fn next_delay(&mut self, elapsed: Duration) -> Option<Duration> {
        let delay = self.delay;
        if elapsed.saturating_add(delay) > self.budget {
            return None;
        }
        self.delay = delay.saturating_mul(2).min(MAX_DELAY);
        Some(delay)
    }

    /// A failure happened: the budget's clock starts now if it has not yet.
    pub fn failed(&mut self) {
        self.start.get_or_insert_with(Instant::now);
    }

    /// Wait before the next attempt, or `None` (without waiting) once the budget is spent.
    pub fn wait(&mut self) -> Option<Duration> {
        let start = *self.start.get_or_insert_with(Instant::now);
        let delay = self.next_delay(start.elapsed())?;
        std::thread::sleep(delay);
        Some(delay)
    }
}

/// How large an answer can be, which sets how long it may stay silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A write's, one key's, a count: silent for `answer_timeout` at most.
    Small,
    /// A listing (a recursive GET, a page of a range): the agent's generous timeouts.
    Listing,
}

/// What one attempt of a request produced.
enum Attempt<T> {
    Retry(String),
    Fatal(Error),
    Ok(T),
}

/// A client for one cluster, talking to one of its members at a time. Connections are kept
/// alive and reused.
///
/// Failover: any transient fault (refused, reset, timeout, 5xx, a broken answer) moves to
/// the next member at once; only a whole round of members failing in a row backs off, and
/// the retry budget runs while no member answers (`failed`). With several members, a member
/// is used only after a quorum read on it (`check`): it shows the cluster id (a member of
/// another cluster is refused), reaches the cluster's leader, and has applied every entry
/// committed before, so that nothing it answers afterwards (a read, a watch registration)
/// is older than what another member answered before the move.
pub struct Client {
    agent: ureq::Agent,
    /// "source" or "destination", for messages and the metrics.
    side: &'static str,
    /// Each member's `scheme://host:port`; never empty.
    members: Vec<String>,
    /// All of them, comma-separated, for messages about the side as a whole.
    all: String,
    /// The position in `members` of the member in use.
    in_use: Cell<usize>,
    /// The member in use has passed `check` since it was chosen.
    checked: Cell<bool>,
    /// The cluster id every member must report (several members only), and the member that
    /// first reported it.
    cluster: RefCell<Option<(String, String)>>,
    /// A key `check` reads on each member: one the side's credentials may read, small
    /// whatever the mirrored tree holds.
    check_key: String,
    auth: Option<String>,
    /// Which API this side speaks; v2 and v3 differ in how a member is checked and how
    /// credentials travel.
    api: Api,
    /// v3 with a user: the name and password for `/v3/auth/authenticate`, and the token it
    /// gave (fetched on first use, again when the server no longer knows it).
    creds: Option<(String, String)>,
    token: RefCell<Option<String>>,
    retry_timeout: Duration,
    /// How long a small answer (a write's, one key's) may stay silent, headers or body,
    /// before the request counts as failed and is retried: `--watch-timeout`, the silence
    /// the mirror already takes as proof elsewhere. etcd answers a write or a small read
    /// within its own request timeout (7 s by default), with an error if need be.
    answer_timeout: Duration,
    /// Set once the server has answered: a TLS failure before that is a configuration
    /// error, after it (a certificate rotated on the server) a transient fault.
    answered: Cell<bool>,
}

/// Time a member gets to answer `check` (its quorum read) in the first round of failures,
/// before the next one is tried. A healthy member answers in one raft round trip; one that
/// still forwards to a leader that has just died holds the read until etcd's own request
/// timeout (7 s by default), which is what this bound cuts short. Once a whole round has
/// failed, members get the usual response timeout, so a cluster that is merely slow still
/// works.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Failures in a row of one request or one watch, across members: the one retry policy.
pub struct Failures {
    backoff: Backoff,
    /// Members that failed since the last back-off.
    in_round: usize,
    /// Whole rounds that failed.
    rounds: u32,
}

/// Why an attempt did not get a usable answer.
enum Failure {
    Retry(String),
    Fatal(Error),
}

/// Percent-encode everything but unreserved characters (and `/` when `keep_slash`).
pub fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Form-encode a value for a request body with as little growth as possible: only what a
/// form parser would read as structure (`& ; = + % #`), spaces and control characters are
/// escaped; other text, UTF-8 included, goes as it is. A value the source accepted then
/// fits etcd's 10 MB form limit on the destination too.
fn encode_body_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii_control() || " &;=+%#".contains(c) {
            out.push_str(&format!("%{:02X}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

fn cond_params(cond: &Cond, params: &mut Vec<(&'static str, String)>) {
    match cond {
        Cond::None => {}
        Cond::Absent => params.push(("prevExist", "false".into())),
        Cond::Value(v) => params.push(("prevValue", v.clone())),
        Cond::Index(i) => params.push(("prevIndex", i.to_string())),
    }
}

/// A query string: everything but unreserved characters escaped.
fn form(params: &[(&str, String)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v, false)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A request body: values escaped only where a form parser needs it.
fn form_body(params: &[(&str, String)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{k}={}", encode_body_value(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn header_u64(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<u64> {
    header_str(resp, name)?.trim().parse().ok()
}

fn header_str(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    Some(resp.headers().get(name)?.to_str().ok()?.to_string())
}

fn read_body(
    resp: &mut ureq::http::Response<ureq::Body>,
) -> std::result::Result<Vec<u8>, ureq::Error> {
    let mut buf = Vec::new();
    resp.body_mut()
        .as_reader()
        .read_to_end(&mut buf)
        .map_err(ureq::Error::from)?;
    Ok(buf)
}

/// A failed request: TLS trust and certificate problems at start need a human (exit 2);
/// everything else, and TLS failures once the server has answered before, is retried.
fn failed<T>(e: ureq::Error, name: &str, answered: bool) -> Attempt<T> {
    let tls = match &e {
        ureq::Error::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_) => true,
        _ => false,
    };
    if tls && !answered {
        return Attempt::Fatal(Error::Usage(format!(
            "TLS with {name} failed: {e} (check --ca-file, --cert-file and --key-file for that side)"
        )));
    }
    Attempt::Retry(e.to_string())
}

fn is_timeout(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Timeout(_) => true,
        ureq::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ),
        _ => false,
    }
}

/// `(errorCode, message)` from an etcd error body, if it is one.
fn etcd_error(body: &[u8]) -> Option<(u64, String)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let code = v.get("errorCode")?.as_u64()?;
    let msg = v.get("message").and_then(Value::as_str).unwrap_or("");
    let cause = v.get("cause").and_then(Value::as_str).unwrap_or("");
    Some((code, format!("{msg} ({cause})")))
}

impl Client {
    /// A client for `endpoint`'s members that retries transient faults for up to
    /// `retry_timeout` with no member answering. `side` names it in messages and metrics;
    /// `check_key` is what `check` reads on each member (see the field).
    pub fn new(
        endpoint: &Endpoint,
        api: Api,
        side: &'static str,
        check_key: &str,
        retry_timeout: Duration,
        answer_timeout: Duration,
    ) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            // Generous on every phase: a source across an ocean still answers in time. A
            // watch bounds the silence it waits for (`watch`), and so does a request whose
            // answer is small (`answer_timeout`); these bound only full listings.
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_send_request(Some(Duration::from_secs(30)))
            .timeout_send_body(Some(Duration::from_secs(60)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .timeout_recv_body(Some(Duration::from_secs(120)))
            .user_agent(concat!("etcdmirror/", env!("CARGO_PKG_VERSION")))
            .tls_config(endpoint.tls.clone())
            .build()
            .into();
        let members = if endpoint.members.is_empty() {
            vec![endpoint.base.clone()]
        } else {
            endpoint.members.clone()
        };
        let urls = members.clone();
        crate::metrics::update(|s| {
            s.members.insert(
                side.to_string(),
                crate::metrics::Members {
                    urls,
                    in_use: 0,
                    moves: 0,
                },
            );
        });
        Client {
            agent,
            side,
            all: members.join(","),
            members,
            in_use: Cell::new(0),
            checked: Cell::new(false),
            cluster: RefCell::new(None),
            check_key: check_key.to_string(),
            auth: endpoint.auth_header(),
            api,
            creds: endpoint
                .credentials()
                .map(|(u, p)| (u.to_string(), p.to_string())),
            token: RefCell::new(None),
            retry_timeout,
            answer_timeout,
            answered: Cell::new(false),
        }
    }

    /// The URL of the member in use, without credentials, for messages.
    pub fn name(&self) -> &str {
        self.members
            .get(self.in_use.get())
            .map_or(self.all.as_str(), String::as_str)
    }

    /// The side's name on the command line, for messages.
    fn arg(&self) -> &'static str {
        if self.side == "source" {
            "SRC"
        } else {
            "DST"
        }
    }

    /// Path and query of a key's URL, to be sent to whichever member is in use.
    fn target(key: &str, query: &[(&str, String)]) -> String {
        let mut url = format!("/v2/keys{}", encode(key, true));
        if !query.is_empty() {
            url.push('?');
            url.push_str(&form(query));
        }
        url
    }

    fn request(
        &self,
        method: &str,
        target: &str,
        body: Option<String>,
        idle_read: Option<Duration>,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        self.request_on(self.name(), method, target, body, |req| match idle_read {
            // ureq's per-read bound also caps each read of the TLS handshake and of the
            // response headers; `--watch-timeout` is at least 5 s, generous for both.
            Some(t) => req.timeout_recv_body(None).timeout_per_read(Some(t)),
            None => req,
        })
    }

    /// One request to `member`, its timeouts adjusted by `tune`.
    fn request_on(
        &self,
        member: &str,
        method: &str,
        target: &str,
        body: Option<String>,
        tune: impl FnOnce(
            ureq::config::ConfigBuilder<ureq::typestate::HttpCrateScope<String>>,
        )
            -> ureq::config::ConfigBuilder<ureq::typestate::HttpCrateScope<String>>,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let url = format!("{member}{target}");
        let mut req = ureq::http::Request::builder().method(method).uri(url);
        let auth = match self.api {
            Api::V2 => self.auth.clone(),
            // The gateway takes the token as it is, without "Bearer".
            Api::V3 => self.token.borrow().clone(),
        };
        if let Some(auth) = auth {
            req = req.header("Authorization", auth);
        }
        let req = match (&body, self.api) {
            (Some(_), Api::V2) => req.header("Content-Type", "application/x-www-form-urlencoded"),
            (Some(_), Api::V3) => req.header("Content-Type", "application/json"),
            (None, _) => req,
        };
        let req = req
            .body(body.unwrap_or_default())
            .map_err(ureq::Error::from)?;
        let req = tune(self.agent.configure_request(req));
        let resp = self.agent.run(req.build());
        if resp.is_ok() {
            self.answered.set(true);
        }
        resp
    }

    /// A fresh record of failures in a row, for one request or one watch.
    pub fn failures(&self) -> Failures {
        Failures {
            backoff: Backoff::new(self.retry_timeout),
            in_round: 0,
            rounds: 0,
        }
    }

    /// `what` failed on the member in use for a transient reason: move to the next member
    /// at once; once every member has failed in a row, back off before the next round;
    /// `Err(Transient)` once waiting would pass the budget.
    pub fn failed(&self, f: &mut Failures, what: &str, why: &str) -> Result<()> {
        let from = self.name().to_string();
        f.backoff.failed();
        f.in_round = f.in_round.saturating_add(1);
        if f.in_round < self.members.len() {
            warn!("{what} on {from} failed ({why}); trying the next member");
            self.move_on(why);
            crate::metrics::update(|s| s.retries = s.retries.saturating_add(1));
            return Ok(());
        }
        f.in_round = 0;
        f.rounds = f.rounds.saturating_add(1);
        if self.members.len() > 1 {
            warn!(
                "{what} on {from} failed ({why}); no member of the {} answered, retrying",
                self.side
            );
        } else {
            warn!("{what} on {from} failed ({why}); retrying");
        }
        self.move_on(why);
        if f.backoff.wait().is_none() {
            return Err(Error::Transient(if self.members.len() > 1 {
                format!(
                    "{what}: no member of the {} ({}) answered; last {from}: {why}",
                    self.side, self.all
                )
            } else {
                format!("{what} on {from}: {why}")
            }));
        }
        crate::metrics::update(|s| s.retries = s.retries.saturating_add(1));
        Ok(())
    }

    /// Move to the next member (with several), to be checked before its first request.
    fn move_on(&self, why: &str) {
        let n = self.members.len();
        if n < 2 {
            return;
        }
        let from = self.name().to_string();
        let next = self.in_use.get().saturating_add(1) % n;
        self.use_member(next);
        info!(
            "{}: moving from member {from} to {} ({why})",
            self.side,
            self.name()
        );
        crate::metrics::update(|s| {
            if let Some(m) = s.members.get_mut(self.side) {
                m.moves = m.moves.saturating_add(1);
            }
        });
    }

    fn use_member(&self, at: usize) {
        self.in_use.set(at);
        self.checked.set(false);
        crate::metrics::update(|s| {
            if let Some(m) = s.members.get_mut(self.side) {
                m.in_use = at;
            }
        });
    }

    /// Ask every member for its cluster id (several members only), each within `timeout`:
    /// exit 2 naming the members that disagree with the others; otherwise remember the id
    /// and start on the first member that answered. A member that does not answer now is
    /// checked when the mirror moves to it.
    pub fn survey(&self, timeout: Duration) -> Result<()> {
        if self.members.len() < 2 {
            return Ok(());
        }
        let mut ids: Vec<(usize, String)> = Vec::new();
        for (i, member) in self.members.iter().enumerate() {
            let resp = match self.api {
                Api::V2 => self
                    .request_on(member, "HEAD", "/v2/keys/", None, |r| {
                        r.timeout_global(Some(timeout))
                    })
                    .map(|r| header_str(&r, "x-etcd-cluster-id")),
                Api::V3 => self
                    .request_on(
                        member,
                        "POST",
                        "/v3/maintenance/status",
                        Some("{}".into()),
                        |r| r.timeout_global(Some(timeout)),
                    )
                    .and_then(|mut r| read_body(&mut r))
                    .map(|body| v3_cluster_id(&body)),
            };
            match resp {
                Ok(Some(id)) => ids.push((i, id)),
                Ok(None) => warn!(
                    "{} member {member} answers without an X-Etcd-Cluster-Id header (not an \
                     etcd v2 member?); it is checked again when the mirror moves to it",
                    self.side
                ),
                Err(e) => warn!(
                    "{} member {member} does not answer ({e}); it is checked when the mirror \
                     moves to it",
                    self.side
                ),
            }
        }
        let name = |i: &usize| self.members.get(*i).map_or("?", String::as_str);
        // The id most members report; on a tie, the first member's.
        let count = |id: &str| ids.iter().filter(|(_, x)| x == id).count();
        let best = ids
            .iter()
            .max_by(|a, b| count(&a.1).cmp(&count(&b.1)).then(b.0.cmp(&a.0)))
            .map(|(_, id)| id.clone());
        let Some(best) = best else {
            return Ok(());
        };
        let (same, odd): (Vec<_>, Vec<_>) = ids.iter().partition(|(_, id)| *id == best);
        if ids
            .iter()
            .any(|(_, id)| *id != best && count(id) == count(&best))
        {
            // As many members on one side as on the other: no telling which is wrong.
            let all: Vec<String> = ids
                .iter()
                .map(|(i, id)| format!("{} (cluster id {id})", name(i)))
                .collect();
            return Err(Error::Usage(format!(
                "the {} members belong to different clusters: {}; every URL in {} must be a \
                 member of the same cluster",
                self.side,
                all.join(", "),
                self.arg()
            )));
        }
        if !odd.is_empty() {
            let odd: Vec<String> = odd
                .iter()
                .map(|(i, id)| format!("{} (cluster id {id})", name(i)))
                .collect();
            let same: Vec<&str> = same.iter().map(|(i, _)| name(i)).collect();
            return Err(Error::Usage(format!(
                "not every {} member belongs to one cluster: {} {} another cluster than {} \
                 (cluster id {best}); every URL in {} must be a member of the same cluster: \
                 remove or fix the odd one",
                self.side,
                odd.join(", "),
                if odd.len() > 1 {
                    "belong to"
                } else {
                    "belongs to"
                },
                same.join(", "),
                self.arg()
            )));
        }
        let first = same.first().map_or(0, |(i, _)| *i);
        *self.cluster.borrow_mut() = Some((best.clone(), name(&first).to_string()));
        if first != self.in_use.get() {
            self.use_member(first);
        }
        info!(
            "{}: {} members of cluster {best}; using {}",
            self.side,
            self.members.len(),
            self.name()
        );
        Ok(())
    }

    /// With several members, before the first request on a member: one quorum read of
    /// `check_key` on it, within `CHECK_TIMEOUT` unless `patient`. It must report the cluster
    /// id the others reported (another one stops the mirror: exit 2, the member list is
    /// wrong); a member that cannot answer it (down, no leader, cut off from the others) is
    /// passed over.
    fn check(&self, patient: bool) -> std::result::Result<(), Failure> {
        if self.members.len() < 2 || self.checked.get() {
            return Ok(());
        }
        if self.api == Api::V3 {
            self.ensure_token()?;
        }
        let (method, target, body) = match self.api {
            Api::V2 => (
                "GET",
                Self::target(&self.check_key, &[("quorum", "true".into())]),
                None,
            ),
            // A v3 range is linearizable unless asked otherwise: the same proof as quorum.
            Api::V3 => (
                "POST",
                "/v3/kv/range".to_string(),
                Some(format!(
                    "{{\"key\":\"{}\",\"keys_only\":true}}",
                    base64(self.check_key.as_bytes())
                )),
            ),
        };
        let resp = self.request_on(self.name(), method, &target, body, |r| {
            if patient {
                r
            } else {
                r.timeout_recv_response(Some(CHECK_TIMEOUT))
            }
        });
        let mut resp = match resp {
            Ok(r) => r,
            Err(e) => {
                return Err(match failed::<()>(e, self.name(), self.answered.get()) {
                    Attempt::Fatal(e) => Failure::Fatal(e),
                    Attempt::Retry(why) => Failure::Retry(format!("quorum read: {why}")),
                    Attempt::Ok(()) => Failure::Retry("quorum read: no answer".into()),
                })
            }
        };
        let status = resp.status().as_u16();
        let id = header_str(&resp, "x-etcd-cluster-id");
        let body = read_body(&mut resp)
            .map_err(|e| Failure::Retry(format!("reading a quorum read: {e}")))?;
        let id = match self.api {
            Api::V2 => id,
            Api::V3 => v3_cluster_id(&body),
        };
        if status >= 500 {
            let text = String::from_utf8_lossy(&body).trim().to_string();
            return Err(Failure::Retry(format!(
                "quorum read: HTTP {status}: {text}"
            )));
        }
        let Some(id) = id else {
            return Err(Failure::Retry(format!(
                "quorum read: HTTP {status} without X-Etcd-Cluster-Id (not an etcd v2 member?)"
            )));
        };
        let mut cluster = self.cluster.borrow_mut();
        match cluster.as_ref() {
            Some((known, seen)) if *known != id => {
                return Err(Failure::Fatal(Error::Usage(format!(
                    "{} member {} reports cluster id {id}, but {seen} reported {known}: it is \
                     not a member of the cluster the mirror uses (a wrong URL in {}, or a \
                     member rebuilt as a new cluster); nothing was read from or written to it. \
                     Fix the member list (if the whole cluster was rebuilt or restored, compare \
                     the trees with --reload --dry-run first)",
                    self.side,
                    self.name(),
                    self.arg()
                ))));
            }
            Some(_) => {}
            None => {
                info!("{}: cluster {id}; using {}", self.side, self.name());
                *cluster = Some((id, self.name().to_string()));
            }
        }
        drop(cluster);
        if self.api == Api::V3 && status != 200 {
            let err = grpc_error(status, &body);
            return Err(Failure::Fatal(
                self.v3_refusal(&format!("range {}", self.check_key), &err),
            ));
        }
        if status == 401 || status == 403 {
            let (code, msg) = etcd_error(&body).unwrap_or((UNAUTHORIZED, "no etcd error".into()));
            return Err(Failure::Fatal(self.refusal(
                &format!("GET {}", self.check_key),
                status,
                code,
                &msg,
            )));
        }
        self.checked.set(true);
        Ok(())
    }

    /// Check the member in use again before its next request (a quorum read, see `check`):
    /// a member cut off from the others is then passed over.
    pub fn recheck(&self) {
        self.checked.set(false);
    }

    /// Run `attempt` on the member in use until it succeeds, fails for good, or transient
    /// faults outlast the budget (`failed`). The flag tells whether a request was retried
    /// (so a write may have landed already).
    fn retrying<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut() -> Attempt<T>,
    ) -> Result<(T, bool)> {
        let mut failures = self.failures();
        let mut retried = false;
        loop {
            let (outcome, sent) = match self.check(failures.rounds > 0) {
                Ok(()) => (attempt(), true),
                Err(Failure::Retry(why)) => (Attempt::Retry(why), false),
                Err(Failure::Fatal(e)) => (Attempt::Fatal(e), false),
            };
            match outcome {
                Attempt::Ok(v) => return Ok((v, retried)),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry(why) => {
                    self.failed(&mut failures, what, &why)?;
                    retried |= sent;
                }
            }
        }
    }

    /// One request/response exchange: status, body, and the headers that matter.
    /// Transient faults come back as `Err(Retry)`.
    fn exchange<T>(
        &self,
        method: &str,
        url: &str,
        body: Option<String>,
        answer: Answer,
    ) -> std::result::Result<(u16, Vec<u8>, Got), Attempt<T>> {
        let idle = (answer == Answer::Small).then_some(self.answer_timeout);
        let mut resp = self
            .request(method, url, body, idle)
            .map_err(|e| failed(e, self.name(), self.answered.get()))?;
        let status = resp.status().as_u16();
        let index = header_u64(&resp, "x-etcd-index").unwrap_or(0);
        let cluster_id = header_str(&resp, "x-etcd-cluster-id");
        let body = read_body(&mut resp)
            .map_err(|e| Attempt::Retry(format!("reading the response: {e}")))?;
        if status >= 500 {
            let text = String::from_utf8_lossy(&body).trim().to_string();
            return Err(Attempt::Retry(format!("HTTP {status}: {text}")));
        }
        let got = Got {
            node: None,
            index,
            cluster_id,
        };
        Ok((status, body, got))
    }

    /// GET a key (recursively when asked). A missing key is `node: None`.
    pub fn get(&self, key: &str, recursive: bool) -> Result<Got> {
        let query: Vec<(&str, String)> = if recursive {
            vec![("recursive", "true".into()), ("sorted", "true".into())]
        } else {
            Vec::new()
        };
        let url = Self::target(key, &query);
        let answer = if recursive {
            Answer::Listing
        } else {
            Answer::Small
        };
        let what = format!("GET {key}");
        let (got, _) = self.retrying(&what, || {
            let (status, body, mut got) = match self.exchange("GET", &url, None, answer) {
                Ok(r) => r,
                Err(a) => return a,
            };
            if status == 200 {
                return match crate::listing::parse_get(&body) {
                    Ok(n) => {
                        got.node = Some(n);
                        Attempt::Ok(got)
                    }
                    Err(e) => Attempt::Retry(format!("malformed response: {e}")),
                };
            }
            match etcd_error(&body) {
                Some((KEY_NOT_FOUND, _)) => Attempt::Ok(got),
                Some((code, msg)) => Attempt::Fatal(self.refusal(&what, status, code, &msg)),
                None if status == 401 || status == 403 => {
                    Attempt::Fatal(self.refusal(&what, status, UNAUTHORIZED, "no etcd error"))
                }
                None => Attempt::Retry(format!("HTTP {status} without an etcd error body")),
            }
        })?;
        Ok(got)
    }

    fn write(
        &self,
        method: &str,
        url: &str,
        body: Option<String>,
        what: &str,
    ) -> Result<(Written, bool)> {
        self.retrying(what, || {
            let (status, body, _) = match self.exchange(method, url, body.clone(), Answer::Small) {
                Ok(r) => r,
                Err(a) => return a,
            };
            if (200..300).contains(&status) {
                return Attempt::Ok(Written::Done);
            }
            match etcd_error(&body) {
                Some((code, message)) if STATE_CODES.contains(&code) => {
                    Attempt::Ok(Written::Rejected { code, message })
                }
                Some((code, message)) => Attempt::Fatal(self.refusal(what, status, code, &message)),
                None if status == 401 || status == 403 => {
                    Attempt::Fatal(self.refusal(what, status, UNAUTHORIZED, "no etcd error"))
                }
                None => Attempt::Retry(format!("HTTP {status} without an etcd error body")),
            }
        })
    }

    /// A refusal that is not about the key's state: credentials (exit 2) or anything else,
    /// such as a value too large (exit 6), reported as etcd gave it.
    fn refusal(&self, what: &str, status: u16, code: u64, message: &str) -> Error {
        let text = format!(
            "{what} on {} refused with HTTP {status}, etcd error {code}: {message}",
            self.name()
        );
        if code == UNAUTHORIZED {
            Error::Usage(format!(
                "{text} (authentication failed or the user may not do this: check the user \
                 and password for this side)"
            ))
        } else {
            Error::Refused(text)
        }
    }

    /// PUT a value (or a directory when `value` is `None`) under a condition.
    /// The flag tells whether the request was retried after a transient fault.
    pub fn put(&self, key: &str, value: Option<&str>, cond: &Cond) -> Result<(Written, bool)> {
        let mut params = match value {
            Some(v) => vec![("value", v.to_string())],
            None => vec![("dir", "true".to_string())],
        };
        cond_params(cond, &mut params);
        let url = Self::target(key, &[]);
        self.write("PUT", &url, Some(form_body(&params)), &format!("PUT {key}"))
    }

    /// DELETE a value, or a directory (`dir`), recursively when asked, under a condition.
    pub fn delete(
        &self,
        key: &str,
        dir: bool,
        recursive: bool,
        cond: &Cond,
    ) -> Result<(Written, bool)> {
        let mut params = Vec::new();
        if dir {
            params.push(("dir", "true".to_string()));
        }
        if recursive {
            params.push(("recursive", "true".to_string()));
        }
        cond_params(cond, &mut params);
        let url = Self::target(key, &params);
        self.write("DELETE", &url, None, &format!("DELETE {key}"))
    }

    /// Watch `key` recursively from `wait_index` (from now with `None`), as a stream or as
    /// one long poll. A read of the body that gets no byte for `idle` ends with `Next::Quiet`.
    pub fn watch(
        &self,
        key: &str,
        wait_index: Option<u64>,
        idle: Duration,
        streamed: bool,
    ) -> Result<Opened> {
        let mut query = vec![
            ("wait", "true".to_string()),
            ("recursive", "true".to_string()),
        ];
        if let Some(i) = wait_index {
            query.push(("waitIndex", i.to_string()));
        }
        if streamed {
            query.push(("stream", "true".to_string()));
        }
        let url = Self::target(key, &query);
        let what = match wait_index {
            Some(i) => format!("watch {key} from {i}"),
            None => format!("watch {key} from now"),
        };
        let (opened, _) = self.retrying(&what, || {
            let mut resp = match self.request("GET", &url, None, Some(idle)) {
                Ok(r) => r,
                Err(e) => return failed(e, self.name(), self.answered.get()),
            };
            let status = resp.status().as_u16();
            let registered = header_u64(&resp, "x-etcd-index");
            if status != 200 {
                let body = read_body(&mut resp).unwrap_or_default();
                return match etcd_error(&body) {
                    Some((EVENT_INDEX_CLEARED, msg)) => Attempt::Ok(Opened::Cleared(msg)),
                    Some((code, message)) if status < 500 => {
                        Attempt::Ok(Opened::Refused { code, message })
                    }
                    _ => Attempt::Retry(format!("HTTP {status}")),
                };
            }
            let reader =
                std::io::BufReader::with_capacity(WATCH_BUFFER, resp.into_body().into_reader());
            Attempt::Ok(Opened::Stream(Stream { reader, registered }))
        })?;
        Ok(opened)
    }
}

/// The read buffer of a watch stream (v2 or v3): large enough that a mirror behind reads
/// many events per read, which a v3 destination then takes in one transaction.
const WATCH_BUFFER: usize = 256 * 1024;

/// A refusal the v3 gateway reports: the HTTP status, the gRPC code and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcError {
    pub http: u16,
    pub code: u64,
    pub message: String,
}

/// gRPC codes the mirror branches on.
pub const GRPC_OUT_OF_RANGE: u64 = 11;
const GRPC_PERMISSION_DENIED: u64 = 7;
const GRPC_UNAUTHENTICATED: u64 = 16;

/// The gateway's error body `{"error":…,"message":…,"code":N}`; anything else keeps the
/// HTTP status and the text.
fn grpc_error(http: u16, body: &[u8]) -> GrpcError {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    let code = v
        .as_ref()
        .and_then(|v| v.get("code"))
        .and_then(Value::as_u64);
    let message = v
        .as_ref()
        .and_then(|v| v.get("message").or_else(|| v.get("error")))
        .and_then(Value::as_str)
        .map_or_else(
            || String::from_utf8_lossy(body).trim().to_string(),
            str::to_string,
        );
    GrpcError {
        http,
        code: code.unwrap_or(0),
        message,
    }
}

/// A v3 answer's `header.cluster_id` (a decimal string), written in hex as v2's
/// `X-Etcd-Cluster-Id` is, so that one id names a cluster whichever API reported it.
fn v3_cluster_id(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let id: u64 = v.get("header")?.get("cluster_id")?.as_str()?.parse().ok()?;
    Some(format!("{id:x}"))
}

/// The v3 gateway's credentials refusals: a token it does not know (expired), none at all
/// ("user name is empty"), or a user without permission.
fn about_credentials(e: &GrpcError) -> bool {
    e.http == 401
        || e.http == 403
        || e.code == GRPC_UNAUTHENTICATED
        || e.code == GRPC_PERMISSION_DENIED
        || e.message.contains("user name is empty")
}

impl Client {
    /// Which API this side speaks.
    pub fn api(&self) -> Api {
        self.api
    }

    /// v3 with a user and no token yet: authenticate on the member in use.
    fn ensure_token(&self) -> std::result::Result<(), Failure> {
        let Some((user, password)) = self.creds.as_ref().filter(|_| self.api == Api::V3) else {
            return Ok(());
        };
        if self.token.borrow().is_some() {
            return Ok(());
        }
        let body = serde_json::json!({"name": user, "password": password}).to_string();
        let mut resp = self
            .request_on(
                self.name(),
                "POST",
                "/v3/auth/authenticate",
                Some(body),
                |r| {
                    r.timeout_recv_body(None)
                        .timeout_per_read(Some(self.answer_timeout))
                },
            )
            .map_err(
                |e| match failed::<()>(e, self.name(), self.answered.get()) {
                    Attempt::Fatal(e) => Failure::Fatal(e),
                    Attempt::Retry(why) => Failure::Retry(format!("authentication: {why}")),
                    Attempt::Ok(()) => Failure::Retry("authentication: no answer".into()),
                },
            )?;
        let status = resp.status().as_u16();
        let body = read_body(&mut resp)
            .map_err(|e| Failure::Retry(format!("reading an authentication: {e}")))?;
        if status >= 500 {
            return Err(Failure::Retry(format!("authentication: HTTP {status}")));
        }
        let token = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("token")?.as_str().map(str::to_string));
        match token {
            Some(t) if status == 200 => {
                *self.token.borrow_mut() = Some(t);
                Ok(())
            }
            _ => {
                let err = grpc_error(status, &body);
                let side = if self.side == "source" { "src" } else { "dst" };
                Err(Failure::Fatal(Error::Usage(format!(
                    "the {} {} refused user {user:?}: {} (HTTP {status}); check --{side}-user \
                     and --{side}-password-file",
                    self.side,
                    self.name(),
                    err.message
                ))))
            }
        }
    }

    /// A v3 refusal that is not about the state of a key: credentials exit 2, anything else
    /// (too large, malformed) exit 6, as etcd gave it.
    pub fn v3_refusal(&self, what: &str, e: &GrpcError) -> Error {
        let text = format!(
            "{what} on {} refused with HTTP {}, gRPC code {}: {}",
            self.name(),
            e.http,
            e.code,
            e.message
        );
        if about_credentials(e) {
            let side = if self.side == "source" { "src" } else { "dst" };
            Error::Usage(format!(
                "{text} (authentication failed or the user may not do this: check \
                 --{side}-user and --{side}-password-file)"
            ))
        } else {
            Error::Refused(text)
        }
    }

    /// One call of the v3 gateway (`/v3/<path>` with a JSON body), retried on transient
    /// faults. The answer is the message, or the refusal for the caller to judge
    /// (credentials refusals stop here, exit 2); the flag tells whether a request was
    /// retried, so a write may have landed already.
    pub fn call_v3(
        &self,
        path: &str,
        body: &str,
        answer: Answer,
        what: &str,
    ) -> Result<(std::result::Result<Value, GrpcError>, bool)> {
        let target = format!("/v3/{path}");
        self.retrying(what, || {
            match self.ensure_token() {
                Ok(()) => {}
                Err(Failure::Retry(why)) => return Attempt::Retry(why),
                Err(Failure::Fatal(e)) => return Attempt::Fatal(e),
            }
            let (status, body, _) =
                match self.exchange("POST", &target, Some(body.to_string()), answer) {
                    Ok(r) => r,
                    Err(a) => return a,
                };
            if status == 200 {
                return match serde_json::from_slice::<Value>(&body) {
                    Ok(v) => Attempt::Ok(Ok(v)),
                    Err(e) => Attempt::Retry(format!("malformed response: {e}")),
                };
            }
            let err = grpc_error(status, &body);
            if err.code == GRPC_UNAUTHENTICATED && self.creds.is_some() {
                // The token expired (or the server restarted): authenticate again.
                *self.token.borrow_mut() = None;
                return Attempt::Retry(format!("the token was refused: {}", err.message));
            }
            if about_credentials(&err) {
                return Attempt::Fatal(self.v3_refusal(what, &err));
            }
            Attempt::Ok(Err(err))
        })
    }

    /// Open a v3 watch (`/v3/watch` with `body`): the stream of its JSON lines, each read
    /// bounded by `idle`. Refusals before the stream starts are the caller's to judge.
    pub fn open_v3_watch(
        &self,
        body: &str,
        idle: Duration,
        what: &str,
    ) -> Result<std::result::Result<std::io::BufReader<ureq::BodyReader<'static>>, GrpcError>> {
        let (opened, _) = self.retrying(what, || {
            match self.ensure_token() {
                Ok(()) => {}
                Err(Failure::Retry(why)) => return Attempt::Retry(why),
                Err(Failure::Fatal(e)) => return Attempt::Fatal(e),
            }
            let mut resp =
                match self.request("POST", "/v3/watch", Some(body.to_string()), Some(idle)) {
                    Ok(r) => r,
                    Err(e) => return failed(e, self.name(), self.answered.get()),
                };
            let status = resp.status().as_u16();
            if status != 200 {
                let body = read_body(&mut resp).unwrap_or_default();
                if status >= 500 {
                    return Attempt::Retry(format!("HTTP {status}"));
                }
                let err = grpc_error(status, &body);
                if about_credentials(&err) {
                    return Attempt::Fatal(self.v3_refusal(what, &err));
                }
                return Attempt::Ok(Err(err));
            }
            // Large enough that a replica behind reads many messages per read, which the
            // loop can then write together (`Watch3::queued`).
            Attempt::Ok(Ok(std::io::BufReader::with_capacity(
                WATCH_BUFFER,
                resp.into_body().into_reader(),
            )))
        })?;
        Ok(opened)
    }

    /// After a credentials refusal inside a watch stream: forget the token, so that the
    /// next request authenticates again.
    pub fn forget_token(&self) {
        *self.token.borrow_mut() = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_keys_and_form_values() {
        assert_eq!(encode("/z/sp ace?q", true), "/z/sp%20ace%3Fq");
        assert_eq!(encode("a&b=c+%#/", false), "a%26b%3Dc%2B%25%23%2F");
        assert_eq!(encode("é", false), "%C3%A9");
        let mut p = vec![("value", "x y".to_string())];
        cond_params(&Cond::Value("a&b".into()), &mut p);
        cond_params(&Cond::Absent, &mut p);
        assert_eq!(form(&p), "value=x%20y&prevValue=a%26b&prevExist=false");
        assert_eq!(form_body(&p), "value=x%20y&prevValue=a%26b&prevExist=false");
        assert_eq!(encode_body_value("é/?'\"\n;#+"), "é/?'\"%0A%3B%23%2B");
    }

    /// What a form parser (Go's url.ParseQuery, as etcd uses) reads back.
    fn parse_form(body: &str) -> Vec<(String, String)> {
        fn unescape(s: &str) -> String {
            let mut out = Vec::new();
            let mut bytes = s.bytes();
            while let Some(b) = bytes.next() {
                match b {
                    b'+' => out.push(b' '),
                    b'%' => {
                        let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                        out.push(u8::from_str_radix(&hex, 16).unwrap());
                    }
                    b => out.push(b),
                }
            }
            String::from_utf8(out).unwrap()
        }
        body.split(['&', ';'])
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (unescape(k), unescape(v))
            })
            .collect()
    }

    proptest::proptest! {
        /// Any budget and any clock: delays start at 50 ms, double up to 5 s, and stop
        /// exactly when waiting would pass the budget.
        #[test]
        fn backoff_is_capped_and_keeps_to_its_budget(
            budget_ms in proptest::prop_oneof![0..100u64, 0..100_000u64, proptest::strategy::Just(u64::MAX)],
            steps in proptest::collection::vec(0..20_000u64, 1..200),
        ) {
            let budget = Duration::from_millis(budget_ms);
            let mut b = Backoff::new(budget);
            let mut elapsed = Duration::ZERO;
            let mut last: Option<Duration> = None;
            for step in steps {
                elapsed = elapsed.saturating_add(Duration::from_millis(step));
                match b.next_delay(elapsed) {
                    Some(d) => {
                        proptest::prop_assert!(d >= FIRST_DELAY && d <= MAX_DELAY);
                        proptest::prop_assert!(elapsed.saturating_add(d) <= budget);
                        if let Some(l) = last {
                            proptest::prop_assert_eq!(d, l.saturating_mul(2).min(MAX_DELAY));
                        }
                        last = Some(d);
                    }
                    None => {
                        let next = last.map_or(FIRST_DELAY, |l| l.saturating_mul(2).min(MAX_DELAY));
                        proptest::prop_assert!(elapsed.saturating_add(next) > budget);
                    }
                }
            }
        }

        #[test]
        fn body_values_read_back_as_written(a in ".*", b in "\\PC*") {
            let p = vec![("value", a.clone()), ("prevValue", b.clone())];
            let back = parse_form(&form_body(&p));
            proptest::prop_assert_eq!(back, vec![("value".into(), a), ("prevValue".into(), b)]);
        }
    }

    fn client(list: &str, budget: Duration) -> Client {
        Client::new(
            &Endpoint::parse(list).unwrap(),
            Api::V2,
            "source",
            "/x",
            budget,
            Duration::from_secs(5),
        )
    }

    /// A failure moves to the next member at once; the budget is spent only when a whole
    /// round of members failed in a row.
    #[test]
    fn failures_move_at_once_and_back_off_per_round() {
        let c = client("http://a:1,http://b:2,http://c:3", Duration::ZERO);
        let mut f = c.failures();
        assert_eq!(c.name(), "http://a:1");
        assert!(c.failed(&mut f, "GET /k", "refused").is_ok());
        assert_eq!(c.name(), "http://b:2");
        assert!(!c.checked.get());
        assert!(c.failed(&mut f, "GET /k", "refused").is_ok());
        assert_eq!(c.name(), "http://c:3");
        let err = c.failed(&mut f, "GET /k", "refused").unwrap_err();
        assert_eq!(c.name(), "http://a:1");
        assert_eq!(err.exit_code(), 1);
        let text = err.to_string();
        assert!(text.contains("no member of the source") && text.contains("http://b:2"));

        // A round that backs off (within the budget) starts a new round.
        let c = client("http://a:1,http://b:2", Duration::from_secs(60));
        let mut f = c.failures();
        for member in ["http://b:2", "http://a:1", "http://b:2", "http://a:1"] {
            assert!(c.failed(&mut f, "GET /k", "refused").is_ok());
            assert_eq!(c.name(), member);
        }
        assert_eq!(f.in_round, 0);

        // One member: every failure is a round, as before members existed.
        let c = client("http://a:1", Duration::ZERO);
        let err = c
            .failed(&mut c.failures(), "GET /k", "refused")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "giving up after transient failures: GET /k on http://a:1: refused"
        );
        assert_eq!(c.name(), "http://a:1");
    }

    #[test]
    fn parses_events() {
        let body = br#"{"action":"compareAndSwap","node":{"key":"/a","value":"2","modifiedIndex":9,"createdIndex":8},"prevNode":{"key":"/a","value":"1","modifiedIndex":8,"createdIndex":8}}"#;
        let e = Event::parse(body).unwrap();
        assert_eq!(e.action, "compareAndSwap");
        assert_eq!(e.node.value.as_deref(), Some("2"));
        assert_eq!(e.node.modified_index, 9);
        assert_eq!(e.prev.unwrap().value.as_deref(), Some("1"));

        let dir = br#"{"action":"delete","node":{"key":"/d","dir":true,"modifiedIndex":5,"createdIndex":3},"prevNode":{"key":"/d","dir":true,"modifiedIndex":3,"createdIndex":3}}"#;
        let e = Event::parse(dir).unwrap();
        assert!(e.node.is_dir() && e.prev.unwrap().is_dir());

        let expired = br#"{"action":"expire","node":{"key":"/t","modifiedIndex":7,"createdIndex":6},"prevNode":{"key":"/t","value":"","modifiedIndex":6,"createdIndex":6,"expiration":"x","ttl":1}}"#;
        let e = Event::parse(expired).unwrap();
        assert!(!e.node.is_dir());
        assert_eq!(e.prev.unwrap().value.as_deref(), Some(""));

        assert!(Event::parse(b"{not json").is_err());
        assert!(Event::parse(br#"{"node":{}}"#).is_err());
    }

    #[test]
    fn parses_error_bodies() {
        let b = br#"{"errorCode":401,"message":"The event in requested index is outdated and cleared","cause":"the requested history has been cleared [5/3]","index":1004}"#;
        let (code, msg) = etcd_error(b).unwrap();
        assert_eq!(code, EVENT_INDEX_CLEARED);
        assert!(msg.contains("cleared [5/3]"));
        assert_eq!(etcd_error(b"<html>"), None);
    }

    #[test]
    fn descendants_are_depth_first() {
        let v: Value = serde_json::from_str(
            r#"{"key":"/r","dir":true,"nodes":[{"key":"/r/a","dir":true,"nodes":[{"key":"/r/a/x","value":"1"}]},{"key":"/r/b","value":""}]}"#,
        )
        .unwrap();
        let n = Node::from_json(v).unwrap();
        let keys: Vec<String> = n.into_descendants().map(|n| n.key).collect();
        assert_eq!(keys, ["/r/a", "/r/a/x", "/r/b"]);
    }
}
