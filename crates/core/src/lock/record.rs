//! What the lock file holds, its names on the host, and its format version.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::model::Role;
use crate::snapshot::Snapshot;
use crate::step::StepError;

/// Suffix of the lock file next to the certificate.
pub const LOCK_SUFFIX: &str = ".certdeploy-lock";

/// The lock file format this code reads and writes. A lock of a higher
/// version is never interpreted: it is treated as held (the request is
/// deferred, and fails after its deferrals), so that a fleet can run two
/// versions side by side while it is upgraded one worker at a time.
pub const LOCK_VERSION: u32 = 1;

/// Marker in the names of the temp files a lock write goes through
/// (`<lock or claim>.tmp.<unique>`).
pub const LOCK_TEMP_MARK: &str = ".tmp.";

pub fn lock_path(cert_path: &str) -> String {
    format!("{cert_path}{LOCK_SUFFIX}")
}

/// The first `bytes` bytes of the sha256 of `s`, in hex: short names for
/// tokens (claim files, journal keys).
pub fn short_hash(s: &str, bytes: usize) -> String {
    Sha256::digest(s.as_bytes())[..bytes.min(32)].iter().map(|b| format!("{b:02x}")).collect()
}

/// The claim file a taker of the lock holding `token` must create first.
pub fn claim_path(lock: &str, token: &str) -> String {
    format!("{lock}.claim.{}", short_hash(token, 8))
}

/// Is `path` a temp file of a write of the lock at `lock` (or of one of
/// its claims)? Such a file is left behind when a worker dies between
/// writing it and linking or renaming it into place.
pub fn is_lock_temp(lock: &str, path: &str) -> bool {
    path.strip_prefix(lock).is_some_and(|rest| rest.contains(LOCK_TEMP_MARK))
}

/// Is `path` a claim file of the lock at `lock`? A taker that dies between
/// replacing the lock and removing its claim leaves it behind.
pub fn is_lock_claim(lock: &str, path: &str) -> bool {
    path.strip_prefix(lock).is_some_and(|rest| rest.starts_with(".claim.") && !rest.contains(LOCK_TEMP_MARK))
}

/// What a lock holder sweeps when it is older than a lease: temp and claim
/// files of the lock at `lock`. While a lease is valid nobody may take the
/// lock over, so no claim on it is in use; a claim on an older token can
/// no longer win (the lock no longer holds that token); an old temp was
/// never linked or renamed into place.
pub fn is_lock_litter(lock: &str, path: &str) -> bool {
    is_lock_temp(lock, path) || is_lock_claim(lock, path)
}

/// A new token, unique per acquisition: `entropy` comes from the caller
/// (random bytes, a clock), so that this stays pure.
pub fn new_token(journal_id: &str, deployment_id: &str, attempt: u32, entropy: u64) -> String {
    let hex = short_hash(&format!("{journal_id}\0{deployment_id}\0{attempt}\0{entropy}"), 12);
    format!("{deployment_id}/{attempt}/{hex}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockPhase {
    /// Nothing on the host changed by this deployment yet (backup links at most).
    Locked,
    /// Snapshots taken; writes, a validate and a reload may have happened.
    Writing,
    /// Deployed; old backups being pruned. A taker finishes the prune
    /// (never rolls back: the result may already be journaled).
    Committing,
}

/// The content of the lock file (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// Format version ([`LOCK_VERSION`]).
    pub v: u32,
    /// Unique per acquisition.
    pub token: String,
    /// Worker name (results' `worker`).
    pub worker: String,
    /// The holder's journal: a random id created with the journal, so that
    /// a worker recognizes its own locks after a restart and two workers
    /// never take each other's for their own (same host name, same path).
    pub journal: String,
    /// The deployment whose state the host may be in.
    pub deployment_id: String,
    pub attempt: u32,
    pub phase: LockPhase,
    pub lease_ms: u64,
    /// Rewrites so far.
    pub seq: u64,
    /// Unix ms by the holder's clock, for people reading the file.
    pub acquired_at_ms: u64,
    #[serde(default)]
    pub snapshots: Vec<(Role, Snapshot)>,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

/// What a lock file's bytes turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Lock(Box<LockRecord>),
    /// A lock written by a newer certdeploy: not interpreted.
    Newer(u32),
}

impl LockRecord {
    pub fn bytes(&self) -> Vec<u8> {
        // A struct of strings, numbers and enums: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parse a lock (or claim) file at `path`. Not JSON, or not a lock: a
    /// permanent error naming the path. A newer format: [`Parsed::Newer`].
    pub fn parse(path: &str, bytes: &[u8]) -> Result<Parsed, StepError> {
        let bad = |e: serde_json::Error| {
            StepError::permanent(format!(
                "{path} is not a certdeploy lock ({e}); remove it by hand once no deployment runs on this target"
            ))
        };
        let v: VersionOnly = serde_json::from_slice(bytes).map_err(bad)?;
        if v.v > LOCK_VERSION {
            return Ok(Parsed::Newer(v.v));
        }
        serde_json::from_slice(bytes).map(|r| Parsed::Lock(Box::new(r))).map_err(bad)
    }

    /// Expired by the host's clock (`host_now`, whole seconds): not
    /// rewritten for a whole lease, with a second for the granularity.
    pub fn expired(&self, mtime: u64, host_now: u64) -> bool {
        host_now > mtime.saturating_add(self.lease_ms.div_ceil(1000)).saturating_add(1)
    }

    /// [`Self::expired`] with the lease read from the host bounded by
    /// `max_lease_ms` (the taker's configured lease): the file lives in a
    /// directory other local users may write, and a lease one of them
    /// crafted must not hold a target for ever. A live holder renews every
    /// quarter lease, well within a bound as long as the workers sharing a
    /// target share `lock_lease_s`.
    pub fn expired_bounded(&self, mtime: u64, host_now: u64, max_lease_ms: u64) -> bool {
        let lease_ms = self.lease_ms.min(max_lease_ms);
        host_now > mtime.saturating_add(lease_ms.div_ceil(1000)).saturating_add(1)
    }

    pub fn describe(&self) -> String {
        format!(
            "worker {} (deployment {} attempt {}, phase {:?})",
            self.worker, self.deployment_id, self.attempt, self.phase
        )
    }
}

/// A lock file as read: its content and its mtime in host seconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockFile {
    pub bytes: Vec<u8>,
    pub mtime: u64,
}

/// Result of an exclusive create. `host_now`: the mtime of the file the
/// call just wrote (the host's clock, whole seconds), whether or not it
/// took the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Created {
    pub created: bool,
    pub host_now: u64,
}
