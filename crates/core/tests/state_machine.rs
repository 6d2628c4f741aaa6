//! Property tests: random sequences of deployments to one host, each with a
//! random fault schedule and random crash points (before or after any host
//! operation or journal flush, including between a remote rename and its
//! journal event, and during rollback). After every deployment, with as
//! many crash/recover/redeliver cycles as the schedule produced:
//!
//! - the outcome is the one the fault schedule implies (oracle);
//! - the host holds exactly the new files (deployed) or exactly the
//!   originals (every other outcome but rollback_failed);
//! - cert and key are never from different deployments;
//! - no write ever happened before every snapshot was durable;
//! - the same schedule without crashes ends in the same outcome and host
//!   state (or in the rollback the recovery table prescribes);
//! - no key bytes appear in the journal; nothing is left unfinished.

use std::collections::BTreeMap;

use certdeploy_core::mutation::{self, Mutation};
use certdeploy_core::testkit::*;
use certdeploy_core::*;
use proptest::prelude::*;
use proptest::test_runner::{TestError, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};

const RELOAD: &str = "reload-daemon";
const VALIDATE: &str = "validate-config";
const CERT: &str = "/srv/tls/cert.pem";
const KEY: &str = "/srv/tls/key.pem";
const CHAIN: &str = "/srv/tls/chain.pem";
const MARKER: &str = "KEY-MARKER-c0ffee";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Daemon {
    Ok,
    /// Exit 0 on the first call only after a transient channel loss.
    TransientOnce,
    /// Rejects the new certificate (validate or reload exit 1 while it is on disk).
    RejectsNew,
    /// Every reload fails, also the retry.
    Broken,
    /// Reload exits 0 but the daemon keeps serving the old certificate.
    NoEffect,
}

#[derive(Clone, Debug)]
struct Scenario {
    /// Redeploy what is on the host (→ unchanged) instead of a new cert.
    same: bool,
    /// An older certificate than the one on the host (→ superseded).
    older: bool,
    snapshot_fault: Option<(Role, bool)>, // (role, permanent)
    write_fault: Option<(Role, bool)>,
    validate_rejects: bool,
    daemon: Daemon,
    restore_fault: Option<Role>,
    /// Crash points: (host/journal steps from the start of a run, after?).
    crashes: Vec<(u64, bool)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Absent,
    Original,
    Gen(u32),
}

#[derive(Clone, Debug)]
struct RefState {
    chain: bool,
    validate: bool,
    verify: bool,
    pre_existing: bool,
    /// What each role holds now.
    host: BTreeMap<Role, Content>,
    generation: u32,
    halted: bool,
    deployments: u32,
}

impl RefState {
    fn roles(&self) -> Vec<Role> {
        if self.chain { vec![Role::Cert, Role::Key, Role::Chain] } else { vec![Role::Cert, Role::Key] }
    }
    fn current_gen(&self) -> Option<u32> {
        match self.host.get(&Role::Cert) {
            Some(Content::Gen(g)) => Some(*g),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
enum Transition {
    Deploy(Box<Scenario>),
    /// The host needs an operator after a failed rollback.
    Halted,
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Cert), Just(Role::Key), Just(Role::Chain)]
}

struct DeployModel;

impl ReferenceStateMachine for DeployModel {
    type State = RefState;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<RefState> {
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(chain, validate, verify, pre_existing)| {
                let c = if pre_existing { Content::Original } else { Content::Absent };
                let mut host = BTreeMap::new();
                host.insert(Role::Cert, c);
                host.insert(Role::Key, c);
                if chain {
                    host.insert(Role::Chain, c);
                }
                RefState { chain, validate, verify, pre_existing, host, generation: 0, halted: false, deployments: 0 }
            })
            .boxed()
    }

    fn transitions(state: &RefState) -> BoxedStrategy<Transition> {
        if state.halted {
            return Just(Transition::Halted).boxed();
        }
        let roles = state.roles();
        let pick = proptest::sample::select(roles);
        let has_cert = state.host.get(&Role::Cert) != Some(&Content::Absent);
        let can_same = state.current_gen().is_some();
        let daemons = if state.verify {
            prop_oneof![
                4 => Just(Daemon::Ok),
                1 => Just(Daemon::TransientOnce),
                2 => Just(Daemon::RejectsNew),
                1 => Just(Daemon::Broken),
                2 => Just(Daemon::NoEffect)
            ]
            .boxed()
        } else {
            prop_oneof![
                4 => Just(Daemon::Ok),
                1 => Just(Daemon::TransientOnce),
                2 => Just(Daemon::RejectsNew),
                1 => Just(Daemon::Broken)
            ]
            .boxed()
        };
        (
            prop::bool::weighted(if can_same { 0.15 } else { 0.0 }),
            prop::bool::weighted(if has_cert { 0.1 } else { 0.0 }),
            prop::option::weighted(0.15, (pick.clone(), any::<bool>())),
            prop::option::weighted(0.2, (pick.clone(), any::<bool>())),
            prop::bool::weighted(if state.validate { 0.2 } else { 0.0 }),
            daemons,
            prop::option::weighted(
                0.15,
                role().prop_filter("planned role", {
                    let chain = state.chain;
                    move |r| chain || *r != Role::Chain
                }),
            ),
            prop::collection::vec((1u64..40, any::<bool>()), 0..=3),
        )
            .prop_map(|(same, older, snapshot_fault, write_fault, validate_rejects, daemon, restore_fault, crashes)| {
                Transition::Deploy(Box::new(Scenario {
                    same,
                    older: older && !same,
                    snapshot_fault,
                    write_fault,
                    validate_rejects,
                    daemon,
                    restore_fault,
                    crashes,
                }))
            })
            .boxed()
    }

    fn apply(mut state: RefState, t: &Transition) -> RefState {
        let Transition::Deploy(s) = t else { return state };
        state.deployments += 1;
        let outcome = oracle(&state, s);
        match outcome {
            Outcome::Deployed => {
                let g = if s.same { state.current_gen().unwrap_or(0) } else { state.generation + 1 };
                for r in state.roles() {
                    state.host.insert(r, Content::Gen(g));
                }
            }
            Outcome::RollbackFailed => state.halted = true,
            _ => {}
        }
        if !s.same && !s.older {
            state.generation += 1;
        }
        state
    }
}

/// The outcome a fault schedule implies, without crashes.
fn oracle(state: &RefState, s: &Scenario) -> Outcome {
    if let Some((_, true)) = s.snapshot_fault {
        return Outcome::Failed;
    }
    if s.older {
        return Outcome::Superseded;
    }
    if s.same {
        return Outcome::Unchanged;
    }
    let rollback = if s.restore_fault.is_some() { Outcome::RollbackFailed } else { Outcome::RolledBack };
    if let Some((_, true)) = s.write_fault {
        return rollback;
    }
    if s.validate_rejects && state.validate {
        return rollback;
    }
    match s.daemon {
        Daemon::Ok | Daemon::TransientOnce => Outcome::Deployed,
        Daemon::RejectsNew | Daemon::NoEffect => rollback,
        Daemon::Broken => {
            if s.restore_fault.is_some() {
                Outcome::RollbackFailed
            } else {
                Outcome::RolledBackDaemonUnknown
            }
        }
    }
}

fn cert_bytes(generation: u32) -> Vec<u8> {
    format!("CERT g{generation} nb={}\nbody-{generation}\n", 1000 + generation).into_bytes()
}
fn key_bytes(generation: u32) -> Vec<u8> {
    format!("-----BEGIN PRIVATE KEY-----\n{MARKER}-{generation}\n-----END PRIVATE KEY-----\n").into_bytes()
}
fn chain_bytes(generation: u32) -> Vec<u8> {
    format!("CHAIN g{generation}\n").into_bytes()
}
fn content_of(role: Role, c: Content) -> Option<Vec<u8>> {
    let g = match c {
        Content::Absent => return None,
        Content::Original => 0,
        Content::Gen(g) => g,
    };
    Some(match role {
        Role::Cert => cert_bytes(g),
        Role::Key => key_bytes(g),
        Role::Chain => chain_bytes(g),
        Role::Bundle | Role::Pkcs12 => unreachable!("the model's targets have no extra files"),
    })
}
fn mode_of(role: Role, c: Content) -> u32 {
    match (role, c) {
        (Role::Key, Content::Original) => 0o640,
        (_, Content::Original) => 0o664,
        (Role::Key, _) => 0o600,
        _ => 0o644,
    }
}

struct Sut {
    sim: Sim,
    /// A rollback failed (possible after a crash even where the schedule
    /// alone would have deployed): the host waits for an operator, so later
    /// transitions leave it alone.
    halted: bool,
}

fn policy_plan(state: &RefState, id: &str, generation: u32, nb_override: Option<i64>) -> (Plan, Payload) {
    let target = TargetSpec {
        host: "h1".into(),
        port: 22,
        user: "deploy".into(),
        cert_path: CERT.into(),
        key_path: KEY.into(),
        chain_path: state.chain.then(|| CHAIN.into()),
        cert_mode: "0644".into(),
        key_mode: "0600".into(),
        validate_command: state.validate.then(|| VALIDATE.into()),
        reload_command: RELOAD.into(),
        verify_endpoint: state.verify.then(|| "h1:443".into()),
        verify_sni: None,
    };
    let cert = cert_bytes(generation);
    let material = Material {
        certificate_pem: String::from_utf8(cert.clone()).unwrap(),
        private_key_pem: Secret::new(key_bytes(generation)),
        chain_pem: state.chain.then(|| String::from_utf8(chain_bytes(generation)).unwrap()),
    };
    let f = fake_cert_facts(&cert).unwrap();
    let facts =
        MaterialFacts { leaf_sha256: Some(f.leaf_sha256), not_before: Some(nb_override.unwrap_or(f.not_before)) };
    let policy = Policy { verify_budget_ms: 3_000, ..Policy::default() };
    build_plan(id, "t1", &target, &material, &facts, policy, 1).unwrap()
}

/// Arm the schedule's faults on a sim (persistent ones on every call).
fn arm(sim: &Sim, s: &Scenario, new_cert: &[u8]) {
    sim.reset_faults();
    let mut w = sim.world();
    w.rejects.clear();
    w.commands.clear();
    w.reload_is_noop = false;
    if let Some((r, permanent)) = s.snapshot_fault {
        if permanent {
            w.always.insert(OpKind::Snapshot(r), StepError::permanent("permission denied"));
        } else {
            w.faults.insert((OpKind::Snapshot(r), 1), Fault::Fail(StepError::transient("connection reset")));
        }
    }
    if let Some((r, permanent)) = s.write_fault {
        if permanent {
            w.always.insert(OpKind::Write(r), StepError::permanent("read-only file system"));
        } else {
            w.faults.insert((OpKind::Write(r), 1), Fault::Fail(StepError::transient("channel closed")));
        }
    }
    if s.validate_rejects {
        w.rejects.insert(VALIDATE.into(), new_cert.to_vec());
    }
    match s.daemon {
        Daemon::Ok => {}
        Daemon::TransientOnce => {
            w.faults.insert(
                (OpKind::Exec(RELOAD.into()), 1),
                Fault::Fail(StepError::transient("connection lost; outcome unknown")),
            );
        }
        Daemon::RejectsNew => {
            w.rejects.insert(RELOAD.into(), new_cert.to_vec());
        }
        Daemon::Broken => {
            w.commands.insert(RELOAD.into(), 1);
        }
        Daemon::NoEffect => w.reload_is_noop = true,
    }
    if let Some(r) = s.restore_fault {
        w.always.insert(OpKind::Restore(r), StepError::permanent("permission denied"));
    }
}

fn arm_crash(sim: &Sim, c: Option<(u64, bool)>) {
    let mut w = sim.world();
    w.crash_at = c.map(|(k, after)| (w.steps + k, after));
}

/// Run one deployment to its end: crash, recover, redeliver as scheduled.
fn run_to_end(
    sim: &Sim,
    state: &RefState,
    id: &str,
    generation: u32,
    nb: Option<i64>,
    crashes: &[(u64, bool)],
) -> (Report, bool) {
    let rig = Rig::new(sim.clone());
    let mut crashes = crashes.iter().copied();
    let mut crashed = false;
    let mut attempt = 1;
    let (plan, payload) = policy_plan(state, id, generation, nb);
    arm_crash(sim, crashes.next());
    let mut result = rig.deploy(plan, &payload);
    for _ in 0..20 {
        match result {
            Ok(Terminal::Finished(r)) => {
                sim.world().crash_at = None;
                return (r, crashed);
            }
            Ok(Terminal::Abandoned(_)) => {
                // The broker redelivers; a new attempt starts afresh.
                attempt += 1;
                let (mut plan, payload) = policy_plan(state, id, generation, nb);
                plan.attempt = attempt;
                arm_crash(sim, crashes.next());
                result = rig.deploy(plan, &payload);
            }
            Err(SimulatedCrash) => {
                crashed = true;
                // A new process looks at what the journal durably holds.
                let records = sim.durable_records(id);
                let replayed = Deployment::replay(&records).ok();
                match replayed.as_ref().and_then(|d| d.terminal().cloned()) {
                    // Terminal (or abandoned) before the crash: the
                    // redelivery re-publishes (or deploys afresh).
                    Some(t) => result = Ok(t),
                    // Nothing durable: the redelivered request starts over.
                    None if replayed.is_none() => result = Ok(Terminal::Abandoned("nothing journaled".into())),
                    None => {
                        assert_eq!(sim.unfinished(), vec![id.to_string()], "crashed deployment must be unfinished");
                        arm_crash(sim, crashes.next());
                        result = rig.recover(id);
                    }
                }
            }
        }
    }
    panic!("no terminal state after 20 cycles");
}

fn host_state(sim: &Sim, roles: &[Role]) -> BTreeMap<Role, Option<(Vec<u8>, u32)>> {
    let paths = [(Role::Cert, CERT), (Role::Key, KEY), (Role::Chain, CHAIN)];
    paths.iter().filter(|(r, _)| roles.contains(r)).map(|(r, p)| (*r, sim.get(p))).collect()
}

struct DeployTest;

impl StateMachineTest for DeployTest {
    type SystemUnderTest = Sut;
    type Reference = DeployModel;

    fn init_test(state: &RefState) -> Sut {
        let sim = Sim::new();
        {
            let mut w = sim.world();
            w.reload_commands.insert(RELOAD.to_string());
            w.served_path = Some(CERT.to_string());
        }
        if state.pre_existing {
            for r in state.roles() {
                let path = match r {
                    Role::Cert => CERT,
                    Role::Key => KEY,
                    Role::Chain => CHAIN,
                    Role::Bundle | Role::Pkcs12 => unreachable!("the model's targets have no extra files"),
                };
                sim.put(path, &content_of(r, Content::Original).unwrap(), mode_of(r, Content::Original));
            }
            sim.world().served = Some(leaf_of(&cert_bytes(0)));
        }
        Sut { sim, halted: false }
    }

    fn apply(mut sut: Sut, state: &RefState, t: Transition) -> Sut {
        let Transition::Deploy(s) = t else { return sut };
        if sut.halted {
            return sut;
        }
        // `state` is the reference state *after* the transition; rebuild the
        // one before it for the oracle and the expected host.
        let id = format!("dep-{}", state.deployments);
        // New and older deployments carry the latest generation (older
        // ones with an earlier notBefore); `same` redeploys what is there.
        let generation = if s.same { state.current_gen().unwrap_or(0) } else { state.generation };
        let nb = s.older.then_some(1);
        let roles = state.roles();
        let before = host_state(&sut.sim, &roles);
        let new_cert = cert_bytes(generation);

        // Baseline: the same schedule without crashes on a forked world.
        let base = sut.sim.fork();
        arm(&base, &s, &new_cert);
        let (base_report, _) = run_to_end(&base, state, &id, generation, nb, &[]);

        arm(&sut.sim, &s, &new_cert);
        let (report, crashed) = run_to_end(&sut.sim, state, &id, generation, nb, &s.crashes);
        let after = host_state(&sut.sim, &roles);

        // 0. The write-ahead rule, first: a write that no durable record
        //    announced explains every symptom the checks below would see
        //    (a crash then loses the record, recovery skips the rollback).
        for (world, name) in [(&sut.sim, "crash run"), (&base, "baseline")] {
            let w = world.world();
            assert!(w.violations.is_empty(), "write-ahead violated ({name}): {:?}", w.violations);
        }

        // 1. Outcome matches the schedule (or, after a crash, the rollback
        //    that the recovery table prescribes).
        let mut pre_state = state.clone();
        pre_state.host =
            before.iter().map(|(r, v)| (*r, if v.is_none() { Content::Absent } else { Content::Original })).collect();
        let expected = oracle(&pre_state, &s);
        assert_eq!(base_report.outcome, expected, "baseline outcome: {}", base_report.message);
        let crash_alternative = crashed && s.restore_fault.is_some() && report.outcome == Outcome::RollbackFailed;
        assert!(
            report.outcome == expected || crash_alternative,
            "outcome {:?} ({}) but schedule implies {:?}",
            report.outcome,
            report.message,
            expected
        );

        // 2. Host state.
        match report.outcome {
            Outcome::Deployed => {
                for r in &roles {
                    let (bytes, mode) = after[r].clone().expect("deployed file exists");
                    let want = content_of(*r, Content::Gen(generation)).unwrap();
                    assert_eq!(bytes, want, "{r} has the new bytes");
                    assert_eq!(mode, if *r == Role::Key { 0o600 } else { 0o644 }, "{r} has the configured mode");
                }
            }
            Outcome::RollbackFailed => {}
            _ => assert_eq!(after, before, "host is back in (or never left) its pre-deploy state: {}", report.message),
        }
        // 3. Same as without crashes.
        if !crash_alternative {
            assert_eq!(report.outcome, base_report.outcome);
            if report.outcome != Outcome::RollbackFailed {
                assert_eq!(after, host_state(&base, &roles), "crash run and baseline end in the same host state");
            }
        }
        // 4. No temp files; backups only where the outcome keeps them.
        for p in sut.sim.list() {
            assert!(!p.contains(".certdeploy-tmp."), "temp file left: {p}");
            if p.ends_with(&format!(".certdeploy-bak.{id}")) {
                assert!(
                    matches!(report.outcome, Outcome::Deployed | Outcome::RollbackFailed),
                    "backup {p} left after {:?}",
                    report.outcome
                );
            }
        }
        sut.halted = report.outcome == Outcome::RollbackFailed;
        sut
    }

    fn check_invariants(sut: &Sut, state: &RefState) {
        let w = sut.sim.world();
        assert!(w.violations.is_empty(), "write-ahead violated: {:?}", w.violations);
        drop(w);
        let bytes = sut.sim.journal_bytes();
        assert!(!bytes.windows(MARKER.len()).any(|x| x == MARKER.as_bytes()), "key bytes in the journal");
        assert!(sut.sim.unfinished().is_empty(), "unfinished deployments left: {:?}", sut.sim.unfinished());
        if !state.halted && !sut.halted {
            // Never a mix: cert and key from the same deployment.
            let cert = sut.sim.get(CERT).map(|c| c.0);
            let key = sut.sim.get(KEY).map(|k| k.0);
            let gen_of = |b: &Option<Vec<u8>>, prefix: &str| {
                b.as_ref().map(|b| {
                    let s = String::from_utf8_lossy(b).to_string();
                    s.split(prefix)
                        .nth(1)
                        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next().map(str::to_string))
                })
            };
            assert_eq!(
                gen_of(&cert, "CERT g"),
                gen_of(&key, &format!("{MARKER}-")),
                "cert and key from different deployments"
            );
        }
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 4096, ..ProptestConfig::default() })]
    #[test]
    fn deployments_with_faults_and_crashes(sequential 1..8 => DeployTest);
}

/// Runs the property with one planted bug switched on (for this thread) and
/// returns the failure it reports and how many cases it took to find it.
fn property_with(bug: Mutation) -> (String, u32) {
    let config =
        ProptestConfig { cases: 256, max_shrink_iters: 0, failure_persistence: None, ..ProptestConfig::default() };
    let mut runner = TestRunner::new(config.clone());
    let cases = std::cell::Cell::new(0u32);
    mutation::set(Some(bug));
    // No shrinking: the first failure is the answer (and without the
    // "seen transitions" counter, which only shrinking uses).
    let result = runner.run(&DeployModel::sequential_strategy(1..8), |(initial, transitions, _seen)| {
        cases.set(cases.get() + 1);
        DeployTest::test_sequential(config.clone(), initial, transitions, None);
        Ok(())
    });
    mutation::set(None);
    match result {
        Err(TestError::Fail(why, _)) => (why.to_string(), cases.get()),
        Err(e) => panic!("{bug:?}: the property test did not run: {e}"),
        Ok(()) => panic!("{bug:?}: the property test passed 256 cases with the bug planted"),
    }
}

/// Mutation test: a driver that does not wait for `Begun { write }` to be
/// durable before writing fails the property (the simulator sees the write
/// with no durable record in front of it).
#[test]
fn unflushed_begun_write_fails_the_property() {
    let (why, cases) = property_with(Mutation::UnflushedBegunWrite);
    eprintln!("failed after {cases} case(s): {why}");
    assert!(why.contains("write before Begun(write) was durable"), "{why}");
}

/// Mutation test: recovery that abandons a deployment which may have
/// written, without restoring the originals, fails the property.
#[test]
fn recovery_without_rollback_fails_the_property() {
    let (why, cases) = property_with(Mutation::RecoveryWithoutRollback);
    eprintln!("failed after {cases} case(s): {why}");
    assert!(!why.contains("write-ahead violated"), "failed for another reason: {why}");
}
