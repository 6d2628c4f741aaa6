//! Verify that outlasts a graceful reload, on the simulator's virtual
//! clock: after a reload the daemon's old worker may still accept for a
//! moment, so verify passes only after `verify_consecutive` handshakes in a
//! row, spread over `verify_window_ms`, all present the expected leaf; any
//! other leaf in between restarts the count; the budget ends it. The same
//! rule decides `original_verified` after a rollback, and a restarted
//! process counts from zero.

mod common;

use std::sync::Mutex;

use certdeploy_core::driver::{self, Env, Verifier};
use certdeploy_core::testkit::*;
use certdeploy_core::*;
use common::*;

const NEW_KEY: &[u8] = b"-----BEGIN PRIVATE KEY-----\nNEW\n-----END PRIVATE KEY-----\n";

fn old_leaf() -> Digest {
    leaf_of(OLD_CERT)
}
fn new_leaf() -> Digest {
    leaf_of(NEW_CERT)
}

/// What one handshake is answered, given what the daemon serves after its
/// last reload: `Some(leaf)` stands for a handshake that reached a worker
/// still serving `leaf`; `None` for the daemon's own answer.
type Answer = Box<dyn FnMut(Digest) -> Option<Digest> + Send>;

/// A verifier in front of the simulated daemon whose answers a test scripts.
struct Graceful {
    inner: MemVerifier,
    answer: Mutex<Answer>,
}

impl Graceful {
    fn new(sim: &Sim, answer: impl FnMut(Digest) -> Option<Digest> + Send + 'static) -> Graceful {
        Graceful { inner: MemVerifier(sim.clone()), answer: Mutex::new(Box::new(answer)) }
    }
}

impl Verifier for Graceful {
    async fn served_leaf(&self, endpoint: &str, sni: Option<&str>) -> Result<Digest, String> {
        let real = self.inner.served_leaf(endpoint, sni).await?;
        let scripted = (self.answer.lock().unwrap())(real);
        Ok(scripted.unwrap_or(real))
    }
}

fn rig() -> Rig {
    let sim = Sim::new();
    {
        let mut w = sim.world();
        w.reload_commands.insert(RELOAD.to_string());
        w.served_path = Some(CERT.to_string());
        w.served = Some(old_leaf());
    }
    sim.put(CERT, OLD_CERT, 0o644);
    sim.put(KEY, OLD_KEY, 0o600);
    Rig::new(sim)
}

/// A plan with verify on and room in its budget for a restart of the count.
fn plan(id: &str, budget_ms: u64) -> (Plan, Payload) {
    let (mut plan, payload) = test_plan(id, NEW_CERT, NEW_KEY, None, false, true);
    plan.policy.verify_budget_ms = budget_ms;
    assert_eq!((plan.policy.verify_consecutive, plan.policy.verify_window_ms), (3, 1_000), "the defaults");
    (plan, payload)
}

fn deploy(rig: &Rig, v: &Graceful, plan: Plan, payload: &Payload) -> Report {
    let env =
        Env { host: &rig.host, verifier: v, journal: &rig.journal, clock: &rig.clock, cert_facts: fake_cert_facts };
    match block_on(driver::start(&env, plan, payload)).expect("driver") {
        Terminal::Finished(r) => r,
        Terminal::Abandoned(why) => panic!("abandoned: {why}"),
    }
}

fn meta(r: &Report, k: &str) -> String {
    r.metadata().get(k).cloned().unwrap_or_else(|| "<absent>".into())
}

/// (time, matched) of every handshake of `step`.
fn handshakes(rig: &Rig, id: &str, of: Step) -> Vec<(u64, bool)> {
    rig.sim
        .durable_records(id)
        .iter()
        .filter_map(|r| match &r.event {
            Event::Verified { step, matched, .. } if *step == of => Some((r.at.0, *matched)),
            _ => None,
        })
        .collect()
}

/// How many handshakes at the end matched in a row.
fn trailing_matches(h: &[(u64, bool)]) -> usize {
    h.iter().rev().take_while(|(_, m)| *m).count()
}

#[test]
fn passes_only_after_three_matches_spanning_the_window() {
    let rig = rig();
    let v = Graceful::new(&rig.sim, |_| None);
    let (p, payload) = plan("s-pass", 10_000);
    let r = deploy(&rig, &v, p, &payload);
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    let h = handshakes(&rig, "s-pass", Step::Verify);
    eprintln!("handshakes (ms, matched): {h:?}");
    assert_eq!(h.len(), 3, "three handshakes, not one: {h:?}");
    assert!(h.iter().all(|(_, m)| *m), "{h:?}");
    for w in h.windows(2) {
        assert!(w[1].0 - w[0].0 >= 500, "matches spaced by the window over two gaps: {h:?}");
    }
    assert!(h[2].0 - h[0].0 >= 1_000, "the matches span the window: {h:?}");
}

#[test]
fn more_handshakes_over_a_longer_window_when_configured() {
    let rig = rig();
    let v = Graceful::new(&rig.sim, |_| None);
    let (mut p, payload) = plan("s-five", 10_000);
    p.policy.verify_consecutive = 5;
    p.policy.verify_window_ms = 2_000;
    let r = deploy(&rig, &v, p, &payload);
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    let h = handshakes(&rig, "s-five", Step::Verify);
    assert_eq!(h.len(), 5, "{h:?}");
    assert!(h[4].0 - h[0].0 >= 2_000, "{h:?}");
}

#[test]
fn an_old_leaf_between_new_ones_restarts_the_count() {
    let rig = rig();
    // The third handshake reaches the old worker.
    let mut n = 0;
    let v = Graceful::new(&rig.sim, move |_| {
        n += 1;
        (n == 3).then(old_leaf)
    });
    let (p, payload) = plan("s-restart", 10_000);
    let r = deploy(&rig, &v, p, &payload);
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    let h = handshakes(&rig, "s-restart", Step::Verify);
    eprintln!("handshakes (ms, matched): {h:?}");
    let matched: Vec<bool> = h.iter().map(|(_, m)| *m).collect();
    assert_eq!(matched, [true, true, false, true, true, true], "three more matches after the old leaf");
    assert!(h[5].0 - h[3].0 >= 1_000, "the last three span the window: {h:?}");
}

#[test]
fn an_old_worker_that_keeps_answering_exhausts_the_budget_and_rolls_back() {
    let rig = rig();
    // Every third handshake to a daemon serving the new leaf gets the old one.
    let mut n = 0;
    let v = Graceful::new(&rig.sim, move |real| {
        if real != new_leaf() {
            return None;
        }
        n += 1;
        (n % 3 == 0).then(old_leaf)
    });
    let (p, payload) = plan("s-budget", 2_000);
    let r = deploy(&rig, &v, p, &payload);
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", r.message);
    assert_eq!(meta(&r, "failed_step"), "verify");
    let h = handshakes(&rig, "s-budget", Step::Verify);
    eprintln!("handshakes (ms, matched): {h:?}\n{}", r.message);
    assert!(h.iter().filter(|(_, m)| *m).count() >= 3, "matches enough, but never three in a row: {h:?}");
    let streak = trailing_matches(&h);
    let want = format!("{streak} in a row served the expected certificate (3 in a row over at least 1000 ms needed)");
    assert!(r.message.contains(&want), "the reason names the matches in a row ({want}): {}", r.message);
    assert!(r.message.contains(&format!("last mismatch: served certificate sha256:{}", old_leaf())), "{}", r.message);
    // Back on the original, which the daemon serves steadily again.
    assert_eq!(meta(&r, "original_verified"), "true");
    assert_eq!(rig.sim.get(CERT).map(|x| x.0), Some(OLD_CERT.to_vec()));
}

/// Verify always sees the old leaf (a worker that never took the new one),
/// so the deployment rolls back; then the check of the original runs with
/// `stale` deciding which of its handshakes meet a worker still serving the
/// new leaf.
fn rollback_with_original_check(id: &str, stale: impl Fn(u32) -> bool + Send + 'static) -> (Report, Vec<(u64, bool)>) {
    let rig = rig();
    let mut k = 0;
    let v = Graceful::new(&rig.sim, move |real| {
        if real == new_leaf() {
            return Some(old_leaf());
        }
        k += 1;
        stale(k).then(new_leaf)
    });
    let (p, payload) = plan(id, 5_000);
    let r = deploy(&rig, &v, p, &payload);
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", r.message);
    assert_eq!(meta(&r, "failed_step"), "verify");
    assert_eq!(rig.sim.world().exec_log, vec![RELOAD, RELOAD], "reload then retry-reload");
    let h = handshakes(&rig, id, Step::VerifyOriginal);
    eprintln!("verify_original handshakes (ms, matched): {h:?}");
    (r, h)
}

#[test]
fn original_verified_needs_the_same_run_of_matches() {
    let (r, h) = rollback_with_original_check("s-orig", |k| k == 3);
    assert_eq!(meta(&r, "original_verified"), "true");
    let matched: Vec<bool> = h.iter().map(|(_, m)| *m).collect();
    assert_eq!(matched, [true, true, false, true, true, true], "restarted after the new leaf was seen");
    assert!(h[5].0 - h[3].0 >= 1_000, "{h:?}");
}

#[test]
fn original_not_verified_when_the_run_never_completes() {
    let (r, h) = rollback_with_original_check("s-orig-no", |k| k % 3 == 0);
    assert_eq!(meta(&r, "original_verified"), "false", "{h:?}");
    assert!(h.iter().filter(|(_, m)| *m).count() >= 3, "matches enough, but never three in a row: {h:?}");
}

/// A process restarted during verify does not trust the matches its
/// predecessor journaled: it counts three fresh ones.
#[test]
fn a_restarted_process_counts_the_matches_from_zero() {
    let rig = rig();
    let v = Graceful::new(&rig.sim, |_| None);
    let (p, payload) = plan("s-crash", 10_000);
    assert_eq!(deploy(&rig, &v, p, &payload).outcome, Outcome::Deployed);
    let records = rig.sim.durable_records("s-crash");
    // Cut the journal right after the second match, as a crash would.
    let second = records
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r.event, Event::Verified { step: Step::Verify, matched: true, .. }))
        .nth(1)
        .map(|(i, _)| i)
        .expect("a second match");
    let mut d = Deployment::replay(&records[..=second]).expect("replay");
    let mut now = records[second].at.plus_ms(60_000);
    let mut fresh = 0;
    while d.phase_name() == "verify" {
        match d.next(now) {
            Next::Record(event) => d.apply(&Record { at: now, event }).expect("apply"),
            Next::Wait(t) => now = t,
            Next::Perform(Action::Verify { step, expected, .. }) => {
                fresh += 1;
                now = now.plus_ms(1);
                let event = Event::Verified { step, served: Some(expected), matched: true, error: None };
                d.apply(&Record { at: now, event }).expect("apply");
            }
            other => panic!("unexpected {other:?} in verify"),
        }
    }
    assert!(d.is_recovering());
    assert_eq!(d.phase_name(), "commit");
    assert_eq!(fresh, 3, "three fresh matches after the restart");
}
