//! Connections: one OpenSSH ControlMaster and one SFTP session per host,
//! shared by every deployment to that host.
//!
//! Why a master per host: opening one costs ~200 ms (TCP, key exchange,
//! authentication); a command over an open master costs ~4 ms. A batch of
//! renewals for one host therefore pays the handshake once.
//!
//! Lifetimes: a master closes when it has been idle for `idle_timeout`
//! (closed by a reaper task, and also by ssh itself through
//! `ControlPersist`, so a killed worker never leaves masters behind). A
//! master found dead (a lost channel, or a failed alive check after a
//! pause) is dropped and reopened by the next operation.
//!
//! How many: at most `max_masters` master processes at once. A lease that
//! needs a new master while all places are taken closes the least recently
//! used idle master and takes its place once that process has exited; when
//! every master is busy it waits for one to become idle. A master is busy
//! while an operation uses it (a lease) and while a deployment that has
//! used it is still running (an [`SshHost`](crate::SshHost) keeps it from
//! its first operation until it is dropped): the operations of one
//! deployment never lose their master to another deployment in between,
//! and a deployment waits for a place only before its first operation.
//! A deployment works on one host, and a deployment waiting for a place
//! holds no master, so a wait always ends: every busy master becomes idle
//! when its deployment ends. Deployments to the same account share its
//! master (and wait on it while it opens) instead of taking a second place.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use certdeploy_core::StepError;
use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder};
use openssh_sftp_client::{Sftp, SftpOptions};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::error::{connect_error, sftp_error, sftp_is_connection_loss, shell_quote};

/// How certdeploy talks SSH. Host keys are checked strictly against
/// `known_hosts` unless a host opts into accept-new.
#[derive(Clone, Debug)]
pub struct SshConfig {
    pub known_hosts: PathBuf,
    pub identity_file: PathBuf,
    pub connect_timeout: Duration,
    /// Where each pool makes its own directory (random name, 0700) for the
    /// control sockets and the generated `ssh_config`; created 0700 when
    /// missing, refused when another user owns it or others may rename
    /// entries in it. Keep it short: a Unix socket path is limited to 107
    /// bytes.
    pub control_dir: PathBuf,
    /// Close a master after this long without use.
    pub idle_timeout: Duration,
    /// Concurrent exec channels per host (sshd's MaxSessions is 10 by
    /// default; the SFTP session takes one more).
    pub per_host_concurrency: usize,
    /// Most master processes open at once (at least 1; see
    /// [`default_max_masters`]).
    pub max_masters: usize,
    /// ssh's `KexAlgorithms`, written into the generated `ssh_config`;
    /// `None` keeps OpenSSH's own default.
    pub kex_algorithms: Option<String>,
}

/// Upper bound of [`default_max_masters`], for memory: each open master is
/// an `ssh` process of ~1.4 MiB PSS, and the worker itself takes up to
/// ~140 MiB once its journal cache is full, so 96 masters keep the worker
/// and its ssh processes near 270 MiB, under 300 MiB (128 measured 309).
/// A configured `max_masters` may be larger.
pub const DEFAULT_MAX_MASTERS_CAP: usize = 96;

/// The default `max_masters` for this process's limits: a quarter of
/// `RLIMIT_NPROC` (each master is a process of this user), an eighth of
/// `RLIMIT_NOFILE` (each master costs the worker its SFTP socket and a
/// socket per command in flight), at most [`DEFAULT_MAX_MASTERS_CAP`]
/// (memory), at least 1.
pub fn default_max_masters() -> usize {
    use rustix::process::{Resource, getrlimit};
    let soft = |r| getrlimit(r).current.unwrap_or(u64::MAX);
    let n = (soft(Resource::Nproc) / 4).min(soft(Resource::Nofile) / 8);
    n.clamp(1, DEFAULT_MAX_MASTERS_CAP as u64) as usize
}

/// One remote account.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostAddr {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// `StrictHostKeyChecking=accept-new` instead of `yes`.
    pub accept_new_host_key: bool,
    /// `Some(sftp_server)`: privilege through sudo. The SFTP server runs as
    /// `sudo -n <sftp_server>` (over an exec channel, not the `sftp`
    /// subsystem) and the validate and reload commands as `sudo -n /bin/sh
    /// -c <command>`, so `user` can be an unprivileged account with a
    /// sudoers rule for exactly these. The rules for links and owners then
    /// trust root and the user sudo runs as, not `user`.
    pub sudo: Option<String>,
}

impl HostAddr {
    pub fn new(host: impl Into<String>, port: u16, user: impl Into<String>) -> HostAddr {
        HostAddr { host: host.into(), port, user: user.into(), accept_new_host_key: false, sudo: None }
    }
    /// From a target of the configuration.
    pub fn of_target(t: &certdeploy_core::TargetSpec) -> HostAddr {
        HostAddr::new(t.host.clone(), t.port, t.user.clone())
    }
    /// This account with privilege through `sudo -n`, the SFTP server being
    /// `sftp_server` (an absolute path on the host).
    pub fn with_sudo(mut self, sftp_server: impl Into<String>) -> HostAddr {
        self.sudo = Some(sftp_server.into());
        self
    }
    /// The key of this account's connection in a pool: a sudo and a plain
    /// session to the same account are different SFTP servers (running as
    /// different users), so they never share one.
    fn slot_key(&self) -> SlotKey {
        (self.host.clone(), self.port, self.user.clone(), self.sudo.clone())
    }
}

type SlotKey = (String, u16, String, Option<String>);

impl fmt::Display for HostAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("ssh control directory {path}: {source}")]
    ControlDir { path: PathBuf, source: std::io::Error },
    #[error("ssh configuration: {0}")]
    Config(String),
}

/// A pool of master connections, one per (host, port, user, sudo).
#[derive(Clone)]
pub struct SshPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    cfg: SshConfig,
    /// The pool's own control directory (see [`SshPool::new`]).
    dir: PathBuf,
    config_file: PathBuf,
    slots: Mutex<HashMap<SlotKey, Arc<Slot>>>,
    masters_opened: AtomicU64,
    /// One permit per master process that may be open (`max_masters`).
    masters: Arc<Semaphore>,
    max_masters: usize,
    /// Woken when a slot's last lease ends (its master became idle) and
    /// when an evicted master's place came back.
    idle: Arc<Notify>,
    /// Leases waiting for a place, and evicted masters whose place has not
    /// come back yet: a waiter evicts only while the second is smaller.
    waiting: AtomicUsize,
    closing: Arc<AtomicUsize>,
    evictions: AtomicU64,
    epoch: Instant,
    /// SFTP requests, round trips and remote commands of every session.
    wire: Arc<crate::count::Totals>,
}

impl Drop for PoolInner {
    /// The pool's own directory goes with it (a killed worker leaves it:
    /// its name is never reused).
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Per-host state.
pub(crate) struct Slot {
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    channels: Arc<Semaphore>,
    /// When the last lease ended, in nanoseconds since `epoch`.
    last_used: AtomicU64,
    epoch: Instant,
    active: AtomicUsize,
    /// `conn` holds a master (a hint for eviction, checked under the lock).
    has_master: AtomicBool,
    idle: Arc<Notify>,
    reaper_running: AtomicBool,
}

impl Slot {
    fn touch(&self) {
        self.last_used.store(self.epoch.elapsed().as_nanos() as u64, Ordering::SeqCst);
    }
    fn idle_for(&self) -> Duration {
        self.epoch.elapsed().saturating_sub(Duration::from_nanos(self.last_used.load(Ordering::SeqCst)))
    }
}

/// One open master with its SFTP session.
pub(crate) struct Conn {
    pub(crate) session: Arc<Session>,
    pub(crate) sftp: Sftp,
    dead: AtomicBool,
    /// The task that owns the SFTP server's channel (the `sftp` subsystem,
    /// or under sudo the `sudo -n <sftp_server>` process, whose stderr it
    /// drains) and waits for its exit. It ends when the SFTP session's
    /// stdin closes.
    server: Option<tokio::task::JoinHandle<()>>,
    /// This master's place among `max_masters` (taken out when the master
    /// is closed, given back once its process has exited).
    place: Mutex<Option<Place>>,
}

/// A place among `max_masters`, and the master process holding it.
struct Place {
    permit: OwnedSemaphorePermit,
    /// A pidfd of the master process (from the mux alive check): its exit
    /// can be awaited and it can be signalled without pid reuse races.
    /// `None` when the kernel or the master would not say.
    pidfd: Option<OwnedFd>,
}

impl Place {
    /// Give the place back once the master process has exited; after 5 s
    /// it is sent SIGTERM, and after 2 s more the place comes back anyway.
    async fn release(self) {
        let Place { permit, pidfd } = self;
        if let Some(fd) = pidfd {
            let fd = Arc::new(fd);
            if !exited_within(&fd, Duration::from_secs(5)).await {
                tracing::warn!("an ssh master did not exit when closed; sending it SIGTERM");
                let _ = rustix::process::pidfd_send_signal(&*fd, rustix::process::Signal::TERM);
                if !exited_within(&fd, Duration::from_secs(2)).await {
                    tracing::warn!("an ssh master survived SIGTERM for 2 s; giving its place back anyway");
                }
            }
        }
        drop(permit);
    }
}

/// A pidfd becomes readable when its process exits.
async fn exited_within(fd: &Arc<OwnedFd>, limit: Duration) -> bool {
    use tokio::io::unix::AsyncFd;
    // Deprecated as unsound when the descriptor can be closed while it is
    // registered; here the registration holds its own reference to the
    // descriptor, which therefore outlives it.
    #[allow(deprecated)]
    let registered = AsyncFd::with_interest(fd.clone(), tokio::io::Interest::READABLE);
    let Ok(afd) = registered else {
        return true;
    };
    tokio::time::timeout(limit, afd.readable()).await.is_ok()
}

/// Counts a lease waiting for a place while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl fmt::Debug for SshPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshPool")
            .field("control_dir", &self.inner.dir)
            .field("masters_opened", &self.masters_opened())
            .field("masters_open", &self.masters_open())
            .finish()
    }
}

impl SshPool {
    /// Make this pool's own control directory: a subdirectory of
    /// `control_dir` with an unpredictable name, created exclusively with
    /// mode 0700 (after checking that `control_dir` belongs to this user or
    /// root and nobody else may rename entries in it), and write
    /// certdeploy's own `ssh_config` into it exclusively, never through a
    /// link; nothing is read from or written to `$HOME`. With
    /// `kex_algorithms` set, `ssh -G` must accept the file (an unknown
    /// algorithm is refused here, naming it, not at the first connection).
    pub fn new(cfg: SshConfig) -> Result<SshPool, PoolError> {
        if let Some(k) = &cfg.kex_algorithms {
            check_kex_syntax(k).map_err(PoolError::Config)?;
        }
        let dir = make_control_dir(&cfg.control_dir)?;
        let config_file = dir.join("ssh_config");
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&config_file)
            .and_then(|mut f| std::io::Write::write_all(&mut f, ssh_config_text(&cfg).as_bytes()));
        if let Err(source) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(PoolError::ControlDir { path: config_file, source });
        }
        if cfg.kex_algorithms.is_some()
            && let Err(e) = ssh_accepts(&config_file)
        {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(PoolError::Config(e));
        }
        let max_masters = cfg.max_masters.max(1);
        Ok(SshPool {
            inner: Arc::new(PoolInner {
                cfg,
                dir,
                config_file,
                slots: Mutex::new(HashMap::new()),
                masters_opened: AtomicU64::new(0),
                masters: Arc::new(Semaphore::new(max_masters)),
                max_masters,
                idle: Arc::new(Notify::new()),
                waiting: AtomicUsize::new(0),
                closing: Arc::new(AtomicUsize::new(0)),
                evictions: AtomicU64::new(0),
                epoch: Instant::now(),
                wire: Default::default(),
            }),
        })
    }

    /// This pool's own directory (control sockets, `ssh_config`) under the
    /// configured `control_dir`.
    pub fn control_dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Remove this pool's own directory (after [`SshPool::close_all`]); the
    /// configured `control_dir` stays.
    pub fn remove_control_dir(&self) {
        let _ = std::fs::remove_dir_all(&self.inner.dir);
    }

    pub fn config(&self) -> &SshConfig {
        &self.inner.cfg
    }

    /// Masters opened since the pool was created (reopens included).
    pub fn masters_opened(&self) -> u64 {
        self.inner.masters_opened.load(Ordering::Relaxed)
    }

    /// Master processes open (or opening, or closing) now: at most
    /// `max_masters`.
    pub fn masters_open(&self) -> usize {
        self.inner.max_masters - self.inner.masters.available_permits()
    }

    /// Leases waiting for a place for a new master now.
    pub fn masters_waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::SeqCst)
    }

    /// Idle masters closed to make room for another (least recently used
    /// first) since the pool was created.
    pub fn masters_evicted(&self) -> u64 {
        self.inner.evictions.load(Ordering::Relaxed)
    }

    /// SFTP requests sent since the pool was created (every packet but the
    /// greeting; see the `count` module).
    pub fn sftp_requests(&self) -> u64 {
        self.inner.wire.requests.load(Ordering::Relaxed)
    }

    /// SFTP round trips since the pool was created: sends while none of the
    /// session's earlier requests was still awaited (requests that leave
    /// together count once).
    pub fn sftp_round_trips(&self) -> u64 {
        self.inner.wire.round_trips.load(Ordering::Relaxed)
    }

    /// Remote commands (exec channels) run since the pool was created.
    pub fn commands_run(&self) -> u64 {
        self.inner.wire.commands.load(Ordering::Relaxed)
    }

    /// Close every master now.
    pub async fn close_all(&self) {
        let slots: Vec<Arc<Slot>> = lock(&self.inner.slots).values().cloned().collect();
        for s in slots {
            let c = {
                let mut g = s.conn.lock().await;
                s.has_master.store(false, Ordering::SeqCst);
                g.take()
            };
            if let Some(c) = c {
                close_conn(c).await;
            }
        }
    }

    /// A place for a new master: a free one, or the place of the least
    /// recently used idle master (closed for it), or the first to come
    /// back once a busy master becomes idle.
    async fn master_place(&self) -> OwnedSemaphorePermit {
        let inner = &self.inner;
        inner.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&inner.waiting);
        loop {
            let notified = inner.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Ok(p) = inner.masters.clone().try_acquire_owned() {
                return p;
            }
            // One eviction per waiting lease: an evicted master's place
            // comes back only once its process has exited.
            if inner.closing.load(Ordering::SeqCst) < inner.waiting.load(Ordering::SeqCst) {
                self.evict_lru_idle();
            }
            tokio::select! {
                p = inner.masters.clone().acquire_owned() => {
                    return p.expect("the masters semaphore is never closed");
                }
                () = &mut notified => {}
            }
        }
    }

    /// Close the least recently used master no lease is using; false when
    /// there is none.
    fn evict_lru_idle(&self) -> bool {
        let mut idle: Vec<(u64, Arc<Slot>)> = lock(&self.inner.slots)
            .values()
            .filter(|s| s.has_master.load(Ordering::SeqCst) && s.active.load(Ordering::SeqCst) == 0)
            .map(|s| (s.last_used.load(Ordering::SeqCst), s.clone()))
            .collect();
        idle.sort_by_key(|(t, _)| *t);
        for (_, s) in idle {
            let Ok(mut g) = s.conn.try_lock() else { continue };
            if s.active.load(Ordering::SeqCst) > 0 {
                continue;
            }
            let Some(c) = g.take() else { continue };
            s.has_master.store(false, Ordering::SeqCst);
            drop(g);
            self.inner.evictions.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("closing the least recently used idle ssh master to make room");
            let (closing, idle) = (self.inner.closing.clone(), self.inner.idle.clone());
            closing.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                close_conn(c).await;
                closing.fetch_sub(1, Ordering::SeqCst);
                // A waiter that left this eviction to another may evict now.
                idle.notify_waiters();
            });
            return true;
        }
        false
    }

    fn slot(&self, addr: &HostAddr) -> Arc<Slot> {
        let mut slots = lock(&self.inner.slots);
        slots
            .entry(addr.slot_key())
            .or_insert_with(|| {
                let s = Slot {
                    conn: tokio::sync::Mutex::new(None),
                    channels: Arc::new(Semaphore::new(self.inner.cfg.per_host_concurrency.max(1))),
                    last_used: AtomicU64::new(0),
                    epoch: self.inner.epoch,
                    active: AtomicUsize::new(0),
                    has_master: AtomicBool::new(false),
                    idle: self.inner.idle.clone(),
                    reaper_running: AtomicBool::new(false),
                };
                s.touch();
                Arc::new(s)
            })
            .clone()
    }

    /// The host's connection, opened (or reopened, if found dead) as needed.
    /// Open (or check) the master for `addr` ahead of the first deployment,
    /// so that a batch arriving at start does not wait for handshakes.
    pub async fn warm(&self, addr: &HostAddr) -> Result<(), StepError> {
        self.lease(addr).await.map(drop)
    }

    pub(crate) async fn lease(&self, addr: &HostAddr) -> Result<Lease, StepError> {
        let slot = self.slot(addr);
        slot.active.fetch_add(1, Ordering::SeqCst);
        // From here on the lease's Drop undoes `active`.
        let mut lease = Lease { slot: slot.clone(), conn: None, host: addr.to_string(), wire: self.inner.wire.clone() };
        let mut guard = slot.conn.lock().await;
        let mut place = None;
        if let Some(c) = guard.as_ref() {
            let idle = slot.idle_for();
            let alive = !c.dead.load(Ordering::SeqCst)
                && (idle < Duration::from_secs(1)
                    || matches!(tokio::time::timeout(Duration::from_secs(2), c.session.check()).await, Ok(Ok(()))));
            if alive {
                lease.conn = Some(c.clone());
                return Ok(lease);
            }
            tracing::info!(host = %addr, "ssh master is gone; reopening");
            if let Some(old) = guard.take() {
                slot.has_master.store(false, Ordering::SeqCst);
                // The replacement takes the dead master's place: another
                // lease of this slot may still hold the dead master, and
                // waiting for a place could wait for that lease.
                place = lock(&old.place).take().map(|p| p.permit);
                tokio::spawn(close_conn(old));
            }
        }
        let permit = match place {
            Some(p) => p,
            None => self.master_place().await,
        };
        let conn = Arc::new(self.open(addr, permit).await?);
        *guard = Some(conn.clone());
        slot.has_master.store(true, Ordering::SeqCst);
        drop(guard);
        self.inner.masters_opened.fetch_add(1, Ordering::Relaxed);
        if !slot.reaper_running.swap(true, Ordering::SeqCst) {
            tokio::spawn(reaper(Arc::downgrade(&slot), self.inner.cfg.idle_timeout));
        }
        lease.conn = Some(conn);
        Ok(lease)
    }

    /// Open a master in the place `permit` holds (given back when this
    /// fails, once a launched master process has exited).
    async fn open(&self, addr: &HostAddr, permit: OwnedSemaphorePermit) -> Result<Conn, StepError> {
        let cfg = &self.inner.cfg;
        let host = addr.to_string();
        let mut b = SessionBuilder::default();
        b.user(addr.user.clone())
            .port(addr.port)
            .keyfile(&cfg.identity_file)
            .known_hosts_check(if addr.accept_new_host_key { KnownHosts::Add } else { KnownHosts::Strict })
            .user_known_hosts_file(&cfg.known_hosts)
            .connect_timeout(cfg.connect_timeout.max(Duration::from_secs(1)))
            .server_alive_interval(Duration::from_secs(5))
            .control_directory(&self.inner.dir)
            .control_persist(ControlPersist::IdleFor(
                NonZeroUsize::new(cfg.idle_timeout.as_secs().max(1) as usize).unwrap_or(NonZeroUsize::MIN),
            ))
            .config_file(&self.inner.config_file);
        // ConnectTimeout covers TCP connect and the banner only, in whole
        // seconds; bound the whole handshake ourselves.
        let limit = cfg.connect_timeout + Duration::from_secs(5);
        let started = Instant::now();
        let dir = match tokio::time::timeout(limit, b.launch_master(&addr.host)).await {
            Ok(Ok(dir)) => dir,
            Ok(Err(e)) => return Err(connect_error(&host, &e)),
            Err(_) => {
                return Err(StepError::transient(format!(
                    "{host}: cannot connect: timed out after {} ms",
                    limit.as_millis()
                )));
            }
        };
        let session = Arc::new(Session::new_native_mux(dir));
        let place = Place { permit, pidfd: master_pidfd(session.control_socket()).await };
        let wire = self.inner.wire.clone();
        let opened = match &addr.sudo {
            None => subsystem_sftp(&session, &host, limit, wire).await.map(|(s, t)| (s, Some(t))),
            Some(server) => sudo_sftp(&session, &host, server, limit, wire).await.map(|(s, t)| (s, Some(t))),
        };
        let (sftp, server) = match opened {
            Ok(o) => o,
            Err(e) => {
                // Dropping the session stops the master.
                drop(session);
                place.release().await;
                return Err(e);
            }
        };
        tracing::debug!(host = %host, ms = started.elapsed().as_millis() as u64, "ssh master opened");
        Ok(Conn { session, sftp, dead: AtomicBool::new(false), server, place: Mutex::new(Some(place)) })
    }
}

/// A pidfd of the master process behind `ctl`, whose pid the master gives
/// in answer to an alive check.
async fn master_pidfd(ctl: &Path) -> Option<OwnedFd> {
    let ask = async {
        let mut c = openssh_mux_client::Connection::connect(ctl).await.ok()?;
        c.send_alive_check().await.ok()
    };
    let pid = tokio::time::timeout(Duration::from_secs(2), ask).await.ok().flatten()?;
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid.get()).ok()?)?;
    match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::debug!("no pidfd for the ssh master {}: {e}", pid.as_raw_nonzero());
            None
        }
    }
}

/// Algorithm names (letters, digits, `@ . _ -`), separated by commas, with
/// one leading `+`, `-` or `^`: what ssh's `KexAlgorithms` takes, and
/// nothing that could end the line it is written on in `ssh_config`.
pub fn check_kex_syntax(k: &str) -> Result<(), String> {
    let names = k.strip_prefix(['+', '-', '^']).unwrap_or(k);
    let ok = !names.is_empty()
        && names.split(',').all(|n| {
            !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '@' | '.' | '_' | '-'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "kex_algorithms {k:?}: expected algorithm names separated by commas, optionally after one +, - or ^ \
             (`ssh -Q kex` lists them)"
        ))
    }
}

/// `ssh -G` parses the generated file as every connection will; what it
/// says when it refuses it (e.g. `Bad SSH2 KexAlgorithms 'x'`).
fn ssh_accepts(config_file: &Path) -> Result<(), String> {
    let out = std::process::Command::new("ssh")
        .arg("-F")
        .arg(config_file)
        .args(["-G", "certdeploy.invalid"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ssh -G: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = said.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    Err(format!("ssh refuses {}: {}", config_file.display(), said.join("; ")))
}

/// Most of the sudo'ed SFTP server's stderr kept for an error message.
const SUDO_STDERR_MAX: usize = 4096;

/// The SFTP session of a target without sudo: the `sftp` subsystem over
/// a channel of the master, its streams counted (see the `count` module);
/// the returned task waits for the subsystem to exit (it ends when the
/// SFTP session's stdin closes).
async fn subsystem_sftp(
    session: &Arc<Session>,
    host: &str,
    limit: Duration,
    wire: Arc<crate::count::Totals>,
) -> Result<(Sftp, tokio::task::JoinHandle<()>), StepError> {
    let mut cmd = Session::to_subsystem(session.clone(), "sftp");
    cmd.stdin(openssh::Stdio::piped()).stdout(openssh::Stdio::piped()).stderr(openssh::Stdio::null());
    let mut child = match tokio::time::timeout(limit, cmd.spawn()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(StepError::transient(format!("{host}: SFTP session: cannot start: {}", error_chain(&e))));
        }
        Err(_) => return Err(StepError::transient(format!("{host}: SFTP session: timed out"))),
    };
    let (Some(stdin), Some(stdout)) = (child.stdin().take(), child.stdout().take()) else {
        return Err(StepError::transient(format!("{host}: SFTP session: no stdin or stdout")));
    };
    let task = tokio::spawn(async move {
        let _ = child.wait().await;
    });
    let (w, r) = crate::count::wrap(wire, stdin, stdout);
    match tokio::time::timeout(limit, Sftp::new(w, r, sftp_options())).await {
        Ok(Ok(s)) => Ok((s, task)),
        Ok(Err(e)) => {
            task.abort();
            let e = sftp_error(host, "open", "SFTP session", &e);
            Err(if e.is_transient() { e } else { StepError::permanent(e.message) })
        }
        Err(_) => {
            task.abort();
            Err(StepError::transient(format!("{host}: SFTP session: timed out")))
        }
    }
}

/// The SFTP session of a sudo target: `sudo -n <server>` over an exec
/// channel of the master, the SFTP protocol over its stdin and stdout.
/// When it does not start (sudo asks for a password, the rule is missing,
/// sudo or the server is not installed), the error is permanent and quotes
/// what sudo said: retrying cannot help until someone fixes the sudoers
/// rule.
async fn sudo_sftp(
    session: &Arc<Session>,
    host: &str,
    server: &str,
    limit: Duration,
    wire: Arc<crate::count::Totals>,
) -> Result<(Sftp, tokio::task::JoinHandle<()>), StepError> {
    use tokio::io::AsyncReadExt as _;
    let shown = format!("sudo -n {server}");
    let command = format!("sudo -n {}", shell_quote(server));
    let mut cmd = Session::to_raw_command(session.clone(), &command);
    cmd.stdin(openssh::Stdio::piped()).stdout(openssh::Stdio::piped()).stderr(openssh::Stdio::piped());
    let mut child = match tokio::time::timeout(limit, cmd.spawn()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(StepError::transient(format!("{host}: `{shown}`: cannot start: {}", error_chain(&e))));
        }
        Err(_) => return Err(StepError::transient(format!("{host}: `{shown}`: timed out starting it"))),
    };
    let (Some(stdin), Some(stdout)) = (child.stdin().take(), child.stdout().take()) else {
        return Err(StepError::transient(format!("{host}: `{shown}`: no stdin or stdout")));
    };
    let stderr = child.stderr().take();
    let said = Arc::new(Mutex::new(Vec::new()));
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
    let kept = said.clone();
    let task = tokio::spawn(async move {
        // Drained for the session's life (a full pipe would stall the
        // server); the first few KiB kept for an error message.
        if let Some(mut e) = stderr {
            let mut buf = [0u8; 1024];
            while let Ok(n) = e.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut k = lock(&kept);
                let room = SUDO_STDERR_MAX.saturating_sub(k.len());
                k.extend_from_slice(&buf[..n.min(room)]);
            }
        }
        let _ = exit_tx.send(child.wait().await);
    });
    let (w, r) = crate::count::wrap(wire, stdin, stdout);
    let e = match tokio::time::timeout(limit, Sftp::new(w, r, sftp_options())).await {
        Ok(Ok(s)) => return Ok((s, task)),
        Ok(Err(e)) => e,
        Err(_) => {
            task.abort();
            return Err(StepError::transient(format!("{host}: `{shown}`: no SFTP greeting: timed out")));
        }
    };
    // Why: the process's exit status and what it said.
    let exit = tokio::time::timeout(Duration::from_secs(5), exit_rx).await;
    let text = String::from_utf8_lossy(&lock(&said)).split_whitespace().collect::<Vec<_>>().join(" ");
    let text = if text.is_empty() { String::new() } else { format!(": {text}") };
    match exit {
        Ok(Ok(Ok(status))) => Err(StepError::permanent(format!(
            "{host}: `{shown}` exited with status {}{text} (sudo must let the SSH user run {server} without a \
             password: `certdeploy check` prints the sudoers rule)",
            status.code().map_or_else(|| "unknown".to_string(), |c| c.to_string())
        ))),
        // The native mux client reports exit status 127 as an error.
        Ok(Ok(Err(openssh::Error::Remote(r)))) if r.kind() == std::io::ErrorKind::NotFound => Err(
            StepError::permanent(format!("{host}: `{shown}`: command not found (exit 127){text}: is sudo installed?")),
        ),
        _ => {
            task.abort();
            Err(StepError::transient(format!(
                "{host}: `{shown}`: SFTP session lost before its greeting{text} ({})",
                error_chain(&e)
            )))
        }
    }
}

/// Check `parent` (created 0700 when missing), then create a directory
/// of a random name in it, exclusively, mode 0700, and check what was
/// created. Whoever could rename entries in `parent` could otherwise swap
/// the directory (and the `ssh_config` naming the known hosts and key)
/// under the worker.
fn make_control_dir(parent: &Path) -> Result<PathBuf, PoolError> {
    let err = |path: &Path, source| PoolError::ControlDir { path: path.to_path_buf(), source };
    let refuse = |path: &Path, why: String| err(path, std::io::Error::new(std::io::ErrorKind::PermissionDenied, why));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent).map_err(|e| err(parent, e))?;
    let me = rustix::process::geteuid().as_raw();
    let meta = std::fs::metadata(parent).map_err(|e| err(parent, e))?;
    if !meta.is_dir() {
        return Err(refuse(parent, "is not a directory".into()));
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(refuse(
            parent,
            format!(
                "belongs to uid {}, not to this user (uid {me}) or root: refusing to keep ssh sockets there",
                meta.uid()
            ),
        ));
    }
    let mode = meta.mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(refuse(
            parent,
            format!(
                "is writable by group or others (mode {:04o}) without the sticky bit: others could swap entries",
                mode & 0o7777
            ),
        ));
    }
    for _ in 0..8 {
        // 48 random bits, and a short name: ssh binds its master socket at
        // `<dir>/.ssh-connection…/master.<16 chars>`, within the 107 bytes
        // of a Unix socket path.
        let mut bytes = [0u8; 6];
        getrandom::fill(&mut bytes).map_err(|e| err(parent, std::io::Error::other(e.to_string())))?;
        let name: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let dir = parent.join(format!("cd-{name}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(err(&dir, e)),
        }
        let made = std::fs::symlink_metadata(&dir).map_err(|e| err(&dir, e))?;
        if !made.is_dir() || made.uid() != me || made.mode() & 0o077 != 0 {
            return Err(refuse(&dir, "is not the private directory just created".into()));
        }
        return Ok(dir);
    }
    Err(refuse(parent, "no fresh directory name after 8 tries".into()))
}

/// Requests go out as soon as the flush task runs: requests issued
/// together (a step's files) still leave in one write, and the crate's
/// default 0.5 ms batching delay only added latency to every round trip of
/// a deployment (measured: ~5% fewer deploys/s and more CPU with it).
fn sftp_options() -> SftpOptions {
    SftpOptions::default().flush_interval(Duration::ZERO)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn close_conn(c: Arc<Conn>) {
    let place = lock(&c.place).take();
    close_session(c).await;
    if let Some(p) = place {
        p.release().await;
    }
}

async fn close_session(c: Arc<Conn>) {
    // Others may still hold it: the last holder's drop shuts the master.
    if let Ok(c) = Arc::try_unwrap(c) {
        let Conn { session, sftp, server, .. } = c;
        // Dropped, not `Sftp::close`d: openssh-sftp-client 0.15's `close`
        // unwraps its session `Arc` and panics while any handle derived from
        // it is still alive (an operation abandoned at its timeout, seen
        // under load at the end of a `deploy`). Dropping ends its tasks too;
        // an idle connection has no request left to flush.
        drop(sftp);
        // A sudo'ed server exits once its stdin closes; its task holds a
        // reference to the session.
        if let Some(mut t) = server
            && tokio::time::timeout(Duration::from_secs(2), &mut t).await.is_err()
        {
            t.abort();
            let _ = t.await;
        }
        if let Ok(s) = Arc::try_unwrap(session) {
            let _ = tokio::time::timeout(Duration::from_secs(5), s.close()).await;
        }
    }
}

/// Closes the slot's master once it has been idle for `idle`.
async fn reaper(slot: Weak<Slot>, idle: Duration) {
    let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        tokio::time::sleep(tick).await;
        let Some(s) = slot.upgrade() else { return };
        if s.active.load(Ordering::SeqCst) > 0 || s.idle_for() < idle {
            continue;
        }
        let Ok(mut g) = s.conn.try_lock() else { continue };
        if s.active.load(Ordering::SeqCst) > 0 {
            continue;
        }
        let c = g.take();
        s.has_master.store(false, Ordering::SeqCst);
        s.reaper_running.store(false, Ordering::SeqCst);
        drop(g);
        if let Some(c) = c {
            tracing::debug!("closing idle ssh master");
            close_conn(c).await;
        }
        return;
    }
}

/// The right to use a host's connection for one step.
pub(crate) struct Lease {
    slot: Arc<Slot>,
    conn: Option<Arc<Conn>>,
    pub(crate) host: String,
    wire: Arc<crate::count::Totals>,
}

/// Why a command has no exit status.
pub(crate) enum ExecFailure {
    TimedOut,
    Lost(String),
    NoChannel(String),
}

impl Lease {
    /// Keep this lease's master busy beyond the lease.
    pub(crate) fn pin(&self) -> Pin {
        self.slot.active.fetch_add(1, Ordering::SeqCst);
        Pin(self.slot.clone())
    }
    fn conn(&self) -> &Conn {
        self.conn.as_deref().expect("a lease always holds a connection")
    }
    pub(crate) fn sftp(&self) -> &Sftp {
        &self.conn().sftp
    }
    pub(crate) fn mark_dead(&self) {
        self.conn().dead.store(true, Ordering::SeqCst);
    }
    /// Classify an SFTP error, marking the connection dead on channel loss.
    pub(crate) fn sftp_err(&self, op: &str, path: &str, e: &openssh_sftp_client::Error) -> StepError {
        if sftp_is_connection_loss(e) {
            self.mark_dead();
        }
        sftp_error(&self.host, op, path, e)
    }

    async fn channel(&self) -> Result<OwnedSemaphorePermit, ExecFailure> {
        self.slot
            .channels
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ExecFailure::NoChannel("channel limiter closed".into()))
    }

    /// Run one shell command line; `(exit code, stdout, stderr)`.
    pub(crate) async fn exec(
        &self,
        command: &str,
        timeout: Duration,
    ) -> Result<(Option<i32>, Vec<u8>, Vec<u8>), ExecFailure> {
        let _permit = self.channel().await?;
        let conn = self.conn();
        self.wire.commands.fetch_add(1, Ordering::Relaxed);
        let run = async {
            use tokio::io::AsyncReadExt as _;
            // The remote sshd runs the string with the user's shell (`sh -c`).
            let mut child = conn
                .session
                .raw_command(command)
                .stdin(openssh::Stdio::null())
                .stdout(openssh::Stdio::piped())
                .stderr(openssh::Stdio::piped())
                .spawn()
                .await?;
            let (mut so, mut se) = (child.stdout().take(), child.stderr().take());
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let read_out = async {
                if let Some(s) = so.as_mut() {
                    let _ = s.read_to_end(&mut out).await;
                }
            };
            let read_err = async {
                if let Some(s) = se.as_mut() {
                    let _ = s.read_to_end(&mut err).await;
                }
            };
            tokio::join!(read_out, read_err);
            let status = child.wait().await;
            Ok::<_, openssh::Error>((status, out, err))
        };
        match tokio::time::timeout(timeout, run).await {
            // Dropping the command's future closes its channel.
            Err(_) => Err(ExecFailure::TimedOut),
            Ok(Ok((Ok(status), out, err))) => Ok((status.code(), out, err)),
            // The native mux client turns exit status 127 into an error.
            Ok(Ok((Err(openssh::Error::Remote(e)), out, err))) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok((Some(127), out, err))
            }
            Ok(Ok((Err(e), _, _)) | Err(e)) => {
                // The mux protocol cannot tell a killed process from a lost
                // connection: ask the master.
                let alive =
                    matches!(tokio::time::timeout(Duration::from_secs(2), conn.session.check()).await, Ok(Ok(())));
                match e {
                    openssh::Error::RemoteProcessTerminated if alive => Ok((None, Vec::new(), Vec::new())),
                    openssh::Error::RemoteProcessTerminated | openssh::Error::Disconnected => {
                        self.mark_dead();
                        Err(ExecFailure::Lost(e.to_string()))
                    }
                    e => {
                        if !alive {
                            self.mark_dead();
                            Err(ExecFailure::Lost(e.to_string()))
                        } else {
                            Err(ExecFailure::NoChannel(error_chain(&e)))
                        }
                    }
                }
            }
        }
    }
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// Keeps a slot's master busy (never closed as idle, by the reaper or to
/// make room) while it lives.
pub(crate) struct Pin(Arc<Slot>);

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin")
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.0.touch();
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The connection first: an evicted idle master must find no lease
        // still holding it.
        drop(self.conn.take());
        self.slot.touch();
        if self.slot.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.slot.idle.notify_waiters();
        }
    }
}

fn ssh_config_text(cfg: &SshConfig) -> String {
    let q = |p: &Path| format!("\"{}\"", p.display());
    format!(
        "# Written by certdeploy; used with ssh -F. Options given with -o take precedence.\n\
         Host *\n\
         \x20 BatchMode yes\n\
         \x20 StrictHostKeyChecking yes\n\
         \x20 UserKnownHostsFile {kh}\n\
         \x20 GlobalKnownHostsFile /dev/null\n\
         \x20 UpdateHostKeys no\n\
         \x20 HashKnownHosts no\n\
         \x20 CheckHostIP no\n\
         \x20 IdentityFile {id}\n\
         \x20 IdentitiesOnly yes\n\
         \x20 IdentityAgent none\n\
         \x20 PasswordAuthentication no\n\
         \x20 KbdInteractiveAuthentication no\n\
         \x20 ForwardAgent no\n\
         \x20 ForwardX11 no\n\
         \x20 ServerAliveInterval 5\n\
         \x20 ServerAliveCountMax 3\n\
         \x20 LogLevel ERROR\n{kex}",
        kh = q(&cfg.known_hosts),
        id = q(&cfg.identity_file),
        kex = cfg.kex_algorithms.as_ref().map_or(String::new(), |k| format!("  KexAlgorithms {k}\n")),
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn cfg(dir: &Path) -> SshConfig {
        SshConfig {
            known_hosts: "/nonexistent/known_hosts".into(),
            identity_file: "/nonexistent/id".into(),
            connect_timeout: Duration::from_secs(1),
            control_dir: dir.to_path_buf(),
            idle_timeout: Duration::from_secs(1),
            per_host_concurrency: 1,
            max_masters: 4,
            kex_algorithms: None,
        }
    }

    #[test]
    fn each_pool_gets_a_private_directory_of_an_unpredictable_name() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().join("control");
        let (a, b) = (SshPool::new(cfg(&parent)).unwrap(), SshPool::new(cfg(&parent)).unwrap());
        assert_ne!(a.control_dir(), b.control_dir());
        for p in [&a, &b] {
            let d = p.control_dir();
            assert_eq!(d.parent(), Some(parent.as_path()));
            let name = d.file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with("cd-") && name.len() == "cd-".len() + 12, "{name}");
            let m = std::fs::symlink_metadata(d).unwrap();
            assert!(m.is_dir() && m.permissions().mode() & 0o777 == 0o700, "{:o}", m.permissions().mode());
            let f = std::fs::symlink_metadata(d.join("ssh_config")).unwrap();
            assert!(f.is_file() && f.permissions().mode() & 0o777 == 0o600);
        }
        let kept = a.control_dir().to_path_buf();
        a.remove_control_dir();
        assert!(!kept.exists());
        let dropped = b.control_dir().to_path_buf();
        drop(b);
        assert!(!dropped.exists(), "the pool's directory goes with it");
        assert!(parent.exists(), "the configured directory stays");
    }

    #[test]
    fn a_control_dir_others_could_swap_entries_in_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = SshPool::new(cfg(&open)).unwrap_err().to_string();
        assert!(e.contains("writable by group or others (mode 0777) without the sticky bit"), "{e}");
        // Sticky, like /tmp: others cannot rename what this user made.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(SshPool::new(cfg(&open)).is_ok());
        if rustix::process::geteuid().is_root() {
            let theirs = tmp.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let e = SshPool::new(cfg(&theirs)).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 65534"), "{e}");
        }
    }
}
