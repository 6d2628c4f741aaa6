//! The journal's random id names a worker in target locks: created with the
//! journal, kept across reopenings, different for every journal (also two
//! journals at the same path on two machines).

use certdeploy_journal::{JournalOptions, SledJournal};

#[test]
fn the_journal_id_is_random_and_survives_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let id_a = SledJournal::open(&a, JournalOptions::default()).expect("open a").id().to_string();
    assert_eq!(id_a.len(), 32, "{id_a}");
    assert!(id_a.bytes().all(|c| c.is_ascii_hexdigit()), "{id_a}");
    let again = SledJournal::open(&a, JournalOptions::default()).expect("reopen a").id().to_string();
    assert_eq!(again, id_a, "kept across reopening");
    let id_b = SledJournal::open(&b, JournalOptions::default()).expect("open b").id().to_string();
    assert_ne!(id_b, id_a, "another journal, another id");
    // A fresh journal at the same path (another machine, or after the
    // directory was removed) gets a new one.
    std::fs::remove_dir_all(&a).expect("remove a");
    let fresh = SledJournal::open(&a, JournalOptions::default()).expect("fresh a").id().to_string();
    assert_ne!(fresh, id_a);
}
