use std::path::PathBuf;

/// Why a journal could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum JournalOpenError {
    #[error("journal {path}: is in use by another process{holder} (only one worker may open a journal)")]
    Locked { path: PathBuf, holder: String },
    #[error(
        "journal {path}: format version {found} is newer than this build supports (up to {supported}); \
         upgrade certdeploy or point it at another journal"
    )]
    UnsupportedVersion { path: PathBuf, found: u8, supported: u8 },
    #[error("journal {path}: {problem}")]
    Corrupt { path: PathBuf, problem: String },
    #[error("journal {path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {path}: sled: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
}

/// Errors of an open journal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("journal sled error: {0}")]
    Sled(#[from] sled::Error),
    #[error("journal I/O error: {action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {what} {key}: format version {found} is unknown (this build reads up to {supported})")]
    UnknownVersion { what: &'static str, key: String, found: u8, supported: u8 },
    #[error("journal {what} {key}: undecodable: {problem}")]
    Corrupt { what: &'static str, key: String, problem: String },
    #[error("journal: encoding a {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("journal: a flush failed earlier, durability is unknown; restart the worker: {0}")]
    Poisoned(String),
    #[error("journal: closed")]
    Closed,
    #[error("journal: sync({seq}) asks for a record never appended (last is {last})")]
    UnknownSeq { seq: u64, last: u64 },
    #[error("journal: invalid deployment id {0:?}")]
    InvalidId(String),
    #[error("journal compaction: {0}")]
    Compaction(String),
}

impl From<Error> for certdeploy_core::driver::JournalError {
    fn from(e: Error) -> Self {
        use certdeploy_core::driver::{JournalError, JournalErrorKind};
        let kind = match e {
            Error::Poisoned(_) => JournalErrorKind::Poisoned,
            _ => JournalErrorKind::Other,
        };
        JournalError::new(kind, e)
    }
}
