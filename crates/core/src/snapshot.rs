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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    },
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
