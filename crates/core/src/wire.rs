//! The two messages on the bus: deploy request and result event
//! (`schemas/deploy-request.v1.json`, `schemas/deploy-result.v1.json`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{Role, Secret, TargetSpec, Timestamp, valid_deployment_id};
use crate::report::{BackupStatus, Details, FailedStep, FileAction, Outcome, Report};
use crate::snapshot::RestoreStatus;
use crate::step::Step;

pub const REQUEST_SCHEMA: &str = "certdeploy.deploy-request.v1";
pub const RESULT_SCHEMA: &str = "certdeploy.deploy-result.v1";
/// Largest accepted request body.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// A decoded deploy request. The key is a [`Secret`]: never printed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub schema: String,
    pub deployment_id: String,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub target_spec: Option<TargetSpec>,
    /// A `[groups.NAME]` of the worker: deploy to each of its targets, in
    /// waves. Exactly one of `target`, `target_spec` and `group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub certificate_pem: String,
    /// The key in clear (PEM). Exactly one of this and `private_key_age`.
    #[serde(default)]
    pub private_key_pem: Option<SecretString>,
    /// The key sealed to the worker: an ASCII-armored age file whose
    /// plaintext is the PEM key.
    #[serde(default)]
    pub private_key_age: Option<String>,
    #[serde(default)]
    pub chain_pem: Option<String>,
    #[serde(default)]
    pub requested_at: Option<String>,
    /// Read the host and compare, change nothing: the result is `planned`
    /// (and the id is not recorded, so a later request with it deploys).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// The two ways a request carries its private key.
pub enum KeyField<'a> {
    /// PEM in clear.
    Pem(&'a str),
    /// ASCII-armored age file whose plaintext is the PEM.
    Age(&'a str),
}

/// A string secret as it arrives in JSON.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretString(pub Secret);

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(SecretString(Secret::new(s.into_bytes())))
    }
}

impl SecretString {
    pub fn new(s: String) -> Self {
        SecretString(Secret::new(s.into_bytes()))
    }
    /// The key as text (PEM is ASCII; invalid UTF-8 cannot come from JSON).
    pub fn expose_str(&self) -> &str {
        std::str::from_utf8(self.0.expose()).unwrap_or("")
    }
}

/// Why a request body was refused, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct RequestError {
    pub field: String,
    pub problem: String,
}

impl RequestError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        RequestError { field: field.into(), problem: problem.into() }
    }
}

/// Best-effort extraction of the id and target from a body that failed to
/// decode, so that the `rejected` result can still name them. Only values
/// that are themselves valid are returned.
pub fn salvage_ids(body: &[u8]) -> (Option<String>, Option<String>) {
    #[derive(Deserialize)]
    struct Ids {
        #[serde(default)]
        deployment_id: Option<serde_json::Value>,
        #[serde(default)]
        target: Option<serde_json::Value>,
    }
    if body.len() > MAX_MESSAGE_BYTES {
        return (None, None);
    }
    let Ok(ids) = serde_json::from_slice::<Ids>(body) else { return (None, None) };
    let id = ids.deployment_id.and_then(|v| v.as_str().map(str::to_string)).filter(|s| valid_deployment_id(s));
    let target = ids
        .target
        .and_then(|v| v.as_str().map(str::to_string))
        .filter(|s| s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic()));
    (id, target)
}

/// Longest `deployment_id` of a group request.
pub const MAX_GROUP_ID_LEN: usize = 64;

/// The `group` a body (perhaps invalid) names, if it is a string.
pub fn salvage_group(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct G {
        #[serde(default)]
        group: Option<serde_json::Value>,
    }
    if body.len() > MAX_MESSAGE_BYTES {
        return None;
    }
    let g = serde_json::from_slice::<G>(body).ok()?.group?;
    g.as_str().map(str::to_string).filter(|s| s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic()))
}

/// Whether a body (perhaps invalid) asks for a dry run (`"dry_run": true`).
pub fn salvage_dry_run(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Dry {
        #[serde(default)]
        dry_run: Option<serde_json::Value>,
    }
    body.len() <= MAX_MESSAGE_BYTES
        && serde_json::from_slice::<Dry>(body).is_ok_and(|d| d.dry_run == Some(serde_json::Value::Bool(true)))
}

/// Decode and structurally check a request body (size, UTF-8, JSON, schema
/// version, id, target). Certificate checks come after (pki crate).
pub fn decode_request(body: &[u8]) -> Result<DeployRequest, RequestError> {
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(RequestError::new(
            "body",
            format!("{} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes", body.len()),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| RequestError::new("body", format!("not valid UTF-8 ({e})")))?;
    // serde also accepts a struct as a JSON array of its fields in order;
    // the schema does not.
    if !text.trim_start().starts_with('{') {
        let found = match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => json_kind(&v).to_string(),
            Err(e) => return Err(describe_decode_error(text, &e)),
        };
        return Err(RequestError::new("body", format!("must be a JSON object, found {found}")));
    }
    let req: DeployRequest = serde_json::from_str(text).map_err(|e| describe_decode_error(text, &e))?;
    if req.target_spec.is_some() {
        let spec_is_object = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .is_some_and(|v| v.get("target_spec").is_some_and(serde_json::Value::is_object));
        if !spec_is_object {
            return Err(RequestError::new("target_spec", "must be an object"));
        }
    }
    if req.schema != REQUEST_SCHEMA {
        return Err(RequestError::new(
            "schema",
            format!("unknown schema version `{}` (expected `{REQUEST_SCHEMA}`)", printable(&req.schema)),
        ));
    }
    if !valid_deployment_id(&req.deployment_id) {
        return Err(RequestError::new("deployment_id", "must be 1-128 characters of [A-Za-z0-9._:-]"));
    }
    if let Some(g) = &req.group {
        if req.target.is_some() || req.target_spec.is_some() {
            return Err(RequestError::new("group", "give exactly one of `target`, `target_spec` and `group`"));
        }
        if !valid_deployment_id(g) {
            return Err(RequestError::new("group", "must be 1-128 characters of [A-Za-z0-9._:-]"));
        }
        // Child ids are `<deployment_id>:<target>`: the group's own id
        // leaves room for the target and cannot be mistaken for a child's.
        if req.deployment_id.len() > MAX_GROUP_ID_LEN || req.deployment_id.contains(':') {
            return Err(RequestError::new(
                "deployment_id",
                format!("a group request's id is at most {MAX_GROUP_ID_LEN} characters and has no `:`"),
            ));
        }
    }
    match (&req.target, &req.target_spec) {
        (Some(_), Some(_)) => {
            return Err(RequestError::new("target", "give either `target` or `target_spec`, not both"));
        }
        (None, None) if req.group.is_some() => {}
        (None, None) => return Err(RequestError::new("target", "missing (or give `target_spec` or `group`)")),
        // Target names follow the same rule as deployment ids (and as
        // `[targets.NAME]` in the configuration).
        (Some(t), None) if !valid_deployment_id(t) => {
            return Err(RequestError::new("target", "must be 1-128 characters of [A-Za-z0-9._:-]"));
        }
        _ => {}
    }
    match (&req.private_key_pem, &req.private_key_age) {
        (Some(_), Some(_)) => {
            return Err(RequestError::new(
                "private_key_age",
                "give either `private_key_pem` or `private_key_age`, not both",
            ));
        }
        (None, None) => {
            return Err(RequestError::new("private_key_pem", "missing required field (or give `private_key_age`)"));
        }
        _ => {}
    }
    Ok(req)
}

/// Top-level fields of a request: (name, required, kind).
const REQUEST_FIELDS: &[(&str, bool, Kind)] = &[
    ("schema", true, Kind::Str),
    ("deployment_id", true, Kind::Str),
    ("target", false, Kind::Str),
    ("target_spec", false, Kind::Object),
    ("certificate_pem", true, Kind::Str),
    ("private_key_pem", false, Kind::Str),
    ("private_key_age", false, Kind::Str),
    ("chain_pem", false, Kind::Str),
    ("requested_at", false, Kind::Str),
];

/// Fields of an inline `target_spec` ([`TargetSpec`]).
const TARGET_SPEC_FIELDS: &[(&str, bool, Kind)] = &[
    ("host", true, Kind::Str),
    ("port", false, Kind::U16),
    ("user", true, Kind::Str),
    ("cert_path", true, Kind::Str),
    ("key_path", true, Kind::Str),
    ("chain_path", false, Kind::Str),
    ("cert_mode", false, Kind::Str),
    ("key_mode", false, Kind::Str),
    ("validate_command", false, Kind::Str),
    ("reload_command", true, Kind::Str),
    ("verify_endpoint", false, Kind::Str),
    ("verify_sni", false, Kind::Str),
];

/// Keys of a `[targets.NAME]` table that an inline `target_spec` may not
/// have: the extra files (a keystore's password file would be a file on the
/// worker's machine named by whoever can publish).
const CONFIG_ONLY_FIELDS: &[&str] =
    &["bundle_path", "bundle_mode", "pkcs12_path", "pkcs12_mode", "pkcs12_password_file", "pkcs12_alias"];

#[derive(Copy, Clone, PartialEq, Eq)]
enum Kind {
    Str,
    Object,
    U16,
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Check one object against a field table; `prefix` is prepended to field
/// names (`target_spec.`). Values are never echoed (they may be key bytes).
fn check_fields(
    obj: &serde_json::Map<String, serde_json::Value>,
    fields: &[(&str, bool, Kind)],
    prefix: &str,
) -> Option<RequestError> {
    for k in obj.keys() {
        if !fields.iter().any(|(name, _, _)| name == k) {
            let expected: Vec<&str> = fields.iter().map(|(n, _, _)| *n).collect();
            // An empty name is shown as `""`, so the error still names it.
            let name = if k.is_empty() { "\"\"".to_string() } else { printable(k) };
            if !prefix.is_empty() && CONFIG_ONLY_FIELDS.contains(&k.as_str()) {
                return Some(RequestError::new(
                    format!("{prefix}{name}"),
                    "only a configured target ([targets.NAME] in the worker's configuration) may write a bundle or \
                     a PKCS#12 keystore: an inline target writes certificate, key and chain only",
                ));
            }
            return Some(RequestError::new(
                format!("{prefix}{name}"),
                format!("unknown field (expected one of: {})", expected.join(", ")),
            ));
        }
    }
    for &(name, required, kind) in fields {
        let field = || format!("{prefix}{name}");
        let v = match obj.get(name) {
            None if required => return Some(RequestError::new(field(), "missing required field")),
            None => continue,
            Some(serde_json::Value::Null) if !required => continue,
            Some(v) => v,
        };
        let problem = match (kind, v) {
            (Kind::Str, serde_json::Value::String(_)) => continue,
            (Kind::Object, serde_json::Value::Object(o)) => {
                match check_fields(o, TARGET_SPEC_FIELDS, &format!("{name}.")) {
                    Some(e) => return Some(e),
                    None => continue,
                }
            }
            (Kind::U16, serde_json::Value::Number(n)) if n.as_u64().is_some_and(|n| n <= u64::from(u16::MAX)) => {
                continue;
            }
            (Kind::U16, serde_json::Value::Number(_)) => "must be an integer from 0 to 65535".to_string(),
            (Kind::Str, v) => format!("must be a string, found {}", json_kind(v)),
            (Kind::Object, v) => format!("must be an object, found {}", json_kind(v)),
            (Kind::U16, v) => format!("must be an integer from 0 to 65535, found {}", json_kind(v)),
        };
        return Some(RequestError::new(field(), problem));
    }
    None
}

/// Turn a serde error into one that names the field. serde's own messages
/// name the offending *value* rather than the field for type errors (and
/// may echo it), so structural problems are located on a generic parse.
fn describe_decode_error(text: &str, e: &serde_json::Error) -> RequestError {
    use serde_json::error::Category;
    let generic = serde_json::from_str::<serde_json::Value>(text);
    if let Err(g) = &generic
        && g.to_string().starts_with("recursion limit exceeded")
    {
        return RequestError::new("body", format!("JSON nested too deeply (more than 128 levels): {g}"));
    }
    if matches!(e.classify(), Category::Syntax | Category::Eof | Category::Io) {
        return RequestError::new("body", format!("not valid JSON: {e}"));
    }
    match generic {
        Ok(serde_json::Value::Object(obj)) => {
            if let Some(err) = check_fields(&obj, REQUEST_FIELDS, "") {
                return err;
            }
        }
        Ok(v) => return RequestError::new("body", format!("must be a JSON object, found {}", json_kind(&v))),
        // The typed parse may fail on a field before it reaches a syntax
        // error that the generic parse sees: it is not JSON at all.
        Err(g) if matches!(g.classify(), Category::Syntax | Category::Eof) => {
            return RequestError::new("body", format!("not valid JSON: {g}"));
        }
        Err(_) => {}
    }
    // What the generic parse cannot see: duplicate keys (a generic map keeps
    // the last one), and anything unforeseen.
    let msg = e.to_string();
    let field = msg.strip_prefix("duplicate field `").and_then(|rest| rest.split('`').next()).map(|f| f.to_string());
    match field {
        Some(f) => {
            let nested =
                !REQUEST_FIELDS.iter().any(|(n, _, _)| *n == f) && TARGET_SPEC_FIELDS.iter().any(|(n, _, _)| *n == f);
            let field = if nested { format!("target_spec.{f}") } else { printable(&f) };
            RequestError::new(field, "duplicate field (a key may appear only once)")
        }
        None => RequestError::new("body", format!("invalid request: {}", printable_long(&msg))),
    }
}

/// Like [`printable`] with room for a whole error message.
fn printable_long(s: &str) -> String {
    let mut out: String = s.chars().take(300).flat_map(char::escape_debug).collect();
    if s.chars().count() > 300 {
        out.push('…');
    }
    out
}

/// Shorten and escape a value taken from a message before echoing it.
pub fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// Serialize a request for publishing (used by `submit`).
pub fn encode_request(
    deployment_id: &str,
    target: &str,
    certificate_pem: &str,
    key: KeyField<'_>,
    chain_pem: Option<&str>,
    requested_at: Timestamp,
) -> Vec<u8> {
    let mut v = serde_json::json!({
        "schema": REQUEST_SCHEMA,
        "deployment_id": deployment_id,
        "target": target,
        "certificate_pem": certificate_pem,
        "requested_at": requested_at.rfc3339(),
    });
    match key {
        KeyField::Pem(k) => v["private_key_pem"] = serde_json::Value::String(k.to_string()),
        KeyField::Age(k) => v["private_key_age"] = serde_json::Value::String(k.to_string()),
    }
    if let Some(c) = chain_pem {
        v["chain_pem"] = serde_json::Value::String(c.to_string());
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The result event published for every request. Consumers ignore fields
/// they do not know (later versions may add some).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultEvent {
    pub schema: String,
    pub deployment_id: String,
    pub target: String,
    pub host: String,
    pub outcome: Outcome,
    pub success: bool,
    pub message: String,
    pub metadata: BTreeMap<String, String>,
    pub attempts: u32,
    /// How many deployments shared this deployment's validate and reload
    /// (1 when alone); absent when it never got to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_shared_with: Option<u32>,
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
    pub worker: String,
    /// The broker-validated AMQP `user_id` of the request, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
    /// A group member's result: the group's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A group member's result: the group request's `deployment_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// A revert's result: the deployment it reverts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverts: Option<String>,
}

impl ResultEvent {
    pub fn from_report(r: &Report, worker: &str) -> ResultEvent {
        ResultEvent {
            schema: RESULT_SCHEMA.to_string(),
            deployment_id: r.deployment_id.clone(),
            target: r.target.clone(),
            host: r.host.clone(),
            outcome: r.outcome,
            success: r.outcome.success(),
            message: r.message.clone(),
            metadata: r.metadata(),
            attempts: r.attempts,
            reload_shared_with: r.reload_shared_with,
            started_at: r.started_at.rfc3339(),
            finished_at: r.finished_at.rfc3339(),
            duration_ms: r.finished_at.since(r.started_at),
            worker: worker.to_string(),
            submitted_by: None,
            group: None,
            parent_id: None,
            reverts: r.reverts.clone(),
        }
    }

    /// The same event as a member's of group `group` (request `parent_id`).
    pub fn in_group(mut self, group: &str, parent_id: &str) -> ResultEvent {
        self.group = Some(group.to_string());
        self.parent_id = Some(parent_id.to_string());
        self
    }

    /// The same event naming who submitted the request.
    pub fn submitted_by(mut self, user: Option<&str>) -> ResultEvent {
        self.submitted_by = user.map(str::to_string);
        self
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Report {
    /// The result's `metadata` map: [`Report::details`] as strings.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        self.details.metadata()
    }
}

impl BackupStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupStatus::NotApplicable => "n/a",
            BackupStatus::Snapshotted => "snapshotted",
            BackupStatus::NoPreExisting => "no_pre_existing",
            BackupStatus::Rollback(r) => r.as_str(),
        }
    }

    fn parse(s: &str) -> Option<BackupStatus> {
        let restores = [
            RestoreStatus::Restored,
            RestoreStatus::Removed,
            RestoreStatus::RestoreFailed,
            RestoreStatus::RemoveFailed,
        ];
        [BackupStatus::NotApplicable, BackupStatus::Snapshotted, BackupStatus::NoPreExisting]
            .into_iter()
            .chain(restores.map(BackupStatus::Rollback))
            .find(|b| b.as_str() == s)
    }
}

impl FailedStep {
    pub fn as_str(self) -> &'static str {
        match self {
            FailedStep::Step(s) => s.as_str(),
            FailedStep::Request => "validate_request",
            FailedStep::DeliveryLimit => "delivery_limit",
            FailedStep::Halted => "halted",
        }
    }

    fn parse(s: &str) -> Option<FailedStep> {
        Step::ALL
            .map(FailedStep::Step)
            .into_iter()
            .chain([FailedStep::Request, FailedStep::DeliveryLimit, FailedStep::Halted])
            .find(|f| f.as_str() == s)
    }
}

/// Per-role keys: `backup_status_cert`, `backup_path_key`, ...
const BACKUP_STATUS: &str = "backup_status_";
const BACKUP_PATH: &str = "backup_path_";
const PLAN: &str = "plan_";

impl Details {
    /// The result's `metadata` map.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let mut m = self.other.clone();
        let mut set = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        for (role, status) in &self.backups {
            set(&format!("{BACKUP_STATUS}{role}"), Some(status.as_str().to_string()));
        }
        for (role, path) in &self.backups_left {
            set(&format!("{BACKUP_PATH}{role}"), Some(path.clone()));
        }
        let flag = |b: bool| b.then(|| "true".to_string());
        set("failed_step", self.failed_step.map(|s| s.as_str().to_string()));
        set("reload_error", self.reload_error.clone());
        set("validate_error", self.validate_error.clone());
        set("retry_reload_error", self.retry_reload_error.clone());
        set("rollback_error", self.rollback_error.clone());
        set("backup_cleanup_error", self.backup_cleanup_error.clone());
        set("prune_error", self.prune_error.clone());
        set("rolled_back", self.rolled_back.map(|b| b.to_string()));
        set("daemon_state_unknown", flag(self.daemon_state_unknown));
        set("manual_action_required", flag(self.manual_action_required));
        set("original_verified", self.original_verified.map(|b| b.to_string()));
        set("recovered", flag(self.recovered));
        set("existing_not_before", self.existing_not_before.map(|n| n.to_string()));
        set("new_not_before", self.new_not_before.map(|n| n.to_string()));
        for (role, action) in &self.plans {
            set(&format!("{PLAN}{role}"), Some(action.as_str().to_string()));
        }
        set("plan_supersede", self.plan_supersede.map(|b| b.to_string()));
        set("plan_outcome", self.plan_outcome.map(|o| o.as_str().to_string()));
        m
    }

    /// Read a `metadata` map back. Lossless: a key this version does not
    /// know, or a value that would not be spelled the same way again, is
    /// kept in [`Details::other`], so `from_metadata(m).metadata() == m`.
    pub fn from_metadata(map: BTreeMap<String, String>) -> Details {
        /// Store `value` if there is one; say whether there was.
        fn put<T>(field: &mut Option<T>, value: Option<T>) -> bool {
            let read = value.is_some();
            if read {
                *field = value;
            }
            read
        }
        /// `v` read by `parse`, if writing it back gives `v` again.
        fn exact<T: ToString>(v: &str, parse: impl Fn(&str) -> Option<T>) -> Option<T> {
            parse(v).filter(|t| t.to_string() == v)
        }
        /// A flag is spelled `true`; absent means false.
        fn flag(field: &mut bool, v: &str) -> bool {
            *field = v == "true";
            *field
        }
        let role = |s: &str| Role::EVERY.into_iter().find(|r| r.as_str() == s);
        let boolean = |v: &str| exact(v, |v| v.parse::<bool>().ok());
        let number = |v: &str| exact(v, |v| v.parse::<i64>().ok());
        let mut d = Details::default();
        for (k, v) in map {
            let read = match k.as_str() {
                "failed_step" => put(&mut d.failed_step, FailedStep::parse(&v)),
                "reload_error" => put(&mut d.reload_error, Some(v.clone())),
                "validate_error" => put(&mut d.validate_error, Some(v.clone())),
                "retry_reload_error" => put(&mut d.retry_reload_error, Some(v.clone())),
                "rollback_error" => put(&mut d.rollback_error, Some(v.clone())),
                "backup_cleanup_error" => put(&mut d.backup_cleanup_error, Some(v.clone())),
                "prune_error" => put(&mut d.prune_error, Some(v.clone())),
                "rolled_back" => put(&mut d.rolled_back, boolean(&v)),
                "daemon_state_unknown" => flag(&mut d.daemon_state_unknown, &v),
                "manual_action_required" => flag(&mut d.manual_action_required, &v),
                "original_verified" => put(&mut d.original_verified, boolean(&v)),
                "recovered" => flag(&mut d.recovered, &v),
                "existing_not_before" => put(&mut d.existing_not_before, number(&v)),
                "new_not_before" => put(&mut d.new_not_before, number(&v)),
                "plan_supersede" => put(&mut d.plan_supersede, boolean(&v)),
                "plan_outcome" => put(&mut d.plan_outcome, Outcome::ALL.into_iter().find(|o| o.as_str() == v)),
                _ => {
                    if let Some((r, s)) = k.strip_prefix(BACKUP_STATUS).and_then(role).zip(BackupStatus::parse(&v)) {
                        d.backups.insert(r, s);
                        true
                    } else if let Some(r) = k.strip_prefix(BACKUP_PATH).and_then(role) {
                        d.backups_left.insert(r, v.clone());
                        true
                    } else if let Some((r, a)) = k
                        .strip_prefix(PLAN)
                        .and_then(role)
                        .zip([FileAction::Write, FileAction::Unchanged].into_iter().find(|a| a.as_str() == v))
                    {
                        d.plans.insert(r, a);
                        true
                    } else {
                        false
                    }
                }
            };
            if !read {
                d.other.insert(k, v);
            }
        }
        d
    }
}

impl From<Details> for BTreeMap<String, String> {
    fn from(d: Details) -> Self {
        d.metadata()
    }
}

impl From<BTreeMap<String, String>> for Details {
    fn from(m: BTreeMap<String, String>) -> Self {
        Details::from_metadata(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Journals hold reports as the `metadata` map; a redelivery re-publishes
    /// them from the typed [`Details`]. Whatever a map holds (keys of other
    /// versions, values spelled otherwise) must come out exactly as it went in.
    #[test]
    fn metadata_reads_back_exactly_whatever_it_holds() {
        let keys = [
            "backup_status_cert",
            "backup_status_key",
            "backup_status_chain",
            "backup_status_bundle",
            "backup_status_pkcs12",
            "backup_status_other",
            "backup_path_cert",
            "backup_path_chain",
            "backup_path_pkcs12",
            "backup_path_",
            "failed_step",
            "reload_error",
            "validate_error",
            "retry_reload_error",
            "rollback_error",
            "backup_cleanup_error",
            "prune_error",
            "rolled_back",
            "daemon_state_unknown",
            "manual_action_required",
            "original_verified",
            "recovered",
            "existing_not_before",
            "new_not_before",
            "plan_cert",
            "plan_chain",
            "plan_",
            "plan_supersede",
            "plan_outcome",
            "attempt",
            "",
        ];
        let values = [
            "",
            "true",
            "false",
            "True",
            "n/a",
            "snapshotted",
            "no_pre_existing",
            "restored",
            "removed",
            "restore_failed",
            "remove_failed",
            "lock",
            "validate_request",
            "delivery_limit",
            "retry_reload",
            "12",
            "-3",
            "0012",
            "+5",
            "9223372036854775808",
            "exit status 1 (output: nginx: [emerg] ...)",
            "write",
            "unchanged",
            "planned",
            "superseded",
        ];
        let round_trip = |m: BTreeMap<String, String>| {
            assert_eq!(Details::from_metadata(m.clone()).metadata(), m);
        };
        for k in keys {
            for v in values {
                round_trip(BTreeMap::from([(k.to_string(), v.to_string())]));
            }
        }
        for shift in 0..values.len() {
            round_trip(
                keys.iter()
                    .enumerate()
                    .map(|(i, k)| (k.to_string(), values[(i + shift) % values.len()].to_string()))
                    .collect(),
            );
        }
        // What this version writes is read into the typed fields.
        let m: BTreeMap<String, String> = [
            ("backup_status_cert", "restore_failed"),
            ("backup_path_cert", "/etc/ssl/site.pem.certdeploy-bak.d1"),
            ("failed_step", "reload"),
            ("rolled_back", "false"),
            ("manual_action_required", "true"),
            ("existing_not_before", "-5"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let d = Details::from_metadata(m);
        assert!(d.other.is_empty(), "{:?}", d.other);
        assert_eq!(d.backups[&Role::Cert], BackupStatus::Rollback(RestoreStatus::RestoreFailed));
        assert_eq!(d.failed_step, Some(FailedStep::Step(Step::Reload)));
        assert_eq!((d.rolled_back, d.manual_action_required, d.existing_not_before), (Some(false), true, Some(-5)));
    }

    #[test]
    fn an_inline_target_may_not_have_a_bundle_or_a_keystore() {
        for key in CONFIG_ONLY_FIELDS {
            let body = serde_json::json!({
                "schema": REQUEST_SCHEMA, "deployment_id": "d1", "certificate_pem": "c", "private_key_pem": "k",
                "target_spec": { "host": "h", "user": "u", "cert_path": "/a", "key_path": "/b",
                                 "reload_command": "true", *key: "/etc/certdeploy/amqp.pass" },
            });
            let e = decode_request(&serde_json::to_vec(&body).unwrap()).unwrap_err();
            assert_eq!(e.field, format!("target_spec.{key}"), "{e}");
            assert!(e.problem.starts_with("only a configured target"), "{e}");
        }
    }

    #[test]
    fn broken_json_is_reported_as_such_even_after_an_unknown_key() {
        for body in [&br#"{"this is": not json"#[..], b"{\"schema\": ", b"not json at all"] {
            let e = decode_request(body).unwrap_err();
            assert_eq!(e.field, "body", "{e}");
            assert!(e.problem.starts_with("not valid JSON"), "{e}");
        }
    }
}
