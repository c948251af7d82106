//! The checking logic on hand-made histories, so the checker cannot silently pass.

use crate::check::{DEGRADED_MAX_AGE_US, Judgement, check, judge_read};
use crate::history::{Attempt, Cred, EventOp, FaultKind, FaultOp, History, ReadOp, ViewKind};

const MS: u64 = 1_000;

fn event(id: u64, run: u32, revision: u64, t_change: u64, t_ack: Option<u64>) -> EventOp {
    EventOp {
        id,
        run,
        revision,
        t_change_us: t_change,
        t_ack_us: t_ack,
        instance: t_ack.map(|_| 0),
        attempts: vec![Attempt {
            instance: 0,
            start_us: t_change,
            end_us: t_ack.unwrap_or(t_change + MS),
            status: Some(if t_ack.is_some() { 200 } else { 503 }),
            ..Attempt::default()
        }],
        stream_id: None,
    }
}

fn read(cred: Cred, run: u32, start: u64, observed: u64, cache_status: &str) -> ReadOp {
    ReadOp {
        id: 0,
        reader: 0,
        instance: 1,
        cred: Some(cred),
        view: Some(ViewKind::Metrics),
        runs: vec![run],
        start_us: start,
        end_us: start + 5 * MS,
        status: Some(200),
        x_cache: "HIT".into(),
        cache_status: cache_status.into(),
        revisions: vec![(run, observed)],
        ..ReadOp::default()
    }
}

fn history(reads: Vec<ReadOp>, events: Vec<EventOp>) -> History {
    History {
        reads,
        events,
        faults: Vec::new(),
    }
}

/// Run 2 at revision 1 from 100 ms, acknowledged at 150 ms.
fn one_event() -> Vec<EventOp> {
    vec![event(0, 2, 1, 100 * MS, Some(150 * MS))]
}

#[test]
fn a_stale_read_after_the_ack_is_a_violation() {
    let h = history(
        vec![read(Cred::Alice, 2, 160 * MS, 0, "runcache; hit; ttl=2")],
        one_event(),
    );
    let r = check(&h);
    assert_eq!(r.count("stale"), 1, "{r:?}");
    let v = &r.violations[0];
    assert_eq!(v.event, Some(0));
    assert_eq!(v.lag_us, Some(10 * MS));
}

#[test]
fn a_stale_read_that_starts_before_the_ack_is_not() {
    // Starts while the event is in flight (after the change, before the ack).
    let h = history(
        vec![read(Cred::Alice, 2, 140 * MS, 0, "runcache; hit; ttl=2")],
        one_event(),
    );
    let r = check(&h);
    assert!(r.violations.is_empty(), "{r:?}");
    assert_eq!(r.checked_reads, 1);
}

#[test]
fn a_fresh_read_after_the_ack_is_fine_and_unacked_events_impose_nothing() {
    let mut events = one_event();
    // Revision 2 was written but never acknowledged.
    events.push(event(1, 2, 2, 200 * MS, None));
    let h = history(
        vec![
            read(Cred::Alice, 2, 300 * MS, 1, "runcache; hit; ttl=2"),
            read(
                Cred::Anonymous,
                2,
                400 * MS,
                2,
                "runcache; fwd=miss; stored",
            ),
        ],
        events,
    );
    let r = check(&h);
    // The unacknowledged attempt (a 503 in this history) is an event violation, nothing else.
    assert_eq!(r.count("stale"), 0, "{r:?}");
    assert_eq!(r.count("event"), 1, "{r:?}");
}

#[test]
fn a_memory_fallback_lag_within_the_bound_is_allowed_and_beyond_it_is_not() {
    let within = 150 * MS + DEGRADED_MAX_AGE_US - MS;
    let beyond = 150 * MS + DEGRADED_MAX_AGE_US + MS;
    let mem = "runcache; hit; ttl=1; detail=memory-fallback";
    let h = history(
        vec![
            read(Cred::Alice, 2, within, 0, mem),
            read(Cred::Alice, 2, beyond, 0, mem),
            // The same lag not served from memory: no allowance.
            read(Cred::Alice, 2, within, 0, "runcache; hit; ttl=1"),
        ],
        one_event(),
    );
    let r = check(&h);
    assert_eq!(r.allowed_lags.len(), 1, "{r:?}");
    assert_eq!(r.allowed_lags[0].read, 0);
    assert_eq!(r.count("stale"), 2, "{r:?}");
    assert!(r.violations.iter().all(|v| v.read != Some(0)));
}

#[test]
fn the_lag_counts_from_the_first_missed_invalidation() {
    // Revisions 1 (acked at 150 ms) and 2 (acked at 2.5 s); a memory read at 2.6 s still at 0
    // is 2.45 s behind the first: beyond the bound, though only 0.1 s behind the latest.
    let events = vec![
        event(0, 2, 1, 100 * MS, Some(150 * MS)),
        event(1, 2, 2, 2_400 * MS, Some(2_500 * MS)),
    ];
    let h = history(
        vec![read(
            Cred::Alice,
            2,
            2_600 * MS,
            0,
            "runcache; hit; ttl=1; detail=memory-fallback",
        )],
        events,
    );
    let r = check(&h);
    assert_eq!(r.count("stale"), 1, "{r:?}");
    assert_eq!(r.violations[0].event, Some(0));
    assert!(r.allowed_lags.is_empty());
}

#[test]
fn a_200_to_bob_on_a_refused_run_is_a_violation() {
    let h = history(
        vec![
            read(Cred::Bob, 3, 10 * MS, 0, "runcache; hit; ttl=2"),
            // Carol on a run the origin hides from her.
            read(Cred::Carol, 6, 10 * MS, 0, "runcache; hit; ttl=2"),
            // Bob on an even run and Carol on a run she may see: fine.
            read(Cred::Bob, 4, 10 * MS, 0, "runcache; hit; ttl=2"),
            read(Cred::Carol, 4, 10 * MS, 0, "runcache; hit; ttl=2"),
        ],
        Vec::new(),
    );
    let r = check(&h);
    assert_eq!(r.count("access"), 2, "{r:?}");
    let mut comparison = read(Cred::Bob, 2, 10 * MS, 0, "runcache; hit; ttl=2");
    comparison.view = Some(ViewKind::Comparison);
    comparison.runs = vec![2, 5];
    comparison.revisions = vec![(2, 0), (5, 0)];
    let r = check(&history(vec![comparison], Vec::new()));
    assert_eq!(
        r.count("access"),
        1,
        "a comparison including a refused run: {r:?}"
    );
}

#[test]
fn the_origins_own_refusal_is_excused_but_other_failures_are_not() {
    let mut refused = read(
        Cred::Bob,
        3,
        10 * MS,
        0,
        "runcache; fwd=miss; detail=refused",
    );
    refused.status = Some(403);
    refused.revisions.clear();
    refused.origin_body = true;
    let mut wrong = refused.clone();
    wrong.cred = Some(Cred::Alice);
    let mut timeout = refused.clone();
    timeout.cred = Some(Cred::Alice);
    timeout.status = Some(504);
    timeout.origin_body = false;
    timeout.error_code = Some("origin_timeout".into());
    let r = check(&history(vec![refused, wrong, timeout], Vec::new()));
    assert_eq!(r.count("failure"), 2, "{r:?}");
    assert_eq!(r.excused.values().sum::<usize>(), 1);
    assert!(r.failures.contains_key("504 origin_timeout"), "{r:?}");
}

#[test]
fn no_answer_is_excused_only_while_the_instance_restarts() {
    let mut lost = read(Cred::Alice, 2, 1_000 * MS, 0, "");
    lost.status = None;
    lost.revisions.clear();
    lost.connect_error = true;
    let mut h = history(vec![lost.clone()], Vec::new());
    h.faults.push(FaultOp {
        id: 0,
        kind: FaultKind::InstanceRestart,
        instance: Some(1),
        start_us: 990 * MS,
        end_us: 1_200 * MS,
        detail: String::new(),
    });
    let windows = vec![(1, 990 * MS, 1_200 * MS)];
    assert!(matches!(judge_read(&lost, &windows), Judgement::Excused(_)));
    assert!(check(&h).violations.is_empty());
    // A time-out is a hang, not a restart.
    let mut hung = lost.clone();
    hung.connect_error = false;
    hung.timed_out = true;
    assert!(matches!(
        judge_read(&hung, &windows),
        Judgement::Violation(_)
    ));
    // Another instance restarting excuses nothing.
    h.faults[0].instance = Some(0);
    assert_eq!(check(&h).count("failure"), 1);
}

#[test]
fn a_revision_seen_before_it_was_written_is_impossible() {
    let events = vec![event(0, 2, 1, 500 * MS, Some(550 * MS))];
    let h = history(
        vec![read(Cred::Alice, 2, 100 * MS, 1, "runcache; hit; ttl=2")],
        events,
    );
    assert_eq!(check(&h).count("impossible"), 1);
}

#[test]
fn a_200_body_for_the_wrong_request_is_a_violation() {
    let mut r = read(Cred::Alice, 2, 100 * MS, 0, "runcache; hit; ttl=2");
    r.error = Some("model_run_id \"5\" for run 2".into());
    assert_eq!(check(&history(vec![r], Vec::new())).count("bad-body"), 1);
}

#[test]
fn a_stream_event_never_applied_is_a_violation_unless_a_fault_could_lose_it() {
    let through_stream = EventOp {
        id: 0,
        run: 2,
        revision: 1,
        t_change_us: 100 * MS,
        t_ack_us: None,
        instance: None,
        attempts: Vec::new(),
        stream_id: Some("1-0".into()),
    };
    let mut h = history(Vec::new(), vec![through_stream]);
    let report = check(&h);
    assert_eq!(report.count("event"), 1, "{:?}", report.violations);
    h.faults.push(FaultOp {
        id: 0,
        kind: FaultKind::KillRestartEmpty,
        instance: None,
        start_us: 2_000 * MS,
        end_us: 3_000 * MS,
        detail: String::new(),
    });
    assert!(check(&h).violations.is_empty());
    // Applied: nothing to say.
    h.faults.clear();
    h.events[0].t_ack_us = Some(300 * MS);
    assert!(check(&h).violations.is_empty());
}

#[test]
fn a_poisoned_entry_not_dead_lettered_is_a_violation() {
    let poisoned = |detail: String| FaultOp {
        id: 0,
        kind: FaultKind::PoisonedStreamEntry,
        instance: None,
        start_us: 100 * MS,
        end_us: 10_100 * MS,
        detail,
    };
    let mut h = history(Vec::new(), Vec::new());
    h.faults.push(poisoned(format!(
        "{} entry 1-0",
        crate::stream::NOT_DEAD_LETTERED
    )));
    assert_eq!(check(&h).count("event"), 1);
    h.faults[0] = poisoned(format!("{} entry 1-0", crate::stream::DEAD_LETTERED));
    assert!(check(&h).violations.is_empty());
}

/// A 200 ranking read by `cred` of `listed` (run, observed revision), best first.
fn ranking_read(cred: Cred, start: u64, listed: &[(u32, u64)]) -> ReadOp {
    let mut r = read(
        cred,
        listed[0].0,
        start,
        listed[0].1,
        "runcache; hit; ttl=2",
    );
    r.view = Some(ViewKind::Ranking { id: 2 });
    r.runs = listed.iter().map(|(run, _)| *run).collect();
    r.revisions = listed.to_vec();
    r
}

#[test]
fn a_ranking_listing_a_run_older_than_an_acknowledged_invalidation_is_stale() {
    // Run 2 went to revision 1 (acknowledged at 150 ms). Rankings listing runs 4, 2 and 8:
    let h = history(
        vec![
            // run 2 still at 0, started after the ack: stale, although run 2 is not first;
            ranking_read(Cred::Alice, 160 * MS, &[(4, 0), (2, 0), (8, 0)]),
            // the same answer, started before the ack: allowed;
            ranking_read(Cred::Alice, 140 * MS, &[(4, 0), (2, 0), (8, 0)]),
            // run 2 at revision 1 after the ack: fresh.
            ranking_read(Cred::Anonymous, 170 * MS, &[(4, 0), (2, 1), (8, 0)]),
        ],
        one_event(),
    );
    let r = check(&h);
    assert_eq!(r.count("stale"), 1, "{r:?}");
    let v = &r.violations[0];
    assert_eq!(
        (v.read, v.event, v.lag_us),
        (Some(0), Some(0), Some(10 * MS))
    );
    assert!(v.note.starts_with("run 2: observed revision 0"), "{v:?}");
    assert_eq!(r.checked_by_view.get("ranking"), Some(&3));
    assert_eq!(r.checked_ranking_revisions, 9);
}

#[test]
fn a_ranking_served_to_a_credential_refused_one_of_its_runs_is_a_violation() {
    // Bob is refused odd runs: a ranking listing run 5 is refused to him as a whole.
    let h = history(
        vec![
            ranking_read(Cred::Bob, 10 * MS, &[(2, 0), (5, 0), (8, 0)]),
            ranking_read(Cred::Bob, 10 * MS, &[(2, 0), (4, 0), (8, 0)]),
        ],
        Vec::new(),
    );
    let r = check(&h);
    assert_eq!(r.count("access"), 1, "{r:?}");
    assert_eq!(r.violations[0].read, Some(0));
}

#[test]
fn a_ranking_answer_is_read_as_one_revision_per_listed_run() {
    let blank = || {
        let mut op = ranking_read(Cred::Alice, 10 * MS, &[(4, 0), (2, 0), (8, 0)]);
        op.revisions.clear();
        op
    };
    let mut op = blank();
    crate::workload::interpret(
        &mut op,
        br#"{"ranking_id": "2", "runs": [{"model_run_id": "4", "revision": 3},
            {"model_run_id": "2", "revision": 7}, {"model_run_id": "8", "revision": 0}]}"#,
    );
    assert_eq!(op.error, None);
    assert_eq!(op.revisions, vec![(4, 3), (2, 7), (8, 0)]);
    // Another list of runs (here: one missing) is a bad body, and no revision is recorded.
    let mut op = blank();
    crate::workload::interpret(
        &mut op,
        br#"{"ranking_id": "2", "runs": [{"model_run_id": "4", "revision": 3},
            {"model_run_id": "8", "revision": 0}]}"#,
    );
    assert!(op.error.is_some() && op.revisions.is_empty(), "{op:?}");
    assert_eq!(check(&history(vec![op], Vec::new())).count("bad-body"), 1);
}

#[test]
fn rankings_list_three_to_five_distinct_runs_and_the_first_is_open_to_everyone() {
    for seed in 0..50 {
        let mut rng = crate::rng::Rng::derive(seed, crate::rng::STREAM_SETUP, 0);
        let rankings = crate::workload::plan_rankings(&mut rng, 8, 4);
        assert_eq!(rankings.len(), 4);
        for (i, runs) in rankings.iter().enumerate() {
            let mut distinct = runs.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), runs.len(), "{rankings:?}");
            assert!(runs.iter().all(|r| (1..=8).contains(r)), "{rankings:?}");
            assert!(
                (3..=5).contains(&runs.len()),
                "ranking {} of seed {seed}: {runs:?}",
                i + 1
            );
            if i == 0 {
                // Only 3 of the 8 runs are open to every credential (2, 4, 8).
                assert!(
                    Cred::ALL.iter().all(|c| c.refusal_of(runs).is_none()),
                    "{runs:?}"
                );
            }
        }
    }
}
