//! Shared helpers for the integration tests: real etcd servers, the mirror binary, polling.
//!
//! Every test starts its own etcd servers (source and destination) on free loopback ports with
//! data dirs under /dev/shm. Everything is cleaned up on drop, so tests can run in parallel.
#![allow(dead_code)]

pub mod proxy;
#[macro_use]
pub mod v3;

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_etcdmirror");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh, unique scratch directory under /dev/shm (falls back to the temp dir), removed on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = base.join(format!(
            "etcdmirror-test-{}-{}-{}",
            std::process::id(),
            n,
            sanitize(tag)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create scratch dir");
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(40)
        .collect()
}

/// A port that nothing listens on right now (may race with other tests; callers retry).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Poll `cond` every 20 ms until it is true; panic with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like `wait_until`, but returns false on timeout instead of panicking.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Percent-encode a key path for use in a URL (keeps '/' and unreserved characters).
pub fn encode_path(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Percent-encode a query component.
pub fn encode_query(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The result of one v2 API call.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    /// X-Etcd-Index header (0 if absent).
    pub index: u64,
    pub cluster_id: String,
    pub body: Value,
}

impl Resp {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
    pub fn error_code(&self) -> Option<u64> {
        self.body.get("errorCode").and_then(Value::as_u64)
    }
    pub fn node(&self) -> &Value {
        &self.body["node"]
    }
    pub fn modified_index(&self) -> u64 {
        self.body["node"]["modifiedIndex"].as_u64().unwrap_or(0)
    }
    pub fn key(&self) -> String {
        self.body["node"]["key"].as_str().unwrap_or("").to_string()
    }
    #[track_caller]
    pub fn expect_ok(self) -> Resp {
        assert!(
            self.ok(),
            "etcd request failed: {} {}",
            self.status,
            self.body
        );
        self
    }
}

/// An HTTP client for one etcd server's v2 keys API. Cheap to clone, usable from threads.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str) -> Client {
        Self::with_tls(base, None)
    }

    /// A client for an https:// server: trusts only `tls.ca` and presents `tls.client_*`.
    pub fn with_tls(base: &str, tls: Option<&TlsFiles>) -> Client {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .max_idle_connections_per_host(16);
        if let Some(t) = tls {
            config = config.tls_config(t.ureq_config());
        }
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent: ureq::Agent::new_with_config(config.build()),
        }
    }

    fn url(&self, key: &str, query: &[(&str, &str)]) -> String {
        let key = if key.starts_with('/') {
            key.to_string()
        } else {
            format!("/{key}")
        };
        let mut url = format!("{}/v2/keys{}", self.base, encode_path(&key));
        for (i, (k, v)) in query.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&encode_query(k));
            url.push('=');
            url.push_str(&encode_query(v));
        }
        url
    }

    /// Raw request: `query` goes in the URL, `form` in a form-encoded body (PUT/POST only).
    pub fn request(
        &self,
        method: &str,
        key: &str,
        query: &[(&str, &str)],
        form: &[(&str, &str)],
    ) -> Resp {
        let url = self.url(key, query);
        let mut last_err = String::new();
        for _ in 0..5 {
            let res = match method {
                "GET" => self.agent.get(&url).call(),
                "DELETE" => self.agent.delete(&url).call(),
                "PUT" => self.agent.put(&url).send_form(form.iter().copied()),
                "POST" => self.agent.post(&url).send_form(form.iter().copied()),
                m => panic!("unsupported method {m}"),
            };
            match res {
                Ok(mut r) => {
                    let status = r.status().as_u16();
                    let header = |name: &str| {
                        r.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string()
                    };
                    let index = header("X-Etcd-Index").parse().unwrap_or(0);
                    let cluster_id = header("X-Etcd-Cluster-Id");
                    let text = r
                        .body_mut()
                        .with_config()
                        .limit(512 * 1024 * 1024)
                        .read_to_string()
                        .unwrap_or_default();
                    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
                    return Resp {
                        status,
                        index,
                        cluster_id,
                        body,
                    };
                }
                Err(e) => {
                    // Only connection-level errors end up here; a write may not be retried
                    // blindly, so only retry when nothing could have been sent.
                    last_err = e.to_string();
                    if method != "GET" {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        panic!("{method} {url} failed: {last_err}");
    }

    /// PUT with arbitrary form parameters (no status check).
    pub fn put(&self, key: &str, form: &[(&str, &str)]) -> Resp {
        self.request("PUT", key, &[], form)
    }

    /// Plain set; panics on failure.
    #[track_caller]
    pub fn set(&self, key: &str, value: &str) -> Resp {
        self.put(key, &[("value", value)]).expect_ok()
    }

    /// POST (in-order key creation) with arbitrary form parameters (no status check).
    pub fn post(&self, dir: &str, form: &[(&str, &str)]) -> Resp {
        self.request("POST", dir, &[], form)
    }

    /// Create a directory (PUT dir=true); panics on failure.
    #[track_caller]
    pub fn mkdir(&self, key: &str) -> Resp {
        self.put(key, &[("dir", "true")]).expect_ok()
    }

    /// DELETE with query parameters (no status check).
    pub fn delete(&self, key: &str, query: &[(&str, &str)]) -> Resp {
        self.request("DELETE", key, query, &[])
    }

    /// GET with query parameters (no status check).
    pub fn get_raw(&self, key: &str, query: &[(&str, &str)]) -> Resp {
        self.request("GET", key, query, &[])
    }

    /// The node JSON for `key`, or None if it does not exist.
    pub fn node(&self, key: &str) -> Option<Value> {
        let r = self.get_raw(key, &[]);
        match r.status {
            200 => Some(r.body["node"].clone()),
            404 => None,
            s => panic!("GET {key}: unexpected status {s}: {}", r.body),
        }
    }

    /// The value of `key`: None if missing; panics if it is a directory.
    pub fn get(&self, key: &str) -> Option<String> {
        self.node(key).map(|n| {
            assert!(n.get("dir").is_none(), "{key} is a directory, not a value");
            n["value"].as_str().unwrap_or("").to_string()
        })
    }

    pub fn exists(&self, key: &str) -> bool {
        self.node(key).is_some()
    }

    /// The store's current X-Etcd-Index.
    pub fn current_index(&self) -> u64 {
        self.get_raw("/", &[]).index
    }

    pub fn cluster_id(&self) -> String {
        self.get_raw("/", &[]).cluster_id
    }
}

/// Full recursive listing under `prefix` (hidden keys are left out by etcd itself).
/// Keys are full etcd keys; None marks a directory. The prefix node itself is not included.
/// A missing prefix gives an empty map.
pub fn tree(c: &Client, prefix: &str) -> BTreeMap<String, Option<String>> {
    let r = c.get_raw(prefix, &[("recursive", "true"), ("sorted", "true")]);
    let mut out = BTreeMap::new();
    match r.status {
        200 => {}
        404 => return out,
        s => panic!("listing {prefix}: status {s}: {}", r.body),
    }
    fn walk(n: &Value, out: &mut BTreeMap<String, Option<String>>) {
        if let Some(nodes) = n.get("nodes").and_then(Value::as_array) {
            for child in nodes {
                let key = child["key"].as_str().unwrap_or("").to_string();
                if child.get("dir").and_then(Value::as_bool) == Some(true) {
                    out.insert(key, None);
                    walk(child, out);
                } else {
                    out.insert(key, Some(child["value"].as_str().unwrap_or("").to_string()));
                }
            }
        }
    }
    let node = &r.body["node"];
    if node.get("dir").and_then(Value::as_bool) == Some(true) {
        walk(node, &mut out);
    } else {
        out.insert(
            node["key"].as_str().unwrap_or("").to_string(),
            Some(node["value"].as_str().unwrap_or("").to_string()),
        );
    }
    out
}

/// `tree`, with `prefix` removed from the front of every key ("/replica/a" -> "/a").
pub fn rel_tree(c: &Client, prefix: &str) -> BTreeMap<String, Option<String>> {
    let p = prefix.trim_end_matches('/');
    tree(c, prefix)
        .into_iter()
        .map(|(k, v)| (k.strip_prefix(p).unwrap_or(&k).to_string(), v))
        .collect()
}

/// Keys that differ between two trees, for failure messages.
pub fn tree_diff(
    a: &BTreeMap<String, Option<String>>,
    b: &BTreeMap<String, Option<String>>,
) -> String {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("only in left: {k:?} = {v:?}")),
            Some(w) if w != v => out.push(format!("differs: {k:?}: {v:?} vs {w:?}")),
            _ => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            out.push(format!("only in right: {k:?} = {v:?}"));
        }
    }
    let n = out.len();
    out.truncate(20);
    format!("{n} differences; first: {}", out.join("; "))
}

/// The key that holds the replication index on the destination for `dst_prefix`.
pub fn index_key(dst_prefix: &str) -> String {
    let p = dst_prefix.trim_end_matches('/');
    if p.is_empty() {
        "/__replication/__ROOT__".to_string()
    } else {
        format!("/__replication{p}")
    }
}

/// The replication index stored on the destination for `dst_prefix`, if any.
pub fn replication_index(dst: &Client, dst_prefix: &str) -> Option<u64> {
    dst.get(&index_key(dst_prefix)).map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("replication index is not a number: {v:?}"))
    })
}

/// Set the replication index directly (to start a mirror from a known source index).
pub fn set_replication_index(dst: &Client, dst_prefix: &str, index: u64) {
    dst.set(&index_key(dst_prefix), &index.to_string());
}

/// A real etcd server (v2 API enabled) on free loopback ports; killed and removed on drop.
pub struct Etcd {
    pub url: String,
    pub name: String,
    pub client_port: u16,
    pub client: Client,
    child: Child,
    /// The etcd command line, to start the same member again on the same data (`restart`).
    argv: Vec<std::ffi::OsString>,
    scratch: Scratch,
}

impl std::ops::Deref for Etcd {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Etcd {
    pub fn start(tag: &str) -> Etcd {
        Self::start_with(tag, None)
    }

    /// An etcd whose client URL is https:// with `tls.server_*` as its certificate, requiring
    /// client certificates signed by `tls.ca` (`--client-cert-auth`). Peer URLs stay http.
    pub fn start_tls(tag: &str, tls: &TlsFiles) -> Etcd {
        Self::start_with(tag, Some(tls))
    }

    fn start_with(tag: &str, tls: Option<&TlsFiles>) -> Etcd {
        let mut last = String::new();
        for attempt in 0..8 {
            match Self::try_start(tag, attempt, tls) {
                Ok(e) => return e,
                Err(e) => last = e,
            }
        }
        panic!("could not start etcd: {last}");
    }

    /// The etcd process id (to stop or freeze it with a signal).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn try_start(tag: &str, attempt: usize, tls: Option<&TlsFiles>) -> Result<Etcd, String> {
        let scratch = Scratch::new(&format!("etcd-{tag}"));
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{}-{}-{}-{}", sanitize(tag), std::process::id(), n, attempt);
        let cport = free_port();
        let pport = free_port();
        if cport == pport {
            return Err("same port twice".into());
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let curl = format!("{scheme}://127.0.0.1:{cport}");
        let purl = format!("http://127.0.0.1:{pport}");
        let log = fs::File::create(scratch.path.join("etcd.log")).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("etcd");
        if let Some(t) = tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        cmd.arg("--name")
            .arg(&name)
            .arg("--data-dir")
            .arg(scratch.path.join("data"))
            .arg("--enable-v2=true")
            .arg("--listen-client-urls")
            .arg(&curl)
            .arg("--advertise-client-urls")
            .arg(&curl)
            .arg("--listen-peer-urls")
            .arg(&purl)
            .arg("--initial-advertise-peer-urls")
            .arg(&purl)
            .arg("--initial-cluster")
            .arg(format!("{name}={purl}"))
            .arg("--initial-cluster-token")
            .arg(&name)
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg("--log-level=warn");
        let argv: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_os_string()).collect();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| {
                format!("spawn etcd: {e} (is etcd installed? apt-get install etcd-server)")
            })?;
        let client = Client::with_tls(&curl, tls);
        // Readiness: our process is alive and the server answering on our port carries our name.
        let start = Instant::now();
        let stats_url = format!("{curl}/v2/stats/self");
        let mut probe = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(2)));
        if let Some(t) = tls {
            probe = probe.tls_config(t.ureq_config());
        }
        let probe = ureq::Agent::new_with_config(probe.build());
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                let log = fs::read_to_string(scratch.path.join("etcd.log")).unwrap_or_default();
                return Err(format!(
                    "etcd exited with {st} during startup: {}",
                    tail(&log, 5)
                ));
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                return Err("etcd not ready within 20 s".into());
            }
            let named = probe
                .get(&stats_url)
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .map(|v| v["name"].as_str() == Some(name.as_str()))
                .unwrap_or(false);
            if named {
                let r = probe.get(format!("{curl}/v2/keys/")).call();
                if let Ok(r) = r {
                    if r.status().as_u16() == 200 {
                        break;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Etcd {
            url: curl,
            name,
            client_port: cport,
            client,
            child,
            argv,
            scratch,
        })
    }

    /// SIGKILL the server and start it again on the same data dir and ports; returns once
    /// it answers again.
    pub fn restart(&mut self) {
        self.respawn();
        wait_until(
            Duration::from_secs(30),
            "etcd to answer after a restart",
            || self.client.get_raw("/", &[]).status == 200,
        );
    }

    /// SIGKILL the server and start it again on the same data dir, ports and files, without
    /// waiting for it (its certificate may have changed).
    pub fn respawn(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.scratch.path.join("etcd.log"))
            .expect("etcd log");
        let log2 = log.try_clone().expect("etcd log");
        self.child = Command::new("etcd")
            .args(&self.argv)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("respawn etcd");
    }

    /// The client address, for a proxy in front of this server.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// The URL with basic-auth credentials embedded.
    pub fn url_with_auth(&self, user: &str, pass: &str) -> String {
        format!("http://{user}:{pass}@127.0.0.1:{}", self.client_port)
    }
}

/// True if `tool` is an executable on PATH.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            let p = d.join(tool);
            p.is_file()
                && fs::metadata(&p).is_ok_and(|m| {
                    use std::os::unix::fs::PermissionsExt;
                    m.permissions().mode() & 0o111 != 0
                })
        })
    })
}

/// Fail (never skip) when a tool the test needs is missing, naming the Debian package.
#[track_caller]
pub fn require_tool(tool: &str, package: &str) {
    assert!(
        on_path(tool),
        "`{tool}` is not on PATH; this test needs it. On Debian/Ubuntu: \
         apt-get install {package}   (`make deps` as root installs it when missing)"
    );
}

/// PEM files for a test PKI made with the openssl CLI: a CA, a server certificate for
/// 127.0.0.1 (SAN IP:127.0.0.1) and a client certificate, all signed by the CA.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub dir: PathBuf,
    _scratch: Scratch,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA (EC P-256) `NAME.pem`/`NAME.key` in `dir`.
pub fn make_ca(dir: &Path, name: &str, cn: &str) {
    require_tool("openssl", "openssl");
    let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A leaf certificate `NAME.pem`/`NAME.key` signed by the CA `CA.pem`/`CA.key` in `dir`,
/// with the given X.509v3 extension lines.
pub fn make_leaf(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) {
    require_tool("openssl", "openssl");
    let (pem, key, csr, extf) = (
        format!("{name}.pem"),
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    fs::write(dir.join(&extf), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &extf,
        ],
    );
}

impl TlsFiles {
    /// Generate a fresh PKI in a scratch dir (needs the openssl CLI: fails if it is missing).
    pub fn generate(tag: &str) -> TlsFiles {
        let scratch = Scratch::new(&format!("pki-{tag}"));
        let d = scratch.path.clone();
        make_ca(&d, "ca", "etcdmirror test CA");
        make_leaf(
            &d,
            "ca",
            "server",
            "127.0.0.1",
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        );
        make_leaf(
            &d,
            "ca",
            "client",
            "etcdmirror-client",
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        );
        TlsFiles {
            ca: d.join("ca.pem"),
            server_cert: d.join("server.pem"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.pem"),
            client_key: d.join("client.key"),
            dir: d,
            _scratch: scratch,
        }
    }

    /// A ureq TLS config that trusts only the CA and presents the client certificate.
    pub fn ureq_config(&self) -> ureq::tls::TlsConfig {
        use ureq::tls::{parse_pem, Certificate, ClientCert, PemItem, RootCerts, TlsConfig};
        let items = |p: &Path| -> Vec<PemItem<'static>> {
            parse_pem(&fs::read(p).unwrap())
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
        };
        let certs = |p: &Path| -> Vec<Certificate<'static>> {
            items(p)
                .into_iter()
                .filter_map(|i| match i {
                    PemItem::Certificate(c) => Some(c),
                    _ => None,
                })
                .collect()
        };
        let key = items(&self.client_key)
            .into_iter()
            .find_map(|i| match i {
                PemItem::PrivateKey(k) => Some(k),
                _ => None,
            })
            .expect("client key");
        TlsConfig::builder()
            .root_certs(RootCerts::new_with_certs(&certs(&self.ca)))
            .client_cert(Some(ClientCert::new_with_certs(
                &certs(&self.client_cert),
                key,
            )))
            .build()
    }

    /// The path as a string, for command lines.
    pub fn s(p: &Path) -> String {
        p.to_string_lossy().into_owned()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Map an exit status to a code; death by signal S gives 128 + S.
pub fn status_code(st: ExitStatus) -> i32 {
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// Wait for a child to exit, with a bound. Returns the exit code (128 + signal if killed),
/// or None on timeout (the child is left running).
pub fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(status_code(st));
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Send a signal by number using kill(1) (no libc dependency).
pub fn send_signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// A running etcdmirror process; stderr and stdout go to files that can be read back.
/// Killed (SIGKILL) on drop.
pub struct Mirror {
    pub child: Child,
    pub args: Vec<String>,
    exit: Option<i32>,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
    _scratch: Scratch,
}

impl Mirror {
    /// Start the binary with `args` followed by SRC and DST. `--port 0` is added unless the
    /// arguments already contain `--port`.
    pub fn start(args: &[&str], src: &str, dst: &str) -> Mirror {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if !all
            .iter()
            .any(|a| a == "--port" || a.starts_with("--port="))
        {
            all.insert(0, "0".into());
            all.insert(0, "--port".into());
        }
        all.push(src.to_string());
        all.push(dst.to_string());
        Self::spawn(all)
    }

    /// Start the binary with exactly these arguments.
    pub fn spawn(args: Vec<String>) -> Mirror {
        Self::spawn_env(args, &[])
    }

    /// Start the binary with exactly these arguments and environment changes: `Some(v)` sets
    /// a variable, `None` removes it.
    pub fn spawn_env(args: Vec<String>, env: &[(&str, Option<&str>)]) -> Mirror {
        let scratch = Scratch::new("mirror");
        let stderr_path = scratch.path.join("stderr");
        let stdout_path = scratch.path.join("stdout");
        let mut cmd = Command::new(BIN);
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_path).unwrap())
            .stderr(fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn etcdmirror");
        Mirror {
            child,
            args,
            exit: None,
            stderr_path,
            stdout_path,
            _scratch: scratch,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// The exit code if the process has exited (128 + signal if killed by one).
    pub fn exited(&mut self) -> Option<i32> {
        if self.exit.is_none() {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.exit = Some(status_code(st));
            }
        }
        self.exit
    }

    pub fn is_alive(&mut self) -> bool {
        self.exited().is_none()
    }

    /// Wait for exit with a bound; None on timeout.
    pub fn wait_exit_timeout(&mut self, timeout: Duration) -> Option<i32> {
        if self.exit.is_none() {
            self.exit = wait_for_exit(&mut self.child, timeout);
        }
        self.exit
    }

    /// Wait for exit with a bound; panics (with the stderr tail) on timeout.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        match self.wait_exit_timeout(timeout) {
            Some(c) => c,
            None => panic!(
                "etcdmirror {:?} did not exit within {timeout:?}; stderr tail:\n{}",
                self.args,
                tail(&self.stderr(), 30)
            ),
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> i32 {
        let _ = self.child.kill();
        self.wait_exit(Duration::from_secs(10))
    }

    /// Send SIGTERM (does not wait).
    pub fn terminate(&self) {
        send_signal(self.pid(), "TERM");
    }

    /// Panic with the stderr tail if the process has exited.
    #[track_caller]
    pub fn assert_alive(&mut self, context: &str) {
        if let Some(code) = self.exited() {
            panic!(
                "etcdmirror exited unexpectedly with {code} ({context}); stderr tail:\n{}",
                tail(&self.stderr(), 40)
            );
        }
    }

    /// Poll `cond` with a bound while checking that the mirror stays alive; fails fast (with
    /// the mirror's stderr) if it exits or on timeout.
    #[track_caller]
    pub fn wait_for(&mut self, timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if cond() {
                return;
            }
            self.assert_alive(&format!("while waiting for: {what}"));
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for: {what}; etcdmirror stderr tail:\n{}",
                    tail(&self.stderr(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Let `time` pass, failing at once if the process exits meanwhile: a period (a quiet
    /// source, a fault in place) the mirror must ride out.
    #[track_caller]
    pub fn stays_alive(&mut self, time: Duration, what: &str) {
        let start = Instant::now();
        while let Some(left) = time.checked_sub(start.elapsed()) {
            self.assert_alive(what);
            std::thread::sleep(left.min(Duration::from_millis(5)));
        }
        self.assert_alive(what);
    }

    /// Wait (with a bound, failing fast if the process exits) until stderr contains `needle`.
    #[track_caller]
    pub fn wait_log(&mut self, timeout: Duration, needle: &str) {
        let path = self.stderr_path.clone();
        self.wait_for(timeout, &format!("{needle:?} in the log"), || {
            fs::read_to_string(&path).is_ok_and(|s| s.contains(needle))
        });
    }

    /// Wait until the destination's replication index (for `dst_prefix`) is at least `index`.
    #[track_caller]
    pub fn wait_index(&mut self, dst: &Client, dst_prefix: &str, index: u64) {
        self.wait_for(
            Duration::from_secs(30),
            &format!("replication index {} >= {index}", index_key(dst_prefix)),
            || replication_index(dst, dst_prefix).is_some_and(|i| i >= index),
        );
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- etcdmirror {:?} stderr tail ----\n{}",
                self.args,
                tail(&self.stderr(), 40)
            );
        }
    }
}

/// A source and a destination server.
pub struct Pair {
    pub src: Etcd,
    pub dst: Etcd,
}

impl Pair {
    pub fn start(tag: &str) -> Pair {
        Pair {
            src: Etcd::start(&format!("{tag}-src")),
            dst: Etcd::start(&format!("{tag}-dst")),
        }
    }

    /// Set the destination's index to the source's current index and start a mirror (no
    /// --reload): everything written on the source afterwards must be replicated.
    pub fn mirror_from_now(&self, args: &[&str], dst_prefix: &str) -> Mirror {
        set_replication_index(&self.dst, dst_prefix, self.src.current_index());
        Mirror::start(args, &self.src.url, &self.dst.url)
    }
}

/// Tiny deterministic PRNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// True if some word starting with `stem` (case-insensitive) has the number `n` as a
/// neighbouring token, e.g. "3 creates", "creates: 3", "create=3".
pub fn mentions_count(text: &str, stem: &str, n: usize) -> bool {
    let tokens: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(|t| t.to_lowercase())
        .collect();
    let n = n.to_string();
    let stem = stem.to_lowercase();
    tokens.iter().enumerate().any(|(i, t)| {
        t.starts_with(&stem)
            && ((i > 0 && tokens[i - 1] == n) || tokens.get(i + 1).is_some_and(|x| *x == n))
    })
}

impl Mirror {
    /// Wait until the destination index reaches the source's current index, then until the
    /// source subtree `src_prefix` and the destination subtree `dst_subtree` hold the same
    /// relative keys and values. `dst_prefix` is the mirror's --dst-prefix (for the index key).
    #[track_caller]
    pub fn wait_synced(
        &mut self,
        src: &Client,
        src_prefix: &str,
        dst: &Client,
        dst_subtree: &str,
        dst_prefix: &str,
        what: &str,
    ) {
        let n = src.current_index();
        self.wait_index(dst, dst_prefix, n);
        let ok = poll_until(Duration::from_secs(10), || {
            rel_tree(src, src_prefix) == rel_tree(dst, dst_subtree)
        });
        if !ok {
            let a = rel_tree(src, src_prefix);
            let b = rel_tree(dst, dst_subtree);
            panic!(
                "after {what}: source {src_prefix} and destination {dst_subtree} differ \
                 (left = source): {}\netcdmirror stderr tail:\n{}",
                tree_diff(&a, &b),
                tail(&self.stderr(), 30)
            );
        }
        self.assert_alive(what);
    }
}

/// Watches the destination from outside while a mirror runs: the recorded replication index
/// must never reach a source write that the replica does not hold yet. Sound only for keys
/// written once and never deleted: once present, a key stays, so an index read before a key
/// was found missing proves the index passed a write that had not arrived.
pub struct NoSkip {
    /// (destination key, source modifiedIndex) of writes not yet seen on the replica.
    pending: Arc<Mutex<Vec<(String, u64)>>>,
    violation: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NoSkip {
    /// Start checking every 20 ms the index recorded for `dst_prefix` on `dst`.
    pub fn start(dst: &Client, dst_prefix: &str) -> NoSkip {
        let pending: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
        let violation: Arc<Mutex<Option<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (p, v, s) = (pending.clone(), violation.clone(), stop.clone());
        let (dst, prefix) = (dst.clone(), dst_prefix.to_string());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if let Some(index) = replication_index(&dst, &prefix) {
                    let due: Vec<_> = p
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|w| w.1 <= index)
                        .cloned()
                        .collect();
                    for (key, mi) in due {
                        if !dst.exists(&key) {
                            *v.lock().unwrap() = Some(format!(
                                "the mirror recorded index {index} while {key} (source index \
                                 {mi}) was not on the replica: it skipped an event"
                            ));
                            return;
                        }
                        p.lock().unwrap().retain(|w| w.0 != key);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        NoSkip {
            pending,
            violation,
            stop,
            thread: Some(thread),
        }
    }

    /// A source write that must be on the replica (at `dst_key`) before the recorded index
    /// reaches `modified_index`.
    pub fn expect(&self, dst_key: &str, modified_index: u64) {
        self.pending
            .lock()
            .unwrap()
            .push((dst_key.to_string(), modified_index));
    }

    /// Panic if the index ever passed a write that had not arrived.
    #[track_caller]
    pub fn assert_ok(&self) {
        if let Some(v) = self.violation.lock().unwrap().clone() {
            panic!("{v}");
        }
    }
}

impl Drop for NoSkip {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One member of a `Cluster`.
pub struct Member {
    /// Its client URL (`http://127.0.0.1:PORT`).
    pub url: String,
    pub name: String,
    pub client_port: u16,
    /// A client for this member alone.
    pub client: Client,
    /// `None` once killed.
    child: Option<Child>,
    /// The etcd command line, to start it again on the same data dir and ports.
    argv: Vec<std::ffi::OsString>,
    log: PathBuf,
}

impl Member {
    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log)
            .expect("etcd log");
        let log2 = log.try_clone().expect("etcd log");
        let child = Command::new("etcd")
            .args(&self.argv)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn etcd (apt-get install etcd-server)");
        self.child = Some(child);
    }

    /// The etcd process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The member answers and has a leader (`/health` is true).
    pub fn healthy(&self) -> bool {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(2)))
                .build(),
        );
        agent
            .get(format!("{}/health", self.url))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .is_some_and(|t| t.contains("\"health\":\"true\""))
    }

    /// Raft state from `/v2/stats/self` ("StateLeader", "StateFollower", ...).
    pub fn raft_state(&self) -> Option<String> {
        let r = self
            .client
            .agent
            .get(format!("{}/v2/stats/self", self.url))
            .call()
            .ok()?;
        let text = r.into_body().read_to_string().ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v["state"].as_str().map(str::to_string)
    }
}

/// A real etcd cluster of several members on loopback, every member listed in the others'
/// `--initial-cluster`; data dirs under /dev/shm. Members can be killed and started again;
/// all are killed on drop.
pub struct Cluster {
    pub members: Vec<Member>,
    _scratch: Scratch,
}

impl Cluster {
    /// Start `n` members and wait until each answers with a leader.
    pub fn start(tag: &str, n: usize) -> Cluster {
        let mut last = String::new();
        for attempt in 0..5 {
            match Self::try_start(tag, n, attempt) {
                Ok(c) => return c,
                Err(e) => last = e,
            }
        }
        panic!("could not start a {n}-member etcd cluster: {last}");
    }

    fn try_start(tag: &str, n: usize, attempt: usize) -> Result<Cluster, String> {
        let scratch = Scratch::new(&format!("cluster-{tag}"));
        let id = COUNTER.fetch_add(1, Ordering::SeqCst);
        let token = format!("{}-{}-{id}-{attempt}", sanitize(tag), std::process::id());
        let mut ports = Vec::new();
        while ports.len() < 2 * n {
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let names: Vec<String> = (0..n).map(|i| format!("{token}-m{i}")).collect();
        let peer = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i + 1]);
        let initial: Vec<String> = (0..n)
            .map(|i| format!("{}={}", names[i], peer(i)))
            .collect();
        let mut members = Vec::new();
        for i in 0..n {
            let url = format!("http://127.0.0.1:{}", ports[2 * i]);
            let data = scratch.path.join(format!("m{i}"));
            let argv: Vec<std::ffi::OsString> = [
                "--name",
                &names[i],
                "--data-dir",
                &data.to_string_lossy(),
                "--enable-v2=true",
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer(i),
                "--initial-advertise-peer-urls",
                &peer(i),
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-token",
                &token,
                "--initial-cluster-state",
                "new",
                "--logger=zap",
                "--log-outputs=stderr",
                "--log-level=warn",
            ]
            .iter()
            .map(|s| s.into())
            .collect();
            let mut m = Member {
                client: Client::new(&url),
                url,
                name: names[i].clone(),
                client_port: ports[2 * i],
                child: None,
                argv,
                log: scratch.path.join(format!("m{i}.log")),
            };
            m.spawn();
            members.push(m);
        }
        let mut cluster = Cluster {
            members,
            _scratch: scratch,
        };
        let start = Instant::now();
        while !cluster.members.iter().all(Member::healthy) {
            for (i, m) in cluster.members.iter_mut().enumerate() {
                if let Some(Ok(Some(st))) = m.child.as_mut().map(Child::try_wait) {
                    let log = fs::read_to_string(&m.log).unwrap_or_default();
                    return Err(format!(
                        "member {i} exited with {st} during startup: {}",
                        tail(&log, 5)
                    ));
                }
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err("the cluster was not healthy within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(cluster)
    }

    pub fn member(&self, i: usize) -> &Member {
        &self.members[i]
    }

    /// The members' client URLs in the order given, comma-separated (as SRC or DST).
    pub fn urls(&self, order: &[usize]) -> String {
        order
            .iter()
            .map(|&i| self.members[i].url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGKILL member `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start member `i` again on its data dir and ports (without waiting for it).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.members[i].spawn();
    }

    /// The member that is the leader, as the running members see it (bounded wait).
    pub fn leader(&self) -> usize {
        let mut found = None;
        wait_until(Duration::from_secs(20), "a leader", || {
            found = self
                .members
                .iter()
                .position(|m| m.is_running() && m.raft_state().as_deref() == Some("StateLeader"));
            found.is_some()
        });
        found.unwrap()
    }

    /// A client for some running member that is healthy (bounded wait).
    pub fn client(&self) -> &Client {
        let mut found = None;
        wait_until(Duration::from_secs(20), "a healthy member", || {
            found = self
                .members
                .iter()
                .position(|m| m.is_running() && m.healthy());
            found.is_some()
        });
        &self.members[found.unwrap()].client
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
