//! Fuzz entry points, shared by the cargo-fuzz targets (`fuzz_targets/`)
//! and by the stable-toolchain replay test
//! (`crates/certdeploy/tests/fuzz_replay.rs`, which includes this file).
//!
//! Each entry point returns `Ok` for an accepted input and a *typed* error
//! for a refused one; a panic is a bug. Invariants that must hold for every
//! input are asserted here, so the fuzzer finds their violations too.

use certdeploy::config::{Config, ConfigError};
use certdeploy::intake::{Rejection, validate_body};
use certdeploy_core::wire::{RequestError, decode_request};
use certdeploy_core::{Deployment, Record, Timestamp};

/// Fixed "now" (2026-11-28T00:00:00Z) so that results do not depend on the
/// day the corpus is replayed. The corpus certificates are valid then.
pub const NOW_S: u64 = 1_795_824_000;

/// The worker configuration requests are checked against: one configured
/// target, inline targets enabled with allowlists.
pub const REQUEST_CONFIG: &str = r#"
[worker]
journal_path = "/tmp/certdeploy-fuzz-unused"
allow_inline_targets = true
inline_host_allowlist = ["*.internal", "10.0.0.?"]
inline_command_allowlist = ["systemctl reload nginx", "nginx -t"]
inline_path_allowlist = ["/etc/ssl/*"]

[targets.web1]
host = "web1.internal"
user = "deploy"
cert_path = "/etc/ssl/site.pem"
key_path = "/etc/ssl/site.key"
chain_path = "/etc/ssl/chain.pem"
reload_command = "systemctl reload nginx"
validate_command = "nginx -t"
"#;

pub fn request_config() -> Config {
    Config::parse(REQUEST_CONFIG, "fuzz.toml", &[]).expect("fuzz request config")
}

/// Decode and validate a message body exactly as the worker does.
pub fn request(data: &[u8]) -> Result<(), Box<Rejection>> {
    thread_local! {
        static CFG: Config = request_config();
    }
    CFG.with(|cfg| request_with(data, cfg))
}

pub fn request_with(data: &[u8], cfg: &Config) -> Result<(), Box<Rejection>> {
    let decoded = decode_request(data);
    let validated = validate_body(data, cfg, Timestamp(NOW_S * 1000));
    match (&decoded, &validated) {
        (Err(d), Err(v)) => assert_eq!(d, &v.error, "validate_body reports the decode error"),
        (Err(d), Ok(_)) => panic!("validate_body accepted what decode_request refused: {d}"),
        _ => {}
    }
    let v = match validated {
        Ok(v) => v,
        Err(r) => {
            check_error(&r.error);
            if let Some(id) = &r.deployment_id {
                assert!(certdeploy_core::valid_deployment_id(id), "salvaged id {id:?} is invalid");
            }
            return Err(Box::new(r));
        }
    };
    // Accepted: it must plan, and every command is configured or allowlisted.
    let (plan, _payload) = v.plan(1).unwrap_or_else(|e| panic!("validated request does not plan: {e}"));
    let allowed = |c: &str| {
        cfg.worker.inline_command_allowlist.iter().any(|a| a == c)
            || cfg.targets.values().any(|t| t.reload_command == c || t.validate_command.as_deref() == Some(c))
    };
    assert!(allowed(&plan.reload_command), "reload command {:?} not allowed", plan.reload_command);
    if let Some(c) = &plan.validate_command {
        assert!(allowed(c), "validate command {c:?} not allowed");
    }
    for f in &plan.files {
        assert!(certdeploy_core::check_remote_path(&f.path).is_ok(), "unsafe path {:?}", f.path);
    }
    Ok(())
}

fn check_error(e: &RequestError) {
    assert!(!e.field.is_empty(), "error without a field: {e}");
    assert!(!e.problem.is_empty(), "error without a problem: {e}");
    assert!(!e.field.chars().any(char::is_control), "field name with control characters: {:?}", e.field);
}

/// The journal's value codec: one format-version byte, then the JSON of a
/// [`Record`] (see `crates/journal/src/codec.rs`). Several values may be
/// given, one per line; if all decode they are replayed the way recovery
/// does, which must return a typed error or a state, never panic.
pub fn journal_record(data: &[u8]) -> Result<usize, JournalFuzzError> {
    let mut records = Vec::new();
    for (i, value) in data.split(|b| *b == b'\n').enumerate() {
        records.push(decode_record(&format!("fuzz#{i}"), value).map_err(JournalFuzzError::Decode)?);
    }
    match Deployment::replay(&records) {
        Ok(_) => Ok(records.len()),
        Err(e) => Err(JournalFuzzError::Replay(e)),
    }
}

/// Why a journal input was refused.
#[derive(Debug)]
pub enum JournalFuzzError {
    Decode(certdeploy_journal::Error),
    Replay(certdeploy_core::CoreError),
}

/// Mirror of the journal crate's private `codec::decode` for records.
pub fn decode_record(key: &str, bytes: &[u8]) -> Result<Record, certdeploy_journal::Error> {
    use certdeploy_journal::{Error, FORMAT_VERSION};
    match bytes.split_first() {
        None => Err(Error::Corrupt { what: "record", key: key.to_string(), problem: "empty value".into() }),
        Some((&FORMAT_VERSION, body)) => serde_json::from_slice(body).map_err(|e| Error::Corrupt {
            what: "record",
            key: key.to_string(),
            problem: e.to_string(),
        }),
        Some((&found, _)) => {
            Err(Error::UnknownVersion { what: "record", key: key.to_string(), found, supported: FORMAT_VERSION })
        }
    }
}

/// `certdeploy.toml` parsing, with a fixed set of `CERTDEPLOY_*` overrides
/// taken from lines `#ENV KEY=VALUE` of the input itself.
pub fn config(data: &[u8]) -> Result<Config, ConfigError> {
    let text = std::str::from_utf8(data).map_err(|e| ConfigError {
        file: "fuzz.toml".into(),
        key: "-".into(),
        problem: format!("cannot read: {e}"),
    })?;
    let env: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("#ENV "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let r = Config::parse(text, "fuzz.toml", &env);
    match &r {
        Ok(cfg) => {
            // Every accepted target is safe to deploy to.
            for (name, t) in &cfg.targets {
                for p in [Some(&t.cert_path), Some(&t.key_path), t.chain_path.as_ref()].into_iter().flatten() {
                    assert!(certdeploy_core::check_remote_path(p).is_ok(), "target {name}: unsafe path {p:?}");
                }
                assert!(!t.host.starts_with('-'), "target {name}: option-like host");
                assert!(certdeploy_core::parse_mode(&t.key_mode).is_some());
            }
        }
        Err(e) => {
            assert!(!e.key.is_empty() && !e.problem.is_empty(), "untyped config error: {e}");
        }
    }
    r
}
