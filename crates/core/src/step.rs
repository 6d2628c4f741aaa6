//! The steps of a deployment and how one can fail: the error a remote
//! operation reports, and the output of a command.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The steps of a deployment, as named in results (`failed_step`) and logs.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Snapshot,
    Write,
    Validate,
    Reload,
    Verify,
    Restore,
    RetryReload,
    VerifyOriginal,
    Cleanup,
    Commit,
    /// Taking or rewriting the target lock.
    Lock,
}

impl Step {
    pub const ALL: [Step; 11] = [
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
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Snapshot => "snapshot",
            Step::Write => "write",
            Step::Validate => "validate",
            Step::Reload => "reload",
            Step::Verify => "verify",
            Step::Restore => "restore",
            Step::RetryReload => "retry_reload",
            Step::VerifyOriginal => "verify_original",
            Step::Cleanup => "cleanup",
            Step::Commit => "commit",
            Step::Lock => "lock",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether retrying a failed step can help.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Connection refused/reset, timeouts, channel loss, "outcome unknown".
    Transient,
    /// Host key, auth, permission denied, missing extension, bad path.
    Permanent,
    /// The target lock is no longer this attempt's (lease ran out, taken
    /// over): the attempt stops touching the host at once.
    LockLost,
}

/// A failed remote operation. The message must never hold key bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    pub kind: ErrorKind,
    pub message: String,
}

impl StepError {
    pub fn transient(message: impl Into<String>) -> Self {
        StepError { kind: ErrorKind::Transient, message: message.into() }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        StepError { kind: ErrorKind::Permanent, message: message.into() }
    }
    pub fn lock_lost(message: impl Into<String>) -> Self {
        StepError { kind: ErrorKind::LockLost, message: message.into() }
    }
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
    pub fn is_lock_lost(&self) -> bool {
        self.kind == ErrorKind::LockLost
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Output of a remote command. `output` is truncated to 4 KiB.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    pub exit_code: Option<i32>,
    pub output: String,
}

impl ExecResult {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
    pub fn describe(&self) -> String {
        let status = match self.exit_code {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_string(),
        };
        if self.output.trim().is_empty() { status } else { format!("{status} (output: {})", self.output.trim()) }
    }
}

pub const OUTPUT_LIMIT: usize = 4096;

/// Truncate command output to [`OUTPUT_LIMIT`] bytes on a char boundary.
pub fn truncate_output(s: &str) -> String {
    if s.len() <= OUTPUT_LIMIT {
        return s.to_string();
    }
    let mut end = OUTPUT_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated]", &s[..end])
}
