//! Golden check of the deployment state machine's behaviour.
//!
//! A deterministic pseudo-random driver runs thousands of attempts against
//! the pure machine: every action gets a scripted answer (success, a
//! transient, permanent or lock-lost failure, a failed command, a mismatch,
//! a failed restore), time jumps past deadlines and budgets, and the process
//! "crashes" at random points, after which the attempt is replayed from its
//! durable records. At every state the machine is also handed each event of
//! a fixed catalogue (most of which do not fit the state) to record whether
//! it is accepted, the error it gives, and what it asks for next.
//!
//! Everything observable goes into one log: every `Next` (events and
//! reports as their journal JSON, reports also as the published result
//! event), every fold error, the accessors the driver and the worker use.
//! The log's SHA-256 must equal [`GOLDEN`]: any change of behaviour, however
//! small (a message's wording, a retry delay, an event accepted in a state
//! where it was refused), changes it. After an intended change, run with
//! `GOLDEN_LOG=/some/file` to write the log, compare it with the log of the
//! previous code, and update the constant.

use std::fmt::Write as _;

use certdeploy_core::lock::LockPhase;
use certdeploy_core::wire::ResultEvent;
use certdeploy_core::*;

/// SHA-256 of the log of [`run_all`].
const GOLDEN: &str = "f1ac34845be8655beee3971a86c0b42eaa0684f6d810655f7ee01501dcee3af7";

const SCENARIOS: u64 = 1500;
/// Scenarios whose every state is also probed with the whole catalogue.
const PROBED: u64 = 400;

/// SplitMix64: small, deterministic, good enough to pick answers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize].clone()
    }
}

const CERT_PEM: &str = "CERT new nb=1000\n-----BEGIN CERTIFICATE-----\nnew\n-----END CERTIFICATE-----\n";

fn plan(rng: &mut Rng, id: &str) -> (Plan, bool) {
    let chain = rng.chance(50);
    let target = TargetSpec {
        host: "web1.internal".into(),
        port: 22,
        user: "deploy".into(),
        cert_path: "/etc/ssl/site.pem".into(),
        key_path: "/etc/ssl/site.key".into(),
        chain_path: chain.then(|| "/etc/ssl/chain.pem".into()),
        cert_mode: "0644".into(),
        key_mode: "0600".into(),
        validate_command: rng.chance(50).then(|| "nginx -t".into()),
        reload_command: "systemctl reload nginx".into(),
        verify_endpoint: rng.chance(60).then(|| "web1.internal:443".into()),
        verify_sni: rng.chance(30).then(|| "www.example.com".into()),
    };
    let material = Material {
        certificate_pem: CERT_PEM.into(),
        private_key_pem: Secret::new(b"-----BEGIN PRIVATE KEY-----\nk\n-----END PRIVATE KEY-----\n".to_vec()),
        chain_pem: (chain || rng.chance(30)).then(|| "CHAIN\n".into()),
    };
    let facts = MaterialFacts {
        leaf_sha256: Some(Digest::of(b"CERT new nb=1000")),
        not_before: rng.pick(&[Some(1000), Some(1000), None]),
    };
    let policy = Policy {
        exec_timeout_ms: 5_000,
        deadline_ms: rng.pick(&[600_000, 3_000, 800]),
        rollback_budget_ms: rng.pick(&[600_000, 2_000, 300]),
        retry_initial_ms: rng.pick(&[100, 1_000]),
        retry_max_ms: rng.pick(&[1_000, 60_000]),
        verify_initial_ms: rng.pick(&[50, 200]),
        verify_budget_ms: rng.pick(&[500, 3_000, 10_000]),
        verify_consecutive: rng.pick(&[1, 3]),
        verify_window_ms: rng.pick(&[0, 400, 1_000]),
        keep_backups: rng.pick(&[0, 1, 3]),
        allow_downgrade: rng.chance(20),
    };
    let attempt = rng.pick(&[1, 1, 2, 5]) as u32;
    let (mut plan, _) = build_plan(id, "web1", &target, &material, &facts, policy, attempt).expect("plan");
    if rng.chance(40) {
        plan.lock = Some(format!("tok-{id}"));
    }
    // Whether snapshots find the new content already in place.
    let identical = rng.chance(25);
    (plan, identical)
}

fn error(rng: &mut Rng) -> StepError {
    match rng.below(10) {
        0..=4 => StepError::transient("connection reset"),
        5..=8 => StepError::permanent("permission denied"),
        _ => StepError::lock_lost("target lock taken over"),
    }
}

/// A step's answer: success with `ok_percent`, else a failure.
fn fails(rng: &mut Rng, ok_percent: u64) -> Option<StepError> {
    (!rng.chance(ok_percent)).then(|| error(rng))
}

fn snapshot_of(rng: &mut Rng, plan: &Plan, role: Role, identical: bool) -> Snapshot {
    let f = plan.file(role).expect("planned role");
    let live_path = if rng.chance(15) { format!("{}.real", f.path) } else { f.path.clone() };
    if !identical && rng.chance(25) {
        return Snapshot { live_path, pre: PreState::Missing };
    }
    let (sha256, mode) = if identical { (f.sha256, f.mode) } else { (Digest::of(b"old"), rng.pick(&[f.mode, 0o640])) };
    let cert = (role == Role::Cert && rng.chance(80)).then(|| CertFacts {
        not_before: rng.pick(&[900, 1000, 1100]),
        leaf_sha256: if identical { Digest::of(b"CERT new nb=1000") } else { Digest::of(b"CERT old") },
    });
    let backup_path = backup_path(&live_path, &plan.deployment_id);
    Snapshot {
        live_path,
        pre: PreState::Existing { backup_path, sha256, size: 10, mode, uid: 0, gid: 0, cert, holds: None },
    }
}

/// Like the driver: within a batch, every success first, then the one
/// failure that decides (the first that is not transient, else the first).
fn successes_then_one_failure(events: Vec<Event>) -> Vec<Event> {
    let (mut out, failures): (Vec<Event>, Vec<Event>) =
        events.into_iter().partition(|e| !matches!(e, Event::StepFailed { .. }));
    let permanent = failures.iter().position(|e| matches!(e, Event::StepFailed { error, .. } if !error.is_transient()));
    if let Some(f) = failures.into_iter().nth(permanent.unwrap_or(0)) {
        out.push(f);
    }
    out
}

/// The scripted answer to an action.
fn answer(rng: &mut Rng, plan: &Plan, identical: bool, action: &Action) -> Vec<Event> {
    match action {
        Action::Snapshot { files, .. } => successes_then_one_failure(
            files
                .iter()
                .map(|f| match fails(rng, 85) {
                    None => Event::Snapshotted { role: f.role, snapshot: snapshot_of(rng, plan, f.role, identical) },
                    Some(error) => Event::StepFailed { step: Step::Snapshot, role: Some(f.role), error },
                })
                .collect(),
        ),
        Action::Write { files, .. } => successes_then_one_failure(
            files
                .iter()
                .map(|f| match fails(rng, 85) {
                    None => Event::Written { role: f.role },
                    Some(error) => Event::StepFailed { step: Step::Write, role: Some(f.role), error },
                })
                .collect(),
        ),
        Action::Exec { step, .. } => vec![match rng.below(10) {
            0..=5 => Event::Executed { step: *step, result: ExecResult { exit_code: Some(0), output: String::new() } },
            6 => Event::Executed { step: *step, result: ExecResult { exit_code: Some(1), output: "boom\n".into() } },
            7 => Event::Executed { step: *step, result: ExecResult { exit_code: None, output: String::new() } },
            _ => Event::StepFailed { step: *step, role: None, error: error(rng) },
        }],
        Action::Verify { step, expected, .. } => vec![match rng.below(10) {
            0..=5 => Event::Verified { step: *step, served: Some(*expected), matched: true, error: None },
            6..=7 => Event::Verified { step: *step, served: Some(Digest::of(b"other")), matched: false, error: None },
            8 => Event::Verified { step: *step, served: None, matched: false, error: None },
            _ => Event::Verified { step: *step, served: None, matched: false, error: Some("refused".into()) },
        }],
        Action::Restore { files, .. } => files
            .iter()
            .map(|f| match rng.below(20) {
                0..=13 => Event::Restored {
                    role: f.role,
                    status: match f.pre {
                        PreState::Missing => RestoreStatus::Removed,
                        PreState::Existing { .. } => RestoreStatus::Restored,
                    },
                    error: None,
                },
                14 => Event::Restored {
                    role: f.role,
                    status: rng.pick(&[RestoreStatus::RestoreFailed, RestoreStatus::RemoveFailed]),
                    error: rng.pick(&[None, Some("gone".to_string())]),
                },
                _ => Event::StepFailed { step: Step::Restore, role: Some(f.role), error: error(rng) },
            })
            .collect(),
        Action::RemoveBackups { .. } => {
            vec![Event::BackupsRemoved { error: rng.chance(20).then(|| "unlink failed".into()) }]
        }
        Action::Prune { .. } => vec![Event::Pruned { error: rng.chance(20).then(|| "readdir failed".into()) }],
        // Only a revert's plan asks for these; this log has none.
        Action::CheckBackups { .. } | Action::Reinstate { .. } => unreachable!("not a revert: {action:?}"),
        Action::LockPhase { phase, .. } => vec![match fails(rng, 85) {
            None => Event::LockPhase { phase: *phase },
            Some(error) => Event::StepFailed { step: Step::Lock, role: None, error },
        }],
    }
}

fn show_next(n: &Next) -> String {
    match n {
        Next::Record(e) => format!("record {}", serde_json::to_string(e).expect("event json")),
        Next::Perform(a) => format!("perform {a:?}"),
        Next::Wait(t) => format!("wait {}", t.0),
        Next::Done(Terminal::Finished(r)) => format!(
            "done {} {}",
            serde_json::to_string(r).expect("report json"),
            String::from_utf8_lossy(&ResultEvent::from_report(r, "w1").to_json())
        ),
        Next::Done(Terminal::Abandoned(why)) => format!("abandoned {why}"),
    }
}

fn show_state(d: &Deployment) -> String {
    format!(
        "[{} written={} recovering={} terminal={}]",
        d.phase_name(),
        d.may_have_written(),
        d.is_recovering(),
        d.terminal().is_some()
    )
}

/// Events to hand every state: one of each kind and step, fitting or not.
fn catalogue(plan: &Plan) -> Vec<Event> {
    let snap = |role: Role, pre: PreState| Snapshot { live_path: format!("/live/{role}"), pre };
    let existing = |role: Role| PreState::Existing {
        backup_path: format!("/live/{role}.certdeploy-bak.x"),
        sha256: Digest::of(b"old"),
        size: 3,
        mode: 0o644,
        uid: 0,
        gid: 0,
        cert: (role == Role::Cert).then(|| CertFacts { not_before: 900, leaf_sha256: Digest::of(b"CERT old") }),
        holds: None,
    };
    let steps = [
        Step::Snapshot,
        Step::Write,
        Step::Validate,
        Step::Reload,
        Step::Verify,
        Step::Restore,
        Step::RetryReload,
        Step::VerifyOriginal,
        Step::Cleanup,
        Step::Commit,
        Step::Lock,
    ];
    let mut c = vec![
        Event::Started { plan: plan.clone() },
        Event::Recovering,
        Event::TakenOver {
            from: "w2 (tok-9)".into(),
            snapshots: plan.roles().map(|r| (r, snap(r, existing(r)))).collect(),
        },
        Event::TakenOver { from: "w2".into(), snapshots: vec![(Role::Cert, snap(Role::Cert, PreState::Missing))] },
        Event::BackupsRemoved { error: None },
        Event::BackupsRemoved { error: Some("unlink".into()) },
        Event::Pruned { error: None },
        Event::Pruned { error: Some("readdir".into()) },
        Event::LockPhase { phase: LockPhase::Locked },
        Event::LockPhase { phase: LockPhase::Writing },
        Event::LockPhase { phase: LockPhase::Committing },
        Event::Abandoned { reason: "probe".into() },
        Event::Finished {
            report: Report {
                deployment_id: "x".repeat(130),
                target: "t".into(),
                host: "h".into(),
                outcome: Outcome::Deployed,
                message: "m".into(),
                details: Default::default(),
                attempts: 1,
                reload_shared_with: None,
                started_at: Timestamp(1),
                finished_at: Timestamp(2),
                reverts: None,
            },
        },
    ];
    for step in steps {
        c.push(Event::Begun { step });
        c.push(Event::GaveUp { step, reason: "probe".into() });
        for error in [StepError::transient("t"), StepError::permanent("p"), StepError::lock_lost("l")] {
            c.push(Event::StepFailed { step, role: None, error: error.clone() });
            c.push(Event::StepFailed { step, role: Some(Role::Key), error });
        }
    }
    for step in [Step::Validate, Step::Reload, Step::RetryReload, Step::Verify] {
        for code in [Some(0), Some(2)] {
            c.push(Event::Executed { step, result: ExecResult { exit_code: code, output: "out".into() } });
        }
    }
    for step in [Step::Verify, Step::VerifyOriginal, Step::Reload] {
        for matched in [true, false] {
            c.push(Event::Verified { step, served: Some(Digest::of(b"x")), matched, error: None });
        }
    }
    for role in Role::ALL {
        c.push(Event::Snapshotted { role, snapshot: snap(role, existing(role)) });
        c.push(Event::Snapshotted { role, snapshot: snap(role, PreState::Missing) });
        c.push(Event::Written { role });
        c.push(Event::Restored { role, status: RestoreStatus::Restored, error: None });
        c.push(Event::Restored { role, status: RestoreStatus::RestoreFailed, error: Some("e".into()) });
    }
    c
}

fn probe(log: &mut String, d: &Deployment, catalogue: &[Event], now: Timestamp) {
    for (i, event) in catalogue.iter().enumerate() {
        let mut p = d.clone();
        match p.apply(&Record { at: now, event: event.clone() }) {
            Ok(()) => {
                let _ = writeln!(log, "  probe {i} ok {} {}", show_state(&p), show_next(&p.next(now.plus_ms(7))));
            }
            Err(e) => {
                let _ = writeln!(log, "  probe {i} err {e}");
            }
        }
    }
}

/// What the machine asks for at several times from `now` on: the same
/// state decides differently before and after a retry, a deadline, a budget.
fn look_ahead(log: &mut String, d: &Deployment, now: Timestamp) {
    for dt in [0, 1, 150, 2_500, 700_000, 1_300_000] {
        let _ = writeln!(log, "  at +{dt}: {}", show_next(&d.next(now.plus_ms(dt))));
    }
}

fn scenario(log: &mut String, seed: u64, probed: bool) {
    let mut rng = Rng(seed);
    let id = format!("g-{seed}");
    let (plan, identical) = plan(&mut rng, &id);
    let catalogue = catalogue(&plan);
    let mut now = Timestamp(1_800_000_000_000 + rng.below(1_000));
    let _ = writeln!(log, "scenario {seed} identical={identical} {}", serde_json::to_string(&plan).expect("plan"));
    // The journal: (record, durable).
    let mut journal: Vec<(Record, bool)> =
        vec![(Record { at: now, event: Event::Started { plan: plan.clone() } }, true)];
    let mut d = Deployment::start(plan.clone(), now);
    if plan.lock.is_some() && rng.chance(15) {
        let snapshots = plan.roles().map(|r| (r, snapshot_of(&mut rng, &plan, r, false))).collect();
        let rec = Record { at: now, event: Event::TakenOver { from: "w0 (tok-0)".into(), snapshots } };
        journal.push((rec.clone(), true));
        let r = d.apply(&rec);
        let _ = writeln!(log, "taken over: {r:?}");
    }
    for step in 0..120 {
        let _ = writeln!(log, "{step} {}", show_state(&d));
        look_ahead(log, &d, now);
        if probed {
            probe(log, &d, &catalogue, now);
        }
        let next = d.next(now);
        let _ = writeln!(log, "next {}", show_next(&next));
        match next {
            Next::Done(_) => return,
            Next::Wait(t) => now = now.max(t),
            Next::Record(event) => {
                let rec = Record { at: now, event };
                journal.push((rec.clone(), true));
                for r in journal.iter_mut() {
                    r.1 = true;
                }
                if let Err(e) = d.apply(&rec) {
                    let _ = writeln!(log, "apply error {e}");
                    return;
                }
            }
            Next::Perform(action) => {
                for event in answer(&mut rng, &plan, identical, &action) {
                    now = now.plus_ms(rng.below(40));
                    let rec = Record { at: now, event };
                    let _ = writeln!(log, "  result {}", serde_json::to_string(&rec).expect("record json"));
                    journal.push((rec.clone(), false));
                    if let Err(e) = d.apply(&rec) {
                        let _ = writeln!(log, "apply error {e}");
                        return;
                    }
                }
            }
        }
        now = now.plus_ms(rng.below(30));
        if rng.chance(4) {
            // Far past a deadline or a budget.
            now = now.plus_ms(rng.pick(&[1_000, 5_000, 700_000]));
        }
        if rng.chance(5) {
            // The process dies: what was not flushed is lost; a new
            // process replays the rest.
            journal.retain(|(_, durable)| *durable);
            let records: Vec<Record> = journal.iter().map(|(r, _)| r.clone()).collect();
            match Deployment::replay(&records) {
                Ok(r) => {
                    let _ = writeln!(log, "crash: replayed {} records", records.len());
                    d = r;
                }
                Err(e) => {
                    let _ = writeln!(log, "crash: replay error {e}");
                    return;
                }
            }
            now = now.plus_ms(rng.below(2_000));
        }
    }
    let _ = writeln!(log, "no end after 120 steps");
}

fn run_all() -> String {
    let mut log = String::new();
    for seed in 0..SCENARIOS {
        scenario(&mut log, seed, seed < PROBED);
    }
    // A journal that is not an attempt's.
    let _ = writeln!(log, "empty replay: {:?}", Deployment::replay(&[]).err());
    log
}

#[test]
fn machine_behaviour_matches_the_golden_digest() {
    let log = run_all();
    if let Ok(path) = std::env::var("GOLDEN_LOG") {
        std::fs::write(&path, &log).expect("write GOLDEN_LOG");
    }
    let digest = Digest::of(log.as_bytes()).to_hex();
    let lines = log.lines().count();
    assert_eq!(digest, GOLDEN, "the machine's behaviour changed ({lines} log lines)");
}
