//! The in-process order of deliveries per target: the key a target is
//! known by (host, port, certificate path), the worker's line of
//! deliveries per key (deployed in the order the broker delivered them),
//! and the runtime's per-key locks (one deployment at a time per target,
//! one run at a time per deployment id).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::config::Config;

/// What deployments are serialized on: one host account's certificate
/// path. The worker orders deliveries by the same key.
pub fn target_key(host: &str, port: u16, cert_path: &str) -> String {
    format!("{host}:{port}:{cert_path}")
}

/// Per-key async locks (FIFO), dropped when nobody holds or waits.
#[derive(Default)]
pub struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub struct KeyGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    pub async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        let guard = m.lock_owned().await;
        KeyGuard { locks: self, key: key.to_string(), guard: Some(guard) }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&self.key).is_some_and(|a| Arc::strong_count(a) == 1) {
            map.remove(&self.key);
        }
    }
}

/// Deliveries for one target (host, port, certificate path) are deployed in
/// the order the broker delivered them, like the queue promises: a batch
/// with renewals r1, r2 for the same host must end with r2 on the host, and
/// r1 must not be reported `superseded` because r2 happened to win a race
/// for the target lock. Validation still runs in parallel; only the
/// deployment waits for its turn.
#[derive(Default)]
pub struct TargetOrder {
    /// Per key, the completion signal of the last delivery queued for it.
    tails: HashMap<String, oneshot::Receiver<()>>,
    prune_at: usize,
}

/// A place in a target's line: wait for `prev`, release the next one by
/// dropping `_next`.
pub struct Turn {
    prev: Option<oneshot::Receiver<()>>,
    _next: Option<oneshot::Sender<()>>,
}

impl Turn {
    pub async fn wait(&mut self) {
        if let Some(prev) = self.prev.take() {
            // The sender is only ever dropped, never used: Err is "done".
            let _ = prev.await;
        }
    }
}

impl TargetOrder {
    pub fn enqueue(&mut self, key: Option<String>) -> Turn {
        let Some(key) = key else { return Turn { prev: None, _next: None } };
        if self.tails.len() >= self.prune_at.max(64) {
            // Drop lines whose last delivery has finished.
            self.tails.retain(|_, rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
            self.prune_at = self.tails.len() * 2;
        }
        let (tx, rx) = oneshot::channel();
        let prev = self.tails.insert(key, rx);
        Turn { prev, _next: Some(tx) }
    }
}

/// The ordering key of a message body: the same key as the runtime's
/// per-target lock, read without validating anything (a body that does not
/// name a target is rejected later and needs no place in any line).
pub fn order_key(body: &[u8], cfg: &Config) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Inline {
        host: String,
        #[serde(default)]
        port: Option<u16>,
        cert_path: String,
    }
    #[derive(serde::Deserialize)]
    struct Keys {
        #[serde(default)]
        target: Option<String>,
        #[serde(default)]
        target_spec: Option<Inline>,
    }
    if body.len() > certdeploy_core::wire::MAX_MESSAGE_BYTES {
        return None;
    }
    let keys: Keys = serde_json::from_slice(body).ok()?;
    match (keys.target, keys.target_spec) {
        (Some(name), None) => {
            let t = cfg.targets.get(&name)?;
            Some(target_key(&t.host, t.port, &t.cert_path))
        }
        (None, Some(s)) => Some(target_key(&s.host, s.port.unwrap_or(22), &s.cert_path)),
        _ => None,
    }
}
