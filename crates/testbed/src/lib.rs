//! Test fixtures for certdeploy: a real OpenSSH server on loopback
//! addresses, started by the (root) test process and serving one
//! unprivileged user, `certdeploy-test` (or an account of a test's own,
//! [`SshdFixture::start_as`]), whose files live in a per-host working
//! directory; sudoers drop-ins for such accounts ([`sudo`]). The test process can inspect and change anything on
//! "the host" directly, because the host is this machine.
//!
//! Requires root and `/usr/sbin/sshd` (package `openssh-server`).
#![forbid(unsafe_code)]

pub mod certs;
pub mod nginx;
pub mod proxy;
pub mod rabbit;
pub mod sudo;

use std::fs;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The unprivileged account the fixture's sshd lets in.
/// A config with one target, `web1`, for tests that never contact a host
/// (validation and in-memory deployments).
pub const WEB1_CONFIG: &str = r#"
[worker]
journal_path = "/tmp/unused"
[targets.web1]
host = "web1.internal"
user = "deploy"
cert_path = "/etc/ssl/site.pem"
key_path = "/etc/ssl/site.key"
chain_path = "/etc/ssl/chain.pem"
reload_command = "systemctl reload nginx"
"#;

pub const TEST_USER: &str = "certdeploy-test";
const SSHD: &str = "/usr/sbin/sshd";
const USER_LOCK: &str = "/tmp/certdeploy-testbed-useradd.lock";

/// What `stat` says about a path, as on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStat {
    /// Permission bits only (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub ino: u64,
    pub nlink: u64,
    pub size: u64,
    pub is_symlink: bool,
}

/// A running sshd listening on one port on each of the given loopback
/// addresses. Dropping it kills sshd (and every connection) and removes its
/// temporary directory.
pub struct SshdFixture {
    dir: tempfile::TempDir,
    addrs: Vec<String>,
    port: u16,
    child: Child,
    /// Further listeners when there are more than 16 addresses.
    extra: Vec<Child>,
    known_hosts: PathBuf,
    identity: PathBuf,
    log: PathBuf,
    user: String,
    uid: u32,
    gid: u32,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("testbed: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "testbed: {cmd:?} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn id_of(flag: &str, user: &str) -> Option<u32> {
    let out = Command::new("id").arg(flag).arg(user).stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Create the test user once. Race-safe across parallel test processes: the
/// check-and-create runs under an exclusive lock on a file in /tmp.
pub fn ensure_test_user() -> (u32, u32) {
    ensure_user(TEST_USER)
}

/// Create an unprivileged account `user` (home directory, `/bin/sh`) once,
/// race-safe like [`ensure_test_user`]. Returns its uid and gid.
pub fn ensure_user(user: &str) -> (u32, u32) {
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(USER_LOCK)
        .unwrap_or_else(|e| panic!("testbed: cannot open {USER_LOCK}: {e}"));
    lock.lock().unwrap_or_else(|e| panic!("testbed: cannot lock {USER_LOCK}: {e}"));
    if id_of("-u", user).is_none() {
        run(Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", user]));
    }
    // With `UsePAM no`, sshd refuses accounts whose password is locked
    // ("!..."), which is how useradd creates them. "*" means: no password
    // login possible, but the account is not locked.
    run(Command::new("usermod").args(["-p", "*", user]));
    let ids = (id_of("-u", user), id_of("-g", user));
    drop(lock);
    match ids {
        (Some(u), Some(g)) => (u, g),
        _ => panic!("testbed: user {user} missing after useradd"),
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("testbed: bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn keygen(path: &Path) -> String {
    run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "certdeploy-testbed", "-f"]).arg(path));
    let public = fs::read_to_string(path.with_extension("pub")).expect("testbed: read public key");
    let mut parts = public.split_whitespace();
    format!("{} {}", parts.next().unwrap_or_default(), parts.next().unwrap_or_default())
}

impl SshdFixture {
    /// Start sshd on one free port on every address of `addrs` (e.g.
    /// `["127.0.0.2", "127.0.0.3"]`). Panics with a clear message when
    /// sshd is not installed or does not come up.
    pub fn start(addrs: &[&str]) -> SshdFixture {
        SshdFixture::start_as(addrs, TEST_USER)
    }

    /// [`SshdFixture::start`] serving the account `user` (created with
    /// [`ensure_user`]) instead of [`TEST_USER`]: a test that changes what
    /// the account may do (a sudoers rule) has an account of its own.
    pub fn start_as(addrs: &[&str], user: &str) -> SshdFixture {
        SshdFixture::start_logging(addrs, user, "VERBOSE")
    }

    /// [`SshdFixture::start_as`] with sshd's `LogLevel` `level` (e.g.
    /// `DEBUG`, whose log names the key exchange each connection chose:
    /// `kex: algorithm: …`).
    pub fn start_logging(addrs: &[&str], user: &str, level: &str) -> SshdFixture {
        assert!(!addrs.is_empty(), "testbed: give at least one listen address");
        if !Path::new(SSHD).exists() {
            panic!("testbed: {SSHD} is missing: install openssh-server (apt-get install -y openssh-server)");
        }
        let (uid, gid) = ensure_user(user);
        // sshd refuses to start without its privilege separation directory.
        fs::create_dir_all("/run/sshd").expect("testbed: create /run/sshd");

        let dir = tempfile::Builder::new().prefix("certdeploy-testbed-").tempdir_in("/tmp").expect("testbed: temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        let root = dir.path();
        let host_key = root.join("host_ed25519");
        let host_pub = keygen(&host_key);
        let identity = root.join("client_ed25519");
        let client_pub = keygen(&identity);
        let authorized = root.join("authorized_keys");
        fs::write(&authorized, format!("{client_pub}\n")).expect("write authorized_keys");
        fs::set_permissions(&authorized, fs::Permissions::from_mode(0o644)).expect("chmod authorized_keys");
        fs::create_dir(root.join("hosts")).expect("mkdir hosts");
        for a in addrs {
            let h = root.join("hosts").join(a);
            fs::create_dir(&h).expect("mkdir host dir");
            std::os::unix::fs::chown(&h, Some(uid), Some(gid)).expect("chown host dir");
        }
        let log = root.join("sshd.log");
        let cfg = root.join("sshd_config");

        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let _ = fs::remove_file(&log);
            // sshd listens on at most 16 sockets: one process per 16 addresses,
            // sharing port, keys and log.
            let mut children: Vec<Child> = Vec::new();
            let mut failed = None;
            for (n, group) in addrs.chunks(16).enumerate() {
                let mut c = String::new();
                c.push_str(&format!("Port {port}\n"));
                for a in group {
                    c.push_str(&format!("ListenAddress {a}:{port}\n"));
                }
                c.push_str(&format!(
                    "HostKey {hk}\nPidFile {pid}\nAuthorizedKeysFile {ak}\nStrictModes no\n\
                     PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                     UsePAM no\nPermitRootLogin no\nAllowUsers {user}\nMaxSessions 64\nMaxStartups 100\n\
                     LogLevel {level}\nSubsystem sftp internal-sftp\n",
                    hk = host_key.display(),
                    pid = root.join(if n == 0 { "sshd.pid".to_string() } else { format!("sshd.{n}.pid") }).display(),
                    ak = authorized.display(),
                ));
                let cfg_n = if n == 0 { cfg.clone() } else { root.join(format!("sshd_config.{n}")) };
                fs::write(&cfg_n, c).expect("write sshd_config");
                let mut child = Command::new(SSHD)
                    .arg("-D")
                    .arg("-f")
                    .arg(&cfg_n)
                    .arg("-E")
                    .arg(&log)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| panic!("testbed: cannot start {SSHD}: {e}"));
                let r = wait_listening(&mut child, group, port);
                children.push(child);
                if let Err(e) = r {
                    failed = Some(e);
                    break;
                }
            }
            match failed {
                None => {
                    let known_hosts = root.join("known_hosts");
                    let mut kh = String::new();
                    for a in addrs {
                        kh.push_str(&format!("[{a}]:{port} {host_pub}\n"));
                    }
                    fs::write(&known_hosts, kh).expect("write known_hosts");
                    let child = children.remove(0);
                    return SshdFixture {
                        addrs: addrs.iter().map(|s| s.to_string()).collect(),
                        port,
                        child,
                        extra: children,
                        known_hosts,
                        identity,
                        log,
                        user: user.to_string(),
                        uid,
                        gid,
                        dir,
                    };
                }
                Some(e) => {
                    for mut child in children {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    last_err = format!("{e}\nsshd log:\n{}", fs::read_to_string(&log).unwrap_or_default());
                }
            }
        }
        panic!("testbed: sshd did not start: {last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }
    /// known_hosts holding the fixture's host key for every `[addr]:port`.
    pub fn known_hosts_path(&self) -> &Path {
        &self.known_hosts
    }
    /// The client's private key (authorized for [`SshdFixture::user`]).
    pub fn identity_path(&self) -> &Path {
        &self.identity
    }
    /// The account sshd lets in ([`TEST_USER`] unless started with
    /// [`SshdFixture::start_as`]).
    pub fn user(&self) -> &str {
        &self.user
    }
    pub fn uid(&self) -> u32 {
        self.uid
    }
    pub fn gid(&self) -> u32 {
        self.gid
    }
    /// The fixture's temp dir (config, keys, log); 0755.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// sshd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// A per-host working directory owned by the fixture's user, where
    /// target files of that "host" live.
    pub fn root_dir_for(&self, addr: &str) -> PathBuf {
        self.dir.path().join("hosts").join(addr)
    }

    /// Write a known_hosts file (in the fixture dir) that names a
    /// *different* ed25519 key for every address: a host key mismatch.
    pub fn mismatched_known_hosts(&self) -> PathBuf {
        let other = self.dir.path().join(format!("other_key_{}", self.port));
        if !other.exists() {
            keygen(&other);
        }
        let public = fs::read_to_string(other.with_extension("pub")).expect("read other key");
        let mut parts = public.split_whitespace();
        let k = format!("{} {}", parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        let path = self.dir.path().join("known_hosts.mismatch");
        let mut s = String::new();
        for a in &self.addrs {
            s.push_str(&format!("[{a}]:{} {k}\n", self.port));
        }
        fs::write(&path, s).expect("write known_hosts.mismatch");
        path
    }

    /// Trust the fixture's host key at `host:port` too (another name for
    /// one of its addresses, e.g. a [`proxy::LatencyProxy`] in front of it):
    /// a line added to [`SshdFixture::known_hosts_path`].
    pub fn trust(&self, host: &str, port: u16) {
        let kh = fs::read_to_string(&self.known_hosts).expect("read known_hosts");
        let key = kh.lines().next().and_then(|l| l.split_once(' ')).map(|(_, k)| k.to_string()).expect("a host key");
        let mut f = fs::OpenOptions::new().append(true).open(&self.known_hosts).expect("open known_hosts");
        f.write_all(format!("[{host}]:{port} {key}\n").as_bytes()).expect("append to known_hosts");
    }

    /// An empty known_hosts file: every host is unknown.
    pub fn empty_known_hosts(&self) -> PathBuf {
        let path = self.dir.path().join("known_hosts.empty");
        fs::write(&path, "").expect("write known_hosts.empty");
        path
    }

    /// Kill every sshd per-connection process (all descendants of the
    /// listener), keeping the listener: clients see their connection drop.
    pub fn kill_connections(&self) -> usize {
        let pids: Vec<u32> = self.listener_pids().into_iter().flat_map(descendants).collect();
        for p in &pids {
            let _ = Command::new("kill").args(["-KILL", &p.to_string()]).status();
        }
        pids.len()
    }

    /// Stop (`SIGSTOP`) or continue (`SIGCONT`) the listeners: while
    /// stopped, a new connection gets no answer (the kernel still accepts
    /// it into the backlog, so it goes on once they continue).
    pub fn freeze_listeners(&self, frozen: bool) {
        let sig = if frozen { "-STOP" } else { "-CONT" };
        for p in self.listener_pids() {
            let _ = Command::new("kill").args([sig, &p.to_string()]).status();
        }
    }

    /// Number of live per-connection sshd processes.
    pub fn connection_count(&self) -> usize {
        self.listener_pids().into_iter().map(|p| children_of(p).len()).sum()
    }

    fn listener_pids(&self) -> Vec<u32> {
        std::iter::once(self.child.id()).chain(self.extra.iter().map(Child::id)).collect()
    }

    // ---- files as they are on disk -------------------------------------

    /// Write a file as root, then hand it to the test user.
    pub fn write(&self, path: impl AsRef<Path>, bytes: &[u8], mode: u32) {
        let path = path.as_ref();
        fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        self.chown_user(path);
        self.chmod(path, mode);
    }
    pub fn read(&self, path: impl AsRef<Path>) -> Vec<u8> {
        let path = path.as_ref();
        fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }
    pub fn exists(&self, path: impl AsRef<Path>) -> bool {
        fs::symlink_metadata(path).is_ok()
    }
    pub fn chmod(&self, path: impl AsRef<Path>, mode: u32) {
        let path = path.as_ref();
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    }
    pub fn chown_user(&self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
    pub fn mkdir(&self, path: impl AsRef<Path>, mode: u32) {
        let path = path.as_ref();
        fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        self.chown_user(path);
        self.chmod(path, mode);
    }
    pub fn symlink(&self, target: impl AsRef<Path>, link: impl AsRef<Path>) {
        std::os::unix::fs::symlink(target.as_ref(), link.as_ref()).expect("symlink");
        self.chown_user(link);
    }
    /// `stat` following symlinks (`is_symlink` from `lstat`).
    pub fn stat(&self, path: impl AsRef<Path>) -> FileStat {
        let path = path.as_ref();
        let m = fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        let l = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
        FileStat {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            ino: m.ino(),
            nlink: m.nlink(),
            size: m.size(),
            is_symlink: l.file_type().is_symlink(),
        }
    }
    /// File names in a directory, sorted.
    pub fn list(&self, dir: impl AsRef<Path>) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir.as_ref())
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// A second local account on the test host: the attacker of the hostile
/// directory tests. It shares [`SHARED_GROUP`] with the directories it may
/// write; it has no SSH access and owns nothing the deploying user needs.
pub const ATTACKER: &str = "certdeploy-attacker";
/// The group that can write the "hostile" target directories.
pub const SHARED_GROUP: &str = "certdeploy-shared";

fn getent_id(db: &str, name: &str) -> Option<u32> {
    let out = Command::new("getent").args([db, name]).stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).split(':').nth(2)?.trim().parse().ok()
}

/// Create the attacker account and the shared group once (race-safe like
/// [`ensure_test_user`]). Returns (attacker uid, shared group gid).
pub fn ensure_attacker() -> (u32, u32) {
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(USER_LOCK)
        .unwrap_or_else(|e| panic!("testbed: cannot open {USER_LOCK}: {e}"));
    lock.lock().unwrap_or_else(|e| panic!("testbed: cannot lock {USER_LOCK}: {e}"));
    if getent_id("group", SHARED_GROUP).is_none() {
        run(Command::new("groupadd").arg(SHARED_GROUP));
    }
    if getent_id("passwd", ATTACKER).is_none() {
        run(Command::new("useradd").args(["--no-create-home", "--shell", "/bin/sh", "-G", SHARED_GROUP, ATTACKER]));
    }
    let ids = (getent_id("passwd", ATTACKER), getent_id("group", SHARED_GROUP));
    drop(lock);
    match ids {
        (Some(u), Some(g)) => (u, g),
        _ => panic!("testbed: {ATTACKER} or {SHARED_GROUP} missing after useradd"),
    }
}

/// Run a shell command as the attacker (`runuser -u certdeploy-attacker`,
/// with its supplementary group).
pub fn run_as_attacker(cmd: &str) -> Output {
    Command::new("runuser")
        .args(["-u", ATTACKER, "--", "sh", "-c", cmd])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("testbed: runuser: {e}"))
}

/// Run a shell command as the test user (`runuser -u certdeploy-test -- sh -c`).
pub fn run_as_user(cmd: &str) -> Output {
    Command::new("runuser")
        .args(["-u", TEST_USER, "--", "sh", "-c", cmd])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("testbed: runuser: {e}"))
}

fn wait_listening(child: &mut Child, addrs: &[&str], port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pending: Vec<&str> = addrs.to_vec();
    while !pending.is_empty() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Err(format!("sshd exited with {status}: {err}"));
        }
        pending.retain(|a| {
            let sa: SocketAddr = match format!("{a}:{port}").parse() {
                Ok(sa) => sa,
                Err(_) => return true,
            };
            TcpStream::connect_timeout(&sa, Duration::from_millis(200)).is_err()
        });
        if Instant::now() > deadline {
            return Err(format!("sshd not accepting on {pending:?} port {port} after 10 s"));
        }
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// The live `ssh` processes whose command line names a path under `dir`
/// (a pool's control directory, or a directory holding pools' directories),
/// and the master connections among them, counted once each by their
/// `.ssh-connection…` directory: a master's command line is `ssh … -S
/// <dir>/…/.ssh-connection…/master …` while it connects and `ssh:
/// <dir>/…/.ssh-connection…/master [mux]` once it serves.
pub fn ssh_processes_under(dir: &Path) -> (usize, usize) {
    let needle = format!("{}/", dir.display());
    let (mut procs, mut masters) = (0, std::collections::BTreeSet::new());
    let Ok(rd) = fs::read_dir("/proc") else { return (0, 0) };
    for e in rd.flatten() {
        if !e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != "ssh" {
            continue;
        }
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let Some(i) = cmdline.find(&needle) else { continue };
        procs += 1;
        let path = cmdline[i..].split(' ').next().unwrap_or_default();
        if let Some(j) = path.find("/.ssh-connection") {
            let end = path[j + 1..].find('/').map_or(path.len(), |k| j + 1 + k);
            masters.insert(path[..end].to_string());
        }
    }
    (procs, masters.len())
}

/// The master connections of [`ssh_processes_under`].
pub fn ssh_masters_under(dir: &Path) -> usize {
    ssh_processes_under(dir).1
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // pid (comm) state ppid ...; comm may hold spaces: split after ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let ppid = rest.split_whitespace().nth(1).and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

fn descendants(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for c in children_of(p) {
            all.push(c);
            frontier.push(c);
        }
    }
    all
}

impl Drop for SshdFixture {
    fn drop(&mut self) {
        let pids: Vec<u32> = self.listener_pids().into_iter().flat_map(descendants).collect();
        let _ = self.child.kill();
        for c in self.extra.iter_mut() {
            let _ = c.kill();
        }
        for p in pids {
            let _ = Command::new("kill").args(["-KILL", &p.to_string()]).status();
        }
        let _ = self.child.wait();
        for c in self.extra.iter_mut() {
            let _ = c.wait();
        }
        // Leave the log behind when a test failed, for post-mortems.
        if std::thread::panicking() {
            let _ = std::io::stderr().write_all(format!("sshd log:\n{}\n", self.log()).as_bytes());
        }
    }
}
