//! Replication through a faulty network (issue 7), with the fault proxy between the mirror
//! and a real source: response bodies held back 0.2 s, 2 s and 10 s after their headers (at
//! start, during catch-up, live), a source 60 ms and 150 ms away each way, a stored index
//! ahead of the source (at start, and after the source is replaced mid-run), connection reuse
//! while idle, black holes longer and shorter than --retry-timeout (on the source and on the
//! destination), watch connections cut twice far apart, and dropped watch responses.
//! Throughout, the recorded index must never pass a write that did not arrive.

mod common;

use common::proxy::{Faults, Proxy, Side};
use common::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The mirrored source prefix, and the destination prefix it goes under.
const SRC: &str = "/p";
const DST: &str = "/replica";

/// Write `key` on the source; `check` then watches that the index does not pass it early.
fn write(pair: &Pair, check: &NoSkip, key: &str, value: &str) {
    let mi = pair.src.set(key, value).modified_index();
    check.expect(&format!("{DST}{key}"), mi);
}

/// Wait (up to `bound`) until the mirror has recorded the source's current index, then until
/// the trees are equal. Fails at once if the index ever passed a write that had not arrived.
#[track_caller]
fn synced(m: &mut Mirror, pair: &Pair, check: &NoSkip, bound: Duration, what: &str) {
    let target = pair.src.current_index();
    m.wait_for(bound, &format!("index {target} recorded ({what})"), || {
        check.assert_ok();
        replication_index(&pair.dst, DST).is_some_and(|i| i >= target)
    });
    poll_until(Duration::from_secs(10), || {
        check.assert_ok();
        rel_tree(&pair.src, SRC) == rel_tree(&pair.dst, "/replica/p")
    });
    check.assert_ok();
    m.wait_synced(&pair.src, SRC, &pair.dst, "/replica/p", DST, what);
}

/// A mirror of `SRC` whose stored index is the source's current one, watching through `proxy`.
fn mirror_from_now(pair: &Pair, proxy: &Proxy, args: &[&str]) -> Mirror {
    set_replication_index(&pair.dst, DST, pair.src.current_index());
    Mirror::start(args, &proxy.url(), &pair.dst.url)
}

/// Bodies held back `hold` after their headers: an event that waited for the start, a
/// catch-up over prefix and outside writes, live writes. Nothing is lost: silence after a
/// watch's headers is not proof that no event is coming.
fn held_body(hold: Duration) {
    let pair = Pair::start(&format!("held-{}ms", hold.as_millis()));
    let check = NoSkip::start(&pair.dst, DST);
    let proxy = Proxy::start_with(
        pair.src.addr(),
        Faults {
            hold_body: hold,
            ..Faults::default()
        },
    );
    // The default --watch-timeout (15 s): every hold here is shorter.
    let args = ["-d", "--src-prefix", SRC];
    // Every source response is held once, and catching up costs a response per event.
    let bound = Duration::from_secs(30) + hold * 10;

    set_replication_index(&pair.dst, DST, pair.src.current_index());
    write(&pair, &check, "/p/a", "written before the start");
    let mut m = Mirror::start(&args, &proxy.url(), &pair.dst.url);
    synced(&mut m, &pair, &check, bound, "an event waiting at start");

    let mut log = m.stderr();
    m.kill();
    for i in 0..3 {
        write(&pair, &check, &format!("/p/b{i}"), "written while stopped");
        if i < 2 {
            pair.src.set(&format!("/x/b{i}"), "outside the prefix");
        }
    }
    m = Mirror::start(&args, &proxy.url(), &pair.dst.url);
    synced(&mut m, &pair, &check, bound, "catching up");

    for i in 0..3 {
        write(&pair, &check, &format!("/p/c{i}"), "written live");
    }
    synced(&mut m, &pair, &check, bound, "live writes");
    log += &m.stderr();
    assert!(
        !log.contains("Skipping key /p/"),
        "a prefix key was skipped:\n{}",
        tail(&log, 30)
    );
}

#[test]
fn bodies_held_200ms_after_their_headers_lose_nothing() {
    held_body(Duration::from_millis(200));
}

#[test]
fn bodies_held_2s_after_their_headers_lose_nothing() {
    held_body(Duration::from_secs(2));
}

#[test]
fn bodies_held_10s_after_their_headers_lose_nothing() {
    held_body(Duration::from_secs(10));
}

/// A source `one_way` away each way (with some jitter): live writes, a catch-up after a stop,
/// and 1100 writes outside the idle prefix, which the recorded index must follow.
fn distance(one_way: Duration) {
    let pair = Pair::start(&format!("distance-{}ms", one_way.as_millis()));
    let check = NoSkip::start(&pair.dst, DST);
    let proxy = Proxy::start_with(
        pair.src.addr(),
        Faults {
            jitter: one_way / 5,
            ..Faults::delay(one_way)
        },
    );
    let args = ["-d", "--src-prefix", SRC, "--watch-timeout", "5"];
    let bound = Duration::from_secs(60);
    let mut m = mirror_from_now(&pair, &proxy, &args);
    m.wait_log(bound, "Starting replication at");
    for i in 0..5 {
        write(&pair, &check, &format!("/p/live{i}"), "written live");
    }
    synced(&mut m, &pair, &check, bound, "live writes at a distance");

    m.kill();
    for i in 0..5 {
        write(
            &pair,
            &check,
            &format!("/p/stopped{i}"),
            "written while stopped",
        );
    }
    m = Mirror::start(&args, &proxy.url(), &pair.dst.url);
    synced(&mut m, &pair, &check, bound, "catching up at a distance");

    // More than the source's 1000-event history, all outside the prefix: a restart must
    // still find the recorded index inside the window.
    let mut last = 0;
    for i in 0..1100 {
        last = pair
            .src
            .set(&format!("/x/k{}", i % 37), &i.to_string())
            .modified_index();
    }
    m.wait_for(
        bound,
        &format!("the recorded index to come within 100 of {last}"),
        || replication_index(&pair.dst, DST).is_some_and(|i| i + 100 >= last),
    );
    write(&pair, &check, "/p/after", "after 1100 outside writes");
    synced(
        &mut m,
        &pair,
        &check,
        bound,
        "a write after the outside burst",
    );
}

#[test]
fn a_source_60ms_away_each_way_is_mirrored() {
    distance(Duration::from_millis(60));
}

#[test]
fn a_source_150ms_away_each_way_is_mirrored() {
    distance(Duration::from_millis(150));
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
fn a_stored_index_ahead_of_the_source_stops_the_mirror_at_start() {
    let pair = Pair::start("ahead-at-start");
    let ahead = pair.src.current_index() + 1000;
    set_replication_index(&pair.dst, DST, ahead);
    let args = ["--src-prefix", SRC, "--watch-timeout", "5"];
    let mut m = Mirror::start(&args, &pair.src.url, &pair.dst.url);
    assert_eq!(m.wait_exit(Duration::from_secs(30)), 3);
    assert_says_ahead(&m);
    assert_eq!(replication_index(&pair.dst, DST), Some(ahead));
}

#[test]
fn a_source_replaced_mid_run_by_one_behind_the_stored_index_stops_the_mirror() {
    let pair = Pair::start("ahead-mid-run");
    let check = NoSkip::start(&pair.dst, DST);
    let proxy = Proxy::start_with(pair.src.addr(), Faults::default());
    let args = ["--src-prefix", SRC, "--watch-timeout", "5"];
    let mut m = mirror_from_now(&pair, &proxy, &args);
    for i in 0..30 {
        write(&pair, &check, &format!("/p/k{i}"), "before the switch");
    }
    synced(&mut m, &pair, &check, Duration::from_secs(30), "writes");
    let stored = replication_index(&pair.dst, DST).unwrap();

    let fresh = Etcd::start("ahead-mid-run-new");
    assert!(
        fresh.current_index() < stored,
        "the new source must be behind"
    );
    proxy.set_upstream(fresh.addr());
    proxy.set(Faults {
        reset: true,
        ..Faults::default()
    });
    proxy.set(Faults::default());
    assert_eq!(m.wait_exit(Duration::from_secs(60)), 3);
    assert_says_ahead(&m);
    assert_eq!(replication_index(&pair.dst, DST), Some(stored));
}

#[test]
fn an_idle_mirror_reuses_its_source_connections() {
    // With the default --watch-timeout: the mirror renews a quiet watch every 15 s (the old
    // pacer opened about two connections per second).
    const IDLE_SECS: u64 = 30;
    const WATCH_TIMEOUT_SECS: u64 = 15;
    let pair = Pair::start("idle-conns");
    let check = NoSkip::start(&pair.dst, DST);
    let proxy = Proxy::start_with(pair.src.addr(), Faults::default());
    let args = ["--src-prefix", SRC];
    let mut m = mirror_from_now(&pair, &proxy, &args);
    m.wait_log(Duration::from_secs(30), "Starting replication at");
    let before = proxy.conns.load(Ordering::SeqCst);
    m.stays_alive(Duration::from_secs(IDLE_SECS), "the idle period");
    let opened = proxy.conns.load(Ordering::SeqCst) - before;
    println!("{opened} source connections opened in {IDLE_SECS} s of idling");
    assert!(
        opened <= IDLE_SECS / WATCH_TIMEOUT_SECS + 2,
        "{opened} source connections opened in {IDLE_SECS} s with nothing to replicate"
    );
    // Still watching, not stuck.
    write(&pair, &check, "/p/after", "after idling");
    synced(
        &mut m,
        &pair,
        &check,
        Duration::from_secs(30),
        "after idling",
    );
}

/// The black-hole tests' mirror: short budgets.
const HOLE_ARGS: [&str; 6] = [
    "--src-prefix",
    SRC,
    "--retry-timeout",
    "5",
    "--watch-timeout",
    "5",
];

/// A mirror with the proxy in front of `side`, synced on one key, then the proxy turned into
/// a black hole: (the servers, the index check, the proxy, the mirror, its SRC and DST).
fn into_a_black_hole(tag: &str, side: Side) -> (Pair, NoSkip, Proxy, Mirror, [String; 2]) {
    let pair = Pair::start(&format!("{tag}-{side:?}"));
    let check = NoSkip::start(&pair.dst, DST);
    let (proxy, urls) = match side {
        Side::Source => {
            let p = Proxy::start_with(pair.src.addr(), Faults::default());
            let urls = [p.url(), pair.dst.url.clone()];
            (p, urls)
        }
        Side::Destination => {
            let p = Proxy::start_with(pair.dst.addr(), Faults::default());
            let urls = [pair.src.url.clone(), p.url()];
            (p, urls)
        }
    };
    set_replication_index(&pair.dst, DST, pair.src.current_index());
    let mut m = Mirror::start(&HOLE_ARGS, &urls[0], &urls[1]);
    write(&pair, &check, "/p/before", "before the black hole");
    synced(&mut m, &pair, &check, Duration::from_secs(30), "before");
    proxy.set(Faults {
        black_hole: true,
        ..Faults::default()
    });
    (pair, check, proxy, m, urls)
}

/// A black hole longer than --retry-timeout on `side`, with a write made in it: exit 1 (the
/// network, not an inconsistency), then a restart once it is gone replicates the write.
fn long_black_hole(side: Side) {
    let (pair, check, proxy, mut m, urls) = into_a_black_hole("black-hole-long", side);
    let started = Instant::now();
    write(&pair, &check, "/p/during", "during the black hole");
    assert_eq!(m.wait_exit(Duration::from_secs(90)), 1);
    eprintln!("exit 1 after {:?} in the black hole", started.elapsed());

    proxy.set(Faults::default());
    m = Mirror::start(&HOLE_ARGS, &urls[0], &urls[1]);
    synced(
        &mut m,
        &pair,
        &check,
        Duration::from_secs(30),
        "after the hole",
    );
}

#[test]
fn a_black_hole_longer_than_the_retry_timeout_ends_in_exit_1_and_loses_nothing() {
    long_black_hole(Side::Source);
}

#[test]
fn a_destination_black_hole_longer_than_the_retry_timeout_ends_in_exit_1_and_loses_nothing() {
    long_black_hole(Side::Destination);
}

/// A 2 s black hole on `side` is ridden out. On the source, only a write outside the
/// prefix happens in it: the proxy's black hole loses swallowed bytes for good (TCP would
/// retransmit them), so an event on an open stream could be lost whatever the mirror does.
/// On the destination, the writes (or their answers) swallowed are retried once silent for
/// --watch-timeout (5 s here).
fn short_black_hole(side: Side) {
    let (pair, check, proxy, mut m, _) = into_a_black_hole("black-hole-short", side);
    match side {
        Side::Source => drop(pair.src.set("/x/during", "outside the prefix")),
        Side::Destination => {
            for i in 0..3 {
                let key = format!("/p/during{i}");
                write(&pair, &check, &key, "during the black hole");
            }
        }
    }
    m.stays_alive(Duration::from_secs(2), "the 2 s black hole");
    proxy.set(Faults::default());
    for i in 0..3 {
        let key = format!("/p/after{i}");
        write(&pair, &check, &key, "after the black hole");
    }
    synced(
        &mut m,
        &pair,
        &check,
        Duration::from_secs(60),
        "after the hole",
    );
}

#[test]
fn a_black_hole_of_2s_is_ridden_out() {
    short_black_hole(Side::Source);
}

#[test]
fn a_destination_black_hole_of_2s_is_ridden_out() {
    short_black_hole(Side::Destination);
}

/// A quiet source whose watch connection is cut twice, the second time long after the first
/// (more than --retry-timeout of quiet in between): each cut gets the whole retry budget.
#[test]
fn watch_cuts_far_apart_each_get_the_whole_retry_budget() {
    let pair = Pair::start("cuts-apart");
    let check = NoSkip::start(&pair.dst, DST);
    let proxy = Proxy::start_with(pair.src.addr(), Faults::default());
    let mut m = mirror_from_now(&pair, &proxy, &HOLE_ARGS);
    write(&pair, &check, "/p/before", "before the cuts");
    synced(&mut m, &pair, &check, Duration::from_secs(30), "before");
    for _ in 0..2 {
        proxy.set(Faults {
            reset: true,
            ..Faults::default()
        });
        proxy.set(Faults::default());
        m.stays_alive(Duration::from_secs(12), "a quiet period");
    }
    write(&pair, &check, "/p/after", "after the cuts");
    synced(
        &mut m,
        &pair,
        &check,
        Duration::from_secs(30),
        "after the cuts",
    );
}

#[test]
fn dropped_watch_responses_are_retried_and_lose_nothing() {
    let drop_one_watch = || Faults {
        drop_responses: 1,
        drop_matching: "wait=true".into(),
        ..Faults::default()
    };
    let pair = Pair::start("dropped-watch");
    let check = NoSkip::start(&pair.dst, DST);
    let proxy = Proxy::start_with(pair.src.addr(), drop_one_watch());
    let args = ["-d", "--src-prefix", SRC, "--watch-timeout", "5"];
    let bound = Duration::from_secs(60);

    // The first watch, whose response would carry this event, gets no answer.
    set_replication_index(&pair.dst, DST, pair.src.current_index());
    write(&pair, &check, "/p/a", "written before the start");
    let mut m = Mirror::start(&args, &proxy.url(), &pair.dst.url);
    synced(
        &mut m,
        &pair,
        &check,
        bound,
        "the first watch's response dropped",
    );
    assert_eq!(
        proxy.faults().drop_responses,
        0,
        "no watch response was dropped"
    );

    // Mid-run: connections reset, and the next watch gets no answer.
    proxy.set(Faults {
        reset: true,
        ..Faults::default()
    });
    proxy.set(drop_one_watch());
    for i in 0..3 {
        write(&pair, &check, &format!("/p/b{i}"), "after the reset");
    }
    synced(
        &mut m,
        &pair,
        &check,
        bound,
        "a watch response dropped mid-run",
    );
    assert_eq!(
        proxy.faults().drop_responses,
        0,
        "no watch response was dropped"
    );
}
