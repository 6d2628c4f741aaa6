//! This process's side of the target locks on the hosts: the tokens it
//! holds right now, a fresh token's entropy, which of this journal's locks
//! a dead earlier process left behind, and who is taking locks (the core's
//! [`Worker`]).

use std::collections::HashSet;
use std::sync::Mutex;

use certdeploy_core::Deployment;
use certdeploy_core::attempt::{Notice, Worker};
use certdeploy_core::lock::{LockRecord, Planted};

use super::Runtime;
use crate::metrics as m;

/// Keeps a token in [`Runtime::live_tokens`] while a lock is held.
pub(super) struct LiveToken<'a> {
    set: &'a Mutex<HashSet<String>>,
    token: String,
}

impl<'a> LiveToken<'a> {
    pub(super) fn new(set: &'a Mutex<HashSet<String>>, token: &str) -> LiveToken<'a> {
        set.lock().unwrap_or_else(|e| e.into_inner()).insert(token.to_string());
        LiveToken { set, token: token.to_string() }
    }
}

impl Drop for LiveToken<'_> {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.token);
    }
}

/// Entropy for lock tokens: unique per acquisition within this process
/// (the journal id in the token's hash makes it unique across workers).
pub(super) fn token_entropy() -> u64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (nanos as u64)
        ^ SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed).rotate_left(48)
        ^ u64::from(std::process::id())
}

impl Runtime {
    /// A previous process of this worker held this lock and no deployment
    /// in this journal still holds it: nothing will renew it.
    pub(super) fn dead_own(&self, r: &LockRecord) -> bool {
        if r.journal != self.journal_id || self.live_tokens.lock().unwrap_or_else(|e| e.into_inner()).contains(&r.token)
        {
            return false;
        }
        let Ok(ids) = self.journal.unfinished() else { return false };
        !ids.iter().any(|id| {
            self.journal
                .records(id)
                .ok()
                .and_then(|recs| Deployment::replay(&recs).ok())
                .is_some_and(|d| d.plan().lock.as_deref() == Some(r.token.as_str()))
        })
    }

    /// This worker as a taker of target locks; `dead_own` is
    /// [`Self::dead_own`] (a closure the caller keeps alive).
    pub(super) fn worker<'a>(&'a self, dead_own: &'a (dyn Fn(&LockRecord) -> bool + Sync)) -> Worker<'a> {
        fn notice(n: Notice) {
            match n {
                Notice::TookOver(_) => metrics::counter!(m::TAKEOVERS).increment(1),
                Notice::LockLost(_) => metrics::counter!(m::LOCKS_LOST).increment(1),
            }
        }
        Worker {
            name: &self.worker_name,
            journal_id: &self.journal_id,
            lease_ms: self.cfg().worker.lock_lease_s * 1000,
            dead_own,
            notice: &notice,
            planted: Planted::None,
        }
    }
}
