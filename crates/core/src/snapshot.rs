//! What a path held before a deployment touched it, and what putting it
//! back did.

use serde::{Deserialize, Serialize};

use crate::model::Digest;

/// Public facts about a certificate already on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertFacts {
    pub not_before: i64,
    pub leaf_sha256: Digest,
}

/// What was at a path before this deployment touched it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PreState {
    Missing,
    Existing {
        backup_path: String,
        sha256: Digest,
        size: u64,
        mode: u32,
        uid: u32,
        gid: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cert: Option<CertFacts>,
        /// A keystore that opens with the configured password: the digest
        /// of what it holds (as `FilePlan::holds`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        holds: Option<Digest>,
    },
}

/// As derived, but `holds` only when there is one (a keystore), so that
/// what every other file's snapshot prints stays as it was.
impl std::fmt::Debug for PreState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PreState::Missing => f.write_str("Missing"),
            PreState::Existing { backup_path, sha256, size, mode, uid, gid, cert, holds } => {
                let mut d = f.debug_struct("Existing");
                d.field("backup_path", backup_path)
                    .field("sha256", sha256)
                    .field("size", size)
                    .field("mode", mode)
                    .field("uid", uid)
                    .field("gid", gid)
                    .field("cert", cert);
                if holds.is_some() {
                    d.field("holds", holds);
                }
                d.finish()
            }
        }
    }
}

/// The journaled result of snapshotting one path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The path actually written: the configured path with symlinks resolved.
    pub live_path: String,
    pub pre: PreState,
}

/// Per-path result of a restore.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreStatus {
    Restored,
    Removed,
    RestoreFailed,
    RemoveFailed,
}

impl RestoreStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreStatus::Restored => "restored",
            RestoreStatus::Removed => "removed",
            RestoreStatus::RestoreFailed => "restore_failed",
            RestoreStatus::RemoveFailed => "remove_failed",
        }
    }
    pub fn ok(self) -> bool {
        matches!(self, RestoreStatus::Restored | RestoreStatus::Removed)
    }
}
