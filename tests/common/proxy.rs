//! A latency-injecting TCP proxy on loopback: the cross-data-centre case in tests and the
//! benchmark.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

/// Forwards 127.0.0.1:port to an upstream address, delaying every chunk by `delay` in each
/// direction (order preserved; a reader thread timestamps chunks, a writer thread sends each
/// one when it is due, so pipelined data is not delayed cumulatively). Counts accepted
/// connections and "GET " request lines sent upstream.
pub struct Proxy {
    pub port: u16,
    pub conns: Arc<AtomicU64>,
    pub gets: Arc<AtomicU64>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr, delay: Duration) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicU64::new(0));
        let gets = Arc::new(AtomicU64::new(0));
        let (c, g) = (conns.clone(), gets.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                c.fetch_add(1, Ordering::Relaxed);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(client, server, delay, Some(g.clone()));
                pipe(s2, c2, delay, None);
            }
        });
        Proxy { port, conns, gets }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn count_gets(carry: &mut Vec<u8>, chunk: &[u8]) -> u64 {
    carry.extend_from_slice(chunk);
    let n = carry.windows(4).filter(|w| *w == b"GET ").count() as u64;
    let keep = carry.len().saturating_sub(3);
    carry.drain(..keep);
    n
}

fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration, gets: Option<Arc<AtomicU64>>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let from2 = from.try_clone().unwrap();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut carry = Vec::new();
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(g) = &gets {
                        g.fetch_add(count_gets(&mut carry, &buf[..n]), Ordering::Relaxed);
                    }
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    thread::spawn(move || {
        for (due, data) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                let _ = from2.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
        // The reader saw EOF: pass the half-close on.
        let _ = to.shutdown(Shutdown::Write);
    });
}
