//! etcd v3 support (issue 10) through a faulty network, on real etcd 3.4, with the fault proxy
//! between the mirror and a v3 source or a v3 destination (and a v2 source mirrored into v3,
//! for held bodies and distance): response bodies held back 0.2 s, 2 s and 10 s after their
//! headers (at start, catching up, live), a source 60 ms and 150 ms away each way with
//! jitter, revisions outside the prefix moving a quiet mirror's index at a distance, black
//! holes shorter and longer than --retry-timeout on either side, a dropped watch answer,
//! watch connections cut twice far apart, connection reuse while idle, and a stored revision
//! ahead of the source (at start, and after the source is replaced mid-run). The same faults
//! on a v2 source into v2 are tests/network.rs's.

#[macro_use]
mod common;

use common::proxy::{Faults, Proxy, Side};
use common::v3::{Mode, Setup, SRC};
use common::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Write `n` keys `{tag}{i}` under the mirrored prefix, with the mode's API.
fn writes(s: &Setup, tag: &str, n: usize) {
    for i in 0..n {
        s.src_put(&format!("{SRC}/{tag}{i}"), &format!("{tag} {i}"));
    }
}

/// A write outside the mirrored prefix: it moves the source's index, not the replica.
fn outside(s: &Setup, key: &str, value: &str) {
    match s.mode {
        Mode::V2ToV3 => drop(s.src.set(&format!("/x/{key}"), value)),
        Mode::V3ToV3 => drop(s.s3.put(&format!("/x/{key}"), value)),
    }
}

/// Store the source's current index, then start a mirror with `extra` reading the source
/// from `src_url` and writing to `dst_url`.
fn mirror_from_now(s: &Setup, extra: &[&str], src_url: &str, dst_url: &str) -> Mirror {
    s.set_index_now();
    Mirror::start(&s.args(extra), src_url, dst_url)
}

/// Source bodies (the watch's and the reads') held back `hold` after their headers: an
/// event that waited for the start, a catch-up after a kill over prefix and outside writes,
/// live writes. Silence after a watch's headers is not proof that no event is coming.
fn held_source_bodies(mode: Mode, hold: Duration) {
    let s = Setup::start(&format!("v3-held-{}ms", hold.as_millis()), mode);
    let proxy = Proxy::start_with(
        s.src.addr(),
        Faults {
            hold_body: hold,
            ..Faults::default()
        },
    );
    // The default --watch-timeout (15 s): every hold here is shorter.
    let args = ["-d"];
    let bound = Duration::from_secs(30) + hold * 10;

    s.set_index_now();
    writes(&s, "a", 1);
    let mut m = Mirror::start(&s.args(&args), &proxy.url(), &s.dst.url);
    s.synced(&mut m, bound, "an event waiting at start");

    m.kill();
    writes(&s, "b", 3);
    outside(&s, "b", "outside the prefix");
    m = Mirror::start(&s.args(&args), &proxy.url(), &s.dst.url);
    s.synced(&mut m, bound, "catching up");

    writes(&s, "c", 3);
    s.synced(&mut m, bound, "live writes");
}

#[test]
fn v3_source_bodies_held_200ms_after_their_headers_lose_nothing() {
    held_source_bodies(Mode::V3ToV3, Duration::from_millis(200));
}

#[test]
fn v3_source_bodies_held_2s_after_their_headers_lose_nothing() {
    held_source_bodies(Mode::V3ToV3, Duration::from_secs(2));
}

#[test]
fn v2_source_bodies_held_2s_after_their_headers_lose_nothing_in_v3() {
    held_source_bodies(Mode::V2ToV3, Duration::from_secs(2));
}

#[test]
fn v3_source_bodies_held_10s_after_their_headers_lose_nothing() {
    held_source_bodies(Mode::V3ToV3, Duration::from_secs(10));
}

/// Transaction answers from the v3 destination held back 2 s after their headers, in both
/// modes: each one is waited for, none is taken for a failure.
fn held_destination_bodies(mode: Mode) {
    let s = Setup::start("v3-dst-held", mode);
    let proxy = Proxy::start_with(
        s.dst.addr(),
        Faults {
            hold_body: Duration::from_secs(2),
            ..Faults::default()
        },
    );
    let mut m = mirror_from_now(&s, &["-d"], &s.src.url, &proxy.url());
    writes(&s, "k", 5);
    s.synced(&mut m, Duration::from_secs(90), "answers held 2 s");
    writes(&s, "again", 3);
    s.synced(&mut m, Duration::from_secs(90), "more answers held 2 s");
}

both_modes!(
    destination_answers_held_2s_lose_nothing,
    held_destination_bodies
);

/// A source `one_way` away each way (with jitter), and the v3 destination a tenth of that:
/// live writes, a catch-up after a kill, then 1100 revisions (v2: events) outside the quiet
/// prefix, which the stored index must follow (for v3, the quiet proof at a distance), and a
/// write after them.
fn distance(mode: Mode, one_way: Duration) {
    let s = Setup::start(&format!("v3-distance-{}ms", one_way.as_millis()), mode);
    let faults = |d: Duration| Faults {
        jitter: d / 5,
        ..Faults::delay(d)
    };
    let src = Proxy::start_with(s.src.addr(), faults(one_way));
    let dst = Proxy::start_with(s.dst.addr(), faults(one_way / 10));
    let args = ["-d", "--watch-timeout", "5"];
    let bound = Duration::from_secs(60);
    let mut m = mirror_from_now(&s, &args, &src.url(), &dst.url());
    m.wait_log(bound, "Starting replication into v3 at");
    writes(&s, "live", 5);
    s.synced(&mut m, bound, "live writes at a distance");

    m.kill();
    writes(&s, "stopped", 5);
    m = Mirror::start(&s.args(&args), &src.url(), &dst.url());
    s.synced(&mut m, bound, "catching up at a distance");

    for i in 0..1100 {
        outside(&s, &format!("k{}", i % 37), &i.to_string());
    }
    let last = s.src_index();
    m.wait_for(
        bound,
        &format!("the stored index to reach {last} (the prefix is quiet)"),
        || s.stored().is_some_and(|i| i >= last),
    );
    writes(&s, "after", 1);
    s.synced(&mut m, bound, "a write after the outside revisions");
}

#[test]
fn a_v3_source_60ms_away_each_way_is_mirrored() {
    distance(Mode::V3ToV3, Duration::from_millis(60));
}

#[test]
fn a_v3_source_150ms_away_each_way_is_mirrored() {
    distance(Mode::V3ToV3, Duration::from_millis(150));
}

#[test]
fn a_v2_source_60ms_away_each_way_is_mirrored_into_v3() {
    distance(Mode::V2ToV3, Duration::from_millis(60));
}

/// Short budgets for the black-hole tests.
const HOLE: [&str; 4] = ["--retry-timeout", "5", "--watch-timeout", "5"];

/// A mirror (v3 to v3) with the proxy in front of `side`, synced on one key.
fn proxied(tag: &str, side: Side) -> (Setup, Proxy, Mirror, String, String) {
    let s = Setup::start(tag, Mode::V3ToV3);
    let (src, dst) = (s.src.url.clone(), s.dst.url.clone());
    let (proxy, src, dst) = match side {
        Side::Source => {
            let p = Proxy::start_with(s.src.addr(), Faults::default());
            let url = p.url();
            (p, url, dst)
        }
        Side::Destination => {
            let p = Proxy::start_with(s.dst.addr(), Faults::default());
            let url = p.url();
            (p, src, url)
        }
    };
    let mut m = mirror_from_now(&s, &HOLE, &src, &dst);
    writes(&s, "before", 1);
    s.synced(&mut m, Duration::from_secs(30), "before the black hole");
    (s, proxy, m, src, dst)
}

fn black_hole() -> Faults {
    Faults {
        black_hole: true,
        ..Faults::default()
    }
}

/// A black hole longer than --retry-timeout on `side`: exit 1 (the network, not an
/// inconsistency), then a restart once it is gone replicates what was written meanwhile.
fn long_black_hole(side: Side) {
    let (s, proxy, mut m, src, dst) = proxied(&format!("v3-hole-long-{side:?}"), side);
    proxy.set(black_hole());
    let started = Instant::now();
    if let Side::Destination = side {
        writes(&s, "during", 3);
    }
    assert_eq!(
        m.wait_exit(Duration::from_secs(90)),
        1,
        "{}",
        tail(&m.stderr(), 20)
    );
    eprintln!("exit 1 after {:?} in the black hole", started.elapsed());
    writes(&s, "stopped", 3);

    proxy.set(Faults::default());
    m = Mirror::start(&s.args(&HOLE), &src, &dst);
    s.synced(&mut m, Duration::from_secs(30), "after the black hole");
}

#[test]
fn a_v3_source_black_hole_longer_than_the_retry_timeout_ends_in_exit_1_and_loses_nothing() {
    long_black_hole(Side::Source);
}

#[test]
fn a_v3_destination_black_hole_longer_than_the_retry_timeout_ends_in_exit_1_and_loses_nothing() {
    long_black_hole(Side::Destination);
}

/// A 2 s black hole on `side` is ridden out. On the source, only revisions outside the
/// prefix happen during it: the proxy's black hole loses the swallowed bytes for good (TCP
/// would retransmit them), so an event on an open stream could be lost whatever the mirror
/// does. On the destination, the writes made during it are retried.
fn short_black_hole(side: Side) {
    let (s, proxy, mut m, _, _) = proxied(&format!("v3-hole-short-{side:?}"), side);
    proxy.set(black_hole());
    match side {
        Side::Source => outside(&s, "during", "outside the prefix"),
        Side::Destination => writes(&s, "during", 3),
    }
    m.stays_alive(Duration::from_secs(2), "the 2 s black hole");
    proxy.set(Faults::default());
    writes(&s, "after", 3);
    s.synced(&mut m, Duration::from_secs(60), "after the black hole");
}

#[test]
fn a_v3_source_black_hole_of_2s_is_ridden_out() {
    short_black_hole(Side::Source);
}

#[test]
fn a_v3_destination_black_hole_of_2s_is_ridden_out() {
    short_black_hole(Side::Destination);
}

#[test]
fn a_dropped_v3_watch_answer_is_retried_and_loses_nothing() {
    let s = Setup::start("v3-dropped-watch", Mode::V3ToV3);
    let proxy = Proxy::start_with(
        s.src.addr(),
        Faults {
            drop_responses: 1,
            drop_matching: "/v3/watch".into(),
            ..Faults::default()
        },
    );
    let args = ["-d", "--watch-timeout", "5"];
    s.set_index_now();
    writes(&s, "a", 1);
    // The first watch, whose stream would carry this event, gets no answer at all.
    let mut m = Mirror::start(&s.args(&args), &proxy.url(), &s.dst.url);
    s.synced(
        &mut m,
        Duration::from_secs(60),
        "the first watch unanswered",
    );
    writes(&s, "b", 3);
    s.synced(&mut m, Duration::from_secs(60), "live writes after it");
}

#[test]
fn an_idle_v3_mirror_reuses_its_source_connections() {
    // The default --watch-timeout: a quiet watch is renewed every 15 s, and its quiet proof
    // (three small reads) goes over pooled connections; measured: 1 new connection in 30 s.
    const IDLE_SECS: u64 = 30;
    const WATCH_TIMEOUT_SECS: u64 = 15;
    let s = Setup::start("v3-idle-conns", Mode::V3ToV3);
    let proxy = Proxy::start_with(s.src.addr(), Faults::default());
    let mut m = mirror_from_now(&s, &[], &proxy.url(), &s.dst.url);
    m.wait_log(Duration::from_secs(30), "Starting replication into v3 at");
    let before = proxy.conns.load(Ordering::SeqCst);
    m.stays_alive(Duration::from_secs(IDLE_SECS), "the idle period");
    let opened = proxy.conns.load(Ordering::SeqCst) - before;
    println!("{opened} source connections opened in {IDLE_SECS} s of idling");
    assert!(
        opened <= IDLE_SECS / WATCH_TIMEOUT_SECS + 2,
        "{opened} source connections opened in {IDLE_SECS} s with nothing to replicate"
    );
    writes(&s, "after", 1);
    s.synced(&mut m, Duration::from_secs(30), "after idling");
}

#[track_caller]
fn assert_says_ahead(m: &Mirror) {
    let log = m.stderr();
    assert!(
        log.contains("ahead of the source") && log.contains("--reload --dry-run"),
        "the message must say the index is ahead of the source and suggest \
         --reload --dry-run:\n{}",
        tail(&log, 10)
    );
}

#[test]
fn a_stored_revision_ahead_of_the_v3_source_stops_the_mirror_at_start() {
    let s = Setup::start("v3-ahead-at-start", Mode::V3ToV3);
    let ahead = s.src_index() + 1000;
    s.d3.put(&index_key("/replica"), &ahead.to_string());
    let mut m = s.mirror(&["--watch-timeout", "5"], &s.dst.url);
    assert_eq!(m.wait_exit(Duration::from_secs(30)), 3);
    assert_says_ahead(&m);
    assert_eq!(s.stored(), Some(ahead), "the index was left as it was");
}

/// The source behind the proxy replaced mid-run by a fresh cluster whose revision is below
/// the stored one (a source rebuilt from nothing): exit 3, the index left as it was.
#[test]
fn a_v3_source_replaced_mid_run_by_one_behind_the_stored_revision_stops_the_mirror() {
    let s = Setup::start("v3-ahead-mid-run", Mode::V3ToV3);
    let proxy = Proxy::start_with(s.src.addr(), Faults::default());
    let args = ["--watch-timeout", "5"];
    let mut m = mirror_from_now(&s, &args, &proxy.url(), &s.dst.url);
    writes(&s, "k", 30);
    s.synced(&mut m, Duration::from_secs(30), "writes");
    let stored = s.stored().expect("an index");

    let fresh = Etcd::start("v3-ahead-mid-run-new");
    let fresh3 = common::v3::V3::new(&fresh.url);
    assert!(fresh3.revision() < stored, "the new source must be behind");
    proxy.set_upstream(fresh.addr());
    proxy.set(Faults {
        reset: true,
        ..Faults::default()
    });
    proxy.set(Faults::default());
    assert_eq!(m.wait_exit(Duration::from_secs(60)), 3);
    assert_says_ahead(&m);
    assert_eq!(s.stored(), Some(stored), "the index was left as it was");
}

/// A quiet v3 source whose watch connection is cut twice, the second time long after the
/// first (more than --retry-timeout of quiet in between): each cut is a fresh fault with its
/// own retry budget, not the continuation of the first.
#[test]
fn v3_watch_cuts_far_apart_each_get_the_whole_retry_budget() {
    let s = Setup::start("v3-cuts-apart", Mode::V3ToV3);
    let proxy = Proxy::start_with(s.src.addr(), Faults::default());
    let mut m = mirror_from_now(&s, &HOLE, &proxy.url(), &s.dst.url);
    writes(&s, "before", 1);
    s.synced(&mut m, Duration::from_secs(30), "before the cuts");
    let cut = || {
        proxy.set(Faults {
            reset: true,
            ..Faults::default()
        });
        proxy.set(Faults::default());
    };
    // No event in between: only the quiet renewals show the source answering.
    for _ in 0..2 {
        cut();
        // Quiet for longer than --retry-timeout (5 s) plus a renewal (--watch-timeout 5 s).
        m.stays_alive(Duration::from_secs(12), "a quiet period");
    }
    writes(&s, "after", 2);
    s.synced(&mut m, Duration::from_secs(30), "after the cuts");
}
