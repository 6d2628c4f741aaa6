//! The retry schedules the README states, on the simulator's virtual
//! clock: transient step errors (1 s doubling to 60 s, full jitter, within
//! the deadline) and verify (0.2 s doubling within its budget).

use certdeploy_core::testkit::*;
use certdeploy_core::*;

const NEW_CERT: &[u8] = b"CERT new nb=200\nnew-body\n";
const NEW_KEY: &[u8] = b"-----BEGIN PRIVATE KEY-----\nNEW\n-----END PRIVATE KEY-----\n";

fn finished(t: Terminal) -> Report {
    match t {
        Terminal::Finished(r) => r,
        Terminal::Abandoned(why) => panic!("abandoned: {why}"),
    }
}

/// Times (virtual ms) of the records `pick` selects.
fn times(records: &[Record], pick: impl Fn(&Event) -> bool) -> Vec<u64> {
    records.iter().filter(|r| pick(&r.event)).map(|r| r.at.0).collect()
}

#[test]
fn transient_errors_back_off_from_1s_doubling_to_60s_with_full_jitter_until_the_deadline() {
    let sim = Sim::new();
    let rig = Rig::new(sim.clone());
    sim.fail_always(OpKind::Snapshot(Role::Cert), StepError::transient("connection refused"));
    let (plan, payload) = test_plan("backoff-1", NEW_CERT, NEW_KEY, None, false, false);
    let policy = plan.policy.clone();
    let report = finished(rig.deploy(plan, &payload).expect("no crash"));
    assert_eq!(report.outcome, Outcome::Failed, "{}", report.message);
    let records = sim.durable_records("backoff-1");
    let started = records[0].at.0;
    let attempts = times(&records, |e| matches!(e, Event::StepFailed { step: Step::Snapshot, .. }));
    let delays: Vec<u64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    let cap = |retry: usize| (policy.retry_initial_ms << retry.min(20)).min(policy.retry_max_ms);
    eprintln!("{} attempts, delays (ms): {delays:?}", attempts.len());
    for (k, d) in delays.iter().enumerate() {
        // Each simulated operation takes 1 ms of the virtual clock.
        assert!(*d <= cap(k) + 2, "retry {} waited {d} ms, more than {} ms", k + 1, cap(k));
    }
    assert_eq!(cap(0), 1_000, "the first retry waits at most 1 s");
    assert!(delays.iter().any(|d| *d > 32_000), "the delay never grew past 32 s: {delays:?}");
    // Full jitter: anywhere in [0, cap], so some waits are under half the cap.
    let short = delays.iter().enumerate().filter(|(k, d)| **d < cap(*k) / 2).count();
    assert!(short * 5 >= delays.len(), "only {short} of {} waits under half their cap: {delays:?}", delays.len());
    // Retried until the deadline, not beyond it.
    let last = *attempts.last().expect("attempts");
    assert!(last - started <= policy.deadline_ms, "an attempt after the deadline");
    assert!(last - started + policy.retry_max_ms > policy.deadline_ms, "gave up long before the deadline");
    assert_eq!(report.metadata().get("failed_step").map(String::as_str), Some("snapshot"));
}

#[test]
fn verify_retries_from_200ms_doubling_within_its_budget() {
    let sim = Sim::new();
    let rig = Rig::new(sim.clone());
    // Nothing is served: every verify attempt fails.
    let (plan, payload) = test_plan("verify-1", NEW_CERT, NEW_KEY, None, false, true);
    let policy = plan.policy.clone();
    let report = finished(rig.deploy(plan, &payload).expect("no crash"));
    assert_ne!(report.outcome, Outcome::Deployed, "{}", report.message);
    let attempts = times(&sim.durable_records("verify-1"), |e| matches!(e, Event::Verified { step: Step::Verify, .. }));
    let delays: Vec<u64> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("{} verify attempts, delays (ms): {delays:?}", attempts.len());
    assert!(delays.len() >= 3, "{delays:?}");
    for (k, d) in delays.iter().enumerate() {
        let want = policy.verify_initial_ms << k;
        // The simulated handshake itself takes 1 ms.
        assert!((want..=want + 2).contains(d), "verify retry {} after {d} ms, expected {want} ms", k + 1);
    }
    let spent = attempts.last().unwrap() - attempts[0];
    let next = policy.verify_initial_ms << delays.len();
    assert!(spent <= policy.verify_budget_ms, "verified after its budget: {spent} ms");
    assert!(spent + next > policy.verify_budget_ms, "gave up with budget left: {spent} ms + {next} ms");
}
