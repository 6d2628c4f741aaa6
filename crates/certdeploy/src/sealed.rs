//! Private keys sealed with age (age-encryption.org v1, X25519 recipients,
//! ASCII armor), so that no key crosses the bus in clear.
//!
//! A request carries `private_key_age`: an armored age file whose plaintext
//! is the PEM key, sealed to the worker's recipient (`age1…`). The worker
//! opens it with its identities (`[worker] key_identities`) into a
//! [`Secret`] that lives only in memory. The worker's own copies of a
//! request (dead letters, deferred requests) never hold a key in clear:
//! [`redact_body`] and [`seal_body`].

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use age::x25519;
use certdeploy_core::Secret;

/// The JSON field of a key in clear.
pub const PEM_FIELD: &str = "private_key_pem";
/// The JSON field of a sealed key.
pub const AGE_FIELD: &str = "private_key_age";

/// Largest plaintext accepted from a sealed key (a PEM key is a few KiB).
const MAX_PLAINTEXT: u64 = 64 * 1024;

/// Why the identities could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: mode {mode:04o} gives group or others access; an identity file must have no group or other \
         permission bits (chmod 0600 or 0400)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}: line {line} is not an age X25519 identity (AGE-SECRET-KEY-1…)")]
    Parse { path: PathBuf, line: usize },
    #[error("{path}: holds no identity")]
    Empty { path: PathBuf },
}

/// The worker's age identities, in configuration order.
#[derive(Clone, Default)]
pub struct Keyring {
    identities: Vec<x25519::Identity>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keyring({} identities)", self.identities.len())
    }
}

/// Why a sealed key could not be opened (names no key material).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("this worker has no key_identities to open a sealed key with")]
    NoIdentities,
    #[error("not an ASCII-armored age file: {0}")]
    Format(String),
    #[error("sealed to a recipient that none of this worker's {0} identities opens")]
    NoMatchingIdentity(usize),
    #[error("cannot be decrypted: {0}")]
    Decrypt(String),
    #[error("its plaintext is larger than {MAX_PLAINTEXT} bytes")]
    TooLarge,
    #[error("its plaintext is not text (a PEM key is)")]
    NotText,
}

impl Keyring {
    /// Read every identity file, refusing one that group or others may
    /// access (a systemd credential, 0400, is fine).
    pub fn load(paths: &[PathBuf]) -> Result<Keyring, KeyringError> {
        use std::os::unix::fs::PermissionsExt;
        let mut identities = Vec::new();
        for path in paths {
            let read = |source| KeyringError::Read { path: path.clone(), source };
            let meta = std::fs::metadata(path).map_err(read)?;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(KeyringError::Permissions { path: path.clone(), mode });
            }
            let text = Secret::new(std::fs::read(path).map_err(read)?);
            let text =
                std::str::from_utf8(text.expose()).map_err(|_| KeyringError::Parse { path: path.clone(), line: 1 })?;
            let before = identities.len();
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let id = x25519::Identity::from_str(line)
                    .map_err(|_| KeyringError::Parse { path: path.clone(), line: n + 1 })?;
                identities.push(id);
            }
            if identities.len() == before {
                return Err(KeyringError::Empty { path: path.clone() });
            }
        }
        Ok(Keyring { identities })
    }

    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }

    pub fn len(&self) -> usize {
        self.identities.len()
    }

    /// The recipient of the first identity: what the worker seals its own
    /// copies of a request to.
    pub fn first_recipient(&self) -> Option<x25519::Recipient> {
        self.identities.first().map(x25519::Identity::to_public)
    }

    /// Decrypt an armored age file with any of the identities.
    pub fn open(&self, armored: &str) -> Result<Secret, OpenError> {
        if self.identities.is_empty() {
            return Err(OpenError::NoIdentities);
        }
        let reader = age::armor::ArmoredReader::new(armored.as_bytes());
        let decryptor = age::Decryptor::new_buffered(reader).map_err(|e| OpenError::Format(e.to_string()))?;
        let mut stream =
            decryptor.decrypt(self.identities.iter().map(|i| i as &dyn age::Identity)).map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => OpenError::NoMatchingIdentity(self.identities.len()),
                other => OpenError::Decrypt(other.to_string()),
            })?;
        // Sized once: no reallocation leaves a copy of the key behind.
        let mut buf = Vec::with_capacity(MAX_PLAINTEXT as usize + 1);
        let read = (&mut stream).take(MAX_PLAINTEXT + 1).read_to_end(&mut buf);
        let plain = Secret::new(buf);
        read.map_err(|e| OpenError::Decrypt(e.to_string()))?;
        if plain.expose().len() as u64 > MAX_PLAINTEXT {
            return Err(OpenError::TooLarge);
        }
        if std::str::from_utf8(plain.expose()).is_err() {
            return Err(OpenError::NotText);
        }
        Ok(plain)
    }
}

/// Parse an `age1…` X25519 recipient.
pub fn parse_recipient(s: &str) -> Result<x25519::Recipient, String> {
    x25519::Recipient::from_str(s.trim()).map_err(|e| format!("`{}` is not an age X25519 recipient: {e}", s.trim()))
}

/// Seal `plaintext` to every recipient, ASCII-armored.
pub fn seal(recipients: &[x25519::Recipient], plaintext: &[u8]) -> Result<String, String> {
    let encryptor = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|e| format!("sealing the key: {e}"))?;
    let mut out = Vec::with_capacity(plaintext.len() * 2 + 512);
    let armor = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)
        .map_err(|e| format!("sealing the key: {e}"))?;
    let mut w = encryptor.wrap_output(armor).map_err(|e| format!("sealing the key: {e}"))?;
    w.write_all(plaintext).map_err(|e| format!("sealing the key: {e}"))?;
    w.finish().and_then(|a| a.finish()).map_err(|e| format!("sealing the key: {e}"))?;
    String::from_utf8(out).map_err(|_| "sealing the key: armor is not text".to_string())
}

/// Write a new identity to `out` (created, mode 0600; an existing file is
/// never overwritten) in the format of `age-keygen`, and return its
/// recipient.
pub fn keygen(out: &Path) -> std::io::Result<x25519::Recipient> {
    use std::os::unix::fs::OpenOptionsExt;
    let id = x25519::Identity::generate();
    let recipient = id.to_public();
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(out)?;
    let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let text = Secret::new(
        format!("# created: {created}\n# public key: {recipient}\n{}\n", id.to_string().expose_secret()).into_bytes(),
    );
    f.write_all(text.expose())?;
    f.sync_all()?;
    Ok(recipient)
}

/// A copy of a request body that holds no key in clear: `private_key_pem`
/// removed from a JSON object (the sealed form stays), and every PEM
/// private key block cut out of every other string in it (a key pasted
/// into the wrong field, or an unknown one); a body that is not a JSON
/// object has every PEM private key block cut out.
pub fn redact_body(body: &[u8]) -> Vec<u8> {
    if let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_slice::<serde_json::Value>(body) {
        obj.remove(PEM_FIELD);
        let mut v = serde_json::Value::Object(obj);
        cut_pem_keys_in(&mut v);
        return serde_json::to_vec(&v).unwrap_or_default();
    }
    cut_pem_keys(body)
}

/// [`cut_pem_keys`] on every string of a JSON value.
fn cut_pem_keys_in(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s.contains("PRIVATE KEY-----") => {
            *s = String::from_utf8_lossy(&cut_pem_keys(s.as_bytes())).into_owned();
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(cut_pem_keys_in),
        serde_json::Value::Object(o) => o.values_mut().for_each(cut_pem_keys_in),
        _ => {}
    }
}

/// Replace every `-----BEGIN … PRIVATE KEY-----` … `-----END … PRIVATE
/// KEY-----` span (and an unterminated one up to the end) by `[redacted]`.
fn cut_pem_keys(body: &[u8]) -> Vec<u8> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const END: &[u8] = b"-----END ";
    const TAIL: &[u8] = b"PRIVATE KEY-----";
    let find = |hay: &[u8], needle: &[u8], from: usize| -> Option<usize> {
        hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
    };
    let mut out = Vec::with_capacity(body.len());
    let mut at = 0;
    while let Some(b) = find(body, BEGIN, at) {
        // A BEGIN line of a private key: its label ends with TAIL within the line.
        let line_end = find(body, b"-----", b + BEGIN.len()).map(|e| e + 5);
        let is_key = line_end.is_some_and(|e| body[..e].ends_with(TAIL) && e - b < 80);
        if !is_key {
            out.extend_from_slice(&body[at..b + BEGIN.len()]);
            at = b + BEGIN.len();
            continue;
        }
        out.extend_from_slice(&body[at..b]);
        out.extend_from_slice(b"[redacted]");
        at = match find(body, END, b).and_then(|e| find(body, TAIL, e).map(|t| t + TAIL.len())) {
            Some(end) => end,
            None => body.len(),
        };
    }
    out.extend_from_slice(&body[at..]);
    out
}

/// A request body whose `private_key_pem` is replaced by the same key
/// sealed to `recipient`; `None` when the body has no key in clear (or is
/// not a JSON object).
pub fn seal_body(body: &[u8], recipient: &x25519::Recipient) -> Option<Result<Vec<u8>, String>> {
    let serde_json::Value::Object(mut obj) = serde_json::from_slice::<serde_json::Value>(body).ok()? else {
        return None;
    };
    let serde_json::Value::String(pem) = obj.remove(PEM_FIELD)? else { return None };
    let pem = Secret::new(pem.into_bytes());
    Some(seal(std::slice::from_ref(recipient), pem.expose()).map(|armored| {
        obj.insert(AGE_FIELD.into(), serde_json::Value::String(armored));
        serde_json::to_vec(&obj).unwrap_or_default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";

    #[test]
    fn seal_then_open_round_trips_and_a_stranger_cannot() {
        let id = x25519::Identity::generate();
        let ring = Keyring { identities: vec![x25519::Identity::generate(), id.clone()] };
        let sealed = seal(&[id.to_public()], KEY.as_bytes()).unwrap();
        assert!(sealed.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"), "{sealed}");
        assert_eq!(ring.open(&sealed).unwrap().expose(), KEY.as_bytes());
        let stranger = Keyring { identities: vec![x25519::Identity::generate()] };
        assert!(matches!(stranger.open(&sealed), Err(OpenError::NoMatchingIdentity(1))));
        assert!(matches!(ring.open("not age"), Err(OpenError::Format(_))));
        assert!(matches!(Keyring::default().open(&sealed), Err(OpenError::NoIdentities)));
    }

    #[test]
    fn redaction_removes_the_clear_key_and_keeps_the_rest() {
        let body = serde_json::to_vec(&serde_json::json!({"deployment_id": "a", "private_key_pem": KEY})).unwrap();
        let r = String::from_utf8(redact_body(&body)).unwrap();
        assert!(!r.contains("PRIVATE KEY") && r.contains("\"deployment_id\":\"a\""), "{r}");
        let mut raw = b"\xff garbage ".to_vec();
        raw.extend_from_slice(&body);
        let r = String::from_utf8_lossy(&redact_body(&raw)).into_owned();
        assert!(!r.contains("MIGHAgEAMBMG") && r.contains("[redacted]") && r.contains("deployment_id"), "{r}");
        let cut =
            String::from_utf8(cut_pem_keys(b"x -----BEGIN CERTIFICATE----- y -----BEGIN EC PRIVATE KEY-----\nabc"))
                .unwrap();
        assert_eq!(cut, "x -----BEGIN CERTIFICATE----- y [redacted]");
        let sealed_only = serde_json::to_vec(&serde_json::json!({"private_key_age": "x"})).unwrap();
        assert_eq!(redact_body(&sealed_only), sealed_only);
        // A key pasted into another field (or an unknown one) is cut too.
        let misplaced =
            serde_json::to_vec(&serde_json::json!({"chain_pem": KEY, "extra": {"k": [KEY]}, "deployment_id": "b"}))
                .unwrap();
        let r = String::from_utf8(redact_body(&misplaced)).unwrap();
        assert!(!r.contains("PRIVATE KEY") && !r.contains("MIGHAgEAMBMG"), "{r}");
        let v: serde_json::Value = serde_json::from_str(&r).expect("still JSON");
        assert_eq!((v["deployment_id"].as_str(), v["chain_pem"].as_str()), (Some("b"), Some("[redacted]\n")), "{v}");
    }

    #[test]
    fn seal_body_replaces_the_clear_key() {
        let id = x25519::Identity::generate();
        let body = serde_json::to_vec(&serde_json::json!({"deployment_id": "a", "private_key_pem": KEY})).unwrap();
        let sealed = seal_body(&body, &id.to_public()).unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
        assert!(v.get(PEM_FIELD).is_none());
        let ring = Keyring { identities: vec![id] };
        assert_eq!(ring.open(v[AGE_FIELD].as_str().unwrap()).unwrap().expose(), KEY.as_bytes());
        assert!(seal_body(b"[1]", &ring.first_recipient().unwrap()).is_none());
    }
}
