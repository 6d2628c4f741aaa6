//! The request/target/plan model: what a deployment writes where, and the
//! facts about it that may be journaled (digests, modes, paths — never key
//! bytes). Key material lives only in [`Payload`], which is never serialized.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroize;

/// Milliseconds since the Unix epoch. Time always comes in from outside.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn plus_ms(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }
    pub fn since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
    /// RFC 3339 with milliseconds, UTC.
    pub fn rfc3339(self) -> String {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.0);
        humantime::format_rfc3339_millis(t).to_string()
    }
}

/// The files a deployment may write.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Cert,
    Key,
    Chain,
    /// Certificate, chain and key in one PEM file (HAProxy, Postfix).
    Bundle,
    /// A PKCS#12 keystore holding key, certificate and chain (Java).
    Pkcs12,
}

impl Role {
    /// The roles every result reports a backup status for (`n/a` when the
    /// target has no such file).
    pub const ALL: [Role; 3] = [Role::Cert, Role::Key, Role::Chain];
    /// The extra files a configured target may add; a result reports them
    /// only when the deployment's plan has them.
    pub const EXTRA: [Role; 2] = [Role::Bundle, Role::Pkcs12];
    /// Every role.
    pub const EVERY: [Role; 5] = [Role::Cert, Role::Key, Role::Chain, Role::Bundle, Role::Pkcs12];
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Cert => "cert",
            Role::Key => "key",
            Role::Chain => "chain",
            Role::Bundle => "bundle",
            Role::Pkcs12 => "pkcs12",
        }
    }
    /// Whether the file holds the private key (in clear or encrypted): it
    /// is written through the private staging directory and gets the key's
    /// owner and group.
    pub fn holds_key(self) -> bool {
        matches!(self, Role::Key | Role::Bundle | Role::Pkcs12)
    }
    /// Whether a snapshot reads the existing file's content (the
    /// certificate for its facts, a keystore to see what it holds).
    pub fn reads_content(self) -> bool {
        matches!(self, Role::Cert | Role::Pkcs12)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A SHA-256 digest, serialized as lowercase hex.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Option<Digest> {
        let v = hex::decode(s).ok()?;
        Some(Digest(v.try_into().ok()?))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::from_hex(&s).ok_or_else(|| serde::de::Error::custom("invalid sha256 hex digest"))
    }
}

/// Key material (or anything else secret). Never printed, zeroed on drop,
/// deliberately not `Serialize`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A deployment target as configured (or sent inline, when allowed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub user: String,
    pub cert_path: String,
    pub key_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_path: Option<String>,
    #[serde(default = "default_cert_mode")]
    pub cert_mode: String,
    #[serde(default = "default_key_mode")]
    pub key_mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validate_command: Option<String>,
    pub reload_command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_sni: Option<String>,
}

/// Defaults of [`TargetSpec`] fields, shared with the worker configuration.
pub fn default_port() -> u16 {
    22
}
pub fn default_cert_mode() -> String {
    "0644".into()
}
pub fn default_key_mode() -> String {
    "0600".into()
}

/// Parse an octal file mode of the form `0[0-7]{3}`.
pub fn parse_mode(s: &str) -> Option<u32> {
    let b = s.as_bytes();
    if b.len() != 4 || b[0] != b'0' || !b[1..].iter().all(|c| (b'0'..=b'7').contains(c)) {
        return None;
    }
    u32::from_str_radix(&s[1..], 8).ok()
}

/// Check a remote path: absolute, normalized, no `..`/`.` segments, no empty
/// segments, no NUL, newline or other control characters.
pub fn check_remote_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err("must be an absolute path".into());
    }
    if p.len() > 4096 {
        return Err("is longer than 4096 bytes".into());
    }
    if p.chars().any(|c| c.is_control()) {
        return Err("contains a control character (NUL, newline, ...)".into());
    }
    if p.len() > 1 && p.ends_with('/') {
        return Err("must name a file, not a directory".into());
    }
    for seg in p[1..].split('/') {
        match seg {
            "" => return Err("is not normalized (empty segment `//`)".into()),
            "." | ".." => return Err(format!("is not normalized (contains `{seg}`)")),
            _ => {}
        }
    }
    if p == "/" {
        return Err("must name a file".into());
    }
    Ok(())
}

/// What every name certdeploy itself creates next to a target's files
/// carries (`.certdeploy-bak.`, `.certdeploy-tmp.`, `.certdeploy-lock`,
/// `.certdeploy-stage.`, `.certdeploy-check.`, lock claims and temps):
/// a target path with it in any segment could be a backup, temp, lock or
/// staging object of another deployment, so none may.
pub const RESERVED_NAME_MARK: &str = ".certdeploy-";

/// A path a target may write: a valid remote path ([`check_remote_path`])
/// outside certdeploy's own names ([`RESERVED_NAME_MARK`]).
pub fn check_target_path(p: &str) -> Result<(), String> {
    check_remote_path(p)?;
    if p.split('/').any(|seg| seg.contains(RESERVED_NAME_MARK)) {
        return Err(format!(
            "uses certdeploy's own names (`{RESERVED_NAME_MARK}…`: backups, temps, locks, staging): \
             it could be another deployment's file"
        ));
    }
    Ok(())
}

/// The live files a target writes, by field, in plan order.
pub fn target_paths(t: &TargetSpec) -> Vec<(&'static str, &str)> {
    let mut v = vec![("cert_path", t.cert_path.as_str()), ("key_path", t.key_path.as_str())];
    if let Some(c) = &t.chain_path {
        v.push(("chain_path", c.as_str()));
    }
    v
}

/// Each of a target's paths is one it may write ([`check_target_path`]),
/// and no path is used for two files. The error names the field (for a
/// path used twice, the later one).
pub fn check_target_paths(t: &TargetSpec) -> Result<(), PlanError> {
    check_paths(&target_paths(t))
}

/// [`check_target_paths`] on a list of `(field, path)`: a target's paths
/// with its extra files ([`Formats::paths`]).
pub fn check_paths(paths: &[(&'static str, &str)]) -> Result<(), PlanError> {
    for (i, (field, p)) in paths.iter().enumerate() {
        check_target_path(p).map_err(|problem| PlanError::Target { field, problem: format!("`{p}` {problem}") })?;
        if let Some((first, _)) = paths[..i].iter().find(|(_, q)| q == p) {
            return Err(PlanError::Target {
                field,
                problem: format!("`{p}` is also this target's {first}: one path cannot hold two files"),
            });
        }
    }
    Ok(())
}

/// Are two host names the same host (ASCII case does not matter)?
pub fn same_host(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// One file the deployment writes. Journaled: holds the digest of the new
/// content, never the content itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePlan {
    pub role: Role,
    pub path: String,
    pub mode: u32,
    pub sha256: Digest,
    pub size: u64,
    /// A keystore only: the digest of what it holds ([`Keystore::holds`]).
    /// Its bytes differ at every build (random salts), so an existing
    /// keystore that holds the same is as good as identical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holds: Option<Digest>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyPlan {
    pub endpoint: String,
    pub sni: Option<String>,
    /// SHA-256 of the new leaf certificate's DER.
    pub expected: Digest,
}

/// Timing and retention policy of one deployment (all durations in ms).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub exec_timeout_ms: u64,
    /// Per-deployment deadline, counted from `Started`.
    pub deadline_ms: u64,
    /// Extra time a rollback may keep retrying transient errors after the deadline.
    pub rollback_budget_ms: u64,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub verify_initial_ms: u64,
    /// Total time verify may retry after a reload before it counts as a mismatch.
    pub verify_budget_ms: u64,
    /// Verify passes only after this many handshakes in a row present the
    /// expected leaf (a graceful reload lets the old worker accept for a
    /// moment). Journals written before this existed read the default.
    #[serde(default = "default_verify_consecutive")]
    pub verify_consecutive: u32,
    /// ... and only once those handshakes span at least this long.
    #[serde(default = "default_verify_window_ms")]
    pub verify_window_ms: u64,
    /// Backups to keep per path after a successful deployment (>= 1).
    pub keep_backups: u32,
    pub allow_downgrade: bool,
}

fn default_verify_consecutive() -> u32 {
    3
}

fn default_verify_window_ms() -> u64 {
    1_000
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            exec_timeout_ms: 60_000,
            deadline_ms: 600_000,
            rollback_budget_ms: 600_000,
            retry_initial_ms: 1_000,
            retry_max_ms: 60_000,
            verify_initial_ms: 200,
            verify_budget_ms: 10_000,
            verify_consecutive: default_verify_consecutive(),
            verify_window_ms: default_verify_window_ms(),
            keep_backups: 1,
            allow_downgrade: false,
        }
    }
}

/// The SSH account a deployment talks to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Remote {
    pub host: String,
    pub port: u16,
    pub user: String,
}

/// Everything the state machine needs to know about one deployment attempt.
/// Journaled as part of `Started`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub deployment_id: String,
    pub target: String,
    /// `host:port`, for results and messages.
    pub host: String,
    /// Where to connect (recovery needs it without the request).
    pub remote: Remote,
    pub attempt: u32,
    pub files: Vec<FilePlan>,
    pub validate_command: Option<String>,
    pub reload_command: String,
    pub verify: Option<VerifyPlan>,
    /// notBefore (unix s) of the incoming leaf, for supersede protection.
    pub new_not_before: Option<i64>,
    pub policy: Policy,
    /// The token of the target lock this attempt holds on the host:
    /// journaled with `Started` so that a restarted worker knows whether
    /// the lock is still its own. `None` for journals written
    /// before host locks existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
    /// What the certificate is, for `status` and the expiry gauge long
    /// after the request is gone. `None` in journals written before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateInfo>,
    /// This attempt is a revert: it puts back what the deployment named
    /// here replaced, from that deployment's backups, instead of writing
    /// new content ([`crate::revert`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<RevertOf>,
}

/// What a revert undoes: a `deployed` deployment, and per file what it
/// wrote and what it found there before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevertOf {
    /// The deployment reverted (the result's `reverts`).
    pub deployment_id: String,
    pub files: Vec<RevertFile>,
}

/// One file of a reverted deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevertFile {
    pub role: Role,
    /// The digest that deployment wrote: the host must still hold exactly
    /// this at `before.live_path`, or the revert changes nothing.
    pub written: Digest,
    /// That deployment's snapshot: the backup to put back (kept where it
    /// is), or `Missing`: the file is removed.
    pub before: crate::snapshot::Snapshot,
}

/// The deployed leaf certificate as an operator asks about it: never key
/// material, only public facts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateInfo {
    /// Subject distinguished name (`CN=www.example.com, O=...`).
    pub subject: String,
    /// notAfter, unix seconds.
    pub not_after: i64,
}

impl Plan {
    pub fn file(&self, role: Role) -> Option<&FilePlan> {
        self.files.iter().find(|f| f.role == role)
    }
    pub fn roles(&self) -> impl Iterator<Item = Role> + '_ {
        self.files.iter().map(|f| f.role)
    }
    /// The configured certificate path: what deployments are serialized
    /// on, and where the target lock lives.
    pub fn cert_path(&self) -> &str {
        self.file(Role::Cert).or(self.files.first()).map(|f| f.path.as_str()).unwrap_or("")
    }
    /// The target lock's path, when this attempt holds one.
    pub fn lock_path(&self) -> Option<String> {
        self.lock.as_ref().map(|_| crate::lock::lock_path(self.cert_path()))
    }
}

/// The bytes to write, by role. Held in memory only for the live attempt.
#[derive(Clone, Debug, Default)]
pub struct Payload {
    contents: BTreeMap<Role, Secret>,
    /// How to open the keystore already on the host, when the plan writes one.
    keystore: Option<KeystoreReader>,
}

impl Payload {
    pub fn get(&self, role: Role) -> Option<&[u8]> {
        self.contents.get(&role).map(Secret::expose)
    }
    pub fn insert(&mut self, role: Role, bytes: Vec<u8>) {
        self.contents.insert(role, Secret::new(bytes));
    }
    /// What the keystore `bytes` (found on the host) holds, opened with the
    /// configured password: `None` without a keystore in the plan, or when
    /// it does not open with it.
    pub fn keystore_holds(&self, bytes: &[u8]) -> Option<Digest> {
        let r = self.keystore.as_ref()?;
        (r.open)(bytes, &r.password)
    }
}

/// Opens a PKCS#12 keystore with a password and tells the digest of what it
/// holds (aliases, keys, certificates): supplied by the caller (the pki
/// crate), so that this crate needs no PKCS#12 code.
pub type OpenKeystore = fn(bytes: &[u8], password: &Secret) -> Option<Digest>;

#[derive(Clone)]
struct KeystoreReader {
    password: Secret,
    open: OpenKeystore,
}

impl fmt::Debug for KeystoreReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeystoreReader([redacted])")
    }
}

/// The extra files of a configured target, besides certificate, key and
/// chain. Never journaled (the keystore and its password are secrets).
#[derive(Clone, Debug, Default)]
pub struct Formats {
    /// `bundle_path`: certificate, chain and key in one PEM file.
    pub bundle: Option<ExtraFile>,
    /// `pkcs12_path`: the keystore, built for this request.
    pub pkcs12: Option<(ExtraFile, Keystore)>,
}

/// Where an extra file goes, and its mode (octal text, as configured).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraFile {
    pub path: String,
    pub mode: String,
}

/// A PKCS#12 keystore built for one request.
#[derive(Clone, Debug)]
pub struct Keystore {
    pub bytes: Secret,
    /// The digest of what it holds, as [`Keystore::open`] tells it of these
    /// very bytes.
    pub holds: Digest,
    pub password: Secret,
    pub open: OpenKeystore,
}

impl Formats {
    /// The extra files' `(field, path)`, in plan order.
    pub fn paths(&self) -> Vec<(&'static str, &str)> {
        let mut v = Vec::new();
        if let Some(b) = &self.bundle {
            v.push(("bundle_path", b.path.as_str()));
        }
        if let Some((p, _)) = &self.pkcs12 {
            v.push(("pkcs12_path", p.path.as_str()));
        }
        v
    }
}

/// What a request asks for, after decoding (material still unvalidated PEM).
#[derive(Clone, Debug)]
pub struct Material {
    pub certificate_pem: String,
    pub private_key_pem: Secret,
    pub chain_pem: Option<String>,
}

/// Facts the caller has extracted from the material (by the pki crate).
#[derive(Clone, Debug, Default)]
pub struct MaterialFacts {
    pub leaf_sha256: Option<Digest>,
    pub not_before: Option<i64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("target.{field}: {problem}")]
    Target { field: &'static str, problem: String },
}

/// Build the plan and payload for one attempt. The chain is appended to the
/// certificate file (certificate, newline, chain) when the target has no
/// `chain_path`.
pub fn build_plan(
    deployment_id: &str,
    target_name: &str,
    target: &TargetSpec,
    material: &Material,
    facts: &MaterialFacts,
    policy: Policy,
    attempt: u32,
) -> Result<(Plan, Payload), PlanError> {
    let formats = Formats::default();
    build_plan_with(deployment_id, target_name, target, material, facts, policy, attempt, &formats)
}

/// [`build_plan`] with a configured target's extra files: the bundle
/// (certificate, chain, key: the chain as given, whether or not the target
/// has a `chain_path`) and the keystore.
#[allow(clippy::too_many_arguments)]
pub fn build_plan_with(
    deployment_id: &str,
    target_name: &str,
    target: &TargetSpec,
    material: &Material,
    facts: &MaterialFacts,
    policy: Policy,
    attempt: u32,
    formats: &Formats,
) -> Result<(Plan, Payload), PlanError> {
    let cert_mode = parse_mode(&target.cert_mode).ok_or_else(|| PlanError::Target {
        field: "cert_mode",
        problem: format!("`{}` is not an octal mode like 0644", target.cert_mode),
    })?;
    let key_mode = parse_mode(&target.key_mode).ok_or_else(|| PlanError::Target {
        field: "key_mode",
        problem: format!("`{}` is not an octal mode like 0600", target.key_mode),
    })?;
    let mut paths = target_paths(target);
    paths.extend(formats.paths());
    check_paths(&paths)?;
    let extra_mode = |field: &'static str, f: &ExtraFile| {
        parse_mode(&f.mode)
            .ok_or_else(|| PlanError::Target { field, problem: format!("`{}` is not an octal mode like 0600", f.mode) })
    };
    let bundle_mode = formats.bundle.as_ref().map(|b| extra_mode("bundle_mode", b)).transpose()?;
    let pkcs12_mode = formats.pkcs12.as_ref().map(|(f, _)| extra_mode("pkcs12_mode", f)).transpose()?;

    let mut payload = Payload::default();
    let mut files = Vec::with_capacity(3);
    let mut push = |role: Role, path: &str, mode: u32, bytes: Vec<u8>| {
        files.push(FilePlan {
            role,
            path: path.to_string(),
            mode,
            sha256: Digest::of(&bytes),
            size: bytes.len() as u64,
            holds: None,
        });
        payload.insert(role, bytes);
    };

    if let (Some(b), Some(mode)) = (&formats.bundle, bundle_mode) {
        let mut bytes = Vec::new();
        for part in
            [Some(material.certificate_pem.as_bytes()), chain_of(material), Some(material.private_key_pem.expose())]
                .into_iter()
                .flatten()
        {
            bytes.extend_from_slice(part);
            if !bytes.ends_with(b"\n") {
                bytes.push(b'\n');
            }
        }
        push(Role::Bundle, &b.path, mode, bytes);
    }
    if let (Some((f, ks)), Some(mode)) = (&formats.pkcs12, pkcs12_mode) {
        push(Role::Pkcs12, &f.path, mode, ks.bytes.expose().to_vec());
    }

    let mut cert = material.certificate_pem.clone().into_bytes();
    let chain = chain_of(material).and_then(|c| std::str::from_utf8(c).ok());
    match (chain, &target.chain_path) {
        (Some(chain), Some(chain_path)) => {
            push(Role::Cert, &target.cert_path, cert_mode, cert);
            push(Role::Chain, chain_path, cert_mode, chain.as_bytes().to_vec());
        }
        (Some(chain), None) => {
            if !cert.ends_with(b"\n") {
                cert.push(b'\n');
            }
            cert.extend_from_slice(chain.as_bytes());
            push(Role::Cert, &target.cert_path, cert_mode, cert);
        }
        (None, _) => push(Role::Cert, &target.cert_path, cert_mode, cert),
    }
    push(Role::Key, &target.key_path, key_mode, material.private_key_pem.expose().to_vec());
    files.sort_by_key(|f| f.role);
    if let Some((_, ks)) = &formats.pkcs12 {
        for f in files.iter_mut().filter(|f| f.role == Role::Pkcs12) {
            f.holds = Some(ks.holds);
        }
        payload.keystore = Some(KeystoreReader { password: ks.password.clone(), open: ks.open });
    }

    let verify = match (&target.verify_endpoint, facts.leaf_sha256) {
        (Some(endpoint), Some(expected)) => {
            Some(VerifyPlan { endpoint: endpoint.clone(), sni: target.verify_sni.clone(), expected })
        }
        (Some(_), None) => {
            return Err(PlanError::Target {
                field: "verify_endpoint",
                problem: "set, but the certificate's fingerprint is unknown".into(),
            });
        }
        (None, _) => None,
    };

    let plan = Plan {
        deployment_id: deployment_id.to_string(),
        target: target_name.to_string(),
        host: format!("{}:{}", target.host, target.port),
        remote: Remote { host: target.host.clone(), port: target.port, user: target.user.clone() },
        attempt,
        files,
        validate_command: target.validate_command.clone(),
        reload_command: target.reload_command.clone(),
        verify,
        new_not_before: facts.not_before,
        policy,
        lock: None,
        certificate: None,
        revert: None,
    };
    Ok((plan, payload))
}

/// The request's chain, when it has one that is not blank.
fn chain_of(material: &Material) -> Option<&[u8]> {
    material.chain_pem.as_deref().filter(|c| !c.trim().is_empty()).map(str::as_bytes)
}

/// Is this a valid deployment id (1–128 chars of `[A-Za-z0-9._:-]`)?
pub fn valid_deployment_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Is this the id of an attempt that may hold a target lock and name
/// backups: a deployment id, or a revert's (`<deployment id>.revert`)?
pub fn valid_attempt_id(id: &str) -> bool {
    valid_deployment_id(id) || id.strip_suffix(crate::revert::REVERT_SUFFIX).is_some_and(valid_deployment_id)
}

/// Names derived from a live path, shared by every host implementation so
/// that recovery can find them from the journal alone.
pub fn backup_path(live_path: &str, deployment_id: &str) -> String {
    format!("{live_path}.certdeploy-bak.{deployment_id}")
}

pub fn temp_path(live_path: &str, deployment_id: &str) -> String {
    format!("{live_path}.certdeploy-tmp.{deployment_id}")
}
