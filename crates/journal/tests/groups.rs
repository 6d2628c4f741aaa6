//! Target groups' records in the journal: kept in order beside the
//! deployments', sharing their sequence (also across a reopen and a
//! compaction), and collected by gc once the group's result was published
//! longer ago than the dedupe retention.

mod common;

use std::time::Duration;

use certdeploy_core::Timestamp;
use certdeploy_core::group::{GroupEvent, GroupRecord, GroupSpec, OnFailure};
use certdeploy_journal::GcPolicy;
use common::{begun, open};

fn rec(at: u64, event: GroupEvent) -> GroupRecord {
    GroupRecord { at: Timestamp(at), event }
}

fn accepted(at: u64) -> GroupRecord {
    let spec = GroupSpec {
        group_id: "g1".into(),
        group: "web".into(),
        members: vec!["a".into(), "b".into()],
        waves: vec![1, 2],
        max_failed: 0,
        on_failure: OnFailure::Halt,
    };
    rec(at, GroupEvent::Accepted { spec, request: "sealed".into(), reply_to: None, submitted_by: None })
}

#[test]
fn group_records_keep_their_order_and_the_sequence_across_reopen_compaction_and_gc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("j");
    let last = {
        let j = open(&path);
        j.append_record("d1", &begun(certdeploy_core::Step::Snapshot, 1)).expect("append");
        j.append_group("g1", &accepted(1)).expect("append");
        j.append_group("g1", &rec(2, GroupEvent::WaveStarted { wave: 0 })).expect("append");
        let last = j.append_group("g2", &accepted(3)).expect("append");
        j.flush_now().expect("flush");
        last
    };
    let j = open(&path);
    // The sequence goes on after the last group record.
    let next = j.append_group("g1", &rec(4, GroupEvent::Published)).expect("append");
    assert!(next > last, "sequence {next} reused after {last}");
    assert_eq!(j.group_ids().expect("ids"), vec!["g1".to_string(), "g2".to_string()]);
    let g1 = j.group_records("g1").expect("records");
    assert_eq!(g1.len(), 3);
    assert_eq!(g1[1].event, GroupEvent::WaveStarted { wave: 0 });
    j.compact().expect("compact");
    assert_eq!(j.group_records("g1").expect("records"), g1, "compaction keeps group records");
    // gc: g1 was published at 4; g2 never was (never collected).
    let policy = GcPolicy::new(Duration::from_millis(10));
    j.gc_with(&policy, Timestamp(50)).expect("gc");
    assert_eq!(j.group_records("g1").expect("records").len(), 3, "kept within the dedupe retention");
    j.gc_with(&policy, Timestamp(1_000)).expect("gc");
    assert!(j.group_records("g1").expect("records").is_empty(), "collected after it");
    assert_eq!(j.group_records("g2").expect("records").len(), 1, "an unfinished group is never collected");
}
