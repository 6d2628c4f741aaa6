//! One validate and one reload for many deployments.
//!
//! Deployments to the same account (host, port, user, and the way commands
//! run there) with the same validate and reload commands that reach their
//! validate step within a window share one run of each: the first one to
//! arrive opens a batch, the others join it until the window has passed,
//! then the batch is closed and its members meet at each shared step.
//! Each member journals its own records around the shared step (its own
//! `Begun` before the reload, its own result after), so that recovery
//! treats a shared reload exactly like a reload of its own.
//!
//! When a shared step fails, every member rolls back (restore, and a
//! retry-reload shared the same way once all are restored), then deploys
//! again alone, one after another in the order they joined, once every
//! member has finished its rollback: only the deployment that breaks the
//! step fails again.
//!
//! [`Book`] is the decision, pure and clock-free (`now` is an argument):
//! who joins which batch, when it closes, who runs a shared step and when,
//! what its result is for each member, and whose turn it is to deploy
//! alone. [`Reloads`] wraps it for concurrently running deployments (any
//! async runtime: it only uses wakers and the [`Clock`] it is given), and
//! [`Ticket`] is one member's place in a batch.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use crate::driver::Clock;
use crate::model::{Plan, Timestamp};
use crate::step::{ExecResult, Step, StepError};

/// What deployments must have in common to share a validate and a reload.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReloadKey {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// How commands run on the account (e.g. through sudo): the same
    /// command run another way is another command.
    pub runner: String,
    pub validate_command: Option<String>,
    pub reload_command: String,
    pub exec_timeout_ms: u64,
}

impl ReloadKey {
    pub fn of(plan: &Plan, runner: &str) -> ReloadKey {
        ReloadKey {
            host: plan.remote.host.clone(),
            port: plan.remote.port,
            user: plan.remote.user.clone(),
            runner: runner.to_string(),
            validate_command: plan.validate_command.clone(),
            reload_command: plan.reload_command.clone(),
            exec_timeout_ms: plan.policy.exec_timeout_ms,
        }
    }
}

pub type BatchId = u64;

/// A command's outcome as every member of a batch sees it.
pub type Shared = Result<ExecResult, StepError>;

/// The batches of one worker: which is open per key, and each one's
/// members and shared steps.
#[derive(Debug)]
pub struct Book {
    window_ms: u64,
    /// Per key, deployments under way in this worker that may still join
    /// its open batch (announced, not joined yet): while there are none,
    /// an open batch need not wait for the rest of its window.
    expected: BTreeMap<ReloadKey, u32>,
    /// Per key, the batch open or at work (until all its members are done).
    open: BTreeMap<ReloadKey, BatchId>,
    batches: BTreeMap<BatchId, Batch>,
    next: BatchId,
}

#[derive(Debug)]
struct Batch {
    key: ReloadKey,
    closes_at: u64,
    closed: bool,
    seats: Vec<Seat>,
    /// Per shared step and round (a step retried after a transient error
    /// is met again): who runs it, then its result.
    steps: BTreeMap<(Step, u32), Run>,
    /// A shared step did not succeed: every member deploys again alone.
    failed: bool,
    /// Its members announce themselves ([`Book::expect`]): it may close
    /// before its window once nobody else is expected.
    announced: bool,
}

#[derive(Debug, Default)]
struct Seat {
    /// How many times this member has come to each shared step.
    rounds: BTreeMap<Step, u32>,
    /// Waiting at this step and round.
    at: Option<(Step, u32)>,
    /// Done with the shared steps (its attempt ended, or it went away).
    left: bool,
    /// Done altogether: deployed again alone, or never needing to.
    done: bool,
}

#[derive(Clone, Debug)]
enum Run {
    /// Member `runner` is running it.
    Running {
        runner: usize,
        with: u32,
    },
    Ran(Shared),
}

/// What a member at a shared step does now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AtStep {
    /// Others are still on their way, or running it.
    Wait,
    /// Run it now, for `with` members (this one included).
    Run { with: u32 },
    /// It ran: this is its result.
    Done(Shared),
}

impl Book {
    /// `window_ms` = 0: every deployment is a batch of its own.
    pub fn new(window_ms: u64) -> Book {
        Book { window_ms, expected: BTreeMap::new(), open: BTreeMap::new(), batches: BTreeMap::new(), next: 0 }
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// A member about to write its files (or, with nothing to write, to
    /// reload) at `now` joins the open batch of its key, or opens one that
    /// closes `window_ms` later. While a closed batch of its key is still
    /// at work (writes, validate, reload, verify, rollbacks, lone
    /// redeploys), it waits: `Err(batch)` to wait for. So no file of
    /// another batch is ever on the host, unvalidated, while a batch
    /// validates or reloads: a validate that checks the whole daemon
    /// configuration fails only for a file of its own batch. (With
    /// `window_ms` = 0, every deployment is a batch of its own at once.)
    /// Returns the batch, the member's seat and when the batch closes.
    pub fn join(&mut self, key: &ReloadKey, now: u64) -> Result<(BatchId, usize, u64), BatchId> {
        if let Some(&b) = self.open.get(key)
            && let Some(batch) = self.batches.get_mut(&b)
        {
            if batch.closed || now >= batch.closes_at {
                return Err(b);
            }
            batch.seats.push(Seat::default());
            return Ok((b, batch.seats.len() - 1, batch.closes_at));
        }
        let b = self.next;
        self.next += 1;
        let closes_at = now.saturating_add(self.window_ms);
        let closed = self.window_ms == 0;
        self.batches.insert(
            b,
            Batch {
                key: key.clone(),
                closes_at,
                closed,
                seats: vec![Seat::default()],
                steps: BTreeMap::new(),
                failed: false,
                announced: false,
            },
        );
        if !closed {
            self.open.insert(key.clone(), b);
        }
        Ok((b, 0, closes_at))
    }

    /// A deployment of `key` is under way and may join its open batch
    /// (it has not written yet).
    pub fn expect(&mut self, key: &ReloadKey) {
        *self.expected.entry(key.clone()).or_insert(0) += 1;
    }

    /// An expected deployment of `key` joined a batch, or ended without
    /// joining one. Returns the open batch of the key when nobody else is
    /// expected now (its members waiting for the window may go on).
    pub fn unexpect(&mut self, key: &ReloadKey) -> Option<BatchId> {
        let n = self.expected.get_mut(key)?;
        *n = n.saturating_sub(1);
        if *n > 0 {
            return None;
        }
        self.expected.remove(key);
        self.open.get(key).copied()
    }

    /// May the batch close before its window has passed? Once no other
    /// deployment of its key is under way in this worker: nobody could
    /// join it.
    pub fn nobody_expected(&self, b: BatchId) -> bool {
        self.batches.get(&b).is_none_or(|batch| batch.announced && !self.expected.contains_key(&batch.key))
    }

    /// A member of batch `b` joined as an announced deployment: the batch
    /// may close early (see [`Self::nobody_expected`]). Batches of members
    /// that do not announce themselves always wait for their window.
    pub fn announced(&mut self, b: BatchId) {
        if let Some(batch) = self.batches.get_mut(&b) {
            batch.announced = true;
        }
    }

    /// Close the batch once its window has passed, or earlier once nobody
    /// else is expected: nobody joins any more (and others of its key wait
    /// until it is done). Returns how many members it has, `None` while
    /// it is still open.
    pub fn close(&mut self, b: BatchId, now: u64) -> Option<u32> {
        let early = self.nobody_expected(b);
        let batch = self.batches.get_mut(&b)?;
        if !batch.closed {
            if now < batch.closes_at && !early {
                return None;
            }
            batch.closed = true;
        }
        Some(batch.seats.len() as u32)
    }

    /// Member `seat` comes to the shared `step` (again, after a transient
    /// error: the next round). The step runs once every member still in
    /// the shared steps has come to the same round; the first to see that
    /// runs it.
    pub fn arrive(&mut self, b: BatchId, seat: usize, step: Step) -> AtStep {
        let Some(batch) = self.batches.get_mut(&b) else { return AtStep::Run { with: 1 } };
        let s = &mut batch.seats[seat];
        let round = s.rounds.entry(step).or_insert(0);
        *round += 1;
        s.at = Some((step, *round));
        batch.poll(seat)
    }

    /// Member `seat`, waiting at its step: what now?
    pub fn poll(&mut self, b: BatchId, seat: usize) -> AtStep {
        match self.batches.get_mut(&b) {
            Some(batch) => batch.poll(seat),
            None => AtStep::Wait,
        }
    }

    /// The runner reports the shared step's result. Anything but a success
    /// fails the batch: every member rolls back and deploys again alone.
    pub fn ran(&mut self, b: BatchId, seat: usize, result: Shared) {
        let Some(batch) = self.batches.get_mut(&b) else { return };
        let Some(at) = batch.seats[seat].at else { return };
        if !result.as_ref().is_ok_and(ExecResult::success) {
            batch.failed = true;
        }
        batch.steps.insert(at, Run::Ran(result));
    }

    /// Member `seat` needs no more shared steps (its attempt ended).
    pub fn leave(&mut self, b: BatchId, seat: usize) {
        if let Some(batch) = self.batches.get_mut(&b) {
            batch.leave(seat);
        }
    }

    /// Member `seat` is done altogether (or gone): it leaves the shared
    /// steps, and the line of lone deployments no longer waits for it.
    /// The batch is forgotten once every member is done.
    pub fn done(&mut self, b: BatchId, seat: usize) {
        let Some(batch) = self.batches.get_mut(&b) else { return };
        batch.leave(seat);
        batch.seats[seat].done = true;
        if batch.seats.iter().all(|s| s.done) {
            let key = batch.key.clone();
            self.batches.remove(&b);
            if self.open.get(&key) == Some(&b) {
                self.open.remove(&key);
            }
        }
    }

    /// Did a shared step of the batch fail?
    pub fn failed(&self, b: BatchId) -> bool {
        self.batches.get(&b).is_some_and(|batch| batch.failed)
    }

    /// After a failed shared step: may member `seat` deploy again alone
    /// now? Once every member has finished its rollback, one after
    /// another in the order they joined.
    pub fn alone_turn(&self, b: BatchId, seat: usize) -> bool {
        let Some(batch) = self.batches.get(&b) else { return true };
        batch.seats.iter().all(|s| s.left) && batch.seats[..seat].iter().all(|s| s.done)
    }

    /// Batches not forgotten yet (for tests: none once all members are done).
    pub fn live(&self) -> usize {
        self.batches.len()
    }
}

impl Batch {
    fn poll(&mut self, seat: usize) -> AtStep {
        let Some(at) = self.seats[seat].at else { return AtStep::Wait };
        match self.steps.get(&at) {
            Some(Run::Ran(r)) => return AtStep::Done(r.clone()),
            Some(Run::Running { runner, with }) if *runner == seat => return AtStep::Run { with: *with },
            Some(Run::Running { .. }) => return AtStep::Wait,
            None => {}
        }
        // Every member still in the shared steps is here.
        let mut with = 0;
        for s in self.seats.iter().filter(|s| !s.left) {
            if s.at != Some(at) {
                return AtStep::Wait;
            }
            with += 1;
        }
        self.steps.insert(at, Run::Running { runner: seat, with });
        AtStep::Run { with }
    }

    fn leave(&mut self, seat: usize) {
        let s = &mut self.seats[seat];
        s.left = true;
        // A runner that goes away mid-run: what the command did is
        // unknown, so the step failed for everyone.
        if let Some(at) = s.at.take()
            && matches!(self.steps.get(&at), Some(Run::Running { runner, .. }) if *runner == seat)
        {
            let e = StepError::transient("the deployment running the shared command stopped before its result");
            self.steps.insert(at, Run::Ran(Err(e)));
            self.failed = true;
        }
    }
}

/// The batches of one worker, for deployments running concurrently.
pub struct Reloads {
    inner: Mutex<Inner>,
    /// Told how many reloads a shared reload saved (its members but one).
    saved: Box<dyn Fn(u64) + Send + Sync>,
}

struct Inner {
    book: Book,
    wakers: BTreeMap<BatchId, Vec<Waker>>,
}

impl Reloads {
    pub fn new(window_ms: u64, saved: impl Fn(u64) + Send + Sync + 'static) -> Arc<Reloads> {
        Arc::new(Reloads {
            inner: Mutex::new(Inner { book: Book::new(window_ms), wakers: BTreeMap::new() }),
            saved: Box::new(saved),
        })
    }

    pub fn window_ms(&self) -> u64 {
        self.lock().book.window_ms()
    }

    /// Batches not forgotten yet.
    pub fn live(&self) -> usize {
        self.lock().book.live()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Join (or open) the batch of `key`, before writing: waits while a
    /// closed batch of the key is at work (see [`Book::join`]).
    pub async fn enter<C: Clock>(self: &Arc<Self>, key: &ReloadKey, clock: &C) -> Ticket {
        self.enter_expected(key, clock, None).await
    }

    /// [`Self::enter`] for a deployment announced by `expected`: once it
    /// has joined, it is no longer waited for.
    pub async fn enter_expected<C: Clock>(
        self: &Arc<Self>,
        key: &ReloadKey,
        clock: &C,
        expected: Option<&Expected>,
    ) -> Ticket {
        let (batch, seat, closes_at) = std::future::poll_fn(|cx| {
            let mut inner = self.lock();
            match inner.book.join(key, clock.now().0) {
                Ok(joined) => {
                    if let Some(e) = expected {
                        inner.book.announced(joined.0);
                        e.arrived(&mut inner);
                    }
                    Poll::Ready(joined)
                }
                Err(busy) => {
                    inner.park(busy, cx.waker());
                    Poll::Pending
                }
            }
        })
        .await;
        Ticket { reloads: self.clone(), batch, seat, closes_at, size: 1 }
    }

    /// Announce a deployment of `key` under way that may join the key's
    /// open batch: until it joins one (or the returned guard is dropped),
    /// that batch waits for it, within its window.
    pub fn expect(self: &Arc<Self>, key: &ReloadKey) -> Expected {
        self.lock().book.expect(key);
        Expected { reloads: self.clone(), key: key.clone(), pending: std::sync::atomic::AtomicBool::new(true) }
    }
}

/// A deployment announced to [`Reloads::expect`], until it joins a batch or
/// is dropped.
pub struct Expected {
    reloads: Arc<Reloads>,
    key: ReloadKey,
    pending: std::sync::atomic::AtomicBool,
}

impl Expected {
    fn arrived(&self, inner: &mut Inner) {
        if self.pending.swap(false, std::sync::atomic::Ordering::AcqRel)
            && let Some(b) = inner.book.unexpect(&self.key)
        {
            inner.wake(b);
        }
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        let reloads = self.reloads.clone();
        let mut inner = reloads.lock();
        self.arrived(&mut inner);
    }
}

impl Inner {
    fn wake(&mut self, b: BatchId) {
        for w in self.wakers.remove(&b).unwrap_or_default() {
            w.wake();
        }
    }

    fn park(&mut self, b: BatchId, waker: &Waker) {
        let list = self.wakers.entry(b).or_default();
        if !list.iter().any(|w| w.will_wake(waker)) {
            list.push(waker.clone());
        }
    }
}

/// One member's place in a batch. Dropping it is being done with the batch.
pub struct Ticket {
    reloads: Arc<Reloads>,
    batch: BatchId,
    seat: usize,
    closes_at: u64,
    size: u32,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket(batch {}, seat {} of {})", self.batch, self.seat, self.size)
    }
}

impl Ticket {
    /// How many deployments joined the batch (once closed).
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Wait for the batch to close (its window to pass); how many
    /// deployments it has.
    pub async fn close<C: Clock>(&mut self, clock: &C) -> u32 {
        loop {
            let closed = self.reloads.lock().book.close(self.batch, clock.now().0);
            match closed {
                Some(n) => {
                    self.size = n;
                    return n;
                }
                None => {
                    // Until the window has passed, or nobody else is
                    // expected any more (woken by the last one's arrival).
                    let (r, b) = (&self.reloads, self.batch);
                    let nobody = std::future::poll_fn(|cx| {
                        let mut inner = r.lock();
                        if inner.book.nobody_expected(b) {
                            return Poll::Ready(());
                        }
                        inner.park(b, cx.waker());
                        Poll::Pending
                    });
                    crate::lock::race(clock.sleep_until(Timestamp(self.closes_at)), nobody).await;
                }
            }
        }
    }

    /// Run the shared `step`: wait for every member still in the shared
    /// steps to come to it, then one of them runs `run` and all get its
    /// result.
    pub async fn exec<F: Future<Output = Shared>>(&self, step: Step, run: impl FnOnce() -> F) -> Shared {
        let r = &self.reloads;
        let mut first = true;
        let at = std::future::poll_fn(|cx| {
            let mut inner = r.lock();
            let at = if std::mem::take(&mut first) {
                inner.book.arrive(self.batch, self.seat, step)
            } else {
                inner.book.poll(self.batch, self.seat)
            };
            if at == AtStep::Wait {
                inner.park(self.batch, cx.waker());
                Poll::Pending
            } else {
                // Arriving may complete the step's meeting for nobody but
                // this one; others may be waiting on a state this changed.
                inner.wake(self.batch);
                Poll::Ready(at)
            }
        })
        .await;
        match at {
            AtStep::Done(result) => result,
            AtStep::Wait => unreachable!("waiting is pending"),
            AtStep::Run { with } => {
                let result = run().await;
                if step == Step::Reload && with > 1 {
                    (r.saved)(u64::from(with) - 1);
                }
                let mut inner = r.lock();
                inner.book.ran(self.batch, self.seat, result.clone());
                inner.wake(self.batch);
                result
            }
        }
    }

    /// Done with the shared steps (this member's attempt ended).
    pub fn leave(&self) {
        let mut inner = self.reloads.lock();
        inner.book.leave(self.batch, self.seat);
        inner.wake(self.batch);
    }

    /// Did a shared step fail (so that this member deploys again alone)?
    pub fn failed(&self) -> bool {
        self.reloads.lock().book.failed(self.batch)
    }

    /// Wait until every member has finished its rollback and those that
    /// joined before this one have deployed again alone. Dropping the
    /// ticket then passes the turn on.
    pub async fn alone_turn(&self) {
        self.leave();
        std::future::poll_fn(|cx| {
            let mut inner = self.reloads.lock();
            if inner.book.alone_turn(self.batch, self.seat) {
                Poll::Ready(())
            } else {
                inner.park(self.batch, cx.waker());
                Poll::Pending
            }
        })
        .await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self.reloads.lock();
        inner.book.done(self.batch, self.seat);
        inner.wake(self.batch);
    }
}

/// Where the driver leaves a member's ticket for its caller (who keeps it
/// through a lone redeploy after a failed batch).
#[derive(Debug, Default)]
pub struct Slot(Mutex<Option<Ticket>>);

impl Slot {
    pub fn put(&self, t: Ticket) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    }
    pub fn take(&self) -> Option<Ticket> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// After an attempt ended without a result: if it was a member of a batch
/// whose shared step failed, wait until it may deploy again alone and
/// return the ticket to hold while it does (run that attempt with
/// [`Coalesce::Alone`]; dropping the ticket passes the turn on).
pub async fn turn_to_deploy_alone(slot: &Slot) -> Option<Ticket> {
    let ticket = slot.take().filter(Ticket::failed)?;
    ticket.alone_turn().await;
    Some(ticket)
}

/// How the driver runs a deployment's validate and reload.
#[derive(Clone, Copy)]
pub enum Coalesce<'a> {
    /// Each its own, nothing journaled about sharing.
    Off,
    /// Its own, journaled as shared with nobody (`reload_shared_with` = 1).
    Alone,
    /// Join the batch of `key` in `reloads` before writing; the ticket is
    /// left in `slot`. `expected`: this deployment's announcement (see
    /// [`Reloads::expect`]), consumed when it joins.
    Join { reloads: &'a Arc<Reloads>, key: &'a ReloadKey, slot: &'a Slot, expected: Option<&'a Expected> },
}

impl Coalesce<'_> {
    /// Does the driver journal `ReloadShared` (and join a batch)?
    pub fn on(&self) -> bool {
        !matches!(self, Coalesce::Off)
    }
}
