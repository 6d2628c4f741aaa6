//! The journal directory: creation with safe permissions, the process
//! lock, and the fsync of sled's files that sled itself does not perform.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use inotify::{Inotify, WatchMask};

use crate::error::JournalOpenError;

pub(crate) const DIR_MODE: u32 = 0o700;
pub(crate) const FILE_MODE: u32 = 0o600;
pub(crate) const LOCK_FILE: &str = "certdeploy.lock";

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> JournalOpenError + 'a {
    move |source| JournalOpenError::Io { path: path.to_path_buf(), action, source }
}

/// Create the directory (0700, parents as needed) or tighten an existing one.
pub(crate) fn prepare_dir(path: &Path) -> Result<(), JournalOpenError> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(JournalOpenError::Corrupt {
                path: path.to_path_buf(),
                problem: "exists and is not a directory".into(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(path)
                .map_err(io_err(path, "creating the directory"))?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                // Make the new directory entry itself durable.
                File::open(parent).and_then(|d| d.sync_all()).map_err(io_err(path, "fsync of the parent directory"))?;
            }
        }
        Err(e) => return Err(io_err(path, "reading the directory")(e)),
    }
    set_mode(path, DIR_MODE).map_err(io_err(path, "setting directory mode 0700"))
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    let m = fs::symlink_metadata(path)?;
    if m.permissions().mode() & 0o7777 != mode {
        fs::set_permissions(path, Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// The process lock: an exclusive `flock` on `certdeploy.lock` holding the
/// holder's pid (for the error message of the next one).
///
/// A compaction swaps the whole journal directory for a new one whose lock
/// file the holder has locked too, then releases the old one. A process
/// that opened the old lock file just before the swap could take that
/// released lock; so a lock counts only while the file it is on is still
/// the one at the journal path, and is tried again on the new file
/// otherwise.
pub(crate) fn lock(dir: &Path) -> Result<File, JournalOpenError> {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join(LOCK_FILE);
    let mut tries = 0;
    let mut f = loop {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(io_err(dir, "opening the lock file"))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut s = String::new();
                let _ = f.read_to_string(&mut s);
                let holder = match s.trim().parse::<u32>() {
                    Ok(pid) => format!(" (pid {pid})"),
                    Err(_) => String::new(),
                };
                return Err(JournalOpenError::Locked { path: dir.to_path_buf(), holder });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(dir, "locking the lock file")(e)),
        }
        let held = f.metadata().map_err(io_err(dir, "reading the lock file"))?;
        match fs::metadata(&path) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => break f,
            // Swapped away by a compaction since it was opened.
            _ if tries < 100 => tries += 1,
            _ => {
                return Err(JournalOpenError::Locked {
                    path: dir.to_path_buf(),
                    holder: " (its lock file keeps being replaced)".into(),
                });
            }
        }
    };
    f.set_len(0)
        .and_then(|_| f.rewind())
        .and_then(|_| writeln!(f, "{}", std::process::id()))
        .map_err(io_err(dir, "writing the lock file"))?;
    Ok(f)
}

/// Tracks sled's files: fixes their modes and fsyncs them.
pub(crate) struct SledFiles {
    dir: PathBuf,
    db: File,
    /// Files already made 0600 and fsynced once (immutable afterwards).
    seen: BTreeSet<PathBuf>,
    /// Reports every entry created, removed or renamed in the journal's
    /// directories, so that a flush walks them only after a change (sled
    /// adds a blob or a snapshot now and then; the walk cost ~40 µs of CPU
    /// per flush). `None` where inotify is not available: every flush walks.
    changes: Option<Inotify>,
}

const DIR_CHANGES: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF);

impl SledFiles {
    /// After sled opened: every file 0600, every directory 0700, `conf` and
    /// every other file fsynced once, and the directories too.
    pub(crate) fn open(dir: &Path) -> Result<SledFiles, JournalOpenError> {
        let db = File::open(dir.join("db")).map_err(io_err(dir, "opening sled's db file for fsync"))?;
        let changes = Inotify::init()
            .inspect_err(|e| tracing::debug!(error = %e, "no inotify: every journal flush lists sled's directories"))
            .ok();
        let mut files = SledFiles { dir: dir.to_path_buf(), db, seen: BTreeSet::new(), changes };
        files.sweep(true).map_err(io_err(dir, "securing and syncing sled's files"))?;
        Ok(files)
    }

    /// Whether an entry of a watched directory changed since the last call
    /// (always true without inotify, and after any inotify error, which
    /// also gives inotify up). An event is queued when the change happens,
    /// so a file sled created before this call is always reported.
    fn changed(&mut self) -> bool {
        let Some(ino) = self.changes.as_mut() else { return true };
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            match ino.read_events(&mut buf) {
                Ok(mut events) => any |= events.next().is_some(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return any,
                Err(e) => {
                    tracing::warn!(error = %e, "inotify failed: every journal flush lists sled's directories");
                    self.changes = None;
                    return true;
                }
            }
        }
    }

    /// Every file of `dir` (sled's, closed by now) made 0600 and fsynced,
    /// every directory made 0700 and fsynced: a copy written elsewhere
    /// made durable before it takes the journal's place.
    pub(crate) fn secure_and_sync(dir: &Path) -> io::Result<()> {
        let db = File::open(dir.join("db"))?;
        SledFiles { dir: dir.to_path_buf(), db, seen: BTreeSet::new(), changes: None }.sweep(true)
    }

    /// [`SledFiles::sweep`] if a watched directory changed. Returns whether
    /// it walked the directories.
    pub(crate) fn sweep_if_changed(&mut self, sync: bool) -> io::Result<bool> {
        if self.changed() { self.sweep(sync).map(|()| true) } else { Ok(false) }
    }

    /// Fix modes of files not seen before (new blobs, snapshots); with
    /// `sync`, fsync them once and the directories whose entries changed.
    pub(crate) fn sweep(&mut self, sync: bool) -> io::Result<()> {
        let mut present = BTreeSet::new();
        let mut dirty_dirs = BTreeSet::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            // Watched before it is listed: what appears after the listing
            // is reported. Adding a watch again is harmless.
            if let Some(ino) = &self.changes
                && let Err(e) = ino.watches().add(&d, DIR_CHANGES)
            {
                tracing::warn!(dir = %d.display(), error = %e, "inotify watch failed: every journal flush lists sled's directories");
                self.changes = None;
            }
            for entry in fs::read_dir(&d)? {
                let entry = entry?;
                let p = entry.path();
                let ft = entry.file_type()?;
                // A file may vanish between readdir and chmod or open (sled
                // replaces snapshots, removes blobs); that is not an error.
                if ft.is_dir() {
                    match set_mode(&p, DIR_MODE) {
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        r => r?,
                    }
                    stack.push(p);
                } else if ft.is_file() {
                    if !self.seen.contains(&p) {
                        match set_mode(&p, FILE_MODE) {
                            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                            r => r?,
                        }
                        if sync {
                            match File::open(&p) {
                                Ok(f) => f.sync_all()?,
                                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                                Err(e) => return Err(e),
                            }
                        }
                        dirty_dirs.insert(d.clone());
                    }
                    present.insert(p);
                }
            }
        }
        if present.len() != self.seen.len() || !present.iter().all(|p| self.seen.contains(p)) {
            dirty_dirs.insert(self.dir.clone());
        }
        if sync {
            for d in &dirty_dirs {
                File::open(d)?.sync_all()?;
            }
        }
        self.seen = present;
        Ok(())
    }

    /// The per-flush fsync: the log file, then any new file. Returns
    /// whether it walked the directories.
    pub(crate) fn fsync(&mut self) -> io::Result<bool> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("journal_fsync", |_| Err(io::Error::other("injected failure (failpoint journal_fsync)")));
        self.db.sync_all()?;
        self.sweep_if_changed(true)
    }
}
