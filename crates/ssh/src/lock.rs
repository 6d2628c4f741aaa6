//! The file primitives of the cross-worker target lock (the `Host`
//! trait's `lock_*` operations). The protocol itself (lease, claims,
//! takeover) lives in the core crate; these only move whole small files
//! atomically and report the host's own clock, so that no two workers'
//! clocks are ever compared.
//!
//! - create: exclusive creation with the full content in place from the
//!   first instant (private temp file, then `hardlink@openssh.com` to the
//!   name, which fails if the name exists).
//! - replace: temp file, then `posix-rename` over the name.
//! - read: content and mtime (whole seconds, host clock).
//! - remove: remove, a missing file is fine.
//! - sweep: remove the temp and claim files killed workers left, older
//!   than given.
//!
//! Every call is bounded by a timeout: a lease is only as good as the time
//! its renewals take.

use std::time::Duration;

use certdeploy_core::StepError;
use certdeploy_core::driver::Fence;
use certdeploy_core::lock::{Created, LockFile, is_lock_litter};
use openssh_sftp_client::metadata::Permissions;

use crate::error::{is_no_such_file, sftp_is_connection_loss, sftp_kind};
use crate::host::{SshHost, in_order2, p};
use crate::pool::Lease;
use openssh_sftp_client::error::SftpErrorKind;

/// Bound on one lock operation (a few SFTP round trips).
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// How old a listing of the lock's directory by the same deployment may
/// be for the sweep to use it instead of listing again.
const RECENT_LISTING: Duration = Duration::from_secs(1);

/// Largest lock file accepted (a lock holds paths and digests, not data).
const MAX_LOCK_BYTES: usize = 256 * 1024;

/// A lock temp name nobody can predict (created exclusively, handled
/// through its handle until the link or rename).
fn temp_name(path: &str) -> String {
    format!("{path}{}{}", certdeploy_core::lock::LOCK_TEMP_MARK, crate::host::random_hex())
}

/// A lock path that is not a regular file (a FIFO would hang the SFTP
/// server's open, a link could lead anywhere) is refused: others may
/// write the target's directories, and plant anything at the lock path.
fn not_regular(addr: &crate::HostAddr, path: &str, m: &openssh_sftp_client::metadata::MetaData) -> Option<StepError> {
    let t = m.file_type();
    if t.is_some_and(|t| t.is_file()) {
        return None;
    }
    let what = match t {
        Some(t) if t.is_symlink() => "a symlink",
        Some(t) if t.is_dir() => "a directory",
        Some(t) if t.is_fifo() => "a FIFO",
        _ => "not a regular file",
    };
    Some(StepError::permanent(format!(
        "{addr}: the target lock {path} is {what}, not a regular file; refusing it (remove it by hand)"
    )))
}

impl SshHost<'_> {
    async fn bounded<T>(
        &self,
        lease: &Lease,
        what: &str,
        f: impl Future<Output = Result<T, StepError>>,
    ) -> Result<T, StepError> {
        match tokio::time::timeout(LOCK_TIMEOUT, f).await {
            Ok(r) => r,
            Err(_) => {
                lease.mark_dead();
                Err(StepError::transient(format!("{}: {what}: timed out; outcome unknown", self.addr())))
            }
        }
    }

    /// Write `bytes` to a fresh temp file next to `path`, mode 0600 before
    /// any byte (fsynced if `durable`): the create, then `[chmod, write,
    /// fsync, fstat]` in one round trip (handled in this order, see
    /// `in_order2`; the fstat only with `clock`). Returns its name and, with
    /// `clock`, its mtime in host seconds (the host's clock). The handle
    /// closes when dropped.
    pub(crate) async fn lock_temp(
        &self,
        lease: &Lease,
        path: &str,
        bytes: &[u8],
        durable: bool,
        clock: bool,
    ) -> Result<(String, u64), StepError> {
        let temp = temp_name(path);
        let f = match lease.sftp().options().read(true).write(true).create_new(true).open(p(&temp)).await {
            Ok(f) => f,
            Err(e) => return Err(lease.sftp_err("create lock temp file", &temp, &e)),
        };
        let (mut a, mut b, mut c, mut d) = (f.clone(), f.clone(), f.clone(), f);
        let sync = async {
            match durable {
                true => c.sync_all().await,
                false => Ok(()),
            }
        };
        let stat = async {
            match clock {
                true => d.metadata().await.map(|m| m.modified().map(|t| t.as_duration().as_secs()).unwrap_or(0)),
                false => Ok(0),
            }
        };
        let ((chmod, wrote), (synced, now)) =
            in_order2(in_order2(a.set_permissions(Permissions::from(0o600u16)), b.write(bytes)), in_order2(sync, stat))
                .await;
        let r = async {
            chmod?;
            let n = wrote?;
            synced?;
            let now = now?;
            // Longer than one write request can carry: the rest, then the
            // fsync again.
            if n < bytes.len() {
                b.write_all(&bytes[n..]).await?;
                if durable {
                    b.sync_all().await?;
                }
            }
            Ok::<_, openssh_sftp_client::Error>(now)
        }
        .await;
        match r {
            Ok(now) => Ok((temp, now)),
            Err(e) => {
                let _ = lease.sftp().fs().remove_file(p(&temp)).await;
                Err(lease.sftp_err("write lock temp file", &temp, &e))
            }
        }
    }

    /// Create `path` with `bytes` unless it exists (then nothing changes).
    /// `[hard link to path, remove the temp]` go out together after the
    /// temp is written; only a failed link needs a look at `path`.
    pub(crate) async fn lock_file_create(&self, path: &str, bytes: &[u8]) -> Result<Created, StepError> {
        let lease = self.lease().await?;
        if !lease.sftp().support_hardlink() {
            return Err(StepError::permanent(format!(
                "{}: the SFTP server lacks the hardlink@openssh.com extension; the target lock cannot be taken",
                self.addr()
            )));
        }
        let work = async {
            // A failed link with no file at `path` afterwards: the lock was
            // released between the two requests; create again.
            let mut last = None;
            for _ in 0..3 {
                let (temp, host_now) = self.lock_temp(&lease, path, bytes, false, true).await?;
                let (mut fs1, mut fs2) = (lease.sftp().fs(), lease.sftp().fs());
                let (linked, _) = in_order2(fs1.hard_link(p(&temp), p(path)), fs2.remove_file(p(&temp))).await;
                let e = match linked {
                    Ok(()) => return Ok(Created { created: true, host_now }),
                    Err(e) if sftp_is_connection_loss(&e) => return Err(lease.sftp_err("create lock", path, &e)),
                    Err(e) => e,
                };
                match lease.sftp().fs().symlink_metadata(p(path)).await {
                    // Taken: the caller judges it by the host's clock
                    // (unless it is no lock file at all).
                    Ok(m) => match not_regular(self.addr(), path, &m) {
                        Some(e) => return Err(e),
                        None => return Ok(Created { created: false, host_now }),
                    },
                    // A generic failure and no lock afterwards: it was
                    // released in between. Anything else is an error.
                    Err(_) if !matches!(sftp_kind(&e), Some(SftpErrorKind::Failure)) => {
                        return Err(lease.sftp_err("create lock", path, &e));
                    }
                    Err(_) => {
                        last = Some(StepError::transient(format!(
                            "{}: create lock {path}: {}; no lock there afterwards",
                            self.addr(),
                            crate::pool::error_chain(&e)
                        )))
                    }
                }
            }
            Err(last.unwrap_or_else(|| StepError::transient(format!("{}: create lock {path}: failed", self.addr()))))
        };
        self.bounded(&lease, "create lock", work).await
    }

    /// Replace `path` (present or not) with `bytes`, atomically; the new
    /// content is fsynced first if `durable`. Returns the host's clock (the
    /// temp file's mtime).
    pub(crate) async fn lock_file_replace(
        &self,
        path: &str,
        bytes: &[u8],
        durable: bool,
        fence: Fence<'_>,
    ) -> Result<Option<u64>, StepError> {
        let lease = self.lease().await?;
        let work = async {
            let (temp, host_now) = self.lock_temp(&lease, path, bytes, durable, true).await?;
            self.lock_install(&lease, &temp, host_now, path, fence).await
        };
        self.bounded(&lease, "replace lock", work).await
    }

    /// The second half of a lock replace, once its temp is written (with
    /// the host's clock `host_now`): when `fence` says no (the caller
    /// stalled past its lease since the temp was written) the rename is
    /// not sent and the temp goes (`None`); otherwise the rename.
    pub(crate) async fn lock_install(
        &self,
        lease: &Lease,
        temp: &str,
        host_now: u64,
        path: &str,
        fence: Fence<'_>,
    ) -> Result<Option<u64>, StepError> {
        if !fence() {
            self.lock_temp_discard(lease, temp).await;
            return Ok(None);
        }
        self.lock_rename(lease, temp, path).await.map(|()| Some(host_now))
    }

    /// Rename the written lock temp `temp` over `path` (within the lock
    /// operations' bound); on failure the temp goes. For a rewrite that
    /// travels in another step's pipeline (the fence already asked).
    pub(crate) async fn lock_rename(&self, lease: &Lease, temp: &str, path: &str) -> Result<(), StepError> {
        let work = async {
            let mut fs = lease.sftp().fs();
            match fs.rename(p(temp), p(path)).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    let _ = fs.remove_file(p(temp)).await;
                    Err(lease.sftp_err("replace lock", path, &e))
                }
            }
        };
        self.bounded(lease, "replace lock", work).await
    }

    /// Remove a lock temp that will not be renamed (best effort).
    pub(crate) async fn lock_temp_discard(&self, lease: &Lease, temp: &str) {
        let _ = self
            .bounded(lease, "remove lock temp", async {
                let _ = lease.sftp().fs().remove_file(p(temp)).await;
                Ok(())
            })
            .await;
    }

    /// The lock file's content and mtime, `None` when there is none.
    pub(crate) async fn lock_file_read(&self, path: &str) -> Result<Option<LockFile>, StepError> {
        let lease = self.lease().await?;
        let work = async {
            // lstat first: only a regular file is opened. (One swapped in
            // between that blocks the open is abandoned at the timeout,
            // with its connection.)
            match lease.sftp().fs().symlink_metadata(p(path)).await {
                Ok(m) => {
                    if let Some(e) = not_regular(self.addr(), path, &m) {
                        return Err(e);
                    }
                }
                Err(e) if is_no_such_file(&e) => return Ok(None),
                Err(e) => return Err(lease.sftp_err("stat lock", path, &e)),
            }
            let mut f = match lease.sftp().open(p(path)).await {
                Ok(f) => f,
                Err(e) if is_no_such_file(&e) => return Ok(None),
                Err(e) => return Err(lease.sftp_err("open lock", path, &e)),
            };
            // `[fstat, read]` in one round trip; the handle closes when
            // dropped.
            let r = async {
                let mut g = f.clone();
                let (meta, first) = in_order2(g.metadata(), f.read(64 * 1024, Default::default())).await;
                let meta = meta?;
                let mut bytes = Vec::new();
                let mut chunk = first?;
                while let Some(c) = chunk {
                    bytes.extend_from_slice(&c);
                    if bytes.len() > MAX_LOCK_BYTES {
                        break;
                    }
                    chunk = f.read(64 * 1024, Default::default()).await?;
                }
                Ok::<_, openssh_sftp_client::Error>((meta, bytes))
            }
            .await;
            match r {
                Ok((meta, bytes)) => {
                    Ok(Some(LockFile { bytes, mtime: meta.modified().map(|t| t.as_duration().as_secs()).unwrap_or(0) }))
                }
                Err(e) => Err(lease.sftp_err("read lock", path, &e)),
            }
        };
        self.bounded(&lease, "read lock", work).await
    }

    /// Remove `path`; a missing file is not an error.
    pub(crate) async fn lock_file_remove(&self, path: &str) -> Result<(), StepError> {
        let lease = self.lease().await?;
        let work = async {
            match lease.sftp().fs().remove_file(p(path)).await {
                Ok(()) => Ok(()),
                Err(e) if is_no_such_file(&e) => Ok(()),
                Err(e) => Err(lease.sftp_err("remove lock", path, &e)),
            }
        };
        self.bounded(&lease, "remove lock", work).await
    }
}

impl SshHost<'_> {
    /// Remove the lock's temp and claim files whose mtime is before
    /// `before` (host seconds): one directory listing, then the removals
    /// pipelined.
    pub(crate) async fn lock_file_sweep(&self, lock: &str, before: u64) -> Result<u32, StepError> {
        let lease = self.lease().await?;
        let dir = match lock.rfind('/') {
            Some(0) => "/".to_string(),
            Some(i) => lock[..i].to_string(),
            None => ".".to_string(),
        };
        // The prune's listing of this directory, when it was taken just
        // now by this deployment, serves: what it shows older than `before`
        // is older than a lease now (a file made since is younger), and
        // litter that old belongs to nobody alive (the premise of every
        // sweep, which removes by name after its listing too).
        let recent = self
            .listed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .filter(|l| l.dir == dir && l.at.elapsed() < RECENT_LISTING);
        let work = async {
            let entries = match recent {
                Some(l) => l.entries,
                None => crate::host::list_dir(&lease, &dir, true).await?,
            };
            let mut doomed = Vec::new();
            for e in entries {
                let full = if dir == "/" { format!("/{}", e.name) } else { format!("{dir}/{}", e.name) };
                if e.file && is_lock_litter(lock, &full) && e.mtime < before {
                    doomed.push(full);
                }
            }
            let results = futures_util::future::join_all(doomed.iter().map(|path| async {
                match lease.sftp().fs().remove_file(p(path)).await {
                    Ok(()) => Ok(()),
                    Err(e) if is_no_such_file(&e) => Ok(()),
                    Err(e) => Err(lease.sftp_err("remove stale lock temp", path, &e)),
                }
            }))
            .await;
            results.into_iter().collect::<Result<Vec<()>, StepError>>()?;
            Ok(doomed.len() as u32)
        };
        self.bounded(&lease, "sweep lock temps", work).await
    }
}
