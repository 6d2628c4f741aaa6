//! A real nginx (`/usr/sbin/nginx`, Debian `nginx-light`) serving TLS on a
//! loopback address from the certificate files of a [`crate::SshdFixture`]
//! host directory, so certdeploy's validate, reload and verify steps run
//! against the real daemon.
//!
//! The master runs as [`TEST_USER`] (no `user` directive, ports > 1024,
//! pid/log/temp files in the fixture's own directory), so the commands
//! certdeploy runs over ssh as that user work unchanged:
//! [`NginxFixture::validate_command`] (`nginx -t -c <conf>`) and
//! [`NginxFixture::reload_command`] (`nginx -s reload -c <conf>`, which reads
//! the master's pid from the `pid` file named in the config). The master is
//! started in the foreground (`daemon off;` in the config) as a direct child
//! of the test process (`setpriv` execs, it does not fork), so the child's
//! pid is the master pid. Dropping the fixture stops nginx.
//!
//! Requires root, `/usr/sbin/nginx`, `setpriv` (util-linux) and `openssl`.

use std::fs;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest as _;

use crate::certs::Bundle;
use crate::{TEST_USER, children_of, descendants, ensure_test_user};

pub const NGINX: &str = "/usr/sbin/nginx";

/// A running nginx master (one worker) on `addr:port`, serving TLS.
pub struct NginxFixture {
    dir: tempfile::TempDir,
    addr: String,
    port: u16,
    conf: PathBuf,
    pid_file: PathBuf,
    error_log: PathBuf,
    stderr_log: PathBuf,
    child: Child,
}

fn free_port_on(addr: &str) -> u16 {
    let l = TcpListener::bind(format!("{addr}:0")).unwrap_or_else(|e| panic!("nginx fixture: bind {addr}:0: {e}"));
    l.local_addr().expect("local addr").port()
}

fn chown_user(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// One TLS server of the config: an SNI name (`None`: the default server
/// with no name), its certificate and key files.
pub type SiteFiles = (Option<String>, PathBuf, PathBuf);

fn config(dir: &Path, addr: &str, port: u16, sites: &[SiteFiles]) -> String {
    let d = dir.display();
    let servers: String = sites
        .iter()
        .map(|(name, cert, key)| {
            let name = name.as_deref().map(|n| format!("\x20       server_name {n};\n")).unwrap_or_default();
            format!(
                "\x20   server {{\n\
                 \x20       listen {addr}:{port} ssl;\n\
                 {name}\
                 \x20       ssl_certificate {cert};\n\
                 \x20       ssl_certificate_key {key};\n\
                 \x20       return 200 \"ok\\n\";\n\
                 \x20   }}\n",
                cert = cert.display(),
                key = key.display(),
            )
        })
        .collect();
    // Every path absolute: `nginx -t` and `nginx -s reload` run over ssh
    // without `-p`, and the compiled-in temp paths (/var/lib/nginx) are
    // not writable by the test user.
    format!(
        "worker_processes 1;\n\
         daemon off;\n\
         master_process on;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/logs/error.log notice;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {d}/tmp/body;\n\
         \x20   proxy_temp_path {d}/tmp/proxy;\n\
         \x20   fastcgi_temp_path {d}/tmp/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/tmp/uwsgi;\n\
         \x20   scgi_temp_path {d}/tmp/scgi;\n\
         \x20   server_names_hash_bucket_size 128;\n\
         {servers}\
         }}\n",
    )
}

impl NginxFixture {
    /// Start nginx on a free port of `addr` (a loopback address), serving
    /// `cert_path`/`key_path` (which must exist and be readable by the test
    /// user). Panics with nginx's own error output when it does not come up.
    pub fn start(cert_path: impl AsRef<Path>, key_path: impl AsRef<Path>, addr: &str) -> NginxFixture {
        let site = (None, cert_path.as_ref().to_path_buf(), key_path.as_ref().to_path_buf());
        NginxFixture::start_sites(&[site], addr)
    }

    /// [`NginxFixture::start`] with one TLS server per site, all on one
    /// port, told apart by SNI (`server_name`); the first is the default.
    pub fn start_sites(sites: &[SiteFiles], addr: &str) -> NginxFixture {
        assert!(Path::new(NGINX).exists(), "nginx fixture: {NGINX} is missing: apt-get install -y nginx-light");
        let (uid, gid) = ensure_test_user();
        let dir = tempfile::Builder::new().prefix("certdeploy-nginx-").tempdir_in("/tmp").expect("nginx temp dir");
        let root = dir.path().to_path_buf();
        for sub in ["logs", "tmp"] {
            fs::create_dir(root.join(sub)).expect("mkdir");
        }
        for p in [root.clone(), root.join("logs"), root.join("tmp")] {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
            chown_user(&p, uid, gid);
        }
        let conf = root.join("nginx.conf");
        let pid_file = root.join("nginx.pid");
        let error_log = root.join("logs").join("error.log");
        let stderr_log = root.join("logs").join("stderr.log");
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port_on(addr);
            fs::write(&conf, config(&root, addr, port, sites)).expect("write conf");
            fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).expect("chmod conf");
            let stderr = fs::File::create(&stderr_log).expect("stderr log");
            chown_user(&stderr_log, uid, gid);
            let mut child = Command::new("setpriv")
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg("--")
                .arg(NGINX)
                .arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(format!("{}/", root.display()))
                .current_dir(&root)
                .stdin(Stdio::null())
                .stdout(stderr.try_clone().expect("dup"))
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("nginx fixture: cannot start {NGINX} via setpriv: {e}"));
            match wait_up(&mut child, addr, port, &pid_file) {
                Ok(()) => {
                    return NginxFixture {
                        dir,
                        addr: addr.to_string(),
                        port,
                        conf,
                        pid_file,
                        error_log,
                        stderr_log,
                        child,
                    };
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = format!(
                        "{e}\nstderr:\n{}\nerror.log:\n{}",
                        fs::read_to_string(&stderr_log).unwrap_or_default(),
                        fs::read_to_string(&error_log).unwrap_or_default()
                    );
                    if !last_err.contains("Address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("nginx fixture: nginx did not start: {last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn addr(&self) -> &str {
        &self.addr
    }
    /// `addr:port`, for `verify_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.addr, self.port)
    }
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }
    /// The fixture's directory (config, pid, logs, temp paths).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// `validate_command` for certdeploy (absolute path: /usr/sbin is not on
    /// an ssh session's PATH for an unprivileged user).
    pub fn validate_command(&self) -> String {
        format!("{NGINX} -t -c {}", self.conf.display())
    }
    /// `reload_command` for certdeploy: signals the master (SIGHUP) after
    /// parsing the config (an unloadable certificate makes it fail too).
    pub fn reload_command(&self) -> String {
        format!("{NGINX} -s reload -c {}", self.conf.display())
    }

    /// The master's pid, from its pid file (checked against the child).
    pub fn master_pid(&self) -> u32 {
        let pid: u32 = fs::read_to_string(&self.pid_file)
            .unwrap_or_else(|e| panic!("read {}: {e}", self.pid_file.display()))
            .trim()
            .parse()
            .expect("pid file holds a pid");
        assert_eq!(pid, self.child.id(), "nginx pid file names a process other than the master we started");
        pid
    }

    /// Is the master still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Current worker processes (children of the master), sorted.
    pub fn worker_pids(&self) -> Vec<u32> {
        let mut v = children_of(self.child.id());
        v.sort_unstable();
        v
    }

    /// Wait until exactly one worker is left (after a reload the old worker
    /// exits once it has no connections): every new connection then reaches
    /// a worker running the current configuration.
    pub fn wait_settled(&self, timeout: Duration) -> Vec<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            let w = self.worker_pids();
            if w.len() == 1 {
                return w;
            }
            if Instant::now() > deadline {
                panic!("nginx fixture: workers {w:?} after {timeout:?}\nerror.log:\n{}", self.error_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// nginx's error log (level notice: signals, reconfigurations, errors).
    pub fn error_log(&self) -> String {
        fs::read_to_string(&self.error_log).unwrap_or_default()
    }

    /// How many reload signals the master received so far (`signal 1
    /// (SIGHUP) received ..., reconfiguring` lines in the error log).
    pub fn reloads(&self) -> usize {
        self.error_log().lines().filter(|l| l.contains("(SIGHUP) received") && l.contains("reconfiguring")).count()
    }

    /// SHA-256 (hex) of the leaf certificate a fresh TLS handshake is
    /// served, fetched with `openssl s_client` (independent of certdeploy's
    /// rustls verifier).
    pub fn served_leaf_sha256(&self) -> String {
        self.try_served_leaf_sha256().unwrap_or_else(|e| panic!("nginx fixture: {e}"))
    }

    pub fn try_served_leaf_sha256(&self) -> Result<String, String> {
        self.try_served_leaf_sha256_for(None)
    }

    /// [`Self::served_leaf_sha256`] for a handshake naming `sni`.
    pub fn served_leaf_sha256_for(&self, sni: &str) -> String {
        self.try_served_leaf_sha256_for(Some(sni)).unwrap_or_else(|e| panic!("nginx fixture: {e}"))
    }

    fn try_served_leaf_sha256_for(&self, sni: Option<&str>) -> Result<String, String> {
        let name = match sni {
            Some(n) => vec!["-servername", n],
            None => vec!["-noservername"],
        };
        let out = Command::new("timeout")
            .args(["10", "openssl", "s_client", "-connect", &self.endpoint()])
            .args(name)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("openssl s_client: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (begin, end) = ("-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----");
        let pem = match (text.find(begin), text.find(end)) {
            (Some(b), Some(e)) if e > b => &text[b..e + end.len()],
            _ => {
                return Err(format!(
                    "no certificate from {}: {}\n{}",
                    self.endpoint(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        };
        let der = pem_to_der(pem)?;
        Ok(hex::encode(sha2::Sha256::digest(der)))
    }
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    let mut child = Command::new("openssl")
        .args(["x509", "-outform", "DER"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("openssl x509: {e}"))?;
    child.stdin.take().expect("stdin").write_all(pem.as_bytes()).map_err(|e| format!("openssl x509: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("openssl x509: {e}"))?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(format!("openssl x509: {}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    Ok(out.stdout)
}

fn wait_up(child: &mut Child, addr: &str, port: u16, pid_file: &Path) -> Result<(), String> {
    let sa: SocketAddr = format!("{addr}:{port}").parse().map_err(|e| format!("{addr}:{port}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("nginx exited with {status}"));
        }
        let pid_ok = fs::read_to_string(pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok()) == Some(child.id());
        if pid_ok && TcpStream::connect_timeout(&sa, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("nginx not accepting on {sa} (or no pid file) after 10 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for NginxFixture {
    fn drop(&mut self) {
        let pid = self.child.id();
        let workers = descendants(pid);
        // Fast shutdown (SIGTERM): the master stops its workers.
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for w in workers {
            let _ = Command::new("kill").args(["-KILL", &w.to_string()]).stderr(Stdio::null()).status();
        }
        if std::thread::panicking() {
            let _ = std::io::stderr().write_all(
                format!(
                    "nginx error.log:\n{}\nnginx stderr:\n{}\n",
                    self.error_log(),
                    fs::read_to_string(&self.stderr_log).unwrap_or_default()
                )
                .as_bytes(),
            );
        }
    }
}

/// A certificate bundle that certdeploy's request checks accept (PEM,
/// X.509, key/certificate match, chain order and signature) but OpenSSL 3
/// refuses to load for a TLS server: the leaf is signed with SHA-1
/// (`sha1WithRSAEncryption`). OpenSSL 3 rates SHA-1 signatures at 63 bits
/// of security, below the default security level 1 (80 bits), so
/// `SSL_CTX_use_certificate` fails with "ca md too weak" and `nginx -t`
/// (and `nginx -s reload`) reject the configuration. Made with the
/// `openssl` command line (rcgen cannot sign with SHA-1). The CA is its own
/// self-signed RSA-2048/SHA-256 root, given as the chain.
pub fn sha1_signed_bundle(cn: &str) -> Bundle {
    let dir = tempfile::Builder::new().prefix("certdeploy-sha1-").tempdir().expect("temp dir");
    let d = dir.path();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(d).stdin(Stdio::null()).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-sha256",
        "-days",
        "30",
        "-subj",
        "/CN=certdeploy sha1 ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        &format!("/CN={cn}"),
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-sha1",
        "-days",
        "30",
        "-set_serial",
        "4242",
        "-out",
        "leaf.pem",
    ]);
    let read = |f: &str| fs::read_to_string(d.join(f)).expect("read openssl output");
    let cert_pem = read("leaf.pem");
    let der = pem_to_der(&cert_pem).expect("leaf DER");
    let not_before =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.as_secs() as i64).unwrap_or(0);
    Bundle {
        cert_pem,
        key_pem: read("leaf.key"),
        chain_pem: read("ca.pem"),
        leaf_sha256: hex::encode(sha2::Sha256::digest(der)),
        not_before,
    }
}

/// Does process `pid` run as the test user (real uid)?
pub fn runs_as_test_user(pid: u32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|r| r.split_whitespace().next());
    let want = Command::new("id").arg("-u").arg(TEST_USER).output().ok();
    match (uid, want) {
        (Some(u), Some(o)) => u == String::from_utf8_lossy(&o.stdout).trim(),
        _ => false,
    }
}
