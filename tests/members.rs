//! Several members per cluster (issue 9, point 1), on real 3-member etcd clusters on
//! loopback, for both sides: the member in use SIGKILLed under a steady workload (the mirror
//! moves to the next member at once: the time from the kill to the next replicated key is
//! printed and bounded, nothing is lost, the trees end equal, the move is logged and in the
//! metrics), a follower still catching up when the mirror moves to it (not taken for a
//! restored source), every member down shorter and longer than --retry-timeout, and a
//! member of another cluster in the list (at start, and met after a move).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SRC: &str = "/p";
const DST: &str = "/replica";
const DST_TREE: &str = "/replica/p";

/// The failover the issue asks for is 2 s; the bound asserted has slack for a loaded test
/// machine, and is still far below the retry budget the kill tests give the mirror (30 s),
/// so a mirror that waited for the budget instead of moving would fail it.
const FAILOVER_BOUND: Duration = Duration::from_secs(4);

/// Which side of the mirror the 3-member cluster is on.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Source,
    Destination,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

/// A 3-member cluster on one side and a single server on the other.
struct Setup {
    side: Side,
    cluster: Cluster,
    single: Etcd,
}

impl Setup {
    fn start(tag: &str, side: Side) -> Setup {
        Setup {
            side,
            cluster: Cluster::start(&format!("{tag}-{}", side.name()), 3),
            single: Etcd::start(&format!("{tag}-single")),
        }
    }

    /// A client for writing on the source: the single server, or a healthy member.
    fn src(&self) -> &Client {
        match self.side {
            Side::Source => self.cluster.client(),
            Side::Destination => &self.single,
        }
    }

    /// A client for reading the destination (any healthy member: the cluster's members
    /// hold the same tree).
    fn dst(&self) -> &Client {
        match self.side {
            Side::Source => &self.single,
            Side::Destination => self.cluster.client(),
        }
    }

    /// SRC and DST for the mirror, the cluster's members in `order`.
    fn ends(&self, order: &[usize]) -> (String, String) {
        let list = self.cluster.urls(order);
        match self.side {
            Side::Source => (list, self.single.url.clone()),
            Side::Destination => (self.single.url.clone(), list),
        }
    }

    /// `--src-prefix /p` mirrored from the source's current index, with metrics on a free
    /// loopback port.
    fn mirror(&self, order: &[usize], extra: &[&str]) -> (Mirror, u16) {
        set_replication_index(self.dst(), DST, self.src().current_index());
        let (src, dst) = self.ends(order);
        start_with_metrics(extra, &src, &dst)
    }
}

/// Start the mirror with `args` and its metrics on a free loopback port (again with
/// another port when something else takes it first).
fn start_with_metrics(args: &[&str], src: &str, dst: &str) -> (Mirror, u16) {
    for _ in 0..10 {
        let port = free_port();
        let mut all: Vec<String> = ["--src-prefix", SRC, "--watch-timeout", "5"]
            .iter()
            .chain(args)
            .map(|s| s.to_string())
            .collect();
        all.extend(["--port".into(), port.to_string()]);
        all.extend(["--listen".into(), "127.0.0.1".into()]);
        all.extend([src.to_string(), dst.to_string()]);
        let mut m = Mirror::spawn(all);
        let ready = poll_until(Duration::from_secs(30), || {
            m.exited().is_some() || m.stderr().contains("Starting replication at")
        });
        match m.exited() {
            Some(2) if m.stderr().contains("--port") => continue,
            Some(code) => panic!("etcdmirror exited with {code}:\n{}", m.stderr()),
            None if ready => return (m, port),
            None => panic!("no `Starting replication at` within 30 s:\n{}", m.stderr()),
        }
    }
    panic!("no free metrics port after 10 tries");
}

/// The value of the exposition line that starts with `series ` (name and labels as the
/// mirror writes them), if the endpoint answers and has it.
fn metric(port: u16, series: &str) -> Option<f64> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Writes `/p/kNNNNN` (each key once) on the source every 20 ms until stopped.
struct Writer {
    /// The number of the next key to be written.
    next: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn key(n: u64) -> String {
    format!("{SRC}/k{n:05}")
}

impl Writer {
    fn start(src: &Client) -> Writer {
        let next = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s, src) = (next.clone(), stop.clone(), src.clone());
        let thread = std::thread::spawn(move || {
            let mut due = Instant::now();
            while !s.load(Ordering::SeqCst) {
                let i = n.load(Ordering::SeqCst);
                src.set(&key(i), &i.to_string());
                n.store(i + 1, Ordering::SeqCst);
                // Pacing a workload, not synchronisation.
                due += Duration::from_millis(20);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        });
        Writer {
            next,
            stop,
            thread: Some(thread),
        }
    }

    fn started(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    /// Stop and return the number of keys written.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("the writer failed");
        }
        self.started()
    }
}

/// SIGKILL member `victim` of the side's cluster while the mirror uses it under a steady
/// workload: replication goes on from the next member, within `FAILOVER_BOUND` of the kill,
/// and nothing is lost. Returns the time from the kill to the next replicated key.
fn kill_member_in_use(side: Side, victim_is_leader: bool) -> Duration {
    let mut s = Setup::start(
        if victim_is_leader {
            "kill-leader"
        } else {
            "kill-follower"
        },
        side,
    );
    // The member in use is the first of the list; the writer on a source cluster writes
    // through the leader, which stays up when the victim is a follower.
    let leader = s.cluster.leader();
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let order = if victim_is_leader {
        vec![leader, followers[0], followers[1]]
    } else {
        vec![followers[0], followers[1], leader]
    };
    let (victim, next) = (order[0], order[1]);
    let (victim_url, next_url) = (
        s.cluster.member(victim).url.clone(),
        s.cluster.member(next).url.clone(),
    );
    let (mut m, port) = s.mirror(&order, &["--retry-timeout", "30"]);
    m.wait_log(
        Duration::from_secs(10),
        &format!("{}: 3 members of cluster", side.name()),
    );
    let in_use = |url: &str| {
        format!(
            "etcdmirror_member_in_use{{side=\"{}\",url=\"{url}\"}}",
            side.name()
        )
    };
    assert_eq!(metric(port, &in_use(&victim_url)), Some(1.0));

    let writer_client = match side {
        Side::Source => s.cluster.member(leader).client.clone(),
        Side::Destination => s.single.client.clone(),
    };
    let dst_reader = match side {
        Side::Source => s.single.client.clone(),
        Side::Destination => s.cluster.member(order[2]).client.clone(),
    };
    let writer = Writer::start(&writer_client);
    let replicated = |n: u64| dst_reader.exists(&format!("{DST}{}", key(n)));
    m.wait_for(Duration::from_secs(20), "steady replication", || {
        replicated(10)
    });

    s.cluster.kill(victim);
    let killed = Instant::now();
    let first = writer.started();
    m.wait_for(
        Duration::from_secs(30),
        &format!("{} (written after the kill) replicated", key(first)),
        || replicated(first),
    );
    let failover = killed.elapsed();
    println!(
        "{} {}: from the SIGKILL of the member in use to the next replicated key: {} ms",
        side.name(),
        if victim_is_leader {
            "leader"
        } else {
            "follower"
        },
        failover.as_millis()
    );
    // The workload goes on a little after the move.
    let more = writer.started() + 25;
    m.wait_for(Duration::from_secs(20), "writes after the move", || {
        replicated(more)
    });
    let written = writer.stop();
    let (src, dst) = (s.src().clone(), s.dst().clone());
    m.wait_synced(&src, SRC, &dst, DST_TREE, DST, "the move");
    assert_eq!(
        rel_tree(&dst, DST_TREE).len() as u64,
        written,
        "every key written is on the destination"
    );

    // The next member, or (when the leader died and the next member still waited for it)
    // the one after.
    let log = m.stderr();
    assert!(
        log.contains(&format!("moving from member {victim_url} to {next_url}")),
        "the move is logged:\n{}",
        tail(&log, 20)
    );
    assert_eq!(metric(port, &in_use(&victim_url)), Some(0.0));
    let now: Vec<Option<f64>> = order[1..]
        .iter()
        .map(|&i| metric(port, &in_use(&s.cluster.member(i).url)))
        .collect();
    assert!(
        now.iter().flatten().sum::<f64>() == 1.0 && now.iter().all(Option::is_some),
        "exactly one other member in use: {now:?}"
    );
    let moves = metric(
        port,
        &format!("etcdmirror_member_moves_total{{side=\"{}\"}}", side.name()),
    );
    assert!(moves.is_some_and(|n| n >= 1.0), "moves: {moves:?}");
    assert!(
        failover < FAILOVER_BOUND,
        "replication resumed {} ms after the kill (bound {} ms)",
        failover.as_millis(),
        FAILOVER_BOUND.as_millis()
    );
    m.assert_alive("at the end");
    failover
}

#[test]
fn source_member_in_use_killed_replication_goes_on() {
    kill_member_in_use(Side::Source, false);
}

#[test]
fn destination_member_in_use_killed_replication_goes_on() {
    kill_member_in_use(Side::Destination, false);
}

/// The leader in use on the destination: its followers first have to notice and elect
/// another, and a request already forwarded to the dead leader hangs until etcd's own
/// request timeout unless the mirror cuts it short (the member check).
#[test]
fn destination_leader_in_use_killed_replication_goes_on() {
    kill_member_in_use(Side::Destination, true);
}

/// A follower that fell behind (frozen while the mirror replicated through another member)
/// becomes the member in use while it is still catching up: its first watch registration
/// would be below the mirror's index, which is how a restored source looks (without the
/// member check, this test stops with exit 3 "ahead of the source"). The quorum read the
/// mirror makes on a member before using it waits until the member has caught up, so the
/// mirror goes on.
#[test]
fn a_follower_still_catching_up_is_not_taken_for_a_restored_source() {
    let mut s = Setup::start("lagging", Side::Source);
    let leader = s.cluster.leader();
    let f: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let (mut m, _port) = s.mirror(&[f[0], f[1], leader], &["--retry-timeout", "30"]);
    let src = s.cluster.member(leader).client.clone();
    let dst = s.single.client.clone();
    src.set("/p/before", "x");
    m.wait_index(&dst, DST, src.current_index());

    let lagging = s.cluster.member(f[1]).pid().unwrap();
    send_signal(lagging, "STOP");
    for i in 0..300 {
        src.set(&format!("/p/while-frozen/k{i}"), &i.to_string());
    }
    // The mirror is at the source's index; the frozen follower is 300 entries behind.
    m.wait_index(&dst, DST, src.current_index());
    // The mirror moves to the frozen follower, whose answer waits until it runs again.
    s.cluster.kill(f[0]);
    m.wait_log(
        Duration::from_secs(10),
        &format!(
            "moving from member {} to {}",
            s.cluster.member(f[0]).url,
            s.cluster.member(f[1]).url
        ),
    );
    send_signal(lagging, "CONT");
    for i in 0..20 {
        src.set(&format!("/p/after/k{i}"), &i.to_string());
    }
    m.wait_synced(
        &src,
        SRC,
        &dst,
        DST_TREE,
        DST,
        "a move to a lagging follower",
    );
    let log = m.stderr();
    assert!(
        log.contains(&format!(
            "moving from member {}",
            s.cluster.member(f[0]).url
        )),
        "{}",
        tail(&log, 20)
    );
    assert!(!log.contains("ahead of the source"), "{}", tail(&log, 20));
}

/// Every member of the side's cluster killed for good: the mirror goes round them, backs
/// off between rounds, and exits 1 once no member has answered for --retry-timeout.
fn every_member_down_longer_than_the_budget(side: Side) {
    let mut s = Setup::start("all-down", side);
    let (mut m, _port) = s.mirror(&[0, 1, 2], &["--retry-timeout", "2"]);
    s.src().set("/p/before", "x");
    m.wait_index(s.dst(), DST, s.src().current_index());
    for i in 0..3 {
        s.cluster.kill(i);
    }
    let killed = Instant::now();
    if side == Side::Destination {
        // Something to write, so that the mirror needs the destination.
        s.single.set("/p/after", "x");
    }
    let code = m.wait_exit(Duration::from_secs(30));
    println!(
        "{}: every member down, exit {code} {} ms after the kill",
        side.name(),
        killed.elapsed().as_millis()
    );
    assert_eq!(code, 1, "{}", tail(&m.stderr(), 10));
    let log = m.stderr();
    assert!(
        log.contains(&format!("no member of the {}", side.name())),
        "{}",
        tail(&log, 10)
    );
}

#[test]
fn every_source_member_down_longer_than_the_budget_exits_1() {
    every_member_down_longer_than_the_budget(Side::Source);
}

#[test]
fn every_destination_member_down_longer_than_the_budget_exits_1() {
    every_member_down_longer_than_the_budget(Side::Destination);
}

/// Every member killed, then two of them (a quorum) started again well within
/// --retry-timeout: the mirror rides it out and goes on.
fn every_member_down_shorter_than_the_budget(side: Side) {
    let mut s = Setup::start("all-down-briefly", side);
    let (mut m, _port) = s.mirror(&[0, 1, 2], &["--retry-timeout", "20"]);
    s.src().set("/p/before", "x");
    m.wait_index(s.dst(), DST, s.src().current_index());
    for i in 0..3 {
        s.cluster.kill(i);
    }
    if side == Side::Destination {
        s.single.set("/p/during", "x");
    }
    s.cluster.restart(1);
    s.cluster.restart(2);
    s.src().set("/p/after", "x");
    let (src, dst) = (s.src().clone(), s.dst().clone());
    m.wait_synced(&src, SRC, &dst, DST_TREE, DST, "every member down briefly");
    assert!(
        m.stderr().contains("answered, retrying"),
        "{}",
        tail(&m.stderr(), 10)
    );
}

#[test]
fn every_source_member_down_shorter_than_the_budget_is_ridden_out() {
    every_member_down_shorter_than_the_budget(Side::Source);
}

#[test]
fn every_destination_member_down_shorter_than_the_budget_is_ridden_out() {
    every_member_down_shorter_than_the_budget(Side::Destination);
}

/// SRC and DST with `list` on the cluster's side.
fn ends_with(s: &Setup, list: &str) -> (String, String) {
    match s.side {
        Side::Source => (list.to_string(), s.single.url.clone()),
        Side::Destination => (s.single.url.clone(), list.to_string()),
    }
}

/// A member of another cluster second in the list: exit 2 at start, naming it, with
/// nothing written.
fn another_cluster_at_start(side: Side) {
    let s = Setup::start("other-at-start", side);
    let other = Etcd::start("other-cluster");
    set_replication_index(s.dst(), DST, s.src().current_index());
    let stored = replication_index(s.dst(), DST);
    let m0 = &s.cluster.member(0).url;
    let list = format!("{m0},{},{}", other.url, s.cluster.urls(&[1, 2]));
    let (src, dst) = ends_with(&s, &list);
    let mut m = Mirror::start(&["--src-prefix", SRC, "--retry-timeout", "5"], &src, &dst);
    assert_eq!(m.wait_exit(Duration::from_secs(30)), 2, "{}", m.stderr());
    let log = m.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("another cluster"))
        .unwrap_or_else(|| panic!("no line about another cluster:\n{log}"));
    assert!(line.contains(&other.url), "{line}");
    assert!(!line.contains(&format!("{} (cluster id", m0)), "{line}");
    assert_eq!(replication_index(s.dst(), DST), stored);
    assert!(
        tree(&other, "/").is_empty(),
        "nothing is written on the other cluster"
    );

    // One member of each cluster: no telling which is wrong, both are named.
    let (src, dst) = ends_with(&s, &format!("{m0},{}", other.url));
    let mut m = Mirror::start(&["--src-prefix", SRC], &src, &dst);
    assert_eq!(m.wait_exit(Duration::from_secs(30)), 2, "{}", m.stderr());
    let log = m.stderr();
    assert!(
        log.lines().any(|l| l.contains("different clusters")
            && l.contains(m0.as_str())
            && l.contains(&other.url)),
        "{log}"
    );
}

#[test]
fn a_source_member_of_another_cluster_exits_2_at_start() {
    another_cluster_at_start(Side::Source);
}

#[test]
fn a_destination_member_of_another_cluster_exits_2_at_start() {
    another_cluster_at_start(Side::Destination);
}

/// A member of another cluster that is down at start (so not checked then), met after a
/// move: the mirror stops with exit 2 naming it, before reading from it or writing to it.
fn another_cluster_after_a_move(side: Side) {
    let mut s = Setup::start("other-mid-run", side);
    let mut other = Etcd::start("other-cluster");
    other.set("/p/from-the-other-cluster", "must not be replicated");
    send_signal(other.pid(), "KILL");
    let list = format!(
        "{},{},{}",
        s.cluster.member(0).url,
        other.url,
        s.cluster.urls(&[1, 2])
    );
    set_replication_index(s.dst(), DST, s.src().current_index());
    let (src, dst) = ends_with(&s, &list);
    let mut m = Mirror::start(
        &[
            "--src-prefix",
            SRC,
            "--retry-timeout",
            "10",
            "--watch-timeout",
            "5",
        ],
        &src,
        &dst,
    );
    m.wait_log(Duration::from_secs(20), "Starting replication at");
    assert!(m
        .stderr()
        .contains(&format!("{} does not answer", other.url)));
    s.src().set("/p/before", "x");
    m.wait_index(s.dst(), DST, s.src().current_index());
    other.restart();
    s.cluster.kill(0);
    if side == Side::Destination {
        s.single.set("/p/after", "x");
    }
    assert_eq!(m.wait_exit(Duration::from_secs(30)), 2, "{}", m.stderr());
    let log = m.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("reports cluster id"))
        .unwrap_or_else(|| panic!("no line about the cluster id:\n{log}"));
    assert!(
        line.contains(&other.url) && line.contains("not a member"),
        "{line}"
    );
    let dst_client = s.dst().clone();
    assert!(!dst_client.exists("/replica/p/from-the-other-cluster"));
    assert!(!other.exists("/replica/p/after") && !other.exists("/__replication/replica"));
}

#[test]
fn a_source_member_of_another_cluster_met_after_a_move_exits_2() {
    another_cluster_after_a_move(Side::Source);
}

#[test]
fn a_destination_member_of_another_cluster_met_after_a_move_exits_2() {
    another_cluster_after_a_move(Side::Destination);
}
