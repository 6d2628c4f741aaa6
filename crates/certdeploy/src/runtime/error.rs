//! The runtime's one error type: what failed (opening the journal or the
//! SSH pool, the journal, the request's plan, the driver, recovery of some
//! deployments), with the cause kept typed.
//!
//! A deployment's own failures on the host are not errors here: they end
//! in a report. An [`Error`] means the runtime could not run or finish the
//! deployment at all; the journal still holds it unfinished.

use std::fmt;

use certdeploy_core::CoreError;
use certdeploy_core::driver::{DriveError, JournalError};
use certdeploy_core::wire::RequestError;
use certdeploy_journal::JournalOpenError;
use certdeploy_ssh::PoolError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the journal, or appending to it or making it durable,
    /// failed. [`JournalError::is_poisoned`] tells a journal that must not
    /// be used any more (a flush or fsync failed) from other failures.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Recovery did not finish these deployments.
    #[error("recovery failed for {} deployment(s): {}", failed.len(), List(failed))]
    Recovery { failed: Vec<Failed> },
    /// The plan could not be built from the request as it was validated.
    #[error("plan: {0}")]
    Plan(#[source] RequestError),
    /// The driver stopped short of a terminal state for another reason
    /// than the journal: the journal's records of the deployment do not
    /// replay, the target lock could not be taken again after a restart
    /// (the host or the link failed), or a step needed the request's
    /// content and this process does not have it.
    #[error(transparent)]
    Driver(DriveError),
    /// A recovery task ended without an answer (it panicked).
    #[error("recovery task: {0}")]
    RecoveryTask(#[source] tokio::task::JoinError),
    /// The journal could not be opened (at start).
    #[error(transparent)]
    OpenJournal(#[from] JournalOpenError),
    /// A target group's records do not fold, or an operation it needs is
    /// not available.
    #[error("{0}")]
    Group(String),
    /// The SSH pool could not be set up (at start).
    #[error("ssh pool: {0}")]
    SshPool(#[from] PoolError),
}

/// One deployment recovery did not finish, and why.
#[derive(Debug)]
pub struct Failed {
    /// Its journal key (none when the task ended without telling).
    pub key: Option<String>,
    pub error: Error,
}

impl Error {
    /// The journal failed for good: a flush or fsync failed, nothing it
    /// says it made durable can be trusted any more, and only a restart
    /// (recovering from what is on disk) makes it usable again.
    pub fn is_journal_poisoned(&self) -> bool {
        match self {
            Error::Journal(j) => j.is_poisoned(),
            Error::Recovery { failed } => failed.iter().any(|f| f.error.is_journal_poisoned()),
            _ => false,
        }
    }
}

impl From<certdeploy_journal::Error> for Error {
    fn from(e: certdeploy_journal::Error) -> Self {
        Error::Journal(e.into())
    }
}

/// A journal error from the driver stays a journal error (its kind is
/// what callers decide on).
impl From<DriveError> for Error {
    fn from(e: DriveError) -> Self {
        match e {
            DriveError::Journal(j) => Error::Journal(j),
            e => Error::Driver(e),
        }
    }
}

impl From<CoreError> for Error {
    fn from(e: CoreError) -> Self {
        Error::Driver(DriveError::Core(e))
    }
}

/// `key: error; key: error` for the message of [`Error::Recovery`].
struct List<'a>(&'a [Failed]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, x) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            match &x.key {
                Some(key) => write!(f, "{key}: {}", x.error)?,
                None => write!(f, "{}", x.error)?,
            }
        }
        Ok(())
    }
}
