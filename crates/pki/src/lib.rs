#![forbid(unsafe_code)]
//! Pure validation of the material in a certdeploy deploy request: PEM parsing, key/certificate match, chain order, validity.
//!
//! No I/O, no async: everything here works on in-memory strings and returns
//! either facts about the certificate or a [`PkiError`] that names the request
//! field and the problem.
//!
//! What is checked by [`validate_bundle`]:
//! - every field is at most [`MAX_FIELD_BYTES`] (checked before any parsing);
//! - PEM framing is strict: BEGIN/END lines must pair up with the same label,
//!   base64 must be canonical padded base64, and no non-whitespace text may
//!   appear outside the blocks (before the first BEGIN line or after an END
//!   line);
//! - `certificate_pem` holds exactly one `CERTIFICATE` block that parses as an
//!   X.509 certificate, is not expired (`notAfter < now`) and not valid only
//!   in the future beyond the allowed clock skew (`notBefore > now + skew`);
//! - `private_key_pem` holds exactly one private key: PKCS#8 (`PRIVATE KEY`:
//!   RSA, ECDSA P-256/P-384, Ed25519), PKCS#1 (`RSA PRIVATE KEY`) or SEC1
//!   (`EC PRIVATE KEY`, optionally preceded by the `EC PARAMETERS` block that
//!   `openssl ecparam -genkey` emits). Encrypted keys are refused. The public
//!   key derived from the private key must equal the certificate's
//!   SubjectPublicKeyInfo;
//! - `chain_pem`, when given, holds one or more `CERTIFICATE` blocks in issuing
//!   order (the leaf's issuer is the subject of chain certificate 1, the issuer
//!   of chain certificate *i* is the subject of chain certificate *i+1*), none
//!   expired or not yet valid, and each link's signature verifies with the
//!   next certificate's public key whenever x509-parser (ring) supports the
//!   signature algorithm; links signed with an algorithm it cannot verify are
//!   checked by name only. A link that verified is remembered for the
//!   process (by hash of the certificate's DER and the issuer's key), so a
//!   batch sharing its intermediates verifies each of their signatures once.
//!
//! Secrets: no error message or `Debug` output ever contains bytes of the
//! private key or any text taken from the key PEM (only fixed descriptions,
//! line numbers and sanitized block labels). Decoded key bytes are zeroized on
//! drop.

mod keystore;
pub use keystore::{
    KEYSTORE_ITERATIONS, MAX_KEYSTORE_BYTES, MAX_MAC_ITERATIONS, Pkcs12, keystore_holds, pkcs12_keystore,
};

use std::collections::HashSet;
use std::fmt;
use std::sync::{LazyLock, Mutex};

use base64ct::Encoding as _;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;
use zeroize::Zeroizing;

use pkcs8::der::asn1::ObjectIdentifier;
use pkcs8::spki::{DecodePublicKey, EncodePublicKey};
use pkcs8::{DecodePrivateKey, PrivateKeyInfoRef};

/// Largest accepted size of one request field, in bytes (1 MiB).
pub const MAX_FIELD_BYTES: usize = 1024 * 1024;

/// The largest RSA modulus accepted, in bits (checked before any
/// arithmetic on the key: checking a key of a million bits would hold a
/// thread for minutes).
pub const MAX_RSA_BITS: usize = 8192;

const FIELD_CERT: &str = "certificate_pem";
const FIELD_KEY: &str = "private_key_pem";
const FIELD_CHAIN: &str = "chain_pem";

const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_RSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_P521: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.35");
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_ED448: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.113");

/// Facts about the leaf certificate (first CERTIFICATE block) of a PEM file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// notBefore, unix seconds.
    pub not_before: i64,
    /// notAfter, unix seconds.
    pub not_after: i64,
    /// SHA-256 of the leaf certificate's DER encoding.
    pub leaf_sha256: [u8; 32],
    /// Subject distinguished name, RFC 4514-like (`CN=www.example.com, O=...`).
    pub subject: String,
    /// The DNS names of the subject alternative name extension, as written
    /// in the certificate (empty when it has none).
    pub dns_names: Vec<String>,
}

/// A validation failure: which request field, and what is wrong with it.
///
/// Displays as `"{field}: {problem}"`. Never contains private key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct PkiError {
    /// `"certificate_pem"`, `"private_key_pem"` or `"chain_pem"`.
    pub field: &'static str,
    /// Human-readable description of the problem.
    pub problem: String,
}

impl PkiError {
    fn new(field: &'static str, problem: impl Into<String>) -> Self {
        PkiError { field, problem: problem.into() }
    }
}

/// Parse facts from PEM bytes of a cert file (may hold leaf + appended chain).
///
/// Lenient on purpose (it reads files found on hosts): text around the blocks
/// is ignored, and only the first `CERTIFICATE` block is considered. Returns
/// `None` when there is no such block or it does not parse as X.509.
pub fn cert_facts(pem: &[u8]) -> Option<CertFacts> {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let start = find(pem, BEGIN)? + BEGIN.len();
    let len = find(&pem[start..], END)?;
    let body: Vec<u8> = pem[start..start + len].iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    let der = base64ct::Base64::decode_vec(std::str::from_utf8(&body).ok()?).ok()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    Some(facts_of(&cert, &der))
}

/// Validate a deploy request's material.
///
/// `now` is unix seconds; `skew_s` is the clock skew tolerated for notBefore
/// (callers use 300). Returns the leaf certificate's facts on success.
pub fn validate_bundle(
    certificate_pem: &str,
    private_key_pem: &str,
    chain_pem: Option<&str>,
    now: i64,
    skew_s: i64,
) -> Result<CertFacts, PkiError> {
    check_size(FIELD_CERT, certificate_pem)?;
    check_size(FIELD_KEY, private_key_pem)?;
    if let Some(chain) = chain_pem {
        check_size(FIELD_CHAIN, chain)?;
    }

    // certificate_pem
    let leaf_blocks = cert_blocks(FIELD_CERT, certificate_pem)?;
    if leaf_blocks.len() != 1 {
        return Err(PkiError::new(
            FIELD_CERT,
            format!(
                "contains {} certificates; exactly one is expected (put intermediate certificates in chain_pem)",
                leaf_blocks.len()
            ),
        ));
    }
    let leaf_der = &leaf_blocks[0].der;
    let leaf = parse_cert(FIELD_CERT, leaf_der, None)?;
    check_validity(FIELD_CERT, &leaf, None, now, skew_s)?;

    // private_key_pem
    let key = parse_private_key(private_key_pem)?;
    check_key_matches(&key, &leaf)?;

    // chain_pem
    if let Some(chain) = chain_pem {
        let blocks = cert_blocks(FIELD_CHAIN, chain)?;
        let mut chain_certs = Vec::with_capacity(blocks.len());
        for (i, b) in blocks.iter().enumerate() {
            chain_certs.push(parse_cert(FIELD_CHAIN, &b.der, Some(i + 1))?);
        }
        for (i, c) in chain_certs.iter().enumerate() {
            check_validity(FIELD_CHAIN, c, Some(i + 1), now, skew_s)?;
        }
        check_chain_order(&leaf, &chain_certs)?;
    }

    Ok(facts_of(&leaf, leaf_der))
}

// ---------------------------------------------------------------------------
// PEM framing

struct PemBlock {
    /// Sanitized label (safe to print).
    label: String,
    /// RFC 1421 `Proc-Type: 4,ENCRYPTED` header present.
    legacy_encrypted: bool,
    der: Zeroizing<Vec<u8>>,
}

/// Print a PEM label only when it looks like one (short, upper-case ASCII).
fn sanitize_label(label: &str) -> String {
    if !label.is_empty()
        && label.len() <= 40
        && label.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == ' ' || c == '-')
    {
        label.to_string()
    } else {
        "<unrecognized label>".to_string()
    }
}

fn is_empty_text(s: &str) -> bool {
    s.trim().is_empty()
}

/// Strictly split `text` into PEM blocks. Error messages contain only line
/// numbers and sanitized labels, never content.
fn parse_pem(field: &'static str, text: &str) -> Result<Vec<PemBlock>, PkiError> {
    if is_empty_text(text) {
        return Err(PkiError::new(field, "is empty"));
    }
    let mut blocks: Vec<PemBlock> = Vec::new();
    // (label, raw label, first line number, body, encrypted header)
    let mut open: Option<(String, String, usize, Zeroizing<String>, bool)> = None;
    for (idx, raw_line) in text.split('\n').enumerate() {
        let lineno = idx + 1;
        let line = raw_line.trim();
        match open.as_mut() {
            None => {
                if line.is_empty() {
                    continue;
                }
                if let Some(label) = pem_marker(line, "BEGIN") {
                    open =
                        Some((sanitize_label(label), label.to_string(), lineno, Zeroizing::new(String::new()), false));
                } else if pem_marker(line, "END").is_some() {
                    return Err(PkiError::new(
                        field,
                        format!("END line without a matching BEGIN line (line {lineno})"),
                    ));
                } else if let Some(last) = blocks.last() {
                    return Err(PkiError::new(
                        field,
                        format!("unexpected text after the END {} line (line {lineno})", last.label),
                    ));
                } else {
                    return Err(PkiError::new(
                        field,
                        format!("unexpected text before the first BEGIN line (line {lineno})"),
                    ));
                }
            }
            Some((label, raw_label, begin_line, body, encrypted)) => {
                if let Some(end_label) = pem_marker(line, "END") {
                    if end_label != raw_label.as_str() {
                        return Err(PkiError::new(
                            field,
                            format!(
                                "BEGIN {label} block (line {begin_line}) is closed by END {} (line {lineno})",
                                sanitize_label(end_label)
                            ),
                        ));
                    }
                    if body.is_empty() {
                        return Err(PkiError::new(field, format!("{label} block (line {begin_line}) has no content")));
                    }
                    let der = base64ct::Base64::decode_vec(body.as_str()).map_err(|_| {
                        PkiError::new(
                            field,
                            format!("{label} block (line {begin_line}) is not valid base64 (truncated or corrupted)"),
                        )
                    })?;
                    blocks.push(PemBlock {
                        label: label.clone(),
                        legacy_encrypted: *encrypted,
                        der: Zeroizing::new(der),
                    });
                    open = None;
                } else if pem_marker(line, "BEGIN").is_some() {
                    return Err(PkiError::new(
                        field,
                        format!(
                            "truncated PEM: BEGIN {label} block (line {begin_line}) has no END line before the next BEGIN line (line {lineno})"
                        ),
                    ));
                } else if line.contains(':') {
                    // RFC 1421 encapsulated header, e.g. "Proc-Type: 4,ENCRYPTED".
                    if line.starts_with("Proc-Type:") && line.contains("ENCRYPTED") {
                        *encrypted = true;
                    }
                } else {
                    body.push_str(line);
                }
            }
        }
    }
    if let Some((label, _, begin_line, _, _)) = open {
        return Err(PkiError::new(
            field,
            format!("truncated PEM: BEGIN {label} block (line {begin_line}) has no END line"),
        ));
    }
    if blocks.is_empty() {
        return Err(PkiError::new(field, "contains no PEM block"));
    }
    Ok(blocks)
}

/// `-----BEGIN LABEL-----` → `Some("LABEL")` for kind `"BEGIN"`.
fn pem_marker<'a>(line: &'a str, kind: &str) -> Option<&'a str> {
    line.strip_prefix("-----")?.strip_prefix(kind)?.strip_prefix(' ')?.strip_suffix("-----")
}

fn cert_blocks(field: &'static str, text: &str) -> Result<Vec<PemBlock>, PkiError> {
    let blocks = parse_pem(field, text)?;
    for (i, b) in blocks.iter().enumerate() {
        if b.label != "CERTIFICATE" {
            let hint =
                if b.label.contains("PRIVATE KEY") { " (the private key belongs in private_key_pem)" } else { "" };
            return Err(PkiError::new(
                field,
                format!("PEM block {} is {}, expected CERTIFICATE{hint}", i + 1, b.label),
            ));
        }
    }
    Ok(blocks)
}

// ---------------------------------------------------------------------------
// Certificates

fn describe(index: Option<usize>, cert: &X509Certificate<'_>) -> String {
    match index {
        None => format!("the certificate ({})", name(cert.subject())),
        Some(i) => format!("certificate {i} ({})", name(cert.subject())),
    }
}

fn name(n: &X509Name<'_>) -> String {
    let s = n.to_string();
    if s.is_empty() { "an empty name".to_string() } else { s }
}

fn names_equal(a: &X509Name<'_>, b: &X509Name<'_>) -> bool {
    a.as_raw() == b.as_raw() || a.to_string() == b.to_string()
}

fn parse_cert<'a>(field: &'static str, der: &'a [u8], index: Option<usize>) -> Result<X509Certificate<'a>, PkiError> {
    let what = match index {
        None => "the certificate".to_string(),
        Some(i) => format!("certificate {i}"),
    };
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => {
            Err(PkiError::new(field, format!("{what} has {} unexpected bytes after its DER encoding", rest.len())))
        }
        Err(e) => Err(PkiError::new(field, format!("{what} is not a valid X.509 certificate: {e}"))),
    }
}

fn check_validity(
    field: &'static str,
    cert: &X509Certificate<'_>,
    index: Option<usize>,
    now: i64,
    skew_s: i64,
) -> Result<(), PkiError> {
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    let prefix = match index {
        None => String::new(),
        Some(_) => format!("{} ", describe(index, cert)),
    };
    if not_after < now {
        return Err(PkiError::new(field, format!("{prefix}expired at {}", rfc3339(not_after))));
    }
    if not_before > now.saturating_add(skew_s) {
        return Err(PkiError::new(
            field,
            format!("{prefix}not valid before {} (more than {skew_s} s in the future)", rfc3339(not_before)),
        ));
    }
    Ok(())
}

/// Links whose signature verified in this process, as SHA-256 of (the
/// certificate's DER, the issuer's SubjectPublicKeyInfo). A batch of
/// renewals shares its intermediates: the intermediate → root signature is
/// checked once instead of for every request (an ECDSA P-256 verification
/// is ~0.1 ms). Only successes are kept; at most [`VERIFIED_LINKS_MAX`],
/// then it starts over.
static VERIFIED_LINKS: LazyLock<Mutex<HashSet<[u8; 32]>>> = LazyLock::new(Default::default);
const VERIFIED_LINKS_MAX: usize = 1024;

thread_local! {
    static SIGNATURE_CHECKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many chain signatures the calling thread has verified itself (links
/// answered from the remembered ones are not counted). Validation runs on
/// the caller's thread, so a test can count its own checks.
pub fn signature_checks_on_this_thread() -> u64 {
    SIGNATURE_CHECKS.with(|c| c.get())
}

fn verify_link(cert: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> Result<(), X509Error> {
    let raw = cert.as_raw();
    let mut h = Sha256::new();
    h.update((raw.len() as u64).to_be_bytes());
    h.update(raw);
    h.update(issuer.public_key().raw);
    let link: [u8; 32] = h.finalize().into();
    let verified = || VERIFIED_LINKS.lock().unwrap_or_else(|p| p.into_inner());
    if verified().contains(&link) {
        return Ok(());
    }
    SIGNATURE_CHECKS.with(|c| c.set(c.get() + 1));
    cert.verify_signature(Some(issuer.public_key()))?;
    let mut set = verified();
    if set.len() >= VERIFIED_LINKS_MAX {
        set.clear();
    }
    set.insert(link);
    Ok(())
}

fn check_chain_order(leaf: &X509Certificate<'_>, chain: &[X509Certificate<'_>]) -> Result<(), PkiError> {
    let mut prev = leaf;
    let mut prev_index: Option<usize> = None;
    for (i, next) in chain.iter().enumerate() {
        let next_index = i + 1;
        if !names_equal(prev.issuer(), next.subject()) {
            let next_desc = match prev_index {
                None => format!("chain certificate 1 is {}", name(next.subject())),
                Some(_) => format!("the next certificate is {}", name(next.subject())),
            };
            let hint = chain
                .iter()
                .position(|c| names_equal(prev.issuer(), c.subject()))
                .map(|p| format!(" (its issuer is certificate {} of the chain)", p + 1))
                .unwrap_or_default();
            return Err(PkiError::new(
                FIELD_CHAIN,
                format!(
                    "not in issuing order: {} is issued by {} but {next_desc}{hint}",
                    describe(prev_index, prev),
                    name(prev.issuer()),
                ),
            ));
        }
        // Ok, or an algorithm x509-parser cannot verify (names matched): go on.
        if let Err(X509Error::SignatureVerificationError) = verify_link(prev, next) {
            return Err(PkiError::new(
                FIELD_CHAIN,
                format!(
                    "the signature of {} does not verify with the public key of chain certificate {next_index} ({})",
                    describe(prev_index, prev),
                    name(next.subject())
                ),
            ));
        }
        prev = next;
        prev_index = Some(next_index);
    }
    Ok(())
}

fn facts_of(cert: &X509Certificate<'_>, der: &[u8]) -> CertFacts {
    CertFacts {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        leaf_sha256: Sha256::digest(der).into(),
        subject: cert.subject().to_string(),
        dns_names: dns_names(cert),
    }
}

fn dns_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect()
}

/// Does a certificate whose DNS names are `dns_names` cover `name`?
///
/// Clients match a host name against the subject alternative names only
/// (the common name is not consulted), ASCII case-insensitively, ignoring a
/// trailing dot. A wildcard is honoured only as the whole left-most label
/// (`*.example.com` covers `www.example.com`, not `example.com` nor
/// `a.b.example.com`). A wildcard `name` (a target that serves every
/// subdomain) is covered only by the same wildcard in the certificate.
pub fn names_cover(dns_names: &[String], name: &str) -> bool {
    let want = normalize_name(name);
    dns_names.iter().any(|have| {
        let have = normalize_name(have);
        if have == want {
            return true;
        }
        match (have.strip_prefix("*."), want.split_once('.')) {
            (Some(parent), Some((first, rest))) => first != "*" && !first.is_empty() && rest == parent,
            _ => false,
        }
    })
}

fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

// ---------------------------------------------------------------------------
// Private keys

/// Public half of an accepted private key.
enum DerivedKey {
    Rsa(Box<rsa::PublicKey>),
    /// The secret, and its public point (uncompressed) when the key file
    /// carried one that ring has checked against the secret. The point is
    /// derived in pure Rust only when the fast checks cannot decide.
    P256(Box<p256::SecretKey>, Option<Vec<u8>>),
    P384(p384::PublicKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl DerivedKey {
    fn kind(&self) -> &'static str {
        match self {
            DerivedKey::Rsa(_) => "RSA",
            DerivedKey::P256(..) => "ECDSA P-256",
            DerivedKey::P384(_) => "ECDSA P-384",
            DerivedKey::Ed25519(_) => "Ed25519",
        }
    }

    fn spki_der(&self) -> Option<Vec<u8>> {
        let doc = match self {
            DerivedKey::Rsa(k) => k.to_public_key_der(),
            DerivedKey::P256(k, _) => k.public_key().to_public_key_der(),
            DerivedKey::P384(k) => k.to_public_key_der(),
            DerivedKey::Ed25519(k) => k.to_public_key_der(),
        };
        doc.ok().map(|d| d.as_bytes().to_vec())
    }

    /// Decode a certificate's SPKI as the same key type and compare keys
    /// (tolerates encoding variants such as compressed EC points).
    fn equals_spki(&self, spki: &[u8]) -> bool {
        match self {
            DerivedKey::Rsa(k) => rsa::PublicKey::from_public_key_der(spki).is_ok_and(|c| c == **k),
            DerivedKey::P256(k, _) => p256::PublicKey::from_public_key_der(spki).is_ok_and(|c| c == k.public_key()),
            DerivedKey::P384(k) => p384::PublicKey::from_public_key_der(spki).is_ok_and(|c| c == *k),
            DerivedKey::Ed25519(k) => ed25519_dalek::VerifyingKey::from_public_key_der(spki).is_ok_and(|c| c == *k),
        }
    }
}

/// Describe the key type in a certificate's SPKI.
fn spki_kind(spki: &[u8]) -> String {
    if rsa::PublicKey::from_public_key_der(spki).is_ok() {
        return "RSA".into();
    }
    if p256::PublicKey::from_public_key_der(spki).is_ok() {
        return "ECDSA P-256".into();
    }
    if p384::PublicKey::from_public_key_der(spki).is_ok() {
        return "ECDSA P-384".into();
    }
    if ed25519_dalek::VerifyingKey::from_public_key_der(spki).is_ok() {
        return "Ed25519".into();
    }
    "unsupported".into()
}

fn key_err(problem: impl Into<String>) -> PkiError {
    PkiError::new(FIELD_KEY, problem)
}

const SUPPORTED: &str = "supported: RSA, ECDSA P-256, ECDSA P-384, Ed25519";

fn parse_private_key(text: &str) -> Result<DerivedKey, PkiError> {
    let blocks = parse_pem(FIELD_KEY, text)?;
    let keys: Vec<&PemBlock> = blocks.iter().filter(|b| b.label != "EC PARAMETERS").collect();
    let block = match keys.as_slice() {
        [] => return Err(key_err("contains no private key block")),
        [one] => *one,
        many => {
            return Err(key_err(format!(
                "contains {} PEM blocks ({}); exactly one private key is expected",
                many.len(),
                many.iter().map(|b| b.label.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
    };
    let encrypted_msg =
        "is encrypted; provide the private key unencrypted (passphrase-protected keys are not supported)";
    match block.label.as_str() {
        "PRIVATE KEY" => parse_pkcs8(&block.der),
        "RSA PRIVATE KEY" => {
            if block.legacy_encrypted {
                return Err(key_err(encrypted_msg));
            }
            check_rsa_size(&block.der, "RSA PRIVATE KEY block is not a valid PKCS#1 RSA private key")?;
            let key = <rsa::PrivateKey as rsa::pkcs1::DecodeRsaPrivateKey>::from_pkcs1_der(&block.der)
                .map_err(|_| key_err("RSA PRIVATE KEY block is not a valid PKCS#1 RSA private key"))?;
            rsa_public(&key)
        }
        "EC PRIVATE KEY" => {
            if block.legacy_encrypted {
                return Err(key_err(encrypted_msg));
            }
            parse_sec1(&block.der)
        }
        "ENCRYPTED PRIVATE KEY" => Err(key_err(encrypted_msg)),
        "OPENSSH PRIVATE KEY" => {
            Err(key_err("OpenSSH-format private keys are not supported; convert it to PKCS#8 (BEGIN PRIVATE KEY)"))
        }
        "CERTIFICATE" => Err(key_err(
            "holds a CERTIFICATE block, expected a private key (the certificate belongs in certificate_pem)",
        )),
        "PUBLIC KEY" | "RSA PUBLIC KEY" => {
            Err(key_err(format!("holds a {} block; the private key is required", block.label)))
        }
        other => Err(key_err(format!(
            "unsupported PEM block type {other}; expected PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY"
        ))),
    }
}

/// The modulus of a PKCS#1 private key is at most [`MAX_RSA_BITS`] long,
/// read from its DER alone.
fn check_rsa_size(pkcs1_der: &[u8], invalid: &str) -> Result<(), PkiError> {
    use rsa::pkcs1::der::Decode as _;
    let key = rsa::pkcs1::RsaPrivateKeyRef::from_der(pkcs1_der).map_err(|_| key_err(invalid))?;
    let n = key.modulus.as_bytes();
    let bits = n.iter().position(|b| *b != 0).map_or(0, |i| (n.len() - i) * 8 - n[i].leading_zeros() as usize);
    if bits > MAX_RSA_BITS {
        return Err(key_err(format!("RSA key of {bits} bits is larger than the {MAX_RSA_BITS}-bit limit")));
    }
    Ok(())
}

fn rsa_public(key: &rsa::PrivateKey) -> Result<DerivedKey, PkiError> {
    key.validate().map_err(|_| key_err("RSA private key is inconsistent (failed validation)"))?;
    Ok(DerivedKey::Rsa(Box::new(key.to_public_key())))
}

fn parse_pkcs8(der: &[u8]) -> Result<DerivedKey, PkiError> {
    let info =
        PrivateKeyInfoRef::try_from(der).map_err(|_| key_err("PRIVATE KEY block is not a valid PKCS#8 private key"))?;
    let alg = info.algorithm.oid;
    let invalid = |kind: &str| key_err(format!("PKCS#8 {kind} private key is invalid"));
    if alg == OID_RSA {
        check_rsa_size(info.private_key.as_bytes(), "PKCS#8 RSA private key is invalid")?;
        let key = rsa::PrivateKey::from_pkcs8_der(der).map_err(|_| invalid("RSA"))?;
        rsa_public(&key)
    } else if alg == OID_EC_PUBLIC_KEY {
        match info.algorithm.parameters_oid().ok() {
            Some(c) if c == OID_P256 => sec1::EcPrivateKey::try_from(info.private_key.as_bytes())
                .ok()
                .and_then(|ec| p256_secret(&ec))
                .ok_or_else(|| invalid("ECDSA P-256")),
            Some(c) if c == OID_P384 => Ok(DerivedKey::P384(
                p384::SecretKey::from_pkcs8_der(der).map_err(|_| invalid("ECDSA P-384"))?.public_key(),
            )),
            Some(c) => Err(key_err(format!("unsupported elliptic curve {} ({SUPPORTED})", curve_name(c)))),
            None => Err(key_err("PKCS#8 EC private key does not name its curve (named curves only)")),
        }
    } else if alg == OID_ED25519 {
        let key = ed25519_dalek::SigningKey::from_pkcs8_der(der).map_err(|_| invalid("Ed25519"))?;
        Ok(DerivedKey::Ed25519(key.verifying_key()))
    } else {
        Err(key_err(format!("unsupported key algorithm {} ({SUPPORTED})", algorithm_name(alg))))
    }
}

fn parse_sec1(der: &[u8]) -> Result<DerivedKey, PkiError> {
    let ec = sec1::EcPrivateKey::try_from(der)
        .map_err(|_| key_err("EC PRIVATE KEY block is not a valid SEC1 private key"))?;
    let curve = match ec.parameters.and_then(|p| p.named_curve()) {
        Some(c) => c,
        // No parameters: infer the curve from the scalar length.
        None => match ec.private_key.len() {
            32 => OID_P256,
            48 => OID_P384,
            _ => return Err(key_err("SEC1 EC private key does not name its curve")),
        },
    };
    let invalid = |kind: &str| key_err(format!("SEC1 {kind} private key is invalid"));
    if curve == OID_P256 {
        p256_secret(&ec).ok_or_else(|| invalid("ECDSA P-256"))
    } else if curve == OID_P384 {
        Ok(DerivedKey::P384(p384::SecretKey::from_sec1_der(der).map_err(|_| invalid("ECDSA P-384"))?.public_key()))
    } else {
        Err(key_err(format!("unsupported elliptic curve {} ({SUPPORTED})", curve_name(curve))))
    }
}

fn curve_name(oid: ObjectIdentifier) -> String {
    if oid == OID_P521 { "P-521".into() } else { oid.to_string() }
}

fn algorithm_name(oid: ObjectIdentifier) -> String {
    if oid == OID_ED448 {
        "Ed448".into()
    } else if oid == OID_RSA_PSS {
        "RSASSA-PSS".into()
    } else {
        oid.to_string()
    }
}

/// Does ring accept `point` (uncompressed) as the public key of `key`? Its
/// assembly is ~10x faster than deriving the point in pure Rust, which was
/// the largest part of a request's validation.
fn p256_pair_ok(key: &p256::SecretKey, point: &[u8]) -> bool {
    if point.len() != 65 || point[0] != 0x04 {
        return false;
    }
    let secret = zeroize::Zeroizing::new(key.to_bytes());
    ring::signature::EcdsaKeyPair::from_private_key_and_public_key(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &secret[..],
        point,
        &ring::rand::SystemRandom::new(),
    )
    .is_ok()
}

/// A P-256 secret from its SEC1 structure (also inside PKCS#8). An embedded
/// public key must belong to the secret: checked by ring when uncompressed,
/// else by deriving it.
fn p256_secret(ec: &sec1::EcPrivateKey<'_>) -> Option<DerivedKey> {
    if ec.parameters.and_then(|p| p.named_curve()).is_some_and(|c| c != OID_P256) {
        return None;
    }
    let secret = p256::SecretKey::from_slice(ec.private_key).ok()?;
    let public = match ec.public_key {
        None => None,
        Some(pk) if p256_pair_ok(&secret, pk) => Some(pk.to_vec()),
        Some(pk) => {
            let embedded = p256::PublicKey::from_sec1_bytes(pk).ok()?;
            if embedded != secret.public_key() {
                return None;
            }
            None
        }
    };
    Some(DerivedKey::P256(Box::new(secret), public))
}

/// P-256, fast: the certificate's point is the key file's (checked) point,
/// or ring accepts it for the secret. `false` = undecided here.
fn p256_matches_fast(key: &p256::SecretKey, public: Option<&[u8]>, cert: &X509Certificate<'_>) -> bool {
    let point = &cert.public_key().subject_public_key.data[..];
    public == Some(point) || p256_pair_ok(key, point)
}

fn check_key_matches(key: &DerivedKey, cert: &X509Certificate<'_>) -> Result<(), PkiError> {
    if let DerivedKey::P256(k, public) = key
        && p256_matches_fast(k, public.as_deref(), cert)
    {
        return Ok(());
    }
    let cert_spki = cert.public_key().raw;
    if key.spki_der().as_deref() == Some(cert_spki) || key.equals_spki(cert_spki) {
        return Ok(());
    }
    let cert_kind = spki_kind(cert_spki);
    if cert_kind == key.kind() {
        Err(key_err("does not match the certificate's public key"))
    } else {
        Err(key_err(format!(
            "does not match the certificate's public key (the certificate has {} {cert_kind} key, the private key is {})",
            article(&cert_kind),
            key.kind()
        )))
    }
}

fn article(word: &str) -> &'static str {
    match word.chars().next() {
        Some('A' | 'E' | 'I' | 'O' | 'U' | 'R' | 'a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

// ---------------------------------------------------------------------------
// Misc

fn check_size(field: &'static str, s: &str) -> Result<(), PkiError> {
    if s.len() > MAX_FIELD_BYTES {
        Err(PkiError::new(
            field,
            format!("is {} bytes, larger than the 1 MiB limit ({MAX_FIELD_BYTES} bytes)", s.len()),
        ))
    } else {
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Unix seconds → `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
fn rfc3339(ts: i64) -> String {
    struct Ts(i64);
    impl fmt::Display for Ts {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let days = self.0.div_euclid(86_400);
            let secs = self.0.rem_euclid(86_400);
            // Howard Hinnant's civil_from_days.
            let z = days + 719_468;
            let era = z.div_euclid(146_097);
            let doe = z.rem_euclid(146_097);
            let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let d = doy - (153 * mp + 2) / 5 + 1;
            let m = if mp < 10 { mp + 3 } else { mp - 9 };
            let y = yoe + era * 400 + i64::from(m <= 2);
            write!(f, "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
        }
    }
    Ts(ts).to_string()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_827_696), "2000-02-29T12:34:56Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn names_are_covered_as_tls_clients_match_them() {
        let san = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cert = san(&["www.example.com", "*.api.example.com", "Shop.Example.org."]);
        for ok in ["www.example.com", "WWW.example.com.", "v1.api.example.com", "shop.example.org"] {
            assert!(names_cover(&cert, ok), "{ok} should be covered");
        }
        for no in ["example.com", "api.example.com", "a.b.api.example.com", "mail.example.com", "*.example.com"] {
            assert!(!names_cover(&cert, no), "{no} should not be covered");
        }
        // A wildcard target name needs the same wildcard in the certificate.
        assert!(names_cover(&cert, "*.api.example.com"));
        assert!(!names_cover(&san(&["www.example.com"]), "*.example.com"));
        assert!(!names_cover(&[], "www.example.com"));
    }

    #[test]
    fn labels_are_sanitized() {
        assert_eq!(sanitize_label("EC PRIVATE KEY"), "EC PRIVATE KEY");
        assert_eq!(sanitize_label("MIIEvAIBADANBgkqhkiG9w0"), "<unrecognized label>");
        assert_eq!(sanitize_label(""), "<unrecognized label>");
    }

    #[test]
    fn pem_marker_parses() {
        assert_eq!(pem_marker("-----BEGIN CERTIFICATE-----", "BEGIN"), Some("CERTIFICATE"));
        assert_eq!(pem_marker("-----END X-----", "BEGIN"), None);
        assert_eq!(pem_marker("-----BEGIN X----", "BEGIN"), None);
    }
}
