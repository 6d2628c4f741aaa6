//! The end of an attempt: its outcome and the report published for it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::Timestamp;

/// Terminal outcomes, exact strings of the result contract.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Deployed,
    Unchanged,
    RolledBack,
    RolledBackDaemonUnknown,
    RollbackFailed,
    Failed,
    Rejected,
    Superseded,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Deployed,
        Outcome::Unchanged,
        Outcome::RolledBack,
        Outcome::RolledBackDaemonUnknown,
        Outcome::RollbackFailed,
        Outcome::Failed,
        Outcome::Rejected,
        Outcome::Superseded,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Deployed => "deployed",
            Outcome::Unchanged => "unchanged",
            Outcome::RolledBack => "rolled_back",
            Outcome::RolledBackDaemonUnknown => "rolled_back_daemon_unknown",
            Outcome::RollbackFailed => "rollback_failed",
            Outcome::Failed => "failed",
            Outcome::Rejected => "rejected",
            Outcome::Superseded => "superseded",
        }
    }
    pub fn success(self) -> bool {
        matches!(self, Outcome::Deployed | Outcome::Unchanged)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The terminal report of a deployment attempt; the result event is built
/// from it. Journaled in `Finished`, so redeliveries re-publish it verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub deployment_id: String,
    pub target: String,
    pub host: String,
    pub outcome: Outcome,
    pub message: String,
    pub metadata: BTreeMap<String, String>,
    pub attempts: u32,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
}
