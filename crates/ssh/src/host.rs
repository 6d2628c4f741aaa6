//! [`Host`] over SSH: the semantics of the core's `MemHost`, on a real
//! file system.
//!
//! Every step is idempotent: names derive from the live path and the
//! deployment id (`model::backup_path`/`temp_path`), stale leftovers of the
//! same names are replaced, and restore re-checks digests before acting.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use certdeploy_core::driver::{Fence, Host, LockWrite, PrunedLocked, Snapped, WrittenLocked};
use certdeploy_core::step::truncate_output;
use certdeploy_core::*;
use futures_util::future::join_all;
// Requests that leave together and are handled in order: each SFTP call
// queues its request when it is first polled, and futures-util's `join`,
// `join3` and `join_all` poll their futures in argument order, so the
// requests go out in this order in one write. The SFTP protocol requires
// requests on the same file to be handled in the order received, and
// OpenSSH's sftp-server (the server certdeploy requires: it needs its
// posix-rename, fsync and hardlink extensions) handles all the requests of
// a session one after the other. One round trip for several requests.
pub(crate) use futures_util::future::{join as in_order2, join_all as in_order_all, join3 as in_order3};
use futures_util::stream::StreamExt as _;
use openssh_sftp_client::error::SftpErrorKind;
use openssh_sftp_client::file::File;
use openssh_sftp_client::fs::Fs;
use openssh_sftp_client::metadata::{MetaData, MetaDataBuilder, Permissions};
use sha2::{Digest as _, Sha256};

use crate::error::{first_connection_loss, is_no_such_file, sftp_is_connection_loss, sftp_kind, shell_quote};
use crate::hostile::TargetPolicy;
use crate::pool::{ExecFailure, HostAddr, Lease, Pin, SshPool};

/// Bound on one SFTP step (snapshot, write, restore, ...): a stalled
/// connection must not hold a deployment forever. ServerAliveInterval
/// normally notices a dead peer well before this.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on housekeeping commands (temp creation, directory sync).
const AUX_TIMEOUT: Duration = Duration::from_secs(30);

/// One remote host, reached through a shared [`SshPool`].
#[derive(Clone, Debug)]
pub struct SshHost<'a> {
    pool: &'a SshPool,
    addr: HostAddr,
    /// Directories whose renames (by [`Host::write`]) are not yet durable.
    /// Normally none: the write fsyncs every renamed file again through its
    /// still open handle, which on Linux's journaling file systems (ext4,
    /// XFS, btrfs) commits the rename with it; SFTP cannot fsync a
    /// directory. Where that fsync fails, `sync DIR` runs in front of the
    /// next command (validate or reload) in the same remote shell; prune
    /// (the commit) and restore run it too if no command came first. A
    /// crash before it is covered by the journal: the deployment is not
    /// committed yet, and recovery rolls it back.
    pending_sync: std::sync::Arc<std::sync::Mutex<BTreeSet<String>>>,
    /// Owner of each live path as the snapshot saw it (`None`: no file), so
    /// the write keeps it without another stat.
    owners: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Owner>>>,
    /// The target's rules for links and owners (other local users may
    /// write its directories).
    pub(crate) policy: std::sync::Arc<TargetPolicy>,
    /// The SSH user's uid and the configured ids, once looked up.
    pub(crate) ids: std::sync::Arc<std::sync::Mutex<Option<crate::hostile::Ids>>>,
    /// From the first operation on: the host's master stays busy (never
    /// closed to make room for another host's) until this is dropped.
    pin: std::sync::Arc<std::sync::OnceLock<Pin>>,
    /// The last listing of a directory (by the prune), so that the lock's
    /// sweep right after it (the same directory: the lock lies next to the
    /// certificate) needs no listing of its own.
    pub(crate) listed: std::sync::Arc<std::sync::Mutex<Option<Listing>>>,
}

/// A directory's entries as one listing saw them.
#[derive(Clone, Debug)]
pub(crate) struct Listing {
    pub(crate) dir: String,
    pub(crate) at: std::time::Instant,
    pub(crate) entries: Vec<Listed>,
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub(crate) struct Listed {
    pub(crate) name: String,
    /// Modification time, whole seconds of the host's clock.
    pub(crate) mtime: u64,
    pub(crate) file: bool,
}

/// Entries OpenSSH's sftp-server puts in one READDIR answer at most; it
/// puts fewer only when it reached the end of the directory.
const READDIR_BATCH: usize = 100;

/// The entries of `dir`. `short_end`: take an answer of fewer than
/// [`READDIR_BATCH`] entries as the end of the directory (OpenSSH's
/// sftp-server, the server certdeploy requires, answers so), which saves
/// the round trip that would only say EOF; the READDIR the stream has sent
/// meanwhile is answered and the handle closed without anybody waiting.
/// Only for listings where an entry missed costs nothing (it is found by
/// the next one: prune, lock sweep).
pub(crate) async fn list_dir(lease: &Lease, dir: &str, short_end: bool) -> Result<Vec<Listed>, StepError> {
    use futures_util::FutureExt as _;
    let d = match lease.sftp().fs().open_dir(p(dir)).await {
        Ok(d) => d,
        Err(e) => return Err(lease.sftp_err("list", dir, &e)),
    };
    let mut out = Vec::new();
    let mut rd = Box::pin(d.read_dir());
    let entry = |e: openssh_sftp_client::fs::DirEntry| {
        let meta = e.metadata();
        Listed {
            name: e.filename().to_string_lossy().into_owned(),
            mtime: meta.modified().map(|t| t.as_duration().as_secs()).unwrap_or(u64::MAX),
            file: meta.file_type().is_some_and(|t| t.is_file()),
        }
    };
    loop {
        // Entries of an answer already in are ready at once; `None` here:
        // the stream has asked for the next answer.
        let next = match rd.next().now_or_never() {
            Some(n) => n,
            None if short_end && !out.is_empty() && out.len() % READDIR_BATCH != 0 => break,
            None => rd.next().await,
        };
        match next {
            Some(Ok(e)) => out.push(entry(e)),
            Some(Err(e)) => return Err(lease.sftp_err("list", dir, &e)),
            None => break,
        }
    }
    Ok(out)
}

/// Remove these old backups, all at once (the requests pipeline on the
/// SFTP channel); one already gone is fine.
async fn remove_old_backups(lease: &Lease, doomed: &[String]) -> Result<(), StepError> {
    let results = join_all(doomed.iter().map(|path| async move {
        match lease.sftp().fs().remove_file(p(path)).await {
            Ok(()) => Ok(()),
            Err(e) if is_no_such_file(&e) => Ok(()),
            Err(e) => Err(lease.sftp_err("remove old backup", path, &e)),
        }
    }))
    .await;
    results.into_iter().collect::<Result<Vec<()>, StepError>>().map(|_| ())
}

pub(crate) fn p(s: &str) -> &Path {
    Path::new(s)
}

fn parent_of(path: &str) -> String {
    match path.rfind('/') {
        Some(0) => "/".into(),
        Some(i) => path[..i].to_string(),
        None => ".".into(),
    }
}

pub(crate) fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A file's owner (uid, gid) as far as known; `None`: keep the default.
type Owner = Option<(Option<u32>, Option<u32>)>;

/// A temp name for `live` nobody can predict: the deployment's temp name
/// (`model::temp_path`, which recovery lists by) and 128 random bits.
pub(crate) fn fresh_temp(live: &str, id: &str) -> String {
    format!("{}.{}", temp_path(live, id), random_hex())
}

/// 128 bits from the operating system's CSPRNG, in hex.
pub(crate) fn random_hex() -> String {
    let mut b = [0u8; 16];
    // The OS's random source failing is not recoverable here.
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    hex::encode(b)
}

/// The staging directory of a temp file and the file's name inside it.
fn stage_paths(temp: &str) -> (String, String) {
    let dir = parent_of(temp);
    let stage = format!("{}/.certdeploy-stage.{}", if dir == "/" { "" } else { &dir }, file_name(temp));
    let staged = format!("{stage}/t");
    (stage, staged)
}

fn mode_of(m: &MetaData) -> u32 {
    m.permissions().map(|p| p.as_raw().bits()).unwrap_or(0) & 0o7777
}

/// A temp file being written, and how it reaches the live path.
struct Temp {
    file: File,
    /// The name renamed over the live path: the temp itself, or a key's
    /// file inside its private staging directory.
    from: String,
    /// That staging directory, removed once `from` has left it.
    stage: Option<String>,
    /// Owner and mode may be set in one request: nobody else can open the
    /// file (staged), or its content is public.
    combine: bool,
}

impl Temp {
    /// Remove the emptied staging directory, if any (best effort).
    async fn remove_stage(&self, fs: &mut Fs) {
        if let Some(stage) = &self.stage {
            let _ = fs.remove_dir(p(stage)).await;
        }
    }
}

/// Content digest and facts of one remote file, read through one handle.
struct Read {
    meta: MetaData,
    sha256: Digest,
    size: u64,
    content: Option<Vec<u8>>,
}

/// `sync -- DIR...`: coreutils fsyncs each named directory.
fn sync_command(dirs: &BTreeSet<String>) -> String {
    let mut cmd = String::from("sync --");
    for d in dirs {
        cmd.push(' ');
        cmd.push_str(&shell_quote(d));
    }
    cmd
}

/// The snapshot of an existing file backed up at `backup`.
fn existing(live: String, backup: String, r: &Read) -> Snapshot {
    Snapshot {
        live_path: live,
        pre: PreState::Existing {
            backup_path: backup,
            sha256: r.sha256,
            size: r.size,
            mode: mode_of(&r.meta),
            uid: r.meta.uid().unwrap_or(0),
            gid: r.meta.gid().unwrap_or(0),
            cert: None,
            holds: None,
        },
    }
}

/// Read an open file to its end: digest, size, and the bytes if `keep`.
/// `known`: its metadata if the caller has it; otherwise the fstat goes out
/// with the first read. The handle is closed when dropped (the close request
/// leaves with the next ones; nobody waits for its answer).
async fn read_open(mut f: File, keep: bool, known: Option<MetaData>) -> Result<Read, openssh_sftp_client::Error> {
    let n = 64 * 1024;
    let mut first = None;
    let meta = match known {
        Some(m) => m,
        None => {
            let mut g = f.clone();
            let (m, chunk) = in_order2(g.metadata(), f.read(n, Default::default())).await;
            first = Some(chunk?);
            m?
        }
    };
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut content = keep.then(Vec::new);
    loop {
        let chunk = match first.take() {
            Some(c) => c,
            None => f.read(n, Default::default()).await?,
        };
        let Some(mut chunk) = chunk else { break };
        hasher.update(&chunk[..]);
        size += chunk.len() as u64;
        if let Some(c) = content.as_mut() {
            c.extend_from_slice(&chunk);
        }
        let short = chunk.len() < n as usize;
        // Key bytes do not linger in freed buffers.
        chunk.iter_mut().for_each(|b| *b = 0);
        // sftp-server answers a read of a regular file with one read(2) of
        // the asked length: a short read that reached the file's size is
        // the end of the file. Saves the round trip that would only return
        // EOF. (A short read before that size: the connection's read limit
        // is below `n`; read on.)
        if short && size >= meta.len().unwrap_or(0) {
            break;
        }
    }
    Ok(Read { meta, sha256: Digest(hasher.finalize().into()), size, content })
}

impl<'a> SshHost<'a> {
    pub fn new(pool: &'a SshPool, addr: HostAddr) -> SshHost<'a> {
        SshHost {
            pool,
            addr,
            pending_sync: Default::default(),
            owners: Default::default(),
            policy: Default::default(),
            ids: Default::default(),
            pin: Default::default(),
            listed: Default::default(),
        }
    }

    /// A lease of this host's connection; the first one also keeps the
    /// master busy for as long as this `SshHost` lives (see the pool).
    async fn pool_lease(&self) -> Result<Lease, StepError> {
        let lease = self.pool.lease(&self.addr).await?;
        self.pin.get_or_init(|| lease.pin());
        Ok(lease)
    }

    /// This host with the target's rules for links and owners.
    pub fn with_policy(mut self, policy: TargetPolicy) -> Self {
        self.policy = std::sync::Arc::new(policy);
        self
    }

    fn take_pending_sync(&self) -> BTreeSet<String> {
        std::mem::take(&mut *self.pending_sync.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Run a deferred directory sync now (see `pending_sync`).
    async fn flush_pending_sync(&self, lease: &Lease) {
        let dirs = self.take_pending_sync();
        self.sync_dirs(lease, dirs).await;
    }

    /// Create `temp` empty and private to its owner, without a shell: the
    /// file is created (`O_EXCL`) inside a fresh directory (unpredictable
    /// name, `temp` is) made with mode 0700, so nobody else can ever open
    /// it there. Nothing is chmodded by path: the directory's lstat (in the
    /// same round trip) must show a directory of the file's own owner,
    /// private, holding the just-created empty file; anything else (a name
    /// swapped under us) fails closed before a byte is written. The caller
    /// sets owner and mode through the handle, writes the content there,
    /// and renames the file over the live path.
    async fn open_private(&self, lease: &Lease, temp: &str) -> Result<File, StepError> {
        let (stage, staged) = stage_paths(temp);
        // One round trip: the requests are handled in this order (see the
        // note on `in_order2`); the file is only used if all succeeded.
        let (mut fs1, mut fs2, mut fs3) = (lease.sftp().fs(), lease.sftp().fs(), lease.sftp().fs());
        let ((made, opened), (dir_stat, file_stat)) = in_order2(
            in_order2(
                fs1.dir_builder().permissions(Permissions::from(0o700u16)).create(p(&stage)),
                // Readable too: its fstat tells the SSH user's uid.
                lease.sftp().options().read(true).write(true).create_new(true).open(p(&staged)),
            ),
            in_order2(fs2.symlink_metadata(p(&stage)), fs3.symlink_metadata(p(&staged))),
        )
        .await;
        let lost = first_connection_loss([
            made.as_ref().err(),
            opened.as_ref().err(),
            dir_stat.as_ref().err(),
            file_stat.as_ref().err(),
        ])
        .map(|e| lease.sftp_err("create temp file", &staged, e));
        if let Some(e) = lost {
            return Err(e);
        }
        let refuse = |why: String| {
            StepError::permanent(format!(
                "{}: cannot create the key's private staging file {staged}: {why}; refusing to write the key any other way",
                self.addr
            ))
        };
        let (mut file, dir, made_file) = match (made, opened, dir_stat, file_stat) {
            (Ok(()), Ok(f), Ok(d), Ok(m)) => (f, d, m),
            (made, opened, d, m) => {
                let (made_ok, opened_ok) = (made.is_ok(), opened.is_ok());
                let ours = made_ok
                    && d.as_ref().is_ok_and(|d| d.file_type().is_some_and(|t| t.is_dir()) && mode_of(d) & 0o077 == 0);
                let e = [made.err(), opened.err(), d.err(), m.err()].into_iter().flatten().next();
                // Only what this call made goes, and nothing through a
                // name that may have been swapped.
                let mut fs = lease.sftp().fs();
                if opened_ok && ours {
                    let _ = fs.remove_file(p(&staged)).await;
                }
                if made_ok {
                    let _ = fs.remove_dir(p(&stage)).await;
                }
                return Err(refuse(e.map(|e| crate::pool::error_chain(&e)).unwrap_or_default()));
            }
        };
        // The created file is the SFTP server's: its uid, once known, says
        // whose; before that, the file's own fstat (a round trip more).
        let mine = match self.known_server_uid() {
            Some(uid) => Some(uid),
            None => match file.metadata().await {
                Ok(m) => m.uid(),
                Err(e) => return Err(lease.sftp_err("stat temp file", &staged, &e)),
            },
        };
        let private_dir = dir.file_type().is_some_and(|t| t.is_dir())
            && dir.uid().is_some()
            && dir.uid() == mine
            && mode_of(&dir) & 0o077 == 0;
        let same_file = made_file.file_type().is_some_and(|t| t.is_file())
            && made_file.uid().is_some()
            && made_file.uid() == mine
            && made_file.len() == Some(0);
        if !private_dir || !same_file {
            // Not removed by name: the names are not ours any more.
            return Err(refuse(format!(
                "the staging directory is not a private directory of the SSH user (mode {:o}, uid {:?}) or holds another file",
                mode_of(&dir),
                dir.uid()
            )));
        }
        Ok(file)
    }

    /// Remove what [`Self::open_private`] may have left for `temp`.
    async fn discard_stage(&self, lease: &Lease, temp: &str) {
        let (stage, staged) = stage_paths(temp);
        let mut fs = lease.sftp().fs();
        let _ = fs.remove_file(p(&staged)).await;
        let _ = fs.remove_dir(p(&stage)).await;
    }

    /// Remove `temp` and any staging leftovers of it.
    async fn discard_temp(&self, lease: &Lease, temp: &str) -> Result<(), StepError> {
        let r = match lease.sftp().fs().remove_file(p(temp)).await {
            Ok(()) => Ok(()),
            Err(e) if is_no_such_file(&e) => Ok(()),
            Err(e) => Err(lease.sftp_err("remove temp file", temp, &e)),
        };
        self.discard_stage(lease, temp).await;
        r
    }

    /// Remove every temp of these deployment temp names (`model::temp_path`:
    /// the names written are these plus a random suffix) and their staging
    /// directories, as one listing of each directory finds them. Only
    /// regular files are removed as temps and only real directories (not
    /// links) entered as staging directories.
    async fn discard_temps_of(&self, lease: &Lease, bases: &[String]) -> Result<(), StepError> {
        let dirs: BTreeSet<String> = bases.iter().map(|b| parent_of(b)).collect();
        for dir in dirs {
            let mut fs = lease.sftp().fs();
            let d = match fs.open_dir(p(&dir)).await {
                Ok(d) => d,
                Err(e) if is_no_such_file(&e) => continue,
                Err(e) => return Err(lease.sftp_err("list", &dir, &e)),
            };
            let mut doomed_files = Vec::new();
            let mut doomed_stages = Vec::new();
            let mut rd = Box::pin(d.read_dir());
            while let Some(e) = rd.next().await {
                let e = e.map_err(|e| lease.sftp_err("list", &dir, &e))?;
                let name = e.filename().to_string_lossy().into_owned();
                let ft = e.metadata().file_type();
                for base in bases.iter().filter(|b| parent_of(b) == dir) {
                    let b = file_name(base);
                    let ours = |n: &str| n == b || n.strip_prefix(b).is_some_and(|r| r.starts_with('.'));
                    let full = if dir == "/" { format!("/{name}") } else { format!("{dir}/{name}") };
                    if ft.is_some_and(|t| t.is_file()) && ours(&name) {
                        doomed_files.push(full);
                    } else if ft.is_some_and(|t| t.is_dir())
                        && name.strip_prefix(".certdeploy-stage.").is_some_and(ours)
                    {
                        doomed_stages.push(full);
                    }
                }
            }
            for f in &doomed_files {
                match fs.remove_file(p(f)).await {
                    Ok(()) => {}
                    Err(e) if is_no_such_file(&e) => {}
                    Err(e) => return Err(lease.sftp_err("remove temp file", f, &e)),
                }
            }
            for stage in &doomed_stages {
                let _ = fs.remove_file(p(&format!("{stage}/t"))).await;
                let _ = fs.remove_dir(p(stage)).await;
            }
        }
        Ok(())
    }

    pub fn addr(&self) -> &HostAddr {
        &self.addr
    }

    /// The path a deployment to `path` writes: `path` with symlinks
    /// resolved by the server (unchanged when it is not a link).
    pub async fn resolve_path(&self, path: &str) -> Result<String, StepError> {
        let lease = self.lease().await?;
        self.resolve(&lease, path).await
    }

    /// A connection that can deploy: posix-rename and fsync are required.
    pub(crate) async fn lease(&self) -> Result<Lease, StepError> {
        let lease = self.pool_lease().await?;
        let sftp = lease.sftp();
        for (ok, ext, why) in [
            (sftp.support_posix_rename(), "posix-rename@openssh.com", "atomic replacement is impossible"),
            (sftp.support_fsync(), "fsync@openssh.com", "durable writes are impossible"),
        ] {
            if !ok {
                return Err(StepError::permanent(format!(
                    "{}: the SFTP server lacks the {ext} extension; refusing to deploy ({why})",
                    self.addr
                )));
            }
        }
        Ok(lease)
    }

    /// The configured path with symlinks resolved (the path actually
    /// written). A symlink is resolved with the server's realpath.
    async fn resolve(&self, lease: &Lease, path: &str) -> Result<String, StepError> {
        self.resolve_stat(lease, path).await.map(|(live, _)| live)
    }

    /// [`Self::resolve`], with the final path's metadata when it exists;
    /// a link is followed only when owned by root or the SSH user and
    /// leading into the path's directory or `link_targets`
    /// ([`Self::resolve_checked`]).
    async fn resolve_stat(&self, lease: &Lease, path: &str) -> Result<(String, Option<MetaData>), StepError> {
        self.resolve_checked(lease, path).await
    }

    /// `Missing`, unless the directory itself is missing (a permanent error:
    /// the write could never succeed).
    async fn missing(&self, lease: &Lease, live: String) -> Result<Snapped, StepError> {
        let dir = parent_of(&live);
        match lease.sftp().fs().metadata(p(&dir)).await {
            Ok(m) if m.file_type().is_some_and(|t| t.is_dir()) => {
                self.remember_owner(&live, None);
                Ok(Snapped { snapshot: Snapshot { live_path: live, pre: PreState::Missing }, content: None })
            }
            Ok(_) => {
                Err(StepError::permanent(format!("{}: {dir} (directory of {live}) is not a directory", self.addr)))
            }
            Err(e) if is_no_such_file(&e) => {
                Err(StepError::permanent(format!("{}: directory {dir} (of {live}) does not exist", self.addr)))
            }
            Err(e) => Err(lease.sftp_err("stat directory", &dir, &e)),
        }
    }

    fn remember_owner(&self, live: &str, owner: Owner) {
        self.owners.lock().unwrap_or_else(|e| e.into_inner()).insert(live.to_string(), owner);
    }

    /// The owner the snapshot saw, or `Err(live)` to look it up.
    fn known_owner<'p>(&self, live: &'p str) -> Result<Owner, &'p str> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner()).get(live).copied().ok_or(live)
    }

    /// `known`: the file's metadata if the caller has it (saves an fstat).
    async fn read_file(
        &self,
        lease: &Lease,
        path: &str,
        keep: bool,
        known: Option<MetaData>,
    ) -> Result<Read, openssh_sftp_client::Error> {
        let f = lease.sftp().open(p(path)).await?;
        read_open(f, keep, known).await
    }

    async fn snapshot_one(&self, lease: &Lease, id: &str, req: &SnapshotRequest) -> Result<Snapped, StepError> {
        // Links and owners first: nothing is written, not even a
        // backup, for a path that resolves where it may not or a file that
        // belongs to someone else.
        let (live, known) = self.path_rules(lease, req.role, &req.path).await?;
        if live == req.path
            && known.is_some()
            && lease.sftp().support_hardlink()
            && let Some(s) = self.snapshot_linked(lease, id, req).await?
        {
            // The file backed up is the one checked (or it is checked now).
            if let PreState::Existing { uid, backup_path, .. } = &s.snapshot.pre
                && let Err(e) = self.check_owner(lease, req.role, &live, Some(*uid)).await
            {
                let _ = lease.sftp().fs().remove_file(p(backup_path)).await;
                return Err(e);
            }
            return Ok(s);
        }
        self.snapshot_careful(lease, id, req, live, known).await
    }

    /// The metadata of the file at `live` (`known` when the path rules
    /// already read it): `None` when there is none, an error when it is not
    /// a regular file.
    async fn regular_file(
        &self,
        lease: &Lease,
        live: &str,
        known: Option<MetaData>,
    ) -> Result<Option<MetaData>, StepError> {
        let stat = match known {
            Some(m) => Ok(m),
            None => lease.sftp().fs().metadata(p(live)).await,
        };
        let meta = match stat {
            Ok(m) => m,
            Err(e) if is_no_such_file(&e) => return Ok(None),
            Err(e) => return Err(lease.sftp_err("stat", live, &e)),
        };
        if !meta.file_type().is_some_and(|t| t.is_file()) {
            return Err(StepError::permanent(format!("{}: {live} is not a regular file", self.addr)));
        }
        Ok(Some(meta))
    }

    /// What [`Self::snapshot_one`] reads, changing nothing: the link and
    /// owner rules, then the live file's digest and metadata (its bytes for
    /// a cert), or `Missing` when its directory exists. No backup is made.
    async fn inspect_one(&self, lease: &Lease, req: &SnapshotRequest) -> Result<Snapped, StepError> {
        let (live, known) = self.path_rules(lease, req.role, &req.path).await?;
        let Some(meta) = self.regular_file(lease, &live, known).await? else {
            return self.missing(lease, live).await;
        };
        let r = match self.read_file(lease, &live, req.role.reads_content(), Some(meta)).await {
            Ok(r) => r,
            Err(e) => return Err(lease.sftp_err("read", &live, &e)),
        };
        Ok(Snapped { snapshot: existing(live, String::new(), &r), content: r.content })
    }

    /// The common case in two round trips: the configured path is a
    /// regular file and no stale backup is in the way. `[lstat, hard link
    /// to the backup name, open the backup]` go out together, then the
    /// read; the file's metadata is the lstat's (a link shares the inode).
    /// `Ok(None)`: not that case; what this did is undone and
    /// [`Self::snapshot_careful`] decides.
    async fn snapshot_linked(
        &self,
        lease: &Lease,
        id: &str,
        req: &SnapshotRequest,
    ) -> Result<Option<Snapped>, StepError> {
        let live = req.path.as_str();
        let backup = backup_path(live, id);
        let (mut fs1, mut fs2) = (lease.sftp().fs(), lease.sftp().fs());
        let (stat, linked, opened) =
            in_order3(fs1.symlink_metadata(p(live)), fs2.hard_link(p(live), p(&backup)), lease.sftp().open(p(&backup)))
                .await;
        let lost = first_connection_loss([stat.as_ref().err(), linked.as_ref().err(), opened.as_ref().err()])
            .map(|e| lease.sftp_err("snapshot", live, e));
        if let Some(e) = lost {
            return Err(e);
        }
        match (stat, &linked, opened) {
            (Ok(meta), Ok(()), Ok(f)) if meta.file_type().is_some_and(|t| t.is_file()) => {
                let r = match read_open(f, req.role.reads_content(), Some(meta)).await {
                    Ok(r) => r,
                    Err(e) => return Err(lease.sftp_err("read backup", &backup, &e)),
                };
                self.remember_owner(live, Some((r.meta.uid(), r.meta.gid())));
                Ok(Some(Snapped { snapshot: existing(live.to_string(), backup, &r), content: r.content }))
            }
            _ => {
                // A symlink (the link named the link itself), a stale
                // backup, a missing file, or something else: undo the link.
                if linked.is_ok()
                    && let Err(e) = lease.sftp().fs().remove_file(p(&backup)).await
                    && !is_no_such_file(&e)
                {
                    return Err(lease.sftp_err("remove backup link", &backup, &e));
                }
                Ok(None)
            }
        }
    }

    /// Any case: symlinks resolved, stale backups replaced, a copy where a
    /// hard link is refused, a missing file told from a missing directory.
    async fn snapshot_careful(
        &self,
        lease: &Lease,
        id: &str,
        req: &SnapshotRequest,
        live: String,
        known: Option<MetaData>,
    ) -> Result<Snapped, StepError> {
        let Some(meta) = self.regular_file(lease, &live, known).await? else {
            return self.missing(lease, live).await;
        };
        let mut fs = lease.sftp().fs();
        self.check_owner(lease, req.role, &live, meta.uid()).await?;
        let backup = backup_path(&live, id);
        let support_hardlink = lease.sftp().support_hardlink();
        // Link first: a stale backup of the same name (an interrupted
        // attempt) only exists after a crash; then remove it and link again.
        let first = if support_hardlink { Some(fs.hard_link(p(&live), p(&backup)).await) } else { None };
        if !matches!(first, Some(Ok(()))) {
            if let Some(Err(e)) = &first
                && sftp_is_connection_loss(e)
            {
                return Err(lease.sftp_err("hard-link backup", &backup, e));
            }
            match fs.remove_file(p(&backup)).await {
                Ok(()) => {}
                Err(e) if is_no_such_file(&e) => {}
                Err(e) => return Err(lease.sftp_err("remove stale backup", &backup, &e)),
            }
        }
        let linked = if matches!(first, Some(Ok(()))) {
            true
        } else if support_hardlink {
            match fs.hard_link(p(&live), p(&backup)).await {
                Ok(()) => true,
                // Not supported by the file system, or forbidden by
                // fs.protected_hardlinks for a file the user does not own:
                // fall back to a copy.
                Err(e)
                    if matches!(
                        sftp_kind(&e),
                        Some(SftpErrorKind::OpUnsupported | SftpErrorKind::Failure | SftpErrorKind::PermDenied)
                    ) =>
                {
                    tracing::info!(host = %self.addr, path = %live, "hard link refused; backing up by copy");
                    false
                }
                Err(e) => return Err(lease.sftp_err("hard-link backup", &backup, &e)),
            }
        } else {
            false
        };
        if !linked {
            self.copy_file(lease, id, &live, &backup, &meta).await?;
        }
        // A link shares the live file's inode: its metadata is known.
        let r = match self.read_file(lease, &backup, req.role.reads_content(), linked.then_some(meta)).await {
            Ok(r) => r,
            Err(e) => return Err(lease.sftp_err("read backup", &backup, &e)),
        };
        self.remember_owner(&live, Some((r.meta.uid(), r.meta.gid())));
        Ok(Snapped { snapshot: existing(live, backup, &r), content: r.content })
    }

    /// Back up by copy: a private temp, same mode (and owner, where
    /// allowed), content, fsync, rename to the backup name.
    async fn copy_file(
        &self,
        lease: &Lease,
        id: &str,
        live: &str,
        backup: &str,
        meta: &MetaData,
    ) -> Result<(), StepError> {
        let temp = fresh_temp(backup, id);
        let mut src = match self.read_file(lease, live, true, Some(*meta)).await {
            Ok(r) => r,
            Err(e) => return Err(lease.sftp_err("read", live, &e)),
        };
        let bytes = src.content.take().unwrap_or_default();
        let r =
            self.write_temp(lease, &temp, mode_of(meta), Ok(Some((meta.uid(), meta.gid()))), &bytes, true, false).await;
        drop(Secret::new(bytes));
        let t = match r {
            Ok(t) => t,
            Err(e) => {
                // Never leave a partial copy of the original (maybe a key) behind.
                let _ = self.discard_temp(lease, &temp).await;
                return Err(e);
            }
        };
        let (mut fs1, mut fs2) = (lease.sftp().fs(), lease.sftp().fs());
        let (renamed, _) = in_order2(fs1.rename(p(&t.from), p(backup)), t.remove_stage(&mut fs2)).await;
        if let Err(e) = renamed {
            let _ = self.discard_temp(lease, &temp).await;
            return Err(lease.sftp_err("rename backup copy to", backup, &e));
        }
        Ok(())
    }

    /// Create the temp file for `temp` (an unpredictable name), empty,
    /// exclusively. `private = false` for public content (a certificate or
    /// chain): the temp is opened directly, without the private staging
    /// directory, because a reader who opens it before its mode is set can
    /// only ever read public bytes. A key's temp is only ever created in
    /// its private staging directory: there is no other way (no shell).
    async fn open_temp(&self, lease: &Lease, temp: &str, private: bool) -> Result<Temp, StepError> {
        if !private {
            return match lease.sftp().options().write(true).create_new(true).open(p(temp)).await {
                Ok(file) => Ok(Temp { file, from: temp.to_string(), stage: None, combine: true }),
                Err(e) => Err(lease.sftp_err("create temp file", temp, &e)),
            };
        }
        let file = self.open_private(lease, temp).await?;
        let (stage, staged) = stage_paths(temp);
        Ok(Temp { file, from: staged, stage: Some(stage), combine: true })
    }

    /// Write a temp file from nothing ([`Self::open_temp`], then
    /// [`Self::fill`]). `owner`: known, or `Err(path)` to keep the owner of
    /// `path` if it exists (looked up while the temp is created).
    #[allow(clippy::too_many_arguments)]
    async fn write_temp(
        &self,
        lease: &Lease,
        temp: &str,
        mode: u32,
        owner: Result<Owner, &str>,
        bytes: &[u8],
        private: bool,
        strict: bool,
    ) -> Result<Temp, StepError> {
        // A file found at the path is kept as its owner's only when that
        // owner is root or the SSH user; otherwise the new file
        // is the SSH user's.
        let trusted = *self.ids.lock().unwrap_or_else(|e| e.into_inner());
        let lookup = async {
            match owner {
                Ok(o) => o,
                Err(path) => lease
                    .sftp()
                    .fs()
                    .symlink_metadata(p(path))
                    .await
                    .ok()
                    .filter(|m| m.uid().is_some_and(|u| trusted.is_some_and(|ids| ids.trusted(u))))
                    .map(|m| (m.uid(), m.gid())),
            }
        };
        let (owner, opened) = tokio::join!(lookup, self.open_temp(lease, temp, private));
        let t = opened?;
        self.fill(lease, &t, mode, owner, bytes, strict).await?;
        Ok(t)
    }

    /// Owner (best effort), mode, content, fsync: in one round trip, in this
    /// order (see `in_order2`). Where `t.combine` allows, owner and mode
    /// are one request (the server applies the mode first) unless set-id
    /// bits (cleared by a chown) are asked for; otherwise the owner goes
    /// first, so that a group change never widens access to content.
    /// `strict`: the owner is configured; not setting it is an error.
    async fn fill(
        &self,
        lease: &Lease,
        t: &Temp,
        mode: u32,
        owner: Owner,
        bytes: &[u8],
        strict: bool,
    ) -> Result<(), StepError> {
        let perm = Permissions::from((mode & 0o7777) as u16);
        let owner = match owner {
            Some((Some(uid), Some(gid))) => Some((uid, gid)),
            _ => None,
        };
        let name = t.from.as_str();
        let combined = t.combine && mode & 0o7000 == 0 && owner.is_some();
        let attrs = async {
            let mut f = t.file.clone();
            if combined && let Some(id) = owner {
                return (f.set_metadata(MetaDataBuilder::new().id(id).permissions(perm).create()).await, None);
            }
            let own = owner.map(|id| f.set_metadata(MetaDataBuilder::new().id(id).create()));
            let mut g = t.file.clone();
            let (own, chmod) = in_order2(
                async {
                    match own {
                        Some(fut) => Some(fut.await),
                        None => None,
                    }
                },
                g.set_permissions(perm),
            )
            .await;
            (chmod, own)
        };
        // One write request carries up to the connection's write limit
        // (its answer says how much): the rest, if any, follows with a
        // second fsync.
        let (mut w, mut s) = (t.file.clone(), t.file.clone());
        let ((mode_set, owned), (wrote, synced)) = in_order2(attrs, in_order2(w.write(bytes), s.sync_all())).await;
        if let Some(Err(e)) = &owned
            && (strict || !matches!(sftp_kind(e), Some(SftpErrorKind::PermDenied | SftpErrorKind::Failure)))
        {
            return Err(lease.sftp_err("chown temp file", name, e));
        }
        let mut resync = false;
        if let Err(e) = mode_set {
            if !combined || sftp_is_connection_loss(&e) {
                return Err(lease.sftp_err("chmod temp file", name, &e));
            }
            // Owner and mode one at a time, owner best effort: an
            // unprivileged user may not give files away.
            let mut f = t.file.clone();
            if let Some(id) = owner
                && let Err(e) = f.set_metadata(MetaDataBuilder::new().id(id).create()).await
                && (strict || !matches!(sftp_kind(&e), Some(SftpErrorKind::PermDenied | SftpErrorKind::Failure)))
            {
                return Err(lease.sftp_err("chown temp file", name, &e));
            }
            if let Err(e) = f.set_permissions(perm).await {
                return Err(lease.sftp_err("chmod temp file", name, &e));
            }
            resync = true;
        }
        let written = match wrote {
            Ok(n) => n,
            Err(e) => return Err(lease.sftp_err("write temp file", name, &e)),
        };
        if let Err(e) = synced {
            return Err(lease.sftp_err("fsync temp file", name, &e));
        }
        if written < bytes.len() {
            if let Err(e) = w.write_all(&bytes[written..]).await {
                return Err(lease.sftp_err("write temp file", name, &e));
            }
            resync = true;
        }
        if resync && let Err(e) = w.sync_all().await {
            return Err(lease.sftp_err("fsync temp file", name, &e));
        }
        Ok(())
    }

    /// Make renames in these directories durable (`sync DIR...`, coreutils
    /// fsyncs each named directory). Best effort: the renames are done.
    /// (OpenSSH's sftp-server would fsync a directory opened read-only
    /// through `fsync@openssh.com`, but openssh-sftp-client sends fsync
    /// only for a handle opened for writing, which a directory cannot be.)
    async fn sync_dirs(&self, lease: &Lease, dirs: BTreeSet<String>) {
        if dirs.is_empty() {
            return;
        }
        match lease.exec(&sync_command(&dirs), AUX_TIMEOUT).await {
            Ok((Some(0), _, _)) => {}
            Ok((code, out, err)) => tracing::warn!(
                host = %self.addr, ?code,
                output = %String::from_utf8_lossy(&[out, err].concat()),
                "directory sync failed"
            ),
            Err(_) => tracing::warn!(host = %self.addr, "directory sync: connection lost"),
        }
    }

    fn exec_failure(&self, f: ExecFailure, what: &str, timeout: Duration) -> StepError {
        match f {
            ExecFailure::TimedOut => StepError::transient(format!(
                "{}: {what}: timed out after {} ms; outcome unknown",
                self.addr,
                timeout.as_millis()
            )),
            ExecFailure::Lost(e) => StepError::transient(format!(
                "{}: {what}: connection lost during command; outcome unknown ({e})",
                self.addr
            )),
            ExecFailure::NoChannel(e) => {
                StepError::transient(format!("{}: {what}: cannot open a channel: {e}", self.addr))
            }
        }
    }

    async fn restore_one(&self, lease: &Lease, id: &str, req: &RestoreRequest) -> Result<RestoreStatus, StepError> {
        let mut fs = lease.sftp().fs();
        let live = &req.live_path;
        let mut temps = vec![temp_path(live, id)];
        if let PreState::Existing { backup_path, .. } = &req.pre {
            temps.push(temp_path(backup_path, id));
        }
        self.discard_temps_of(lease, &temps).await?;
        match &req.pre {
            PreState::Missing => match fs.remove_file(p(live)).await {
                Ok(()) => Ok(RestoreStatus::Removed),
                Err(e) if is_no_such_file(&e) => Ok(RestoreStatus::Removed),
                Err(e) => Err(lease.sftp_err("remove", live, &e)),
            },
            PreState::Existing { backup_path, sha256, .. } => match fs.rename(p(backup_path), p(live)).await {
                Ok(()) => {
                    // rename() of two links to one inode does nothing: the
                    // write never happened. The live path is the original
                    // either way; drop the backup name.
                    let _ = fs.remove_file(p(backup_path)).await;
                    Ok(RestoreStatus::Restored)
                }
                Err(e) if is_no_such_file(&e) => match self.read_file(lease, live, false, None).await {
                    // Restored before a crash.
                    Ok(r) if r.sha256 == *sha256 => Ok(RestoreStatus::Restored),
                    Ok(_) => Err(StepError::permanent(format!(
                        "{}: {backup_path} is missing and {live} differs from the snapshot",
                        self.addr
                    ))),
                    Err(e) if is_no_such_file(&e) => {
                        Err(StepError::permanent(format!("{}: {backup_path} and {live} are both missing", self.addr)))
                    }
                    Err(e) => Err(lease.sftp_err("read", live, &e)),
                },
                Err(e) => Err(lease.sftp_err(&format!("rename {backup_path} over"), live, &e)),
            },
        }
    }

    /// Put one file back for a revert, keeping the backup: the backup,
    /// checked to hold `pre`'s digest, is hard-linked to a fresh temp that
    /// is renamed over the live path (the live path gets the backup's very
    /// inode: content, mode, owner), or copied (mode and owner kept where
    /// allowed) where a link is refused; a file that did not exist before
    /// is removed. Done again after a crash, it does the same.
    async fn reinstate_one(&self, lease: &Lease, id: &str, req: &RestoreRequest) -> Result<(), StepError> {
        let live = &req.live_path;
        let mut fs = lease.sftp().fs();
        let (backup, sha256) = match &req.pre {
            PreState::Missing => {
                return match fs.remove_file(p(live)).await {
                    Ok(()) => Ok(()),
                    Err(e) if is_no_such_file(&e) => Ok(()),
                    Err(e) => Err(lease.sftp_err("remove", live, &e)),
                };
            }
            PreState::Existing { backup_path, sha256, .. } => (backup_path, sha256),
        };
        let read = match self.read_file(lease, backup, false, None).await {
            Ok(r) => r,
            Err(e) if is_no_such_file(&e) => {
                return Err(StepError::permanent(format!("{}: the backup {backup} is gone", self.addr)));
            }
            Err(e) => return Err(lease.sftp_err("read backup", backup, &e)),
        };
        if read.sha256 != *sha256 {
            return Err(StepError::permanent(format!(
                "{}: the backup {backup} holds sha256:{}, not the sha256:{sha256} backed up",
                self.addr, read.sha256
            )));
        }
        let temp = fresh_temp(live, id);
        let linked = if lease.sftp().support_hardlink() {
            match fs.hard_link(p(backup), p(&temp)).await {
                Ok(()) => true,
                Err(e)
                    if matches!(
                        sftp_kind(&e),
                        Some(SftpErrorKind::OpUnsupported | SftpErrorKind::Failure | SftpErrorKind::PermDenied)
                    ) =>
                {
                    false
                }
                Err(e) => return Err(lease.sftp_err("hard-link backup", &temp, &e)),
            }
        } else {
            false
        };
        if !linked {
            tracing::info!(host = %self.addr, path = %live, "hard link refused; putting the backup back by copy");
            return self.copy_file(lease, id, backup, live, &read.meta).await;
        }
        if let Err(e) = fs.rename(p(&temp), p(live)).await {
            let _ = self.discard_temp(lease, &temp).await;
            return Err(lease.sftp_err(&format!("rename {temp} over"), live, &e));
        }
        Ok(())
    }

    async fn prune_dir(
        &self,
        lease: &Lease,
        id: &str,
        dir: &str,
        lives: &[&String],
        keep: u32,
    ) -> Result<(), StepError> {
        let listed = list_dir(lease, dir, true).await?;
        let doomed = self.old_backups(id, dir, lives, keep, listed);
        remove_old_backups(lease, &doomed).await
    }

    /// The backups of `lives` (all in `dir`) beyond `keep` in this listing
    /// of `dir`, never `id`'s own; the listing is kept for the lock's sweep.
    fn old_backups(&self, id: &str, dir: &str, lives: &[&String], keep: u32, listed: Vec<Listed>) -> Vec<String> {
        let entries: Vec<(String, u64)> =
            listed.iter().map(|e| (e.name.clone(), if e.mtime == u64::MAX { 0 } else { e.mtime })).collect();
        *self.listed.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Listing { dir: dir.to_string(), at: std::time::Instant::now(), entries: listed });
        let mut doomed = Vec::new();
        for live in lives {
            let base = file_name(live);
            let prefix = format!("{base}.certdeploy-bak.");
            let own = file_name(&backup_path(live, id)).to_string();
            let mut others: Vec<&(String, u64)> =
                entries.iter().filter(|(n, _)| n.starts_with(&prefix) && *n != own).collect();
            // Newest first; this attempt's own backup counts as one kept.
            others.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
            for (name, _) in others.into_iter().skip(keep.saturating_sub(1) as usize) {
                doomed.push(if dir == "/" { format!("/{name}") } else { format!("{dir}/{name}") });
            }
        }
        doomed
    }

    /// [`Host::prune_locked`]: the listings go with the lock's temp, the
    /// removals with its rename (after the fence): three round trips for
    /// both steps.
    async fn prune_with_lock(&self, id: &str, live_paths: &[String], keep: u32, lock: &LockWrite<'_>) -> PrunedLocked {
        let lease = match self.pool_lease().await {
            Ok(l) => l,
            Err(e) => return (Err(e), None),
        };
        // Normally done in front of the reload already.
        self.flush_pending_sync(&lease).await;
        let dirs: Vec<String> = live_paths.iter().map(|l| parent_of(l)).collect::<BTreeSet<_>>().into_iter().collect();
        let work = async {
            let lease = &lease;
            let lists = in_order_all(dirs.iter().map(|dir| list_dir(lease, dir, true)));
            let (staged, listed) =
                in_order2(self.lock_temp(lease, lock.path, &lock.bytes, lock.durable, true), lists).await;
            let (temp, host_now) = match staged {
                Ok(t) => t,
                Err(e) => return (Err(e), None),
            };
            if !(lock.fence)() {
                self.lock_temp_discard(lease, &temp).await;
                return (Ok(None), None);
            }
            let mut doomed = Vec::new();
            let mut listing_failed = None;
            for (dir, l) in dirs.iter().zip(listed) {
                match l {
                    Ok(l) => {
                        let lives: Vec<&String> = live_paths.iter().filter(|p| parent_of(p) == *dir).collect();
                        doomed.extend(self.old_backups(id, dir, &lives, keep, l));
                    }
                    Err(e) => {
                        listing_failed.get_or_insert(e);
                    }
                }
            }
            let (renamed, removed) =
                in_order2(self.lock_rename(lease, &temp, lock.path), remove_old_backups(lease, &doomed)).await;
            let pruned = match listing_failed {
                Some(e) => Err(e),
                None => removed,
            };
            (renamed.map(|()| Some(host_now)), Some(pruned))
        };
        match tokio::time::timeout(STEP_TIMEOUT, work).await {
            Ok(v) => v,
            Err(_) => {
                let e = self.step_timeout(&lease, "prune");
                (Err(e.clone()), Some(Err(e)))
            }
        }
    }

    /// [`Host::write`], and with `lock` [`Host::write_locked`]: the lock's
    /// temp is created and filled in the same round trips as the files'
    /// temps, its rename is confirmed (and `lock.after` asked) before the
    /// first live rename is sent, and if either says no, every temp goes
    /// and no live path changes. The first part of the answer is the
    /// lock's (`None` without `lock`).
    async fn write_with(
        &self,
        deployment_id: &str,
        files: &[(WriteRequest, &[u8])],
        lock: Option<&LockWrite<'_>>,
    ) -> (Option<Result<Option<u64>, StepError>>, Vec<Result<(), StepError>>) {
        let lease = match self.lease().await {
            Ok(l) => l,
            Err(e) => return (lock.map(|_| Err(e.clone())), vec![Err(e)]),
        };
        let temps: Vec<String> = files.iter().map(|(f, _)| fresh_temp(&f.live_path, deployment_id)).collect();
        // Owners: configured ids, or an existing file's when its
        // owner is root or the SSH user, or the SSH user's.
        let ids = if self.needs_ids() || files.iter().any(|(f, _)| self.known_owner(&f.live_path).is_err()) {
            match self.ids(&lease).await {
                Ok(ids) => Some(ids),
                Err(e) => return (lock.map(|_| Err(e.clone())), vec![Err(e)]),
            }
        } else {
            None
        };
        let owners: Vec<(Result<Owner, &str>, bool)> = files
            .iter()
            .map(|(f, _)| {
                let known = self.known_owner(&f.live_path);
                match ids {
                    Some(ids) if self.policy.owner_configured(f.role) || ids.owner_for(f.role, None).is_some() => {
                        let kept = known.ok().flatten();
                        let o = ids.owner_for(f.role, kept).map(|(u, g)| (Some(u), Some(g)));
                        (Ok(o), true)
                    }
                    _ => (known, false),
                }
            })
            .collect();
        let work = async {
            // The temps, concurrently (keeping the original owner where there
            // was one; only a key's needs the private staging directory).
            let fill =
                in_order_all(files.iter().zip(&temps).zip(&owners).map(|(((f, bytes), temp), (owner, strict))| {
                    let private = f.role.holds_key();
                    self.write_temp(&lease, temp, f.mode, *owner, bytes, private, *strict)
                }));
            // The lock's temp goes with them; its rename once both are
            // written, alone: no live path changes before it is confirmed.
            let (filled, replaced) = match lock {
                None => (fill.await, None),
                Some(l) => {
                    let (staged, filled) =
                        in_order2(self.lock_temp(&lease, l.path, &l.bytes, l.durable, true), fill).await;
                    let replaced = match staged {
                        Ok((temp, host_now)) => self.lock_install(&lease, &temp, host_now, l.path, l.fence()).await,
                        Err(e) => Err(e),
                    };
                    if !matches!(replaced, Ok(Some(_))) || !(l.after)() {
                        drop(filled);
                        for temp in &temps {
                            let _ = self.discard_temp(&lease, temp).await;
                        }
                        return (Some(replaced), Vec::new());
                    }
                    (filled, Some(replaced))
                }
            };
            // The temps filled before the first failure are renamed over
            // the live paths, in order; then the emptied staging directories
            // are removed and each renamed file is fsynced again through its
            // open handle, which makes its rename durable: one round trip.
            let mut ready = Vec::with_capacity(files.len());
            let mut failed = None;
            for r in filled {
                match r {
                    Ok(t) if failed.is_none() => ready.push(t),
                    Ok(_) => {}
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            let lease = &lease;
            let renames = in_order_all(
                ready
                    .iter()
                    .zip(files)
                    .map(|(t, (f, _))| async move { lease.sftp().fs().rename(p(&t.from), p(&f.live_path)).await }),
            );
            let unstage =
                in_order_all(ready.iter().map(|t| async move { t.remove_stage(&mut lease.sftp().fs()).await }));
            let resync = in_order_all(ready.iter().map(|t| async move { t.file.clone().sync_all().await.is_ok() }));
            let (renamed, _, synced) = in_order3(renames, unstage, resync).await;
            let mut out: Vec<Result<(), StepError>> = Vec::with_capacity(files.len());
            let mut unsynced = BTreeSet::new();
            for (((r, t), (f, _)), synced) in renamed.into_iter().zip(&ready).zip(files).zip(synced) {
                if r.is_ok() && !synced {
                    unsynced.insert(parent_of(&f.live_path));
                }
                out.push(r.map_err(|e| lease.sftp_err(&format!("rename {} over", t.from), &f.live_path, &e)));
            }
            out.extend(failed.map(Err));
            drop(ready);
            // Temps not renamed (their content may be a key) go away.
            for (i, temp) in temps.iter().enumerate() {
                if !matches!(out.get(i), Some(Ok(()))) {
                    let _ = self.discard_temp(lease, temp).await;
                }
            }
            // A rename not made durable here is, by `sync DIR` in front of
            // the next command (or by prune or restore): see `pending_sync`.
            self.pending_sync.lock().unwrap_or_else(|e| e.into_inner()).extend(unsynced);
            (replaced, out)
        };
        match tokio::time::timeout(STEP_TIMEOUT, work).await {
            Ok(v) => v,
            Err(_) => {
                let e = self.step_timeout(&lease, "write");
                (lock.map(|_| Err(e.clone())), vec![Err(e)])
            }
        }
    }

    fn step_timeout(&self, lease: &Lease, what: &str) -> StepError {
        lease.mark_dead();
        StepError::transient(format!(
            "{}: {what}: timed out after {} s; outcome unknown",
            self.addr,
            STEP_TIMEOUT.as_secs()
        ))
    }
}

impl SshHost<'_> {
    /// Run `command` (a shell script; `shown` names it in errors).
    async fn exec_script(&self, command: &str, shown: &str, timeout_ms: u64) -> Result<ExecResult, StepError> {
        let lease = self.pool_lease().await?;
        let timeout = Duration::from_millis(timeout_ms);
        // The deferred directory sync of the last write, in the same shell,
        // silent (best effort, like `sync_dirs`), on its own line so that
        // the command is parsed exactly as given.
        let dirs = self.take_pending_sync();
        // Under sudo, only the command itself runs privileged; the sync
        // (which needs no privilege: it opens the directories read-only)
        // runs as the SSH user.
        let command = match &self.addr.sudo {
            Some(_) => std::borrow::Cow::Owned(sudo_command(command)),
            None => std::borrow::Cow::Borrowed(command),
        };
        let script = if dirs.is_empty() {
            None
        } else {
            let mut s = sync_command(&dirs);
            s.push_str(" >/dev/null 2>&1\n");
            s.push_str(&command);
            Some(s)
        };
        match lease.exec(script.as_deref().unwrap_or(&command), timeout).await {
            Ok((exit_code, out, err)) => {
                let mut s = String::from_utf8_lossy(&out).into_owned();
                s.push_str(&String::from_utf8_lossy(&err));
                Ok(ExecResult { exit_code, output: truncate_output(&s) })
            }
            Err(f) => {
                // The sync may not have run: keep it for the next step.
                self.pending_sync.lock().unwrap_or_else(|e| e.into_inner()).extend(dirs);
                Err(self.exec_failure(f, &format!("command `{shown}`"), timeout))
            }
        }
    }
}

/// Exit status and stderr marker of a guarded command whose lock check
/// failed (nothing else ran).
const LOCK_LOST_EXIT: i32 = 75;
const LOCK_LOST_MARK: &str = "certdeploy: target lock lost";

/// What a lock file holding this guard's token contains (the lock is
/// compact JSON; tokens are made of deployment-id characters, `/` and hex).
fn guard_needle(guard: &ExecGuard) -> String {
    format!("\"token\":\"{}\"", guard.token)
}

/// The shell prefix of a guarded command: run nothing unless the lock file
/// still holds this token.
fn guard_prefix(guard: &ExecGuard) -> String {
    format!(
        "grep -qF -e {} -- {} 2>/dev/null || {{ echo {} >&2; exit {LOCK_LOST_EXIT}; }}\n",
        shell_quote(&guard_needle(guard)),
        shell_quote(&guard.lock_path),
        shell_quote(LOCK_LOST_MARK)
    )
}

/// A configured command as a sudo target runs it: `sudo -n /bin/sh -c
/// '<command>'`, so that sudo sees exactly the argument vector `/bin/sh`,
/// `-c`, `<command>` and a sudoers rule can name it exactly (see
/// [`crate::sudoers_rule`]). Nothing else is added to the privileged
/// command line: the lock guard and the directory sync run outside sudo.
pub(crate) fn sudo_command(command: &str) -> String {
    format!("sudo -n /bin/sh -c {}", shell_quote(command))
}

impl SshHost<'_> {
    /// The guard of a sudo target: the lock file belongs to the user sudo
    /// runs as (mode 0600), out of the SSH user's reach, so it is read over
    /// the (privileged) SFTP session, just before the command is sent;
    /// putting the check into the privileged command line would make it
    /// different for every deployment, and no sudoers rule could name it.
    async fn sudo_guard(&self, command: &str, guard: &ExecGuard) -> Result<(), StepError> {
        let lost = |why: String| {
            StepError::lock_lost(format!(
                "{}: the target lock {} {why}; `{command}` was not run",
                self.addr, guard.lock_path
            ))
        };
        match self.lock_file_read(&guard.lock_path).await {
            Ok(Some(lock)) => {
                let needle = guard_needle(guard);
                if lock.bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    Ok(())
                } else {
                    Err(lost("no longer holds this deployment's token".into()))
                }
            }
            Ok(None) => Err(lost("no longer holds this deployment's token (it is gone)".into())),
            Err(e) if e.is_transient() => Err(e),
            Err(e) => Err(lost(format!("cannot be read ({})", e.message))),
        }
    }
}

impl Host for SshHost<'_> {
    async fn exec_guarded(&self, command: &str, timeout_ms: u64, guard: &ExecGuard) -> Result<ExecResult, StepError> {
        if self.addr.sudo.is_some() {
            self.sudo_guard(command, guard).await?;
            return self.exec_script(command, command, timeout_ms).await;
        }
        let script = format!("{}{command}", guard_prefix(guard));
        let r = self.exec_script(&script, command, timeout_ms).await?;
        if r.exit_code == Some(LOCK_LOST_EXIT) && r.output.trim() == LOCK_LOST_MARK {
            return Err(StepError::lock_lost(format!(
                "{}: the target lock {} no longer holds this deployment's token; `{command}` was not run",
                self.addr, guard.lock_path
            )));
        }
        Ok(r)
    }

    async fn lock_create(&self, path: &str, bytes: &[u8]) -> Result<certdeploy_core::lock::Created, StepError> {
        self.lock_file_create(path, bytes).await
    }

    async fn lock_replace(
        &self,
        path: &str,
        bytes: &[u8],
        durable: bool,
        fence: Fence<'_>,
    ) -> Result<Option<u64>, StepError> {
        self.lock_file_replace(path, bytes, durable, fence).await
    }

    async fn lock_read(&self, path: &str) -> Result<Option<certdeploy_core::lock::LockFile>, StepError> {
        self.lock_file_read(path).await
    }

    async fn lock_remove(&self, path: &str) -> Result<(), StepError> {
        self.lock_file_remove(path).await
    }

    async fn lock_sweep(&self, lock: &str, before: u64) -> Result<u32, StepError> {
        self.lock_file_sweep(lock, before).await
    }

    async fn resolve_path(&self, path: &str) -> Result<String, StepError> {
        SshHost::resolve_path(self, path).await
    }

    async fn snapshot(&self, deployment_id: &str, files: &[SnapshotRequest]) -> Vec<Result<Snapped, StepError>> {
        let lease = match self.lease().await {
            Ok(l) => l,
            Err(e) => return files.iter().map(|_| Err(e.clone())).collect(),
        };
        // All paths at once: SFTP requests pipeline on the one channel.
        let all = join_all(files.iter().map(|f| self.snapshot_one(&lease, deployment_id, f)));
        match tokio::time::timeout(STEP_TIMEOUT, all).await {
            Ok(v) => v,
            Err(_) => {
                let e = self.step_timeout(&lease, "snapshot");
                files.iter().map(|_| Err(e.clone())).collect()
            }
        }
    }

    async fn inspect(&self, files: &[SnapshotRequest]) -> Vec<Result<Snapped, StepError>> {
        // The same connection checks as a deployment (posix-rename, fsync):
        // a host a deployment would refuse is refused here too.
        let lease = match self.lease().await {
            Ok(l) => l,
            Err(e) => return files.iter().map(|_| Err(e.clone())).collect(),
        };
        let all = join_all(files.iter().map(|f| self.inspect_one(&lease, f)));
        match tokio::time::timeout(STEP_TIMEOUT, all).await {
            Ok(v) => v,
            Err(_) => {
                let e = self.step_timeout(&lease, "dry run read");
                files.iter().map(|_| Err(e.clone())).collect()
            }
        }
    }

    async fn write(&self, deployment_id: &str, files: &[(WriteRequest, &[u8])]) -> Vec<Result<(), StepError>> {
        self.write_with(deployment_id, files, None).await.1
    }

    async fn write_locked(
        &self,
        deployment_id: &str,
        files: &[(WriteRequest, &[u8])],
        lock: LockWrite<'_>,
    ) -> WrittenLocked {
        let (replaced, written) = self.write_with(deployment_id, files, Some(&lock)).await;
        (replaced.unwrap_or(Ok(None)), written)
    }

    async fn exec(&self, command: &str, timeout_ms: u64) -> Result<ExecResult, StepError> {
        self.exec_script(command, command, timeout_ms).await
    }

    async fn restore(&self, deployment_id: &str, files: &[RestoreRequest]) -> Vec<Result<RestoreStatus, StepError>> {
        let lease = match self.lease().await {
            Ok(l) => l,
            Err(e) => return files.iter().map(|_| Err(e.clone())).collect(),
        };
        let work = async {
            let out = join_all(files.iter().map(|f| self.restore_one(&lease, deployment_id, f))).await;
            let mut dirs = self.take_pending_sync();
            dirs.extend(files.iter().zip(&out).filter(|(_, r)| r.is_ok()).map(|(f, _)| parent_of(&f.live_path)));
            self.sync_dirs(&lease, dirs).await;
            out
        };
        match tokio::time::timeout(STEP_TIMEOUT, work).await {
            Ok(v) => v,
            Err(_) => {
                let e = self.step_timeout(&lease, "restore");
                files.iter().map(|_| Err(e.clone())).collect()
            }
        }
    }

    async fn reinstate(&self, deployment_id: &str, files: &[RestoreRequest]) -> Vec<Result<(), StepError>> {
        let lease = match self.lease().await {
            Ok(l) => l,
            Err(e) => return vec![Err(e)],
        };
        let work = async {
            // One after the other, stopping at the first failure (like the
            // renames of a write).
            let mut out = Vec::with_capacity(files.len());
            for f in files {
                let r = self.reinstate_one(&lease, deployment_id, f).await;
                let failed = r.is_err();
                out.push(r);
                if failed {
                    break;
                }
            }
            // Made durable by `sync DIR` in front of the next command (or
            // by prune or restore).
            let dirs = files.iter().take(out.len()).map(|f| parent_of(&f.live_path));
            self.pending_sync.lock().unwrap_or_else(|e| e.into_inner()).extend(dirs);
            out
        };
        match tokio::time::timeout(STEP_TIMEOUT, work).await {
            Ok(v) => v,
            Err(_) => vec![Err(self.step_timeout(&lease, "revert write"))],
        }
    }

    async fn discard_temps(&self, deployment_id: &str, paths: &[String]) -> Result<(), StepError> {
        let lease = self.pool_lease().await?;
        let work = async {
            let mut bases = Vec::with_capacity(paths.len());
            for path in paths {
                // A path the link rules refuse was never written through its
                // link: its own names are the only ones there can be.
                let live = match self.resolve(&lease, path).await {
                    Ok(live) => live,
                    Err(e) if !e.is_transient() => path.clone(),
                    Err(e) => return Err(e),
                };
                bases.push(temp_path(&live, deployment_id));
            }
            self.discard_temps_of(&lease, &bases).await
        };
        match tokio::time::timeout(STEP_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(self.step_timeout(&lease, "remove temps")),
        }
    }

    async fn remove_backups(&self, deployment_id: &str, paths: &[String]) -> Result<(), StepError> {
        let lease = self.pool_lease().await?;
        let work = async {
            let results = join_all(paths.iter().map(|path| async {
                // A path the link rules refuse was never backed up through
                // its link: its own names are the only ones there can be.
                let live = match self.resolve(&lease, path).await {
                    Ok(live) => live,
                    Err(e) if !e.is_transient() => path.clone(),
                    Err(e) => return Err(e),
                };
                let mut fs = lease.sftp().fs();
                // The backup, the write temps, and a backup copy's temps.
                let backup = backup_path(&live, deployment_id);
                match fs.remove_file(p(&backup)).await {
                    Ok(()) => {}
                    Err(e) if is_no_such_file(&e) => {}
                    Err(e) => return Err(lease.sftp_err("remove", &backup, &e)),
                }
                let temps = [temp_path(&live, deployment_id), temp_path(&backup, deployment_id)];
                self.discard_temps_of(&lease, &temps).await
            }))
            .await;
            results.into_iter().collect::<Result<Vec<()>, StepError>>().map(|_| ())
        };
        match tokio::time::timeout(STEP_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(self.step_timeout(&lease, "remove backups")),
        }
    }

    async fn prune_locked(
        &self,
        deployment_id: &str,
        live_paths: &[String],
        keep: u32,
        lock: LockWrite<'_>,
    ) -> PrunedLocked {
        self.prune_with_lock(deployment_id, live_paths, keep, &lock).await
    }

    async fn prune(&self, deployment_id: &str, live_paths: &[String], keep: u32) -> Result<(), StepError> {
        let lease = self.pool_lease().await?;
        // Normally done in front of the reload already.
        self.flush_pending_sync(&lease).await;
        let dirs: BTreeSet<String> = live_paths.iter().map(|l| parent_of(l)).collect();
        let work = async {
            let results = join_all(dirs.iter().map(|dir| {
                let lives: Vec<&String> = live_paths.iter().filter(|l| parent_of(l) == *dir).collect();
                let lease = &lease;
                async move { self.prune_dir(lease, deployment_id, dir, &lives, keep).await }
            }))
            .await;
            results.into_iter().collect::<Result<Vec<()>, StepError>>().map(|_| ())
        };
        match tokio::time::timeout(STEP_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(self.step_timeout(&lease, "prune")),
        }
    }
}
