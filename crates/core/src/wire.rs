//! The two messages on the bus: deploy request and result event
//! (`schemas/deploy-request.v1.json`, `schemas/deploy-result.v1.json`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::event::{Outcome, Report};
use crate::model::{Secret, TargetSpec, Timestamp, valid_deployment_id};

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
    pub certificate_pem: String,
    pub private_key_pem: SecretString,
    #[serde(default)]
    pub chain_pem: Option<String>,
    #[serde(default)]
    pub requested_at: Option<String>,
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
    let req: DeployRequest = serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        let field = msg.split('`').nth(1).filter(|_| msg.contains("field")).unwrap_or("body").to_string();
        RequestError::new(field, format!("invalid JSON request: {msg}"))
    })?;
    if req.schema != REQUEST_SCHEMA {
        return Err(RequestError::new(
            "schema",
            format!("unknown schema version `{}` (expected `{REQUEST_SCHEMA}`)", printable(&req.schema)),
        ));
    }
    if !valid_deployment_id(&req.deployment_id) {
        return Err(RequestError::new("deployment_id", "must be 1-128 characters of [A-Za-z0-9._:-]"));
    }
    match (&req.target, &req.target_spec) {
        (Some(_), Some(_)) => {
            return Err(RequestError::new("target", "give either `target` or `target_spec`, not both"));
        }
        (None, None) => return Err(RequestError::new("target", "missing (or give `target_spec`)")),
        (Some(t), None) if t.is_empty() || t.len() > 128 => {
            return Err(RequestError::new("target", "must be 1-128 characters"));
        }
        _ => {}
    }
    Ok(req)
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
    private_key_pem: &str,
    chain_pem: Option<&str>,
    requested_at: Timestamp,
) -> Vec<u8> {
    let mut v = serde_json::json!({
        "schema": REQUEST_SCHEMA,
        "deployment_id": deployment_id,
        "target": target,
        "certificate_pem": certificate_pem,
        "private_key_pem": private_key_pem,
        "requested_at": requested_at.rfc3339(),
    });
    if let Some(c) = chain_pem {
        v["chain_pem"] = serde_json::Value::String(c.to_string());
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The result event published for every request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
    pub worker: String,
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
            metadata: r.metadata.clone(),
            attempts: r.attempts,
            started_at: r.started_at.rfc3339(),
            finished_at: r.finished_at.rfc3339(),
            duration_ms: r.finished_at.since(r.started_at),
            worker: worker.to_string(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Report {
    /// The report of a request refused before any remote contact.
    pub fn rejected(deployment_id: &str, target: &str, host: &str, message: String, at: Timestamp) -> Report {
        let mut metadata = BTreeMap::new();
        for role in ["cert", "key", "chain"] {
            metadata.insert(format!("backup_status_{role}"), "n/a".to_string());
        }
        metadata.insert("failed_step".into(), "validate_request".into());
        Report {
            deployment_id: deployment_id.to_string(),
            target: target.to_string(),
            host: host.to_string(),
            outcome: Outcome::Rejected,
            message,
            metadata,
            attempts: 1,
            started_at: at,
            finished_at: at,
        }
    }
}
