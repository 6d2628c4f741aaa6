//! One validate and one reload for many deployments: the batch book on its
//! own, then property tests of several deployments to one daemon (one
//! certificate path each) running concurrently through the production
//! driver with the batches of `coalesce`, with a broken certificate among
//! them, faults in the shared validate or reload, and a crash anywhere
//! (every member's journal then replayed by recovery, the unfinished ones
//! redelivered). Whatever happens:
//!
//! - every deployment ends with a result; only the one whose certificate
//!   the daemon refuses ends `rolled_back`, every other one `deployed`;
//! - each site's file holds its new certificate (the culprit's: its
//!   original) and the daemon serves what is in the files;
//! - each member journals its own `ReloadShared` before the shared
//!   validate and its own `Begun` before the shared reload; no write
//!   before its snapshots were durable;
//! - with nothing going wrong and all arriving together, the daemon is
//!   reloaded once and every result says `reload_shared_with` = all;
//! - every batch is forgotten at the end.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use certdeploy_core::coalesce::*;
use certdeploy_core::driver::{self, Clock, Env};
use certdeploy_core::testkit::*;
use certdeploy_core::*;
use proptest::prelude::*;

const VALIDATE: &str = "nginx -t";
const RELOAD: &str = "nginx -s reload";
const WINDOW_MS: u64 = 200;

/// Virtual time whose sleeps wait until the scheduler moves time on (when
/// every member is blocked), so that members can meet within a window.
#[derive(Clone)]
struct StepClock {
    sim: Sim,
    wakes: Arc<Mutex<BTreeSet<u64>>>,
}

impl Clock for StepClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.sim.world().now)
    }
    async fn sleep_until(&self, t: Timestamp) {
        std::future::poll_fn(|_| {
            if self.sim.world().now >= t.0 {
                Poll::Ready(())
            } else {
                self.wakes.lock().unwrap().insert(t.0);
                Poll::Pending
            }
        })
        .await
    }
}

type Task<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Poll every task in turn until all are done; when none moved for two
/// rounds, move time to the earliest sleep's end.
fn run_all<'a, T>(tasks: Vec<Task<'a, T>>, clock: &StepClock, book: &Reloads) -> Vec<T> {
    let mut tasks: Vec<Option<Task<'a, T>>> = tasks.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = tasks.iter().map(|_| None).collect();
    let mut cx = Context::from_waker(Waker::noop());
    let mut still = 0;
    let mut rounds = 0u64;
    let marker = || {
        let w = clock.sim.world();
        (w.steps, w.records.len(), w.now, book.live())
    };
    while tasks.iter().any(Option::is_some) {
        rounds += 1;
        assert!(rounds < 1_000_000, "the members never finished");
        let before = marker();
        let mut done = false;
        for (i, t) in tasks.iter_mut().enumerate() {
            if let Some(f) = t
                && let Poll::Ready(v) = f.as_mut().poll(&mut cx)
            {
                out[i] = Some(v);
                *t = None;
                done = true;
            }
        }
        if done || marker() != before {
            still = 0;
            continue;
        }
        still += 1;
        if still < 2 {
            continue;
        }
        let next = std::mem::take(&mut *clock.wakes.lock().unwrap()).into_iter().next();
        let Some(t) = next else { panic!("every member is blocked and none sleeps: a deadlock") };
        let mut w = clock.sim.world();
        w.now = w.now.max(t);
        still = 0;
    }
    out.into_iter().map(|v| v.expect("finished")).collect()
}

struct Site {
    id: String,
    sni: String,
    cert: String,
    key: String,
    original: Vec<u8>,
    new: Vec<u8>,
    plan: Plan,
    payload: Payload,
}

fn sites(n: usize, broken: Option<usize>, verify: bool) -> Vec<Site> {
    (0..n)
        .map(|i| {
            let sni = format!("s{i}.example");
            let (cert, key) = (format!("/srv/tls/s{i}.pem"), format!("/srv/tls/s{i}.key"));
            let original = format!("CERT s{i} nb=100\nold body {i}\n").into_bytes();
            let tag = if broken == Some(i) { " BROKEN" } else { "" };
            let new = format!("CERT s{i} nb=200{tag}\nnew body {i}\n").into_bytes();
            let target = TargetSpec {
                host: "web1.internal".into(),
                port: 22,
                user: "deploy".into(),
                cert_path: cert.clone(),
                key_path: key.clone(),
                chain_path: None,
                cert_mode: "0644".into(),
                key_mode: "0600".into(),
                validate_command: Some(VALIDATE.into()),
                reload_command: RELOAD.into(),
                verify_endpoint: verify.then(|| "web1.internal:443".into()),
                verify_sni: verify.then(|| sni.clone()),
            };
            let material = Material {
                certificate_pem: String::from_utf8_lossy(&new).into_owned(),
                private_key_pem: Secret::new(format!("KEY {i}\n").into_bytes()),
                chain_pem: None,
            };
            let f = fake_cert_facts(&new).expect("facts");
            let facts = MaterialFacts { leaf_sha256: Some(f.leaf_sha256), not_before: Some(f.not_before) };
            let policy = Policy { verify_budget_ms: 3_000, ..Policy::default() };
            let id = format!("dep-{i}");
            let (plan, payload) =
                build_plan(&id, &format!("s{i}"), &target, &material, &facts, policy, 1).expect("valid plan");
            Site { id, sni, cert, key, original, new, plan, payload }
        })
        .collect()
}

/// The reload rule of a batch: when the daemon reloads, every deployment
/// whose new certificate it will load has journaled its own `Begun(reload)`
/// durably (a crash right after leaves each one knowing the reload may
/// have run). Holds while no process has died: recovery's retry-reloads
/// are each deployment's own.
fn reload_begun_by_all(w: &World, command: &str) -> Option<String> {
    if command != RELOAD {
        return None;
    }
    for (cert, _) in w.sites.values() {
        let first_line = w.bytes(cert).and_then(|b| b.split(|c| *c == b'\n').next());
        if !first_line.is_some_and(|l| l.windows(6).any(|x| x == b"nb=200")) {
            continue;
        }
        let id = w.records.iter().rev().find_map(|(id, r, _)| match &r.event {
            Event::Started { plan } if plan.cert_path() == cert => Some(id.clone()),
            _ => None,
        })?;
        let attempt = w.records.iter().filter(|(i, _, d)| *i == id && *d).map(|(_, r, _)| r);
        let mut ok = false;
        for r in attempt {
            match r.event {
                Event::Started { .. } => ok = false,
                Event::Begun { step: Step::Reload } => ok = true,
                _ => {}
            }
        }
        if !ok {
            return Some(format!("the daemon reloaded {cert} (new) before {id} journaled Begun(reload)"));
        }
    }
    None
}

/// One daemon serving every site from its original certificate.
fn host(sites: &[Site]) -> Sim {
    let sim = Sim::new();
    for s in sites {
        sim.put(&s.cert, &s.original, 0o644);
        sim.put(&s.key, b"old key\n", 0o600);
    }
    let mut w = sim.world();
    for s in sites {
        w.sites.insert(s.sni.clone(), (s.cert.clone(), Some(leaf_of(&s.original))));
    }
    w.site_commands = [VALIDATE.to_string(), RELOAD.to_string()].into();
    w.reload_commands.insert(RELOAD.into());
    w.exec_check = Some(reload_begun_by_all);
    drop(w);
    sim
}

/// One request run to a result the way the worker runs it: a new attempt
/// joining the batch of its key; after a failed shared step, its turn to
/// deploy alone, then a new attempt alone.
async fn member<H: driver::Host, V: driver::Verifier, J: driver::Journal>(
    env: &Env<'_, H, V, J, StepClock>,
    reloads: &Arc<Reloads>,
    site: &Site,
    first_attempt: u32,
    start_at: u64,
    mut expected: Option<Expected>,
) -> Terminal {
    let key = ReloadKey::of(&site.plan, "");
    env.clock.sleep_until(Timestamp(start_at)).await;
    let mut alone: Option<Ticket> = None;
    for attempt in first_attempt.. {
        assert!(attempt < first_attempt + 5, "{}: too many attempts", site.id);
        let mut plan = site.plan.clone();
        plan.attempt = attempt;
        let slot = Slot::default();
        let c = match alone {
            Some(_) => Coalesce::Alone,
            None => Coalesce::Join { reloads, key: &key, slot: &slot, expected: expected.as_ref() },
        };
        match driver::start_coalesced(env, plan, &site.payload, None, c).await.expect("driver") {
            Terminal::Abandoned(why) => {
                expected = None;
                if let Some(t) = turn_to_deploy_alone(&slot).await {
                    alone = Some(t);
                } else {
                    panic!("{}: abandoned without a failed batch, with no crash: {why}", site.id);
                }
            }
            t => return t,
        }
    }
    unreachable!()
}

#[derive(Clone, Debug)]
enum Trouble {
    None,
    /// The shared validate's channel drops (transient).
    ValidateTransient,
    /// The shared reload exits 1 once (then works).
    ReloadFails,
    /// The shared reload's channel drops once (transient).
    ReloadTransient,
}

#[derive(Clone, Debug)]
struct Case {
    n: usize,
    broken: Option<usize>,
    fault: Trouble,
    verify: bool,
    /// Per member, when it starts (ms after the first).
    delays: Vec<u64>,
    crash: Option<(u64, bool)>,
    /// Members announce themselves ([`Reloads::expect`]) as the worker's do.
    announce: bool,
}

struct Ran {
    /// The simulation's clock when the members started.
    t0: u64,
    sim: Sim,
    sites: Vec<Site>,
    saved: u64,
    crashed: bool,
}

fn run_case(c: &Case) -> Ran {
    let sites = sites(c.n, c.broken, c.verify);
    let sim = host(&sites);
    match c.fault {
        Trouble::None => {}
        Trouble::ValidateTransient => sim.fail(
            OpKind::Exec(VALIDATE.into()),
            1,
            certdeploy_core::testkit::Fault::Fail(StepError::transient("channel lost")),
        ),
        Trouble::ReloadFails => sim.exit_codes(RELOAD, &[1]),
        Trouble::ReloadTransient => sim.fail(
            OpKind::Exec(RELOAD.into()),
            1,
            certdeploy_core::testkit::Fault::Fail(StepError::transient("channel lost")),
        ),
    }
    if let Some((step, after)) = c.crash {
        sim.crash_at(step, after);
    }
    let saved = Arc::new(AtomicU64::new(0));
    let counter = saved.clone();
    let reloads = Reloads::new(WINDOW_MS, move |n| {
        counter.fetch_add(n, Ordering::Relaxed);
    });
    let clock = StepClock { sim: sim.clone(), wakes: Arc::default() };
    let (host, verifier, journal) = (MemHost(sim.clone()), MemVerifier(sim.clone()), MemJournal(sim.clone()));
    let env = Env { host: &host, verifier: &verifier, journal: &journal, clock: &clock, cert_facts: fake_cert_facts };
    let t0 = sim.world().now;
    // Announced as the worker announces the deliveries it has taken, when
    // they are taken (before any starts): a batch of their key waits for
    // them within its window, and for nobody once all of them have joined.
    let announce = |s: &Site| c.announce.then(|| reloads.expect(&ReloadKey::of(&s.plan, "")));

    // The worker runs every request at once.
    let first = run_until_crash(|| {
        let tasks: Vec<Task<'_, Terminal>> = sites
            .iter()
            .zip(&c.delays)
            .map(|(s, d)| Box::pin(member(&env, &reloads, s, 1, t0 + d, announce(s))) as Task<'_, Terminal>)
            .collect();
        run_all(tasks, &clock, &reloads)
    });
    let crashed = first.is_err();
    if crashed {
        // The process died: unflushed records are gone; a new process
        // recovers every unfinished attempt from its own journal, then the
        // broker redelivers whatever has no result.
        sim.crash_journal();
        // A fault happens once: it is not scheduled again after the restart.
        sim.reset_faults();
        sim.world().scripted.clear();
        sim.world().exec_check = None;
        clock.wakes.lock().unwrap().clear();
        for id in sim.unfinished() {
            let records = sim.durable_records(&id);
            let task = Box::pin(async { driver::resume(&env, &records).await.expect("recovery") });
            run_all(vec![task as Task<'_, Terminal>], &clock, &reloads);
        }
        let again: Vec<&Site> = sites.iter().filter(|s| result(&sim, &s.id).is_none()).collect();
        let now = sim.world().now;
        let tasks: Vec<Task<'_, Terminal>> = again
            .iter()
            .map(|s| {
                let attempts =
                    sim.durable_records(&s.id).iter().filter(|r| matches!(r.event, Event::Started { .. })).count();
                Box::pin(member(&env, &reloads, s, attempts as u32 + 1, now, announce(s))) as Task<'_, Terminal>
            })
            .collect();
        run_all(tasks, &clock, &reloads);
    }
    assert_eq!(reloads.live(), 0, "every batch is forgotten once its members are done");
    Ran { t0, sim, sites, saved: saved.load(Ordering::Relaxed), crashed }
}

/// The last result journaled for `id`.
fn result(sim: &Sim, id: &str) -> Option<Report> {
    sim.durable_records(id).into_iter().rev().find_map(|r| match r.event {
        Event::Finished { report } => Some(report),
        _ => None,
    })
}

fn check(c: &Case, o: &Ran) -> Result<(), TestCaseError> {
    let sim = &o.sim;
    let w = sim.world().clone();
    prop_assert!(w.violations.is_empty(), "write-ahead violations: {:?}", w.violations);
    prop_assert!(sim.unfinished().is_empty(), "unfinished: {:?}", sim.unfinished());
    for (i, s) in o.sites.iter().enumerate() {
        let r = result(sim, &s.id);
        prop_assert!(r.is_some(), "{} has no result", s.id);
        let r = r.unwrap();
        let culprit = c.broken == Some(i);
        let want = if culprit { Outcome::RolledBack } else { Outcome::Deployed };
        prop_assert_eq!(r.outcome, want, "{}: {}", s.id, r.message);
        let shared = r.reload_shared_with.unwrap_or(0);
        prop_assert!(shared >= 1 && shared as usize <= c.n, "{}: reload_shared_with {:?}", s.id, r.reload_shared_with);
        let file = sim.get(&s.cert).map(|(b, _)| b);
        let expect = if culprit { &s.original } else { &s.new };
        prop_assert_eq!(file.as_ref(), Some(expect), "{}: cert file", s.id);
        prop_assert_eq!(sim.get(&s.key).is_some(), true, "{}: key file", s.id);
        prop_assert_eq!(w.sites[&s.sni].1, Some(leaf_of(expect)), "{}: served", s.id);
        prop_assert!(!String::from_utf8_lossy(&sim.journal_bytes()).contains("KEY "), "key bytes in the journal");
        journal_order(sim, &s.id)?;
    }
    if !o.crashed && c.broken.is_none() && matches!(c.fault, Trouble::None) && c.delays.iter().all(|d| *d == 0) {
        let reloads = w.exec_log.iter().filter(|e| *e == RELOAD).count();
        prop_assert_eq!(reloads, 1, "one reload for all: {:?}", w.exec_log);
        prop_assert_eq!(w.exec_log.iter().filter(|e| *e == VALIDATE).count(), 1, "one validate for all");
        prop_assert_eq!(o.saved, c.n as u64 - 1, "reloads saved");
        for s in &o.sites {
            prop_assert_eq!(result(sim, &s.id).unwrap().reload_shared_with, Some(c.n as u32), "{}", s.id);
        }
    }
    if !o.crashed && c.broken.is_some() && c.delays.iter().all(|d| *d == 0) {
        // The batch failed: each deployed again alone.
        for s in &o.sites {
            prop_assert_eq!(result(sim, &s.id).unwrap().reload_shared_with, Some(1), "{}", s.id);
        }
    }
    Ok(())
}

/// Per attempt: `ReloadShared` before the validate result, its own `Begun`
/// before a reload result, and a shared step's result never without them.
fn journal_order(sim: &Sim, id: &str) -> Result<(), TestCaseError> {
    let mut shared = false;
    let mut begun = false;
    for r in sim.durable_records(id) {
        match r.event {
            Event::Started { .. } => (shared, begun) = (false, false),
            Event::ReloadShared { .. } => shared = true,
            Event::Begun { step: Step::Reload } => begun = true,
            Event::Executed { step: Step::Validate, .. } | Event::StepFailed { step: Step::Validate, .. } => {
                prop_assert!(shared, "{id}: validate result before ReloadShared");
            }
            Event::Executed { step: Step::Reload, .. } | Event::StepFailed { step: Step::Reload, .. } => {
                prop_assert!(shared && begun, "{id}: reload result before its own Begun(reload)");
            }
            _ => {}
        }
    }
    Ok(())
}

fn fault() -> impl Strategy<Value = Trouble> {
    prop_oneof![
        3 => Just(Trouble::None),
        1 => Just(Trouble::ValidateTransient),
        1 => Just(Trouble::ReloadFails),
        1 => Just(Trouble::ReloadTransient),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        2usize..=5,
        any::<bool>(),
        fault(),
        any::<bool>(),
        any::<bool>(),
        prop::option::of((1u64..160, any::<bool>())),
        any::<bool>(),
    )
        .prop_flat_map(|(n, broken, fault, verify, stagger, crash, announce)| {
            // A reload that fails for good fails the deployment running it:
            // only the shared one is scheduled to (all arrive together, and
            // no broken certificate makes them deploy alone first).
            let (broken, stagger) =
                if matches!(fault, Trouble::ReloadFails) { (false, false) } else { (broken, stagger) };
            let delays = if stagger { prop::collection::vec(0u64..400, n).boxed() } else { Just(vec![0; n]).boxed() };
            (Just(n), if broken { (0..n).prop_map(Some).boxed() } else { Just(None).boxed() }, delays).prop_map(
                move |(n, broken, delays)| Case { n, broken, fault: fault.clone(), verify, delays, crash, announce },
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn shared_reloads_end_like_reloads_of_their_own(c in case()) {
        let o = run_case(&c);
        check(&c, &o)?;
    }
}

/// Five deployments arriving together: one validate, one reload, each
/// result `reload_shared_with = 5`, four reloads saved.
#[test]
fn five_together_share_one_reload() {
    let c = Case {
        n: 5,
        broken: None,
        fault: Trouble::None,
        verify: true,
        delays: vec![0; 5],
        crash: None,
        announce: false,
    };
    let o = run_case(&c);
    check(&c, &o).unwrap();
    let w = o.sim.world();
    assert_eq!(w.exec_log, vec![VALIDATE.to_string(), RELOAD.to_string()]);
    assert_eq!(o.saved, 4);
}

/// One broken certificate among four: the shared validate fails, all four
/// roll back, then deploy alone one after another: only the broken one
/// ends `rolled_back`.
#[test]
fn one_broken_among_four_only_it_rolls_back() {
    let c = Case {
        n: 4,
        broken: Some(2),
        fault: Trouble::None,
        verify: true,
        delays: vec![0; 4],
        crash: None,
        announce: false,
    };
    let o = run_case(&c);
    check(&c, &o).unwrap();
    let w = o.sim.world();
    // The shared validate, then each alone: validate (+ reload when it passes).
    let validates = w.exec_log.iter().filter(|e| *e == VALIDATE).count();
    let reloads = w.exec_log.iter().filter(|e| *e == RELOAD).count();
    assert_eq!((validates, reloads), (5, 3), "{:?}", w.exec_log);
}

/// Members arriving further apart than the window do not share.
#[test]
fn members_beyond_the_window_reload_alone() {
    let c = Case {
        n: 3,
        broken: None,
        fault: Trouble::None,
        verify: false,
        delays: vec![0, 1_000, 2_000],
        crash: None,
        announce: false,
    };
    let o = run_case(&c);
    check(&c, &o).unwrap();
    for s in &o.sites {
        assert_eq!(result(&o.sim, &s.id).unwrap().reload_shared_with, Some(1));
    }
    assert_eq!(o.sim.world().exec_log.iter().filter(|e| *e == RELOAD).count(), 3);
}

/// Announced members all taken together share one reload, as without
/// announcements, and nobody waits for the rest of the window: the batch
/// closes once every announced member has joined.
#[test]
fn announced_members_share_one_reload_without_waiting_for_the_window() {
    let c = Case {
        n: 5,
        broken: None,
        fault: Trouble::None,
        verify: false,
        delays: vec![0; 5],
        crash: None,
        announce: true,
    };
    let o = run_case(&c);
    check(&c, &o).unwrap();
    assert_eq!(o.sim.world().exec_log, vec![VALIDATE.to_string(), RELOAD.to_string()]);
    let took = o.sim.world().now - o.t0;
    assert!(took < WINDOW_MS, "waited for the window: ended after {took} ms");
}

/// A deployment alone under way for its daemon does not wait for a window
/// nobody can join (unannounced, it waits the whole window).
#[test]
fn a_lone_announced_member_reloads_without_waiting_for_the_window() {
    for announce in [true, false] {
        let c =
            Case { n: 1, broken: None, fault: Trouble::None, verify: false, delays: vec![0], crash: None, announce };
        let o = run_case(&c);
        check(&c, &o).unwrap();
        let took = o.sim.world().now - o.t0;
        assert_eq!(took < WINDOW_MS, announce, "announce {announce}: ended after {took} ms");
    }
}

/// A key of the book's own tests.
fn book_key() -> ReloadKey {
    ReloadKey {
        host: "h".into(),
        port: 22,
        user: "u".into(),
        runner: String::new(),
        validate_command: None,
        reload_command: "r".into(),
        exec_timeout_ms: 1,
    }
}

/// The book's side of announcements: an announced batch closes early once
/// nobody else of its key is expected, not before; unannounced batches
/// always wait for their window.
#[test]
fn book_closes_an_announced_batch_once_nobody_else_is_expected() {
    let key = book_key();
    let mut b = Book::new(200);
    b.expect(&key);
    b.expect(&key);
    let (b0, _, _) = b.join(&key, 1_000).unwrap();
    b.announced(b0);
    assert_eq!(b.unexpect(&key), None, "one more is expected");
    assert_eq!(b.close(b0, 1_001), None, "waits for the one expected");
    assert_eq!(b.unexpect(&key), Some(b0), "the last one went: the open batch is told");
    assert_eq!(b.close(b0, 1_001), Some(1), "closed before its window");
    let other = ReloadKey { reload_command: "other".into(), ..key.clone() };
    let (b1, _, _) = b.join(&other, 2_000).unwrap();
    assert_eq!(b.close(b1, 2_001), None, "unannounced: waits for its window");
    assert_eq!(b.close(b1, 2_200), Some(1));
}

#[test]
fn book_joins_within_the_window_only() {
    let key = book_key();
    let mut b = Book::new(200);
    let (b0, s0, closes) = b.join(&key, 1_000).unwrap();
    assert_eq!((s0, closes), (0, 1_200));
    let (b1, s1, _) = b.join(&key, 1_199).unwrap();
    assert_eq!((b1, s1), (b0, 1), "joined within the window");
    assert_eq!(b.close(b0, 1_199), None, "still open");
    assert_eq!(b.join(&key, 1_200), Err(b0), "the window has passed: wait for the batch at work");
    assert_eq!(b.close(b0, 1_200), Some(2));
    assert_eq!(b.join(&key, 5_000), Err(b0), "a closed batch at work keeps others of its key out");
    let other = ReloadKey { reload_command: "other".into(), ..key.clone() };
    assert!(b.join(&other, 1_200).is_ok(), "another command is another batch");

    // The shared step runs once every member has come to it.
    assert_eq!(b.arrive(b0, 1, Step::Validate), AtStep::Wait);
    assert_eq!(b.arrive(b0, 0, Step::Validate), AtStep::Run { with: 2 });
    assert_eq!(b.poll(b0, 1), AtStep::Wait, "running");
    b.ran(b0, 0, Ok(ExecResult { exit_code: Some(1), output: String::new() }));
    assert!(matches!(b.poll(b0, 1), AtStep::Done(Ok(r)) if r.exit_code == Some(1)));
    assert!(b.failed(b0));
    // Alone, one after another, once both rolled back.
    assert!(!b.alone_turn(b0, 0), "seat 1 has not rolled back yet");
    b.leave(b0, 0);
    b.leave(b0, 1);
    assert!(b.alone_turn(b0, 0));
    assert!(!b.alone_turn(b0, 1), "after seat 0");
    b.done(b0, 0);
    assert!(b.alone_turn(b0, 1));
    b.done(b0, 1);
    let (b2, s2, _) = b.join(&key, 5_000).unwrap();
    assert_ne!(b2, b0, "once every member is done, a new batch opens");
    assert_eq!(s2, 0);

    let mut off = Book::new(0);
    let (a, _, _) = off.join(&key, 5).unwrap();
    assert_eq!(off.close(a, 5), Some(1));
    let (a2, _, _) = off.join(&key, 5).unwrap();
    assert_ne!(a2, a, "window 0: each alone, none waits");
}
