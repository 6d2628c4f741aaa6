//! A lock this worker holds: its lease by the holder's own monotonic
//! clock, its renewals and rewrites, and its release.
//!
//! The lease is judged by the host's clock alone (a lock not rewritten for
//! `lease_ms`, by its mtime against the mtime of a file the checker has
//! just written, is expired). The holder, for its part, stops touching the
//! host once `lease − margin` has passed since the *start* of its last
//! successful rewrite, by its own monotonic clock. A rewrite lands on the
//! host after it started, so the holder has stopped before anyone may take
//! over, whatever the workers' clocks say, as long as one lock operation
//! takes less than the margin.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};

use super::Planted;
use super::protocol::reacquire;
use super::record::{LockPhase, LockRecord, Parsed};
use crate::driver::{Clock, Host, LockWrite};
use crate::step::StepError;

/// The part of the lease kept as margin: a quarter, at least 0.5 s.
pub fn margin_ms(lease_ms: u64) -> u64 {
    (lease_ms / 4).max(500)
}

#[derive(Debug)]
struct State {
    record: LockRecord,
    /// Monotonic ms after which the holder no longer touches the host.
    valid_until: u64,
    /// Monotonic ms at which the last successful write started.
    written_at: u64,
    /// The host's clock (whole seconds) at our last write of the lock.
    host_now: u64,
    lost: bool,
    released: bool,
    /// Set (once) when the lease was found run out by the holder's own
    /// clock while the lock was still meant to be used: how long it had
    /// been since the write that last extended it started.
    overrun_ms: Option<u64>,
    /// A rewrite (renewal or phase) is in flight: they never overlap, or
    /// an older content could land after a newer one.
    busy: bool,
}

/// A held target lock, shared by the deployment it protects and the
/// renewal running beside it.
#[derive(Debug)]
pub struct Held {
    path: String,
    lease_ms: u64,
    planted: Planted,
    st: Mutex<State>,
}

/// Clears `busy` when dropped (also when the rewrite's future is dropped).
struct Turn<'a>(&'a Held);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.st().busy = false;
    }
}

/// Yields once to the executor.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Which of two futures finished first.
pub enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Poll `a` and `b` together; the first to finish wins, the other is
/// dropped. Needs no runtime (both run in the caller's task).
pub async fn race<A: Future, B: Future>(a: A, b: B) -> Either<A::Output, B::Output> {
    let mut a = pin!(a);
    let mut b = pin!(b);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(x) = a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(x));
        }
        if let Poll::Ready(y) = b.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(y));
        }
        Poll::Pending
    })
    .await
}

impl Held {
    /// `since_mono`: when the write that made the lock ours started;
    /// `host_now`: the host's clock at that write.
    pub fn new(path: String, record: LockRecord, since_mono: u64, host_now: u64, planted: Planted) -> Held {
        let lease_ms = record.lease_ms;
        let valid_until = since_mono + lease_ms.saturating_sub(margin_ms(lease_ms));
        Held {
            path,
            lease_ms,
            planted,
            st: Mutex::new(State {
                record,
                valid_until,
                written_at: since_mono,
                host_now,
                lost: false,
                released: false,
                overrun_ms: None,
                busy: false,
            }),
        }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn path(&self) -> &str {
        &self.path
    }
    pub fn token(&self) -> String {
        self.st().record.token.clone()
    }
    pub fn record(&self) -> LockRecord {
        self.st().record.clone()
    }
    pub fn planted(&self) -> Planted {
        self.planted
    }
    /// May this worker still touch the host at `now_mono`?
    pub fn valid(&self, now_mono: u64) -> bool {
        let mut st = self.st();
        self.note_overrun(&mut st, now_mono);
        !st.lost && !st.released && now_mono < st.valid_until
    }

    /// Note, once, that the lease has run out by this holder's own clock
    /// while the lock was still meant to be used (not lost to another
    /// token, not released): the holder stalled longer than `lease −
    /// margin` since the write that last extended the lease started. The
    /// fence keeps that safe (no host operation starts from now on), but
    /// the attempt ends and the next taker redoes what the lock still
    /// describes (a rollback, say): a warning names it, so that a slow
    /// machine is told apart from a protocol fault.
    fn note_overrun(&self, st: &mut State, now_mono: u64) {
        if st.lost || st.released || st.overrun_ms.is_some() || now_mono < st.valid_until {
            return;
        }
        let stalled = now_mono.saturating_sub(st.written_at);
        st.overrun_ms = Some(stalled);
        tracing::warn!(
            lock = %self.path,
            stalled_ms = stalled,
            lease_ms = self.lease_ms,
            "lease overrun: {stalled} ms passed since the lock write that last extended this worker's lease started \
             (it may touch the host for {} ms of its {} ms lease); this worker stops touching the host, and whoever \
             takes the lock next deals with what it describes",
            self.lease_ms.saturating_sub(margin_ms(self.lease_ms)),
            self.lease_ms
        );
    }

    /// Why this lock can no longer be relied on, for the attempt's record.
    pub fn lost_reason(&self) -> String {
        let st = self.st();
        if st.lost {
            format!("target lock {} was taken over by another worker (a renewal found another token in it)", self.path)
        } else if let Some(ms) = st.overrun_ms {
            format!(
                "target lock {}: lease overrun: this worker's lease ran out by its own clock, {ms} ms after the lock \
                 write that last extended it started (it may touch the host for {} ms of its {} ms lease)",
                self.path,
                self.lease_ms.saturating_sub(margin_ms(self.lease_ms)),
                self.lease_ms
            )
        } else {
            format!("target lock {} is no longer ours", self.path)
        }
    }
    pub fn valid_until(&self) -> u64 {
        self.st().valid_until
    }
    pub fn is_lost(&self) -> bool {
        self.st().lost
    }
    pub fn is_released(&self) -> bool {
        self.st().released
    }
    /// How often the renewal runs.
    pub fn renew_every_ms(&self) -> u64 {
        (self.lease_ms / 4).max(1)
    }

    fn try_turn(&self) -> Option<Turn<'_>> {
        let mut st = self.st();
        if st.busy {
            return None;
        }
        st.busy = true;
        Some(Turn(self))
    }

    async fn turn(&self) -> Turn<'_> {
        loop {
            if let Some(t) = self.try_turn() {
                return t;
            }
            YieldNow(false).await;
        }
    }

    /// Write the lock with `edit` applied, extending the lease from the
    /// moment the write started. Refused once the lock is no longer valid
    /// (the fence), unless `skip_fence` (a deliberately broken renewal).
    async fn write<'a, H: Host, C: Clock>(
        &'a self,
        host: &'a H,
        clock: &'a C,
        edit: impl FnOnce(&mut LockRecord),
        skip_fence: bool,
    ) -> Result<(), StepError> {
        let replace =
            |w: LockWrite<'a>| async move { (host.lock_replace(w.path, &w.bytes, w.durable, w.fence()).await, ()) };
        self.write_via(clock, edit, skip_fence, replace).await.0
    }

    /// [`Self::write`], the lock replaced by `op` (a host operation that
    /// replaces the lock as [`Host::lock_replace`] does, and may carry other
    /// requests in the same pipeline); `op`'s own result comes back beside
    /// the rewrite's, `None` when `op` did not run (the fence).
    async fn write_via<'a, C: Clock, T, F, Fut>(
        &'a self,
        clock: &'a C,
        edit: impl FnOnce(&mut LockRecord),
        skip_fence: bool,
        op: F,
    ) -> (Result<(), StepError>, Option<T>)
    where
        F: FnOnce(LockWrite<'a>) -> Fut,
        Fut: Future<Output = (Result<Option<u64>, StepError>, T)>,
    {
        let started = clock.mono_ms();
        let (next, durable) = {
            let mut st = self.st();
            self.note_overrun(&mut st, started);
            let fenced = st.lost || st.released || started >= st.valid_until;
            if fenced && !skip_fence {
                drop(st);
                return (Err(StepError::lock_lost(self.lost_reason())), None);
            }
            let mut next = st.record.clone();
            edit(&mut next);
            next.seq += 1;
            // The instructions a taker rolls back from must survive a crash
            // of the host.
            let durable = next.phase == LockPhase::Writing && st.record.phase != LockPhase::Writing;
            (next, durable)
        };
        // The fence again before the rename: a holder stalled after its
        // temp file was written must not install an old lease's content
        // over a taker's lock.
        #[cfg(feature = "testkit")]
        let skip_fence = skip_fence || self.planted == Planted::RewriteRenameSkipsFence;
        let fence = move || {
            let now = clock.mono_ms();
            let mut st = self.st();
            self.note_overrun(&mut st, now);
            skip_fence || (!st.lost && !st.released && now < st.valid_until)
        };
        // Once the rename is confirmed, the lease runs from `started`: the
        // holder's watch sees it extended from then on (the requests that
        // follow in the same operation may take a while).
        let lease = self.lease_ms.saturating_sub(margin_ms(self.lease_ms));
        let after = move || {
            let now = clock.mono_ms();
            let mut st = self.st();
            let valid = !st.lost && !st.released && now < started + lease;
            if valid {
                st.valid_until = st.valid_until.max(started + lease);
                st.written_at = st.written_at.max(started);
            }
            valid
        };
        let w = LockWrite {
            path: &self.path,
            bytes: next.bytes(),
            durable,
            fence: Box::new(fence),
            after: Box::new(after),
        };
        let (replaced, out) = op(w).await;
        let host_now = match replaced {
            Ok(Some(host_now)) => host_now,
            Ok(None) => {
                let e = StepError::lock_lost(format!(
                    "{} (the lease ran out while the lock was being rewritten)",
                    self.lost_reason()
                ));
                return (Err(e), Some(out));
            }
            Err(e) => return (Err(e), Some(out)),
        };
        let mut st = self.st();
        st.record = next;
        st.host_now = host_now;
        st.valid_until = started + lease;
        st.written_at = started;
        (Ok(()), Some(out))
    }

    /// Rewrite the lock (phase changes, a takeover handing over to the
    /// taker's own request).
    pub async fn rewrite<H: Host, C: Clock>(
        &self,
        host: &H,
        clock: &C,
        edit: impl FnOnce(&mut LockRecord),
    ) -> Result<(), StepError> {
        let _turn = self.turn().await;
        self.write(host, clock, edit, false).await
    }

    /// [`Self::rewrite`] through `op`: a host operation that replaces the
    /// lock (the rename confirmed, or fenced, as [`Host::lock_replace`])
    /// and carries other requests in the same pipeline (the write's temps,
    /// the prune's listing). `op`'s result is `None` when it did not run:
    /// the lock was fenced before anything was sent.
    pub async fn rewrite_with<'a, C: Clock, T, F, Fut>(
        &'a self,
        clock: &'a C,
        edit: impl FnOnce(&mut LockRecord),
        op: F,
    ) -> (Result<(), StepError>, Option<T>)
    where
        F: FnOnce(LockWrite<'a>) -> Fut,
        Fut: Future<Output = (Result<Option<u64>, StepError>, T)>,
    {
        let _turn = self.turn().await;
        self.write_via(clock, edit, false, op).await
    }

    /// Check the lock is still ours, then extend the lease. Skipped while
    /// another rewrite is in flight (that one extends it).
    pub async fn renew<H: Host, C: Clock>(&self, host: &H, clock: &C) -> Result<(), StepError> {
        let Some(_turn) = self.try_turn() else { return Ok(()) };
        if self.is_released() {
            return Ok(());
        }
        let token = self.token();
        let ours = match host.lock_read(&self.path).await? {
            Some(f) => matches!(LockRecord::parse(&self.path, &f.bytes)?, Parsed::Lock(r) if r.token == token),
            None => false,
        };
        if !ours {
            self.st().lost = true;
            return Err(StepError::lock_lost(format!("target lock {} was taken over by another worker", self.path)));
        }
        #[cfg(feature = "testkit")]
        let skip_fence = self.planted == Planted::RenewSkipsFence;
        #[cfg(not(feature = "testkit"))]
        let skip_fence = false;
        self.write(host, clock, |_| {}, skip_fence).await
    }

    /// Renew a quarter lease after the last write of the lock (whoever
    /// made it), again and again. Resolves only when the lock is lost
    /// (never once it was released).
    pub async fn renew_loop<H: Host, C: Clock>(&self, host: &H, clock: &C) {
        // Not before this (after a failed try, or while another rewrite is
        // in flight), so that the loop never spins.
        let mut not_before = 0;
        let pause = (self.renew_every_ms() / 8).max(50);
        loop {
            let at = (self.st().written_at + self.renew_every_ms()).max(not_before);
            clock.sleep_mono_until(at).await;
            if self.is_released() {
                std::future::pending::<()>().await;
            }
            if self.st().busy {
                not_before = clock.mono_ms() + pause;
                continue;
            }
            match self.renew(host, clock).await {
                Ok(()) => not_before = 0,
                Err(e) if self.is_lost() => {
                    tracing::warn!(lock = %self.path, "{}", e.message);
                    return;
                }
                Err(e) => {
                    tracing::warn!(lock = %self.path, "lock renewal failed: {}", e.message);
                    not_before = clock.mono_ms() + pause;
                }
            }
        }
    }

    /// Resolves once the lease has run out by the holder's clock (or the
    /// lock was found lost); never after a release.
    pub async fn expired<C: Clock>(&self, clock: &C) {
        loop {
            let now = clock.mono_ms();
            let (lost, released, until) = {
                let mut st = self.st();
                self.note_overrun(&mut st, now);
                (st.lost, st.released, st.valid_until)
            };
            if released {
                std::future::pending::<()>().await;
            }
            if lost || now >= until {
                return;
            }
            clock.sleep_mono_until(until).await;
        }
    }

    /// The watch a holder runs beside its work: renewals, and the fence.
    /// Resolves when the lock can no longer be relied on.
    pub async fn watch<H: Host, C: Clock>(&self, host: &H, clock: &C) {
        race(self.renew_loop(host, clock), self.expired(clock)).await;
    }

    /// Run `work` under this lock: renewed beside it, and dropped (wherever
    /// it is) once the lock can no longer be relied on (`None`). When the
    /// work ends first, a renewal in flight is finished before the watch is
    /// dropped, so that no half-written lock temp file is left behind.
    pub async fn guard<H: Host, C: Clock, T>(&self, host: &H, clock: &C, work: impl Future<Output = T>) -> Option<T> {
        let mut work = pin!(work);
        let mut watch = pin!(self.watch(host, clock));
        let mut out = None;
        std::future::poll_fn(|cx| {
            if out.is_none() {
                if let Poll::Ready(v) = work.as_mut().poll(cx) {
                    out = Some(v);
                } else {
                    return match watch.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(()),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
            // The work is done: only a renewal can be writing the lock.
            if !self.st().busy {
                return Poll::Ready(());
            }
            let _ = watch.as_mut().poll(cx);
            if self.st().busy { Poll::Pending } else { Poll::Ready(()) }
        })
        .await;
        out
    }

    /// Remove the lock if it is still ours, then remove the temp and claim
    /// files that killed workers left, older than a lease by the host's
    /// clock (a younger one may be a live worker's). Once only:
    /// afterwards the name may be another worker's lock. While the lease
    /// is valid nobody else can have replaced it, so no read first. Once
    /// it is not (the holder stalled before its release), the lock is
    /// taken back through its claim as after a restart, then removed; if
    /// another worker took it over meanwhile, it is theirs and stays.
    pub async fn release<H: Host, C: Clock>(&self, host: &H, clock: &C) -> Result<(), StepError> {
        let _turn = self.turn().await;
        let now = clock.mono_ms();
        let (valid, host_now, token) = {
            let mut st = self.st();
            if st.released || st.lost {
                st.released = true;
                return Ok(());
            }
            self.note_overrun(&mut st, now);
            st.released = true;
            (now < st.valid_until, st.host_now, st.record.token.clone())
        };
        if valid {
            host.lock_remove(&self.path).await?;
            sweep(host, &self.path, host_now, self.lease_ms).await;
            return Ok(());
        }
        let since = clock.mono_ms();
        let Some(_) = reacquire(host, clock, &self.path, &token, self.planted).await? else {
            return Ok(());
        };
        // The same fence as every other host operation of a holder.
        // (`reacquire` swept the litter.)
        if clock.mono_ms() < since + self.lease_ms.saturating_sub(margin_ms(self.lease_ms)) {
            host.lock_remove(&self.path).await?;
        }
        Ok(())
    }
}

/// Remove lock temp and claim files older than a lease (and a second of
/// mtime granularity) before `host_now`. Called by a holder whose lease is
/// valid (see [`super::is_lock_litter`]). Best effort.
pub async fn sweep<H: Host>(host: &H, lock: &str, host_now: u64, lease_ms: u64) {
    let before = host_now.saturating_sub(lease_ms.div_ceil(1000) + 1);
    match host.lock_sweep(lock, before).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(lock, "removed {n} stale lock temp or claim file(s) left by killed workers"),
        Err(e) => tracing::warn!(lock, "removing stale lock temp and claim files: {}", e.message),
    }
}
