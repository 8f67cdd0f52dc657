//! A fault-injecting TCP proxy on loopback for the tests and the benchmark: per-direction
//! delay and jitter, response bodies held back after their headers, dropped responses, black
//! hole and reset, all switchable while connections are open.

use super::Rng;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// What the proxy does to the bytes it forwards; `Faults::default()` forwards them at once.
///
/// Every chunk read from one side is queued with the time it is due on the other side; one
/// writer per direction sends the queue in order, so no fault ever reorders bytes, and delays
/// are not cumulative (pipelined data is not delayed once per chunk).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Delay of every chunk from the client to the server.
    pub to_server: Duration,
    /// Delay of every chunk from the server to the client.
    pub to_client: Duration,
    /// Up to this much more delay, drawn per chunk in both directions.
    pub jitter: Duration,
    /// Hold back the first body bytes after each response's header block this long (from
    /// when they arrive). The headers go through at once; everything after the held bytes
    /// queues behind them. Applies to every response on a keep-alive connection, and to a
    /// chunked stream only at its start.
    pub hold_body: Duration,
    /// Forward the next this many requests whose request line contains `drop_matching`, but
    /// swallow their whole responses (headers and body). The client connection stays open
    /// and silent: the client sees a request that is never answered. Later responses on the
    /// same connection are delivered. Counts down as requests are picked.
    pub drop_responses: u32,
    /// Which requests `drop_responses` picks; empty picks every request.
    pub drop_matching: String,
    /// Swallow every byte in both directions, on open and new connections, without closing
    /// anything. Unlike a real black hole (where TCP retransmits after it ends), swallowed
    /// bytes are gone for good, so a stream that was open across it may have lost data.
    pub black_hole: bool,
    /// Close every open connection (both sockets shut down: a FIN, not an RST, as std cannot
    /// set SO_LINGER) and close new ones as soon as they are accepted, until switched off.
    pub reset: bool,
}

impl Faults {
    /// The same delay in both directions, and nothing else.
    pub fn delay(each_way: Duration) -> Faults {
        Faults {
            to_server: each_way,
            to_client: each_way,
            ..Faults::default()
        }
    }
}

/// Which side of the mirror a proxy stands in front of.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Side {
    Source,
    Destination,
}

/// Forwards 127.0.0.1:port to an upstream address with the configured [`Faults`], which can be
/// changed at any time with [`Proxy::set`]. Counts accepted connections and GET requests.
pub struct Proxy {
    pub port: u16,
    /// Connections accepted and connected upstream.
    pub conns: Arc<AtomicU64>,
    /// GET requests forwarded upstream.
    pub gets: Arc<AtomicU64>,
    shared: Arc<Shared>,
}

/// What the accept loop and every connection's threads share with the `Proxy`.
struct Shared {
    faults: Mutex<Faults>,
    upstream: Mutex<SocketAddr>,
    /// Both sockets of every open connection, so that `reset` can close them.
    open: Mutex<HashMap<u64, [TcpStream; 2]>>,
    rng: Mutex<Rng>,
    gets: Arc<AtomicU64>,
}

/// Poisoning is irrelevant here: a panicking test must not take the proxy down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Proxy {
    /// Delay every chunk by `delay` in each direction.
    pub fn start(upstream: SocketAddr, delay: Duration) -> Proxy {
        Self::start_with(upstream, Faults::delay(delay))
    }

    /// Start with the given faults.
    pub fn start_with(upstream: SocketAddr, faults: Faults) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicU64::new(0));
        let gets = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Shared {
            faults: Mutex::new(faults),
            upstream: Mutex::new(upstream),
            open: Mutex::new(HashMap::new()),
            rng: Mutex::new(Rng::new(0x5eed ^ u64::from(port))),
            gets: gets.clone(),
        });
        let (sh, c) = (shared.clone(), conns.clone());
        thread::spawn(move || {
            for (id, client) in (0u64..).zip(listener.incoming()) {
                let Ok(client) = client else { continue };
                let upstream = *lock(&sh.upstream);
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue; // dropping `client` closes it
                };
                if let Some(conn) = Conn::register(&sh, id, &client, &server) {
                    c.fetch_add(1, Ordering::Relaxed);
                    conn.spawn(client, server);
                }
            }
        });
        Proxy {
            port,
            conns,
            gets,
            shared,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Replace the faults; with `reset` set, every open connection is closed now.
    pub fn set(&self, faults: Faults) {
        let reset = faults.reset;
        *lock(&self.shared.faults) = faults;
        if reset {
            for [client, server] in lock(&self.shared.open).values() {
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
            }
        }
    }

    /// The current faults (`drop_responses` counts down as responses are picked).
    pub fn faults(&self) -> Faults {
        lock(&self.shared.faults).clone()
    }

    /// Send new connections to another upstream; open ones stay where they are.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *lock(&self.shared.upstream) = upstream;
    }
}

/// One proxied connection, shared by its four threads; unregistered when the last one ends.
struct Conn {
    id: u64,
    shared: Arc<Shared>,
    /// For each request forwarded so far, in order: whether its response is swallowed.
    dropped: Mutex<Vec<bool>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        lock(&self.shared.open).remove(&self.id);
    }
}

/// Which way bytes flow.
#[derive(Clone, Copy, PartialEq)]
enum Dir {
    ToServer,
    ToClient,
}

/// A chunk of bytes and when it may be sent.
type Queued = (Instant, Vec<u8>);

impl Conn {
    /// Register a new connection, or `None` (the caller closes it) while `reset` is set.
    fn register(
        shared: &Arc<Shared>,
        id: u64,
        client: &TcpStream,
        server: &TcpStream,
    ) -> Option<Arc<Conn>> {
        // Checked under the registry lock, so a `set` with `reset` either sees this
        // connection and closes it or comes after the check and refuses it.
        let mut open = lock(&shared.open);
        if lock(&shared.faults).reset {
            return None;
        }
        open.insert(id, [client.try_clone().ok()?, server.try_clone().ok()?]);
        Some(Arc::new(Conn {
            id,
            shared: shared.clone(),
            dropped: Mutex::new(Vec::new()),
        }))
    }

    fn spawn(self: Arc<Self>, client: TcpStream, server: TcpStream) {
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        self.clone().pipe(Dir::ToServer, client, server);
        self.pipe(Dir::ToClient, s2, c2);
    }

    /// A reader thread that timestamps chunks and a writer thread that sends each one when due.
    fn pipe(self: Arc<Self>, dir: Dir, from: TcpStream, to: TcpStream) {
        let (tx, rx) = mpsc::channel::<Queued>();
        let from2 = from.try_clone().unwrap();
        let conn = self.clone();
        thread::spawn(move || conn.read(dir, from, tx));
        thread::spawn(move || self.write(rx, from2, to));
    }

    fn read(&self, dir: Dir, mut from: TcpStream, tx: Sender<Queued>) {
        let mut framer = Framer::new(dir == Dir::ToServer);
        let mut buf = vec![0u8; 64 * 1024];
        let mut due = Instant::now();
        // The last response whose body was held: only its first body bytes are.
        let mut held: Option<u64> = None;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = Instant::now();
            for piece in framer.split(&buf[..n]) {
                if let Some(head) = &piece.complete_head {
                    if dir == Dir::ToServer {
                        self.request(head);
                    }
                }
                let swallowed = dir == Dir::ToClient
                    && lock(&self.dropped).get(piece.message as usize) == Some(&true);
                if swallowed {
                    continue;
                }
                let extra = {
                    let faults = lock(&self.shared.faults);
                    let jitter = faults.jitter.as_micros() as u64;
                    let jitter = lock(&self.shared.rng).below(jitter.saturating_add(1));
                    let mut extra = Duration::from_micros(jitter);
                    if dir == Dir::ToServer {
                        extra += faults.to_server;
                    } else {
                        extra += faults.to_client;
                        if !piece.head && held != Some(piece.message) {
                            held = Some(piece.message);
                            extra += faults.hold_body;
                        }
                    }
                    extra
                };
                due = due.max(now + extra);
                if tx.send((due, buf[piece.range].to_vec())).is_err() {
                    return;
                }
            }
        }
    }

    /// A request's header block is complete (and not yet forwarded): count it, and decide
    /// whether its response will be swallowed.
    fn request(&self, head: &str) {
        let line = head.lines().next().unwrap_or("");
        if line.starts_with("GET ") {
            self.shared.gets.fetch_add(1, Ordering::Relaxed);
        }
        let mut faults = lock(&self.shared.faults);
        let drop = faults.drop_responses > 0 && line.contains(faults.drop_matching.as_str());
        if drop {
            faults.drop_responses -= 1;
        }
        lock(&self.dropped).push(drop);
    }

    fn write(&self, rx: Receiver<Queued>, from: TcpStream, mut to: TcpStream) {
        for (due, data) in rx {
            thread::sleep(due.saturating_duration_since(Instant::now()));
            if lock(&self.shared.faults).black_hole {
                continue;
            }
            if to.write_all(&data).is_err() {
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
        // The reader saw EOF: pass the half-close on.
        let _ = to.shutdown(Shutdown::Write);
    }
}

/// A header block longer than this means the bytes are not HTTP: stop parsing them.
const MAX_HEAD: usize = 64 * 1024;

/// Where one direction's byte stream is in HTTP/1.1 message framing. Enough for etcd and
/// ureq: no `Expect: 100-continue`, no HEAD requests.
#[derive(Clone, Copy)]
enum At {
    /// In a header block, collected in `Framer::line`.
    Head,
    /// In a body with this many bytes left.
    Body(u64),
    /// In a chunked body, on a chunk-size line.
    ChunkSize,
    /// Chunk data and its CRLF, this many bytes left.
    Chunk(u64),
    /// After the last chunk, on trailer lines up to an empty one.
    Trailer,
    /// In a body that ends with the connection (or in bytes that are not HTTP).
    ToClose,
}

struct Framer {
    /// Requests: no length means no body. Responses: it means a body up to the close.
    requests: bool,
    at: At,
    line: Vec<u8>,
    /// The current message's number on this connection, from 0.
    message: u64,
}

/// A run of bytes from one read that belongs to one part of one message.
struct Piece {
    range: Range<usize>,
    message: u64,
    /// Header bytes (else body bytes, chunk framing included).
    head: bool,
    /// The whole header block, when it ends in this piece.
    complete_head: Option<String>,
}

impl Framer {
    fn new(requests: bool) -> Framer {
        Framer {
            requests,
            at: At::Head,
            line: Vec::new(),
            message: 0,
        }
    }

    fn split(&mut self, data: &[u8]) -> Vec<Piece> {
        let mut pieces: Vec<Piece> = Vec::new();
        let mut i = 0;
        while i < data.len() {
            let (message, head) = (self.message, matches!(self.at, At::Head));
            let (n, complete_head) = self.step(&data[i..]);
            match pieces.last_mut() {
                Some(p) if p.message == message && p.head == head && p.complete_head.is_none() => {
                    p.range.end += n
                }
                _ => pieces.push(Piece {
                    range: i..i + n,
                    message,
                    head,
                    complete_head: None,
                }),
            }
            if let (Some(h), Some(p)) = (complete_head, pieces.last_mut()) {
                p.complete_head = Some(h);
            }
            i += n;
        }
        pieces
    }

    /// Consume the bytes at the start of `data` that the current state covers (at least one).
    fn step(&mut self, data: &[u8]) -> (usize, Option<String>) {
        match self.at {
            At::Body(left) | At::Chunk(left) => {
                let n = left.min(data.len() as u64);
                self.at = match (self.at, left - n) {
                    (At::Body(_), 0) => self.next_message(),
                    (At::Body(_), rest) => At::Body(rest),
                    (_, 0) => At::ChunkSize,
                    (_, rest) => At::Chunk(rest),
                };
                return (n as usize, None);
            }
            At::ToClose => return (data.len(), None),
            At::Head | At::ChunkSize | At::Trailer => {}
        }
        // Header, chunk-size and trailer lines: one byte at a time.
        self.line.push(data[0]);
        if !self.line.ends_with(b"\n") {
            if self.line.len() > MAX_HEAD {
                self.at = At::ToClose;
            }
            return (1, None);
        }
        match self.at {
            At::Head if self.line.ends_with(b"\r\n\r\n") => {
                let head = String::from_utf8_lossy(&self.line).into_owned();
                self.line.clear();
                self.at = self.body(&head);
                return (1, Some(head));
            }
            At::ChunkSize => {
                let text = String::from_utf8_lossy(&self.line);
                let size = text.split([';', '\r', '\n']).next().unwrap_or("").trim();
                self.at = match u64::from_str_radix(size, 16) {
                    Ok(0) => At::Trailer,
                    Ok(n) => At::Chunk(n + 2),
                    Err(_) => At::ToClose,
                };
                self.line.clear();
            }
            At::Trailer => {
                if self.line == b"\r\n" {
                    self.at = self.next_message();
                }
                self.line.clear();
            }
            _ => {}
        }
        (1, None)
    }

    /// The framing of the body that follows the header block `head`.
    fn body(&mut self, head: &str) -> At {
        let head = head.to_ascii_lowercase();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
            return At::ChunkSize;
        }
        let status = head.split(' ').nth(1).unwrap_or("");
        match header("content-length:").and_then(|v| v.parse().ok()) {
            Some(0) => self.next_message(),
            Some(n) => At::Body(n),
            None if self.requests || status == "204" || status == "304" => self.next_message(),
            None => At::ToClose,
        }
    }

    fn next_message(&mut self) -> At {
        self.message += 1;
        At::Head
    }
}
