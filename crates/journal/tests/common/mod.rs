//! Journal records for the journal's tests: opening a journal, and the
//! records of a deployment (a `Started` is each suite's own: its key
//! differs).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use certdeploy_core::{Details, Event, Outcome, Record, Report, Step, Timestamp};
use certdeploy_journal::{JournalOptions, SledJournal};

pub const NEW_CERT: &[u8] = b"CERT new nb=200\nnew-body\n";

pub fn open(path: &Path) -> SledJournal {
    SledJournal::open(path, JournalOptions::default()).expect("open journal")
}

pub fn begun(step: Step, at: u64) -> Record {
    Record { at: Timestamp(at), event: Event::Begun { step } }
}

pub fn report(id: &str, outcome: Outcome, at: u64) -> Report {
    Report {
        deployment_id: id.into(),
        target: "web1".into(),
        host: "web1.internal:22".into(),
        outcome,
        message: format!("{outcome} for {id}"),
        details: Details::from_metadata(BTreeMap::from([("backup_status_cert".into(), "snapshotted".into())])).into(),
        attempts: 1,
        reload_shared_with: None,
        started_at: Timestamp(at.saturating_sub(10)),
        finished_at: Timestamp(at),
        reverts: None,
    }
}

pub fn finished(id: &str, outcome: Outcome, at: u64) -> Record {
    Record { at: Timestamp(at), event: Event::Finished { report: report(id, outcome, at) } }
}
