//! A group's fan-out under property tests, with crashes anywhere.
//!
//! A driver loop like the runtime's folds the group's durable records,
//! asks [`Group::next`] and acts: journals a wave's start, runs members
//! (a fake child journal: a finished child id returns its report, an
//! interrupted one is rolled back and runs again), reverts (a fake revert
//! journal, idempotent likewise), ends, publishes. A schedule of crashes
//! stops the driver between any two of its actions (also inside a child's
//! deployment); a restart folds what is on disk and goes on.
//!
//! Properties, for random groups, waves, budgets, member outcomes, revert
//! outcomes and crash schedules:
//! - every prefix of the records folds without error, and a restart at a
//!   prefix decides exactly what the run decided there before;
//! - no member is deployed twice, and no member of a never-started wave
//!   is touched;
//! - a wave starts only when every member of every earlier wave ended;
//! - every published copy of the group result is identical, and equal to
//!   the crash-free run's; its outcome is the one the rules give
//!   (computed independently here);
//! - `reverted` only when every deployed member's revert succeeded.

// Members are indexes into several per-member vectors at once.
#![allow(clippy::needless_range_loop)]

use std::collections::{BTreeMap, HashMap};

use certdeploy_core::group::*;
use certdeploy_core::{Outcome, Report, Timestamp};
use proptest::prelude::*;

const T: Timestamp = Timestamp(1_800_000_000_000);

#[derive(Clone, Debug)]
enum Child {
    InFlight,
    Finished(Report),
}

#[derive(Clone, Debug)]
struct Scenario {
    spec: GroupSpec,
    /// Per member: what its deployment ends with.
    outcomes: Vec<Outcome>,
    /// Per member: whether its revert succeeds.
    revert_ok: Vec<bool>,
}

#[derive(Default)]
struct World {
    durable: Vec<GroupRecord>,
    children: HashMap<usize, Child>,
    /// Per member: deployments that ended `deployed` and stayed.
    deploys: HashMap<usize, u32>,
    /// Per member: revert journal (its outcome once it ended).
    revert_journal: HashMap<usize, String>,
    revert_effects: HashMap<usize, u32>,
    published: Vec<GroupResult>,
    child_results: Vec<Report>,
    /// Per records length: the decision taken after folding that prefix.
    decisions: HashMap<usize, Next>,
    /// Actions done (a crash schedule counts these).
    ticks: u64,
}

impl World {
    fn append(&mut self, event: GroupEvent) {
        self.durable.push(GroupRecord { at: T, event });
    }
}

/// Stops the driver at the scheduled ticks.
struct Crashes {
    at: Vec<u64>,
}

impl Crashes {
    /// True: crash now.
    fn tick(&mut self, w: &mut World) -> bool {
        w.ticks += 1;
        self.at.contains(&w.ticks)
    }
}

fn report(s: &Scenario, i: usize, o: Outcome) -> Report {
    let m = &s.spec.members[i];
    let mut r = Report::lock_failed(&s.spec.child_id(m), m, "h", format!("{o}"), T);
    r.outcome = o;
    r
}

/// A member's child deployment as the runtime runs it: a finished id
/// returns its report; an interrupted one was rolled back (the host as
/// before) and runs afresh. `None`: crashed inside it.
fn run_child(s: &Scenario, w: &mut World, c: &mut Crashes, i: usize) -> Option<Report> {
    if let Some(Child::Finished(r)) = w.children.get(&i) {
        return Some(r.clone());
    }
    w.children.insert(i, Child::InFlight);
    if c.tick(w) {
        return None;
    }
    let o = s.outcomes[i];
    if o == Outcome::Deployed {
        *w.deploys.entry(i).or_default() += 1;
    }
    let r = report(s, i, o);
    w.children.insert(i, Child::Finished(r.clone()));
    Some(r)
}

/// A revert as its own journaled operation: done once, then its outcome.
fn run_revert(s: &Scenario, w: &mut World, c: &mut Crashes, i: usize) -> Option<String> {
    if let Some(o) = w.revert_journal.get(&i) {
        return Some(o.clone());
    }
    if c.tick(w) {
        return None;
    }
    let o = if s.revert_ok[i] { REVERTED.to_string() } else { "failed".to_string() };
    if s.revert_ok[i] {
        *w.revert_effects.entry(i).or_default() += 1;
    }
    w.revert_journal.insert(i, o.clone());
    Some(o)
}

/// The runtime's loop, until done (true) or a crash (false).
fn drive(s: &Scenario, w: &mut World, c: &mut Crashes) -> bool {
    loop {
        let g = Group::fold(&w.durable).expect("the records fold");
        // Results of members that ended before a crash, not yet published.
        let unpublished = g.unpublished_children();
        if !unpublished.is_empty() {
            if c.tick(w) {
                return false;
            }
            let members = unpublished.iter().map(|&i| s.spec.members[i].clone()).collect();
            w.child_results.extend(unpublished.iter().map(|i| g.ended[i].clone()));
            w.append(GroupEvent::ChildrenPublished { members });
            continue;
        }
        let next = g.next();
        match w.decisions.get(&w.durable.len()) {
            Some(before) => assert_eq!(before, &next, "a restart decides otherwise at record {}", w.durable.len()),
            None => {
                w.decisions.insert(w.durable.len(), next.clone());
            }
        }
        match next {
            Next::Done => return true,
            Next::StartWave(k) => {
                if c.tick(w) {
                    return false;
                }
                w.append(GroupEvent::WaveStarted { wave: k });
            }
            Next::Run(members) => {
                // Members of a wave end in any order: last first here.
                for i in members.into_iter().rev() {
                    let Some(r) = run_child(s, w, c, i) else { return false };
                    if c.tick(w) {
                        return false;
                    }
                    let member = s.spec.members[i].clone();
                    w.append(GroupEvent::MemberEnded { member: member.clone(), report: r.clone() });
                    if c.tick(w) {
                        return false;
                    }
                    w.child_results.push(r);
                    w.append(GroupEvent::ChildrenPublished { members: vec![member] });
                }
            }
            Next::StartRevert => {
                if c.tick(w) {
                    return false;
                }
                w.append(GroupEvent::RevertStarted);
            }
            Next::Revert(members) => {
                for i in members {
                    let Some(outcome) = run_revert(s, w, c, i) else { return false };
                    if c.tick(w) {
                        return false;
                    }
                    let member = s.spec.members[i].clone();
                    w.append(GroupEvent::RevertEnded { member, outcome, message: String::new() });
                }
            }
            Next::End => {
                if c.tick(w) {
                    return false;
                }
                w.append(GroupEvent::Ended { result: g.result(T, "w") });
            }
            Next::Publish => {
                if c.tick(w) {
                    return false;
                }
                let result = g.result.clone().expect("ended");
                w.published.push(result);
                for i in g.never_started() {
                    w.child_results.push(g.halted_report(i, T));
                }
                if c.tick(w) {
                    return false;
                }
                w.append(GroupEvent::Published);
            }
        }
    }
}

/// Run with crashes and restarts until done.
fn run(s: &Scenario, crashes: Vec<u64>) -> World {
    let mut w = World::default();
    w.append(GroupEvent::Accepted {
        spec: s.spec.clone(),
        request: "sealed".into(),
        reply_to: None,
        submitted_by: None,
    });
    let mut c = Crashes { at: crashes };
    for _ in 0..1000 {
        if drive(s, &mut w, &mut c) {
            return w;
        }
        // Restart: the child journal's interrupted deployment is rolled
        // back by recovery (nothing of it stays on the host).
        w.children.retain(|_, ch| matches!(ch, Child::Finished(_)));
    }
    panic!("no end after 1000 restarts");
}

/// The outcome by the rules, computed without the model.
fn expected(s: &Scenario) -> (GroupOutcome, usize, Vec<bool>) {
    let n = s.spec.members.len();
    let mut ran = vec![false; n];
    let mut failed = 0;
    let mut waves_run = 0;
    let mut halted = false;
    let mut start = 0;
    for &end in &s.spec.waves {
        waves_run += 1;
        for i in start..end {
            ran[i] = true;
            if !matches!(s.outcomes[i], Outcome::Deployed | Outcome::Unchanged) {
                failed += 1;
            }
        }
        start = end;
        if failed > s.spec.max_failed {
            halted = true;
            break;
        }
    }
    let deployed: Vec<usize> = (0..n).filter(|&i| ran[i] && s.outcomes[i] == Outcome::Deployed).collect();
    let ok = (0..n).filter(|&i| ran[i] && matches!(s.outcomes[i], Outcome::Deployed | Outcome::Unchanged)).count();
    let outcome = if !halted {
        if ok == 0 { GroupOutcome::Failed } else { GroupOutcome::Deployed }
    } else if deployed.is_empty() {
        GroupOutcome::Failed
    } else if s.spec.on_failure == OnFailure::Revert && deployed.iter().all(|&i| s.revert_ok[i]) {
        GroupOutcome::Reverted
    } else {
        GroupOutcome::Partial
    };
    (outcome, waves_run, ran)
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..14)
        .prop_flat_map(|n| {
            let size = prop_oneof![(1usize..16).prop_map(WaveSize::Count), (1u32..=100).prop_map(WaveSize::Percent)];
            let outcome = prop_oneof![
                6 => Just(Outcome::Deployed),
                2 => Just(Outcome::Unchanged),
                1 => Just(Outcome::RolledBack),
                1 => Just(Outcome::Failed),
            ];
            (
                Just(n),
                prop::collection::vec(size, 0..4),
                0usize..3,
                prop_oneof![Just(OnFailure::Halt), Just(OnFailure::Revert)],
                prop::collection::vec(outcome, n),
                prop::collection::vec(prop::bool::weighted(0.8), n),
            )
        })
        .prop_map(|(n, sizes, max_failed, on_failure, outcomes, revert_ok)| Scenario {
            spec: GroupSpec {
                group_id: "g1".into(),
                group: "fleet".into(),
                members: (0..n).map(|i| format!("t{i}")).collect(),
                waves: cumulative_waves(&sizes, n),
                max_failed,
                on_failure,
            },
            outcomes,
            revert_ok,
        })
}

fn check(s: &Scenario, w: &World) {
    let n = s.spec.members.len();
    // Every prefix folds, and the decisions agree with the run's.
    for p in 1..=w.durable.len() {
        let g = Group::fold(&w.durable[..p]).unwrap_or_else(|e| panic!("prefix {p} does not fold: {e}"));
        if let Some(d) = w.decisions.get(&p) {
            assert_eq!(&g.next(), d, "prefix {p} decides otherwise than the run did");
        }
    }
    // No member deployed twice; members of waves never started untouched.
    let (outcome, waves_run, ran) = expected(s);
    for i in 0..n {
        assert!(w.deploys.get(&i).copied().unwrap_or(0) <= 1, "member {i} deployed twice");
        assert!(w.revert_effects.get(&i).copied().unwrap_or(0) <= 1, "member {i} reverted twice");
        if !ran[i] {
            assert!(!w.children.contains_key(&i), "member {i} of a wave that never started was run");
        }
    }
    // A wave starts only when every earlier member ended.
    let mut ended = std::collections::HashSet::new();
    for r in &w.durable {
        match &r.event {
            GroupEvent::WaveStarted { wave } => {
                let before = if *wave == 0 { 0 } else { s.spec.waves[wave - 1] };
                for i in 0..before {
                    assert!(ended.contains(&s.spec.members[i]), "wave {wave} started before member {i} ended");
                }
            }
            GroupEvent::MemberEnded { member, .. } => {
                ended.insert(member.clone());
            }
            _ => {}
        }
    }
    // Every copy identical; the outcome is the rules'.
    assert!(!w.published.is_empty(), "no group result published");
    assert!(w.published.windows(2).all(|p| p[0] == p[1]), "group result copies differ");
    let r = &w.published[0];
    assert_eq!(r.outcome, outcome, "outcome for {s:?}");
    assert_eq!(r.waves_run, waves_run);
    let halted = ran.iter().filter(|r| !**r).count();
    assert_eq!(r.counts.get("halted").copied(), Some(halted));
    let children: BTreeMap<String, Outcome> =
        (0..n).map(|i| (s.spec.members[i].clone(), if ran[i] { s.outcomes[i] } else { Outcome::Failed })).collect();
    assert_eq!(r.children, children);
    if r.outcome == GroupOutcome::Reverted {
        assert!(r.reverts.values().all(|o| o == REVERTED) && !r.reverts.is_empty());
    }
    if s.spec.on_failure == OnFailure::Halt {
        assert!(r.reverts.is_empty(), "a halting group reverted");
    }
    // Every member has a child result; halted ones say so.
    for i in 0..n {
        let id = s.spec.child_id(&s.spec.members[i]);
        let rs: Vec<&Report> = w.child_results.iter().filter(|r| r.deployment_id == id).collect();
        assert!(!rs.is_empty(), "member {i} has no child result");
        if !ran[i] {
            assert!(
                rs.iter().all(|r| r.outcome == Outcome::Failed
                    && r.metadata().get("failed_step").map(String::as_str) == Some("halted")),
                "halted member {i}: {rs:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn crashes_anywhere_change_no_decision(s in scenario(), crashes in prop::collection::vec(1u64..120, 0..6)) {
        let clean = run(&s, Vec::new());
        check(&s, &clean);
        let w = run(&s, crashes);
        check(&s, &w);
        prop_assert_eq!(&w.published[0], &clean.published[0], "a crashed run ends otherwise than a clean one");
    }
}

/// Every single crash point of one larger group, one at a time, then
/// every pair of nearby ones.
#[test]
fn every_crash_point_of_a_twelve_member_canary_group() {
    let n = 12;
    let mut outcomes = vec![Outcome::Deployed; n];
    outcomes[5] = Outcome::RolledBack;
    for on_failure in [OnFailure::Halt, OnFailure::Revert] {
        let s = Scenario {
            spec: GroupSpec {
                group_id: "g".into(),
                group: "fleet".into(),
                members: (0..n).map(|i| format!("t{i}")).collect(),
                waves: cumulative_waves(&[WaveSize::Count(1), WaveSize::Percent(25), WaveSize::Percent(100)], n),
                max_failed: 0,
                on_failure,
            },
            outcomes: outcomes.clone(),
            revert_ok: vec![true; n],
        };
        let clean = run(&s, Vec::new());
        check(&s, &clean);
        let want = if on_failure == OnFailure::Halt { GroupOutcome::Partial } else { GroupOutcome::Reverted };
        assert_eq!(clean.published[0].outcome, want);
        for a in 1..=clean.ticks {
            let w = run(&s, vec![a]);
            check(&s, &w);
            assert_eq!(w.published[0], clean.published[0]);
            let w = run(&s, vec![a, a + 1, a + 3]);
            check(&s, &w);
            assert_eq!(w.published[0], clean.published[0]);
        }
    }
}

/// The model refuses records that do not follow: a wave before its
/// predecessor ended, a member ending twice or before its wave.
#[test]
fn records_out_of_order_do_not_fold() {
    let spec = GroupSpec {
        group_id: "g".into(),
        group: "fleet".into(),
        members: vec!["a".into(), "b".into(), "c".into()],
        waves: vec![1, 3],
        max_failed: 0,
        on_failure: OnFailure::Halt,
    };
    let s = Scenario { spec: spec.clone(), outcomes: vec![Outcome::Deployed; 3], revert_ok: vec![true; 3] };
    let rec = |event| GroupRecord { at: T, event };
    let accepted = rec(GroupEvent::Accepted { spec, request: String::new(), reply_to: None, submitted_by: None });
    let ended = |i: usize| {
        rec(GroupEvent::MemberEnded { member: s.spec.members[i].clone(), report: report(&s, i, Outcome::Deployed) })
    };
    let wave = |k| rec(GroupEvent::WaveStarted { wave: k });
    assert!(Group::fold(&[accepted.clone(), wave(0), wave(1)]).is_err(), "wave 1 before wave 0 ended");
    assert!(Group::fold(&[accepted.clone(), wave(0), ended(1)]).is_err(), "member of an unstarted wave ended");
    assert!(Group::fold(&[accepted.clone(), wave(0), ended(0), ended(0)]).is_err(), "a member ended twice");
    assert!(Group::fold(&[accepted.clone(), wave(1)]).is_err(), "wave 1 first");
    let g = Group::fold(&[accepted, wave(0), ended(0), wave(1)]).expect("in order");
    assert_eq!(g.next(), Next::Run(vec![1, 2]));
}
