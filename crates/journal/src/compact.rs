//! The file-system side of a compaction: the sibling directory the
//! compacted copy is written to, the atomic exchange of the two
//! directories, and the removal of what a crash left behind.
//!
//! The journal path is the only authority. A copy is complete and durable
//! before it is exchanged with the journal path in one `renameat2(2)`
//! `RENAME_EXCHANGE`, so at every instant the journal path names a whole
//! journal (the old one or the new one, which hold the same entries), and
//! whatever the sibling holds is garbage: half a copy, a complete copy that
//! was never swapped in, or the old journal once swapped out.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::files::{LOCK_FILE, SledFiles};

/// A crash point for the compaction tests; nothing without the
/// `failpoints` feature.
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name);
    };
}
pub(crate) use crash_point;

pub(crate) fn err(step: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |e| Error::Compaction(format!("{step}: {e}"))
}

/// `<journal>.compact`, beside the journal directory.
pub(crate) fn sibling(path: &Path) -> Option<PathBuf> {
    let path = path.components().as_path();
    let name = path.file_name()?;
    let mut s = name.to_os_string();
    s.push(".compact");
    Some(path.with_file_name(s))
}

fn parent(path: &Path) -> &Path {
    match path.components().as_path().parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsync the directory holding the journal path (and its sibling).
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    File::open(parent(path))?.sync_all()
}

/// What a sled database and the journal's lock put in a directory: a
/// sibling holding anything else is not removed.
fn ours(name: &str) -> bool {
    matches!(name, "conf" | "db" | "blobs" | LOCK_FILE) || name.starts_with("snap.")
}

/// Remove the sibling `dir` if it exists (a crash's leftover); `Ok(true)`
/// if it did. Refuses, naming it, a sibling that is not a directory or
/// holds entries no compaction writes.
pub(crate) fn remove_leftover(dir: &Path) -> Result<bool, String> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
        Ok(m) if !m.is_dir() => {
            return Err(format!("{} is not a directory: move it away (certdeploy compacts through it)", dir.display()));
        }
        Ok(_) => {}
    }
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = entry.file_name();
        if !name.to_str().is_some_and(ours) {
            return Err(format!(
                "{} holds `{}`, which no compaction writes: not removed; move it away",
                dir.display(),
                name.to_string_lossy()
            ));
        }
    }
    remove(dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    Ok(true)
}

/// Remove a sibling known to be a compaction's (the old journal once
/// swapped out), then make the removal durable.
pub(crate) fn remove(dir: &Path) -> io::Result<()> {
    // sled's log goes first: a crash in between leaves half a directory,
    // which the next open removes like any other leftover.
    match fs::remove_file(dir.join("db")) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    crash_point!("journal_compact_removing");
    fs::remove_dir_all(dir)?;
    crash_point!("journal_compact_removed");
    sync_parent(dir)
}

/// Exchange the two directories in one step.
pub(crate) fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(|e| {
        let unsupported = [rustix::io::Errno::INVAL, rustix::io::Errno::NOSYS, rustix::io::Errno::OPNOTSUPP];
        let what = if unsupported.contains(&e) {
            " (renameat2 RENAME_EXCHANGE: this file system or kernel may not support it)"
        } else {
            ""
        };
        io::Error::new(io::Error::from(e).kind(), format!("{e}{what}"))
    })
}

/// Open sled at `path`. The lock sled takes on its `db` file may outlive a
/// handle dropped a moment ago by the time its background threads let go
/// of the file: a refused lock is tried again for up to two seconds.
pub(crate) fn open_sled(path: &Path, cache_capacity: u64) -> sled::Result<sled::Db> {
    let mut tries = 0;
    loop {
        match sled::Config::new().path(path).cache_capacity(cache_capacity).open() {
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// The page cache of the copy being written.
const COPY_CACHE: u64 = 8 << 20;

/// Write every tree of `src` into a new sled database at `dir` (created
/// 0700, locked like a journal), close it, and make every file and
/// directory of it durable with its mode fixed. Returns the lock on the
/// copy's lock file and how many entries were copied.
///
/// The walk of `sled::Db::export` and `sled::Db::import`, with errors
/// returned rather than panics.
pub(crate) fn write_copy(src: &sled::Db, dir: &Path, cache_capacity: u64) -> Result<(File, u64), Error> {
    crate::files::prepare_dir(dir).map_err(|e| Error::Compaction(e.to_string()))?;
    let lock = crate::files::lock(dir).map_err(|e| Error::Compaction(e.to_string()))?;
    let mut copied = 0u64;
    {
        // Written once and closed: its cache only adds to the memory the
        // journal's own cache takes meanwhile.
        let db = open_sled(dir, cache_capacity.min(COPY_CACHE))?;
        for name in src.tree_names() {
            let from = src.open_tree(&name)?;
            let to = db.open_tree(&name)?;
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for kv in from.iter() {
                let (k, v) = kv?;
                batch.insert(k, v);
                n += 1;
                if n == 1024 {
                    to.apply_batch(std::mem::take(&mut batch))?;
                    copied += n;
                    n = 0;
                }
            }
            to.apply_batch(batch)?;
            copied += n;
            crash_point!("journal_compact_copying");
        }
        db.flush()?;
    }
    SledFiles::secure_and_sync(dir).map_err(err("fsync of the compacted copy"))?;
    Ok((lock, copied))
}
