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

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use certdeploy_core::StepError;
use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder};
use openssh_sftp_client::{Sftp, SftpOptions};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{connect_error, sftp_error, sftp_is_connection_loss};

/// How certdeploy talks SSH. Host keys are checked strictly against
/// `known_hosts` unless a host opts into accept-new.
#[derive(Clone, Debug)]
pub struct SshConfig {
    pub known_hosts: PathBuf,
    pub identity_file: PathBuf,
    pub connect_timeout: Duration,
    /// Where control sockets and the generated `ssh_config` live (created
    /// 0700). Keep it short: a Unix socket path is limited to 107 bytes.
    pub control_dir: PathBuf,
    /// Close a master after this long without use.
    pub idle_timeout: Duration,
    /// Concurrent exec channels per host (sshd's MaxSessions is 10 by
    /// default; the SFTP session takes one more).
    pub per_host_concurrency: usize,
}

/// One remote account.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostAddr {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// `StrictHostKeyChecking=accept-new` instead of `yes`.
    pub accept_new_host_key: bool,
}

impl HostAddr {
    pub fn new(host: impl Into<String>, port: u16, user: impl Into<String>) -> HostAddr {
        HostAddr { host: host.into(), port, user: user.into(), accept_new_host_key: false }
    }
    /// From a target of the configuration.
    pub fn of_target(t: &certdeploy_core::TargetSpec) -> HostAddr {
        HostAddr::new(t.host.clone(), t.port, t.user.clone())
    }
}

impl fmt::Display for HostAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("ssh control directory {path}: {source}")]
    ControlDir { path: PathBuf, source: std::io::Error },
}

/// A pool of master connections, one per (host, port, user).
#[derive(Clone)]
pub struct SshPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    cfg: SshConfig,
    config_file: PathBuf,
    slots: Mutex<HashMap<(String, u16, String), Arc<Slot>>>,
    masters_opened: AtomicU64,
}

/// Per-host state.
pub(crate) struct Slot {
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    channels: Arc<Semaphore>,
    last_used: Mutex<Instant>,
    active: AtomicUsize,
    reaper_running: AtomicBool,
}

/// One open master with its SFTP session.
pub(crate) struct Conn {
    pub(crate) session: Arc<Session>,
    pub(crate) sftp: Sftp,
    dead: AtomicBool,
}

impl fmt::Debug for SshPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshPool")
            .field("control_dir", &self.inner.cfg.control_dir)
            .field("masters_opened", &self.masters_opened())
            .finish()
    }
}

impl SshPool {
    /// Create the control directory (0700) and write certdeploy's own
    /// `ssh_config` into it; nothing is read from or written to `$HOME`.
    pub fn new(cfg: SshConfig) -> Result<SshPool, PoolError> {
        let err = |source| PoolError::ControlDir { path: cfg.control_dir.clone(), source };
        std::fs::create_dir_all(&cfg.control_dir).map_err(err)?;
        std::fs::set_permissions(&cfg.control_dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        let config_file = cfg.control_dir.join("ssh_config");
        std::fs::write(&config_file, ssh_config_text(&cfg)).map_err(err)?;
        Ok(SshPool {
            inner: Arc::new(PoolInner {
                cfg,
                config_file,
                slots: Mutex::new(HashMap::new()),
                masters_opened: AtomicU64::new(0),
            }),
        })
    }

    pub fn config(&self) -> &SshConfig {
        &self.inner.cfg
    }

    /// Masters opened since the pool was created (reopens included).
    pub fn masters_opened(&self) -> u64 {
        self.inner.masters_opened.load(Ordering::Relaxed)
    }

    /// Close every master now.
    pub async fn close_all(&self) {
        let slots: Vec<Arc<Slot>> = lock(&self.inner.slots).values().cloned().collect();
        for s in slots {
            let c = s.conn.lock().await.take();
            if let Some(c) = c {
                close_conn(c).await;
            }
        }
    }

    fn slot(&self, addr: &HostAddr) -> Arc<Slot> {
        let mut slots = lock(&self.inner.slots);
        slots
            .entry((addr.host.clone(), addr.port, addr.user.clone()))
            .or_insert_with(|| {
                Arc::new(Slot {
                    conn: tokio::sync::Mutex::new(None),
                    channels: Arc::new(Semaphore::new(self.inner.cfg.per_host_concurrency.max(1))),
                    last_used: Mutex::new(Instant::now()),
                    active: AtomicUsize::new(0),
                    reaper_running: AtomicBool::new(false),
                })
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
        let mut lease = Lease { slot: slot.clone(), conn: None, host: addr.to_string() };
        let mut guard = slot.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            let idle = lock(&slot.last_used).elapsed();
            let alive = !c.dead.load(Ordering::SeqCst)
                && (idle < Duration::from_secs(1)
                    || matches!(tokio::time::timeout(Duration::from_secs(2), c.session.check()).await, Ok(Ok(()))));
            if alive {
                lease.conn = Some(c.clone());
                return Ok(lease);
            }
            tracing::info!(host = %addr, "ssh master is gone; reopening");
            if let Some(old) = guard.take() {
                tokio::spawn(close_conn(old));
            }
        }
        let conn = Arc::new(self.open(addr).await?);
        *guard = Some(conn.clone());
        drop(guard);
        self.inner.masters_opened.fetch_add(1, Ordering::Relaxed);
        if !slot.reaper_running.swap(true, Ordering::SeqCst) {
            tokio::spawn(reaper(Arc::downgrade(&slot), self.inner.cfg.idle_timeout));
        }
        lease.conn = Some(conn);
        Ok(lease)
    }

    async fn open(&self, addr: &HostAddr) -> Result<Conn, StepError> {
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
            .control_directory(&cfg.control_dir)
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
        let sftp = match tokio::time::timeout(limit, Sftp::from_clonable_session(session.clone(), sftp_options())).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let e = sftp_error(&host, "open", "SFTP session", &e);
                return Err(if e.is_transient() { e } else { StepError::permanent(e.message) });
            }
            Err(_) => return Err(StepError::transient(format!("{host}: SFTP session: timed out"))),
        };
        tracing::debug!(host = %host, ms = started.elapsed().as_millis() as u64, "ssh master opened");
        Ok(Conn { session, sftp, dead: AtomicBool::new(false) })
    }
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
    // Others may still hold it: the last holder's drop shuts the master.
    if let Ok(c) = Arc::try_unwrap(c) {
        let Conn { session, sftp, .. } = c;
        // Dropped, not `Sftp::close`d: openssh-sftp-client 0.15's `close`
        // unwraps its session `Arc` and panics while any handle derived from
        // it is still alive (an operation abandoned at its timeout, seen
        // under load at the end of a `deploy`). Dropping ends its tasks too;
        // an idle connection has no request left to flush.
        drop(sftp);
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
        if s.active.load(Ordering::SeqCst) > 0 || lock(&s.last_used).elapsed() < idle {
            continue;
        }
        let Ok(mut g) = s.conn.try_lock() else { continue };
        if s.active.load(Ordering::SeqCst) > 0 {
            continue;
        }
        let c = g.take();
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
}

/// Why a command has no exit status.
pub(crate) enum ExecFailure {
    TimedOut,
    Lost(String),
    NoChannel(String),
}

impl Lease {
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

impl Drop for Lease {
    fn drop(&mut self) {
        *lock(&self.slot.last_used) = Instant::now();
        self.slot.active.fetch_sub(1, Ordering::SeqCst);
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
         \x20 LogLevel ERROR\n",
        kh = q(&cfg.known_hosts),
        id = q(&cfg.identity_file),
    )
}
