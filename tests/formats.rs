//! Extra files per target over a real sshd: a PKCS#12 keystore that Java's
//! keytool and OpenSSL read (key, certificate and chain under the alias),
//! a bundle (certificate, chain, key) that OpenSSL reads, each kept as it
//! is when it already holds the request's content, and put back byte for
//! byte (and mode) when the reload fails. Neither the keystore's password
//! nor key bytes reach the journal, the result or the logs.

#![allow(clippy::type_complexity)] // common/mod.rs (Fleet::files)

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use certdeploy_core::Outcome;
use certdeploy_core::wire::ResultEvent;
use common::*;

const PASSWORD: &str = "Keystore-Pa55-e2e-7c41";
const ALIAS: &str = "tomcat";

struct Setup {
    fleet: Fleet,
    t: Target,
    p12: PathBuf,
    bundle: PathBuf,
}

fn setup() -> Setup {
    setup_with(false)
}

fn setup_with(broker: bool) -> Setup {
    let fleet = Fleet::new(1, broker);
    let t = fleet.targets[0].clone();
    let pw = fleet.tmp.path().join("keystore.pass");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (p12, bundle) = (t.dir.join("site.p12"), t.dir.join("haproxy.pem"));
    Setup { fleet, t, p12, bundle }
}

impl Setup {
    /// The configuration with both extra files and `reload` (default: the
    /// reload log).
    fn config(&self, reload: Option<&str>) -> PathBuf {
        let extra = format!(
            "bundle_path = \"{}\"\npkcs12_path = \"{}\"\npkcs12_password_file = \"{}\"\npkcs12_alias = \"{ALIAS}\"\n",
            self.bundle.display(),
            self.p12.display(),
            self.fleet.tmp.path().join("keystore.pass").display()
        );
        self.fleet.write_config(&Opts {
            reload_command: reload.map(str::to_string),
            target_extra: extra,
            ..Opts::default()
        })
    }

    /// `certdeploy deploy` at TRACE: the result and everything it logged.
    fn deploy(&self, cfg: &Path, id: &str, b: &Bundle) -> (ResultEvent, String) {
        let args = deploy_args(self.fleet.tmp.path(), &self.t.name, id, b, true, true);
        let out = Command::new(bin())
            .arg("--config")
            .arg(cfg)
            .args(&args)
            .env("RUST_LOG", "trace")
            .output()
            .expect("run certdeploy");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let ev: ResultEvent =
            serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", tail(&stderr, 40)));
        (ev, format!("{stdout}\n{stderr}"))
    }
}

fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("run {program}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{program} {args:?} failed: {text}");
    text
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// The base64 bodies of the PEM blocks labelled `label` in `text`, in order.
fn blocks(text: &str, label: &str) -> Vec<String> {
    let (begin, end) = (format!("-----BEGIN {label}-----"), format!("-----END {label}-----"));
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines().map(str::trim) {
        match &mut cur {
            None if line == begin => cur = Some(String::new()),
            Some(body) if line == end => {
                out.push(std::mem::take(body));
                cur = None;
            }
            Some(body) => body.push_str(line),
            None => {}
        }
    }
    out
}

/// The public key of the private key in `pem_file` and of the first
/// certificate in `cert_file`, as OpenSSL prints them.
fn public_keys(dir: &Path, key_pem: &str, cert_pem: &str) -> (String, String) {
    let (k, c) = (dir.join("pub-key.pem"), dir.join("pub-cert.pem"));
    write_file(&k, key_pem);
    write_file(&c, cert_pem);
    let of_key = tool("openssl", &["pkey", "-in", k.to_str().unwrap(), "-pubout"]);
    let of_cert = tool("openssl", &["x509", "-in", c.to_str().unwrap(), "-pubkey", "-noout"]);
    (of_key, of_cert)
}

/// Neither the password nor the key (any line of its base64) is in `text`.
fn assert_clean(what: &str, text: &str, keys: &[&Bundle]) {
    assert!(!text.contains(PASSWORD), "{what}: holds the keystore password");
    for b in keys {
        for l in b.key_pem.lines().filter(|l| !l.starts_with("-----") && l.len() > 16) {
            assert!(!text.contains(l), "{what}: holds a line of the private key: {l}");
        }
    }
    assert!(!text.contains("PRIVATE KEY-----\n"), "{what}: holds a PEM key");
}

#[test]
fn a_pkcs12_keystore_is_read_by_keytool_and_openssl_kept_when_the_same_and_restored_on_rollback() {
    let s = setup();
    let ca = TestCa::new();
    let dir = s.fleet.tmp.path();
    let cfg = s.config(None);
    let b1 = ca.leaf("java.example.com", 2);

    let (ev, log1) = s.deploy(&cfg, "p12-1", &b1);
    assert_eq!(ev.outcome, Outcome::Deployed, "{}", ev.message);
    assert_eq!(ev.metadata.get("backup_status_pkcs12").map(String::as_str), Some("no_pre_existing"));
    assert_eq!(mode(&s.p12), 0o600, "pkcs12_mode's default");
    let f = s.p12.to_str().unwrap();

    // Java's keytool lists the alias as a key entry.
    let listed = tool("keytool", &["-list", "-keystore", f, "-storetype", "PKCS12", "-storepass", PASSWORD]);
    assert!(listed.contains(&format!("{ALIAS}, ")) && listed.contains("PrivateKeyEntry"), "{listed}");
    assert!(listed.contains("Your keystore contains 1 entry"), "{listed}");
    // OpenSSL: AES-256 and PBKDF2, a SHA-256 MAC; key, certificate, chain.
    let info = tool("openssl", &["pkcs12", "-in", f, "-passin", &format!("pass:{PASSWORD}"), "-info", "-noout"]);
    assert!(info.contains("AES-256-CBC") && info.contains("PBKDF2") && info.contains("MAC: sha256"), "{info}");
    let out = tool("openssl", &["pkcs12", "-in", f, "-passin", &format!("pass:{PASSWORD}"), "-nodes"]);
    let want: Vec<String> = [blocks(&b1.cert_pem, "CERTIFICATE"), blocks(&b1.chain_pem, "CERTIFICATE")].concat();
    assert_eq!(blocks(&out, "CERTIFICATE"), want, "leaf, intermediate, root in that order");
    assert_eq!(blocks(&out, "PRIVATE KEY").len(), 1, "one key");
    assert!(out.contains(&format!("friendlyName: {ALIAS}")), "{out}");
    let (of_key, of_cert) = public_keys(dir, &out, &b1.cert_pem);
    assert_eq!(of_key, of_cert, "the keystore's key is the certificate's");
    assert_eq!(of_key, public_keys(dir, &b1.key_pem, &b1.cert_pem).0);

    // The same request again: the keystore holds it already (its bytes
    // would differ if built again): unchanged, nothing written or reloaded.
    let first = std::fs::read(&s.p12).unwrap();
    let reloads = s.fleet.reloads(&s.t);
    let (ev, log2) = s.deploy(&cfg, "p12-2", &b1);
    assert_eq!(ev.outcome, Outcome::Unchanged, "{}", ev.message);
    assert_eq!(std::fs::read(&s.p12).unwrap(), first, "the keystore in place is kept");
    assert_eq!(s.fleet.reloads(&s.t), reloads);

    // A failing reload puts the previous keystore back, byte for byte and mode.
    std::fs::set_permissions(&s.p12, std::fs::Permissions::from_mode(0o640)).unwrap();
    let failing = s.config(Some("false"));
    let b2 = ca.leaf("java.example.com", 1);
    let (ev, log3) = s.deploy(&failing, "p12-3", &b2);
    // `false` fails the retried reload too: the daemon's state is unknown,
    // the files are put back all the same.
    assert_eq!(ev.outcome, Outcome::RolledBackDaemonUnknown, "{}", ev.message);
    assert_eq!(ev.metadata.get("backup_status_pkcs12").map(String::as_str), Some("restored"));
    assert_eq!(std::fs::read(&s.p12).unwrap(), first, "the previous keystore, byte for byte");
    assert_eq!(mode(&s.p12), 0o640, "and its mode");
    assert!(s.fleet.leftovers(&s.t).is_empty(), "{:?}", s.fleet.leftovers(&s.t));

    // A new certificate with a working reload replaces it (the same file
    // as the failing configuration: written again).
    let cfg = s.config(None);
    let (ev, log4) = s.deploy(&cfg, "p12-4", &b2);
    assert_eq!(ev.outcome, Outcome::Deployed, "{}", ev.message);
    let out = tool("openssl", &["pkcs12", "-in", f, "-passin", &format!("pass:{PASSWORD}"), "-nodes"]);
    assert_eq!(blocks(&out, "CERTIFICATE")[0], blocks(&b2.cert_pem, "CERTIFICATE")[0]);

    // Journal, results and logs hold neither the password nor a key.
    for (i, log) in [log1, log2, log3, log4].iter().enumerate() {
        assert!(log.contains("TRACE"), "trace level is on");
        assert_clean(&format!("deploy {} output", i + 1), log, &[&b1, &b2]);
    }
    for id in ["p12-1", "p12-2", "p12-3", "p12-4"] {
        let (code, shown, err) = run(&cfg, &["journal", "show", id, "--json"]);
        assert_eq!(code, 0, "{err}");
        assert!(shown.contains("\"pkcs12\""), "the keystore is a file of the plan: {shown}");
        assert_clean(&format!("journal show {id}"), &shown, &[&b1, &b2]);
    }
}

#[test]
fn a_bundle_is_certificate_chain_and_key_that_openssl_reads_and_is_restored_on_rollback() {
    let s = setup();
    let ca = TestCa::new();
    let dir = s.fleet.tmp.path();
    let cfg = s.config(None);
    let b1 = ca.leaf("haproxy.example.com", 2);

    let (ev, _) = s.deploy(&cfg, "bundle-1", &b1);
    assert_eq!(ev.outcome, Outcome::Deployed, "{}", ev.message);
    let bundle = std::fs::read_to_string(&s.bundle).unwrap();
    assert_eq!(bundle, format!("{}{}{}", b1.cert_pem, b1.chain_pem, b1.key_pem), "certificate, chain, key");
    assert_eq!(mode(&s.bundle), 0o600, "bundle_mode's default");
    // OpenSSL reads the certificates in order, and the key matches the first.
    let f = s.bundle.to_str().unwrap();
    let leaf = tool("openssl", &["x509", "-in", f, "-noout", "-fingerprint", "-sha256"]);
    assert!(leaf.replace(':', "").to_lowercase().contains(&b1.leaf_sha256), "{leaf}");
    let objects = tool("openssl", &["storeutl", "-noout", f]);
    assert!(
        objects.contains("0: Certificate\n1: Certificate\n2: Certificate\n3: Pkey\nTotal found: 4"),
        "leaf, intermediate, root, key: {objects}"
    );
    let of_key = tool("openssl", &["pkey", "-in", f, "-pubout"]);
    assert_eq!(of_key, public_keys(dir, &b1.key_pem, &b1.cert_pem).1, "the bundle's key is its certificate's");

    // A failing reload puts the previous bundle back, byte for byte and mode.
    let before = std::fs::read(&s.bundle).unwrap();
    std::fs::set_permissions(&s.bundle, std::fs::Permissions::from_mode(0o640)).unwrap();
    let b2 = ca.leaf("haproxy.example.com", 1);
    let (ev, _) = s.deploy(&s.config(Some("false")), "bundle-2", &b2);
    // `false` fails the retried reload too: the daemon's state is unknown,
    // the files are put back all the same.
    assert_eq!(ev.outcome, Outcome::RolledBackDaemonUnknown, "{}", ev.message);
    assert_eq!(ev.metadata.get("backup_status_bundle").map(String::as_str), Some("restored"));
    assert_eq!(std::fs::read(&s.bundle).unwrap(), before);
    assert_eq!(mode(&s.bundle), 0o640);

    // `certdeploy check` checks the extra files as the others.
    let (code, out, err) = run(&cfg, &["check"]);
    assert_eq!(code, 0, "{out}{err}");
    for (what, p) in [("bundle", &s.bundle), ("pkcs12", &s.p12)] {
        assert!(out.contains(&format!("[ok] {what} {}: ", p.display())), "{out}");
    }
}

/// The worker over RabbitMQ: the keystore deployed, the same request again
/// `unchanged`; its TRACE log, the results and the journal hold neither the
/// password nor a key.
#[tokio::test(flavor = "multi_thread")]
async fn the_worker_deploys_a_keystore_and_its_log_results_and_journal_hold_no_password_or_key() {
    let s = setup_with(true);
    let ca = TestCa::new();
    let cfg = s.config(None);
    let mut client = Client::connect(&s.fleet).await;
    let w = Proc::worker(&s.fleet, &cfg, &[("RUST_LOG", "trace"), ("CERTDEPLOY_LOG_FORMAT", "json")], "worker-formats");
    let b = ca.leaf("java.example.com", 2);
    let mut results = Vec::new();
    for (id, want) in [("w-p12-1", Outcome::Deployed), ("w-p12-2", Outcome::Unchanged)] {
        client.publish(&certdeploy_testbed::certs::request(id, &s.t.name, &b, true)).await;
        let ids = vec![id.to_string()];
        let seen = client.collect(std::time::Duration::from_secs(120), all_ids(&ids)).await;
        let ev = seen.get(id).and_then(|v| v.first()).unwrap_or_else(|| panic!("no result for {id}"));
        assert_eq!(ev.outcome, want, "{}", ev.message);
        results.push(serde_json::to_string(ev).unwrap());
    }
    let listed = tool(
        "keytool",
        &["-list", "-keystore", s.p12.to_str().unwrap(), "-storetype", "PKCS12", "-storepass", PASSWORD],
    );
    assert!(listed.contains(&format!("{ALIAS}, ")), "{listed}");
    for id in ["w-p12-1", "w-p12-2"] {
        let (code, shown, err) = run(&cfg, &["journal", "show", id, "--json"]);
        assert_eq!(code, 0, "{err}");
        assert!(shown.contains("\"pkcs12\""), "{shown}");
        assert_clean(&format!("journal show {id}"), &shown, &[&b]);
    }
    let log = w.log_text();
    assert!(log.contains("TRACE"), "trace level is on: {}", tail(&log, 20));
    assert_clean("worker log", &log, &[&b]);
    assert_clean("results", &results.join("\n"), &[&b]);
}
