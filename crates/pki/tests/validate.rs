//! Validation tests for certdeploy-pki. All material is generated at test
//! time: certificates with rcgen (ring backend), RSA keys with the `rsa` crate
//! (rcgen's ring backend cannot generate RSA keys).

use std::sync::OnceLock;

use base64ct::Encoding as _;
use certdeploy_pki::{CertFacts, MAX_FIELD_BYTES, PkiError, cert_facts, validate_bundle};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    SignatureAlgorithm,
};
use sha2::{Digest, Sha256};

/// A fixed "now": 2027-01-15T08:00:00Z.
const NOW: i64 = 1_800_000_000;
const DAY: i64 = 86_400;
const SKEW: i64 = 300;

fn t(ts: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(ts).unwrap()
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64ct::Base64::encode_string(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_body(pem: &str) -> Vec<&str> {
    pem.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("-----")).collect()
}

/// RSA-2048 key pair as PKCS#8 PEM (generated once: slow in debug builds).
fn rsa_pkcs8_pem() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| {
        use rsa::Generate as _;
        use rsa::pkcs8::EncodePrivateKey as _;
        let key = rsa::PrivateKey::generate();
        pem_encode("PRIVATE KEY", key.to_pkcs8_der().unwrap().as_bytes())
    })
}

fn rsa_pkcs1_pem() -> String {
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::pkcs8::DecodePrivateKey as _;
    let key = rsa::PrivateKey::from_pkcs8_pem(rsa_pkcs8_pem()).unwrap();
    pem_encode("RSA PRIVATE KEY", key.to_pkcs1_der().unwrap().as_bytes())
}

fn p256_sec1_pem(pkcs8_pem: &str) -> String {
    use p256::pkcs8::DecodePrivateKey as _;
    let key = p256::SecretKey::from_pkcs8_pem(pkcs8_pem).unwrap();
    pem_encode("EC PRIVATE KEY", &key.to_sec1_der().unwrap())
}

fn p384_sec1_pem(pkcs8_pem: &str) -> String {
    use p384::pkcs8::DecodePrivateKey as _;
    let key = p384::SecretKey::from_pkcs8_pem(pkcs8_pem).unwrap();
    pem_encode("EC PRIVATE KEY", &key.to_sec1_der().unwrap())
}

#[derive(Clone, Copy)]
enum Alg {
    Rsa,
    P256,
    P384,
    Ed25519,
}

fn keypair(alg: Alg) -> KeyPair {
    match alg {
        Alg::Rsa => KeyPair::from_pkcs8_pem_and_sign_algo(rsa_pkcs8_pem(), &rcgen::PKCS_RSA_SHA256).unwrap(),
        Alg::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        Alg::P384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        Alg::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
    }
}

fn params(cn: &str, not_before: i64, not_after: i64, ca: bool) -> CertificateParams {
    let mut p = CertificateParams::new(vec![format!("{}.example", cn.to_lowercase())]).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.not_before = t(not_before);
    p.not_after = t(not_after);
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    p
}

struct Node {
    params: CertificateParams,
    key: KeyPair,
    cert: Certificate,
}

impl Node {
    fn root(cn: &str, alg: Alg) -> Node {
        let params = params(cn, NOW - 365 * DAY, NOW + 3650 * DAY, true);
        let key = keypair(alg);
        let cert = params.self_signed(&key).unwrap();
        Node { params, key, cert }
    }

    fn issue(&self, cn: &str, alg: Alg, nb: i64, na: i64, ca: bool) -> Node {
        let params = params(cn, nb, na, ca);
        let key = keypair(alg);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        Node { params, key, cert }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

/// Root → Intermediate → Leaf, all of one algorithm, leaf valid around NOW.
struct Pki {
    root: Node,
    inter: Node,
    leaf: Node,
}

fn pki(alg: Alg) -> Pki {
    let root = Node::root("Root", alg);
    let inter = root.issue("Intermediate", alg, NOW - 100 * DAY, NOW + 1000 * DAY, true);
    let leaf = inter.issue("Leaf", alg, NOW - DAY, NOW + 90 * DAY, false);
    Pki { root, inter, leaf }
}

impl Pki {
    fn chain(&self) -> String {
        format!("{}{}", self.inter.pem(), self.root.pem())
    }
}

fn validate(cert: &str, key: &str, chain: Option<&str>) -> Result<CertFacts, PkiError> {
    validate_bundle(cert, key, chain, NOW, SKEW)
}

fn err(cert: &str, key: &str, chain: Option<&str>) -> String {
    match validate(cert, key, chain) {
        Ok(_) => panic!("expected a validation error"),
        Err(e) => {
            assert_eq!(e.to_string(), format!("{}: {}", e.field, e.problem));
            e.to_string()
        }
    }
}

// ---------------------------------------------------------------------------
// Valid bundles

#[test]
fn valid_rsa_pkcs8_and_pkcs1_with_chain() {
    let p = pki(Alg::Rsa);
    let chain = p.chain();
    let facts = validate(&p.leaf.pem(), rsa_pkcs8_pem(), Some(&chain)).unwrap();
    assert_eq!(facts.subject, "CN=Leaf");
    let pkcs1 = rsa_pkcs1_pem();
    assert!(pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    assert_eq!(validate(&p.leaf.pem(), &pkcs1, Some(&chain)).unwrap(), facts);
}

#[test]
fn valid_p256_pkcs8_sec1_and_ec_parameters_block() {
    let p = pki(Alg::P256);
    let chain = p.chain();
    let facts = validate(&p.leaf.pem(), &p.leaf.key_pem(), Some(&chain)).unwrap();
    let sec1 = p256_sec1_pem(&p.leaf.key_pem());
    assert!(sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"));
    assert_eq!(validate(&p.leaf.pem(), &sec1, Some(&chain)).unwrap(), facts);
    // `openssl ecparam -genkey` output: EC PARAMETERS (prime256v1 OID) + key.
    let with_params = format!("-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n{sec1}");
    assert_eq!(validate(&p.leaf.pem(), &with_params, Some(&chain)).unwrap(), facts);
}

#[test]
fn valid_p384_pkcs8_and_sec1() {
    let p = pki(Alg::P384);
    let chain = p.chain();
    let facts = validate(&p.leaf.pem(), &p.leaf.key_pem(), Some(&chain)).unwrap();
    let sec1 = p384_sec1_pem(&p.leaf.key_pem());
    assert_eq!(validate(&p.leaf.pem(), &sec1, Some(&chain)).unwrap(), facts);
}

#[test]
fn valid_ed25519_without_chain() {
    let p = pki(Alg::Ed25519);
    let facts = validate(&p.leaf.pem(), &p.leaf.key_pem(), None).unwrap();
    assert_eq!(facts.subject, "CN=Leaf");
}

#[test]
fn mixed_algorithm_chain_verifies() {
    let root = Node::root("Root", Alg::Rsa);
    let inter = root.issue("Intermediate", Alg::P384, NOW - DAY, NOW + 900 * DAY, true);
    let leaf = inter.issue("Leaf", Alg::Ed25519, NOW - DAY, NOW + 90 * DAY, false);
    let chain = format!("{}{}", inter.pem(), root.pem());
    validate(&leaf.pem(), &leaf.key_pem(), Some(&chain)).unwrap();
}

#[test]
fn facts_are_the_leafs() {
    let p = pki(Alg::P256);
    let facts = validate(&p.leaf.pem(), &p.leaf.key_pem(), None).unwrap();
    assert_eq!(facts.not_before, NOW - DAY);
    assert_eq!(facts.not_after, NOW + 90 * DAY);
    let digest: [u8; 32] = Sha256::digest(p.leaf.cert.der().as_ref()).into();
    assert_eq!(facts.leaf_sha256, digest);
}

#[test]
fn crlf_and_surrounding_whitespace_are_accepted() {
    let p = pki(Alg::P256);
    let cert = format!("\n\n{}\n  \n", p.leaf.pem().replace('\n', "\r\n"));
    let key = p.leaf.key_pem().replace('\n', "\r\n");
    validate(&cert, &key, None).unwrap();
}

// ---------------------------------------------------------------------------
// Key / certificate mismatch

#[test]
fn wrong_key_same_algorithm() {
    let p = pki(Alg::P256);
    let other = keypair(Alg::P256).serialize_pem();
    assert_eq!(err(&p.leaf.pem(), &other, None), "private_key_pem: does not match the certificate's public key");
    // SEC1 form of the wrong key: same verdict.
    assert_eq!(
        err(&p.leaf.pem(), &p256_sec1_pem(&other), None),
        "private_key_pem: does not match the certificate's public key"
    );
}

#[test]
fn wrong_key_other_algorithm() {
    let p = pki(Alg::P256);
    let ed = keypair(Alg::Ed25519).serialize_pem();
    assert_eq!(
        err(&p.leaf.pem(), &ed, None),
        "private_key_pem: does not match the certificate's public key \
         (the certificate has an ECDSA P-256 key, the private key is Ed25519)"
    );
    let p = pki(Alg::Ed25519);
    assert_eq!(
        err(&p.leaf.pem(), &rsa_pkcs1_pem(), None),
        "private_key_pem: does not match the certificate's public key \
         (the certificate has an Ed25519 key, the private key is RSA)"
    );
}

// ---------------------------------------------------------------------------
// Validity period

#[test]
fn expired_certificate() {
    let root = Node::root("Root", Alg::P256);
    // notAfter 2027-01-01T00:00:00Z, before NOW.
    let leaf = root.issue("Leaf", Alg::P256, NOW - 400 * DAY, 1_798_761_600, false);
    assert_eq!(err(&leaf.pem(), &leaf.key_pem(), None), "certificate_pem: expired at 2027-01-01T00:00:00Z");
}

#[test]
fn not_yet_valid_certificate() {
    let root = Node::root("Root", Alg::P256);
    let leaf = root.issue("Leaf", Alg::P256, NOW + 3600, NOW + 90 * DAY, false);
    assert_eq!(
        err(&leaf.pem(), &leaf.key_pem(), None),
        "certificate_pem: not valid before 2027-01-15T09:00:00Z (more than 300 s in the future)"
    );
    // Within the allowed skew: accepted.
    let leaf = root.issue("Leaf", Alg::P256, NOW + 200, NOW + 90 * DAY, false);
    validate(&leaf.pem(), &leaf.key_pem(), None).unwrap();
}

#[test]
fn expired_chain_certificate() {
    let root = Node::root("Root", Alg::P256);
    let inter = root.issue("Intermediate", Alg::P256, NOW - 900 * DAY, NOW - DAY, true);
    let leaf = inter.issue("Leaf", Alg::P256, NOW - DAY, NOW + 90 * DAY, false);
    let chain = format!("{}{}", inter.pem(), root.pem());
    assert_eq!(
        err(&leaf.pem(), &leaf.key_pem(), Some(&chain)),
        "chain_pem: certificate 1 (CN=Intermediate) expired at 2027-01-14T08:00:00Z"
    );
}

// ---------------------------------------------------------------------------
// Chain order and signatures

#[test]
fn reversed_chain() {
    let p = pki(Alg::P256);
    let reversed = format!("{}{}", p.root.pem(), p.inter.pem());
    assert_eq!(
        err(&p.leaf.pem(), &p.leaf.key_pem(), Some(&reversed)),
        "chain_pem: not in issuing order: the certificate (CN=Leaf) is issued by \
         CN=Intermediate but chain certificate 1 is CN=Root (its issuer is certificate 2 of the chain)"
    );
}

#[test]
fn chain_link_out_of_order_after_first() {
    let p = pki(Alg::P256);
    let other_root = Node::root("Other Root", Alg::P256);
    let chain = format!("{}{}", p.inter.pem(), other_root.pem());
    assert_eq!(
        err(&p.leaf.pem(), &p.leaf.key_pem(), Some(&chain)),
        "chain_pem: not in issuing order: certificate 1 (CN=Intermediate) is issued by \
         CN=Root but the next certificate is CN=Other Root"
    );
}

#[test]
fn chain_with_same_name_but_wrong_key_fails_signature() {
    let p = pki(Alg::P256);
    // Another "CN=Intermediate" with a different key.
    let impostor = p.root.issue("Intermediate", Alg::P256, NOW - DAY, NOW + 900 * DAY, true);
    assert_eq!(
        err(&p.leaf.pem(), &p.leaf.key_pem(), Some(&impostor.pem())),
        "chain_pem: the signature of the certificate (CN=Leaf) does not verify with the \
         public key of chain certificate 1 (CN=Intermediate)"
    );
}

#[test]
fn a_verified_link_vouches_only_for_the_same_certificate_and_key() {
    // Links verified once are remembered (a batch shares its intermediates);
    // a certificate or an issuer key that differs in any byte is checked
    // afresh.
    let checks = certdeploy_pki::signature_checks_on_this_thread;
    let p = pki(Alg::P256);
    let before = checks();
    validate(&p.leaf.pem(), &p.leaf.key_pem(), Some(&p.chain())).expect("valid");
    assert_eq!(checks() - before, 2, "first sight: leaf -> intermediate and intermediate -> root verified");
    validate(&p.leaf.pem(), &p.leaf.key_pem(), Some(&p.chain())).expect("valid");
    assert_eq!(checks() - before, 2, "the same bundle again verifies no signature");
    // A batch: another leaf of the same intermediate verifies only its own link.
    let sibling = p.inter.issue("Sibling", Alg::P256, NOW - DAY, NOW + 90 * DAY, false);
    validate(&sibling.pem(), &sibling.key_pem(), Some(&p.chain())).expect("valid");
    assert_eq!(checks() - before, 3, "the shared intermediate -> root link is verified once");
    let impostor = p.root.issue("Intermediate", Alg::P256, NOW - DAY, NOW + 900 * DAY, true);
    let chain = format!("{}{}", impostor.pem(), p.root.pem());
    assert_eq!(
        err(&p.leaf.pem(), &p.leaf.key_pem(), Some(&chain)),
        "chain_pem: the signature of the certificate (CN=Leaf) does not verify with the \
         public key of chain certificate 1 (CN=Intermediate)"
    );
    // The same intermediate, re-signed by another root of the same name.
    let other_root = Node::root("Root", Alg::P256);
    let chain = format!("{}{}", p.inter.pem(), other_root.pem());
    assert_eq!(
        err(&p.leaf.pem(), &p.leaf.key_pem(), Some(&chain)),
        "chain_pem: the signature of certificate 1 (CN=Intermediate) does not verify with the \
         public key of chain certificate 2 (CN=Root)"
    );
}

#[test]
fn chain_must_hold_only_certificates() {
    let p = pki(Alg::P256);
    let chain = format!("{}{}", p.inter.pem(), p.leaf.key_pem());
    let e = err(&p.leaf.pem(), &p.leaf.key_pem(), Some(&chain));
    assert_eq!(
        e,
        "chain_pem: PEM block 2 is PRIVATE KEY, expected CERTIFICATE \
         (the private key belongs in private_key_pem)"
    );
}

// ---------------------------------------------------------------------------
// PEM framing

#[test]
fn truncated_pem() {
    let p = pki(Alg::P256);
    let pem = p.leaf.pem();
    let cut = &pem[..pem.len() / 2];
    assert_eq!(
        err(cut, &p.leaf.key_pem(), None),
        "certificate_pem: truncated PEM: BEGIN CERTIFICATE block (line 1) has no END line"
    );
    // Body lines lost but END present: the DER no longer parses.
    let lines: Vec<&str> = pem.lines().collect();
    let short = format!("{}\n{}\n{}\n", lines[0], lines[1], lines[lines.len() - 1]);
    let e = err(&short, &p.leaf.key_pem(), None);
    assert!(e.starts_with("certificate_pem: the certificate is not a valid X.509 certificate"), "{e}");
}

#[test]
fn trailing_garbage_rejected_whitespace_accepted() {
    let p = pki(Alg::P256);
    let pem = p.leaf.pem();
    let n = pem.lines().count();
    assert_eq!(
        err(&format!("{pem}garbage\n"), &p.leaf.key_pem(), None),
        format!("certificate_pem: unexpected text after the END CERTIFICATE line (line {})", n + 1)
    );
    assert_eq!(
        err(&format!("hello\n{pem}"), &p.leaf.key_pem(), None),
        "certificate_pem: unexpected text before the first BEGIN line (line 1)"
    );
    validate(&format!("{pem}\n \t\n"), &p.leaf.key_pem(), None).unwrap();
}

#[test]
fn two_certificates_in_certificate_pem() {
    let p = pki(Alg::P256);
    let both = format!("{}{}", p.leaf.pem(), p.inter.pem());
    assert_eq!(
        err(&both, &p.leaf.key_pem(), None),
        "certificate_pem: contains 2 certificates; exactly one is expected \
         (put intermediate certificates in chain_pem)"
    );
}

#[test]
fn garbage_base64() {
    let p = pki(Alg::P256);
    let bad = "-----BEGIN CERTIFICATE-----\nMIIB!!notbase64$$\n-----END CERTIFICATE-----\n";
    assert_eq!(
        err(bad, &p.leaf.key_pem(), None),
        "certificate_pem: CERTIFICATE block (line 1) is not valid base64 (truncated or corrupted)"
    );
    // Valid base64, not DER.
    let notder = "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";
    let e = err(notder, &p.leaf.key_pem(), None);
    assert!(e.starts_with("certificate_pem: the certificate is not a valid X.509 certificate"), "{e}");
    let key_pem = p.leaf.key_pem();
    let first = pem_body(&key_pem)[0].to_string();
    let key = key_pem.replace(&first, &first.replace('A', "*"));
    assert_eq!(
        err(&p.leaf.pem(), &key, None),
        "private_key_pem: PRIVATE KEY block (line 1) is not valid base64 (truncated or corrupted)"
    );
}

#[test]
fn mismatched_and_stray_markers() {
    let p = pki(Alg::P256);
    let pem = p.leaf.pem().replace("END CERTIFICATE", "END X509 CRL");
    let n = pem.lines().count();
    assert_eq!(
        err(&pem, &p.leaf.key_pem(), None),
        format!("certificate_pem: BEGIN CERTIFICATE block (line 1) is closed by END X509 CRL (line {n})")
    );
    assert_eq!(
        err("-----END CERTIFICATE-----\n", &p.leaf.key_pem(), None),
        "certificate_pem: END line without a matching BEGIN line (line 1)"
    );
    assert_eq!(
        err("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n", &p.leaf.key_pem(), None),
        "certificate_pem: CERTIFICATE block (line 1) has no content"
    );
}

#[test]
fn empty_fields() {
    let p = pki(Alg::P256);
    assert_eq!(err("", &p.leaf.key_pem(), None), "certificate_pem: is empty");
    assert_eq!(err(" \n", &p.leaf.key_pem(), None), "certificate_pem: is empty");
    assert_eq!(err(&p.leaf.pem(), "", None), "private_key_pem: is empty");
    assert_eq!(err(&p.leaf.pem(), &p.leaf.key_pem(), Some("")), "chain_pem: is empty");
}

#[test]
fn oversize_fields_rejected_before_parsing() {
    let p = pki(Alg::P256);
    let huge = "A".repeat(MAX_FIELD_BYTES + 1);
    assert_eq!(
        err(&huge, &p.leaf.key_pem(), None),
        "certificate_pem: is 1048577 bytes, larger than the 1 MiB limit (1048576 bytes)"
    );
    assert_eq!(
        err(&p.leaf.pem(), &huge, None),
        "private_key_pem: is 1048577 bytes, larger than the 1 MiB limit (1048576 bytes)"
    );
    assert_eq!(
        err(&p.leaf.pem(), &p.leaf.key_pem(), Some(&huge)),
        "chain_pem: is 1048577 bytes, larger than the 1 MiB limit (1048576 bytes)"
    );
}

#[test]
fn wrong_block_types() {
    let p = pki(Alg::P256);
    assert_eq!(
        err(&p.leaf.key_pem(), &p.leaf.key_pem(), None),
        "certificate_pem: PEM block 1 is PRIVATE KEY, expected CERTIFICATE \
         (the private key belongs in private_key_pem)"
    );
    assert_eq!(
        err(&p.leaf.pem(), &p.leaf.pem(), None),
        "private_key_pem: holds a CERTIFICATE block, expected a private key \
         (the certificate belongs in certificate_pem)"
    );
    let two = format!("{}{}", p.leaf.key_pem(), keypair(Alg::P256).serialize_pem());
    assert_eq!(
        err(&p.leaf.pem(), &two, None),
        "private_key_pem: contains 2 PEM blocks (PRIVATE KEY, PRIVATE KEY); \
         exactly one private key is expected"
    );
    let openssh = pem_encode("OPENSSH PRIVATE KEY", b"openssh-key-v1\0none");
    assert_eq!(
        err(&p.leaf.pem(), &openssh, None),
        "private_key_pem: OpenSSH-format private keys are not supported; \
         convert it to PKCS#8 (BEGIN PRIVATE KEY)"
    );
    let public = pem_encode("PUBLIC KEY", &[0x30, 0x00]);
    assert_eq!(
        err(&p.leaf.pem(), &public, None),
        "private_key_pem: holds a PUBLIC KEY block; the private key is required"
    );
}

#[test]
fn encrypted_keys_rejected() {
    let p = pki(Alg::Rsa);
    const MSG: &str = "private_key_pem: is encrypted; provide the private key unencrypted \
                       (passphrase-protected keys are not supported)";
    // PKCS#8 EncryptedPrivateKeyInfo (content irrelevant: refused by type).
    let enc = pem_encode("ENCRYPTED PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]);
    assert_eq!(err(&p.leaf.pem(), &enc, None), MSG);
    // Legacy OpenSSL encryption (RFC 1421 headers).
    let pkcs1 = rsa_pkcs1_pem();
    let legacy = pkcs1.replacen(
        "-----BEGIN RSA PRIVATE KEY-----\n",
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
         DEK-Info: AES-128-CBC,3F17F5316E2BAC89F5A8F06A8C9A2B3C\n\n",
        1,
    );
    assert_eq!(err(&p.leaf.pem(), &legacy, None), MSG);
}

#[test]
fn unsupported_key_algorithm() {
    let p = pki(Alg::P256);
    // PKCS#8 Ed448 key: SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.113 }, OCTET STRING { OCTET STRING (57 bytes) } }
    let mut der = vec![0x30, 0x47, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x71];
    der.extend_from_slice(&[0x04, 0x3b, 0x04, 0x39]);
    der.extend_from_slice(&[7u8; 57]);
    let ed448 = pem_encode("PRIVATE KEY", &der);
    assert_eq!(
        err(&p.leaf.pem(), &ed448, None),
        "private_key_pem: unsupported key algorithm Ed448 \
         (supported: RSA, ECDSA P-256, ECDSA P-384, Ed25519)"
    );
}

// ---------------------------------------------------------------------------
// Secrets never leak into errors

#[test]
fn errors_never_contain_key_material() {
    let p = pki(Alg::Rsa);
    let keys = [
        rsa_pkcs8_pem().to_string(),
        rsa_pkcs1_pem(),
        keypair(Alg::P256).serialize_pem(),
        p256_sec1_pem(&keypair(Alg::P256).serialize_pem()),
        keypair(Alg::Ed25519).serialize_pem(),
    ];
    let mut checked = 0;
    for key in &keys {
        let body = pem_body(key);
        assert!(body.len() >= 2);
        let middle = body.len() / 2;
        let mut variants = vec![
            key.clone(),                                                 // wrong key (for all but RSA)
            format!("{key}trailing secret junk\n"),                      // trailing garbage
            key.replace(body[middle], "@@@@"),                           // corrupted base64
            key.lines().take(body.len()).collect::<Vec<_>>().join("\n"), // truncated
            format!("{key}{key}"),                                       // two keys
            key.replacen(body[0], &body[0][..body[0].len() - 4], 1),     // bad length
        ];
        variants.push(key.replace("PRIVATE KEY", "SECRET BLOB"));
        // Key body framed as a certificate (reaches the X.509 parser's errors).
        let mut as_cert = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in &body {
            as_cert.push_str(line);
            as_cert.push('\n');
        }
        as_cert.push_str("-----END CERTIFICATE-----\n");
        variants.push(as_cert);
        for v in &variants {
            let outcomes = [
                validate(&p.leaf.pem(), v, None),
                validate(v, v, None),
                validate(&p.leaf.pem(), &p.leaf.pem(), Some(v)),
            ];
            for r in outcomes {
                if let Err(e) = r {
                    let shown = format!("{e} {e:?}");
                    for line in &body {
                        assert!(!shown.contains(line), "key line leaked into: {shown}");
                        // No 16-char piece of the key body either.
                        for piece in line.as_bytes().chunks(16).filter(|c| c.len() == 16) {
                            let piece = std::str::from_utf8(piece).unwrap();
                            assert!(!shown.contains(piece), "key piece leaked into: {shown}");
                        }
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 80, "only {checked} errors checked");
}

// ---------------------------------------------------------------------------
// cert_facts

#[test]
fn cert_facts_reads_the_leaf_of_a_cert_file_with_chain() {
    let p = pki(Alg::P256);
    let file = format!("{}\n{}", p.leaf.pem(), p.chain());
    let facts = cert_facts(file.as_bytes()).unwrap();
    assert_eq!(facts.subject, "CN=Leaf");
    assert_eq!(facts.not_before, NOW - DAY);
    assert_eq!(facts.not_after, NOW + 90 * DAY);
    let digest: [u8; 32] = Sha256::digest(p.leaf.cert.der().as_ref()).into();
    assert_eq!(facts.leaf_sha256, digest);
    // Same facts as validation returns.
    assert_eq!(validate(&p.leaf.pem(), &p.leaf.key_pem(), Some(&p.chain())).unwrap(), facts);
    // Lenient about text around the blocks (files found on hosts).
    let annotated = format!("subject=CN = Leaf\r\n{}", file.replace('\n', "\r\n"));
    assert_eq!(cert_facts(annotated.as_bytes()), Some(facts));
}

#[test]
fn cert_facts_none_without_parseable_certificate() {
    let p = pki(Alg::P256);
    assert_eq!(cert_facts(b""), None);
    assert_eq!(cert_facts(p.leaf.key_pem().as_bytes()), None);
    assert_eq!(cert_facts(b"\xff\xfe binary junk"), None);
    let pem = p.leaf.pem();
    assert_eq!(cert_facts(&pem.as_bytes()[..pem.len() / 2]), None);
    let bad = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
    assert_eq!(cert_facts(bad.as_bytes()), None);
}

#[test]
fn error_type_shape() {
    let e = validate("", "", None).unwrap_err();
    assert_eq!(e.field, "certificate_pem");
    assert_eq!(e.problem, "is empty");
    let _: &dyn std::error::Error = &e;
    // Algorithm values from rcgen used above must stay distinct (sanity).
    let algs: [&SignatureAlgorithm; 2] = [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P256_SHA256];
    assert_ne!(algs[0], algs[1]);
}

/// The fast P-256 path (ring) keeps the same verdicts: a key file whose
/// embedded public key is not its secret's is invalid, and a key without
/// an embedded public key still matches (or not) by its secret.
#[test]
fn p256_embedded_public_key_must_be_the_secrets() {
    use p256::elliptic_curve::sec1::ToSec1Point as _;
    use p256::pkcs8::DecodePrivateKey as _;
    use sec1::der::Encode as _;
    let p = pki(Alg::P256);
    let own = p256::SecretKey::from_pkcs8_pem(&p.leaf.key_pem()).unwrap();
    let other = p256::SecretKey::from_pkcs8_pem(&keypair(Alg::P256).serialize_pem()).unwrap();
    let secret = own.to_bytes();
    let foreign_point = other.public_key().to_sec1_point(false);
    let own_point = own.public_key().to_sec1_point(false);
    let sec1_with = |point: Option<&[u8]>| {
        let ec = sec1::EcPrivateKey {
            private_key: &secret[..],
            parameters: Some(sec1::EcParameters::NamedCurve(sec1::der::oid::ObjectIdentifier::new_unwrap(
                "1.2.840.10045.3.1.7",
            ))),
            public_key: point,
        };
        pem_encode("EC PRIVATE KEY", &ec.to_der().unwrap())
    };
    assert!(validate(&p.leaf.pem(), &sec1_with(Some(own_point.as_bytes())), None).is_ok());
    assert!(validate(&p.leaf.pem(), &sec1_with(None), None).is_ok(), "no embedded point: matched by the secret");
    assert_eq!(
        err(&p.leaf.pem(), &sec1_with(Some(foreign_point.as_bytes())), None),
        "private_key_pem: SEC1 ECDSA P-256 private key is invalid"
    );
    // Compressed embedded point (ring takes only uncompressed): derived instead.
    let compressed = own.public_key().to_sec1_point(true);
    assert!(validate(&p.leaf.pem(), &sec1_with(Some(compressed.as_bytes())), None).is_ok());
}

/// DER of a PKCS#1 RSAPrivateKey whose modulus has `bits` bits (the other
/// integers are junk: the size is refused before anything looks at them).
fn rsa_pkcs1_der_of_bits(bits: usize) -> Vec<u8> {
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = body.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len.to_be_bytes().iter().copied().skip_while(|b| *b == 0).collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(body);
        out
    }
    let mut n = vec![0xffu8; bits.div_ceil(8)];
    n[0] = 0xff >> (n.len() * 8 - bits);
    if n[0] & 0x80 != 0 {
        n.insert(0, 0); // positive, minimal
    }
    let mut body = tlv(0x02, &[0]);
    body.extend(tlv(0x02, &n));
    body.extend(tlv(0x02, &[0x01, 0x00, 0x01]));
    for _ in 0..6 {
        body.extend(tlv(0x02, &[0x03]));
    }
    tlv(0x30, &body)
}

#[test]
fn rsa_keys_above_8192_bits_are_rejected_before_any_arithmetic() {
    let p = pki(Alg::Rsa);
    for bits in [8193, 100_000, 4_000_000] {
        let der = rsa_pkcs1_der_of_bits(bits);
        let started = std::time::Instant::now();
        let e = err(&p.leaf.pem(), &pem_encode("RSA PRIVATE KEY", &der), None);
        assert_eq!(e, format!("private_key_pem: RSA key of {bits} bits is larger than the 8192-bit limit"));
        // The same key wrapped in PKCS#8.
        let mut info = vec![0x02, 0x01, 0x00];
        info.extend([0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00]);
        let mut octets = vec![0x04];
        let len = der.len();
        let lb: Vec<u8> = len.to_be_bytes().iter().copied().skip_while(|b| *b == 0).collect();
        octets.push(0x80 | lb.len() as u8);
        octets.extend(lb);
        octets.extend(&der);
        info.extend(octets);
        let mut pkcs8 = vec![0x30];
        let lb: Vec<u8> = info.len().to_be_bytes().iter().copied().skip_while(|b| *b == 0).collect();
        pkcs8.push(0x80 | lb.len() as u8);
        pkcs8.extend(lb);
        pkcs8.extend(info);
        if pkcs8.len() * 4 / 3 < MAX_FIELD_BYTES {
            let e = err(&p.leaf.pem(), &pem_encode("PRIVATE KEY", &pkcs8), None);
            assert_eq!(e, format!("private_key_pem: RSA key of {bits} bits is larger than the 8192-bit limit"));
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{bits} bits: {:?}", started.elapsed());
    }
    // At the limit the size check passes (the junk key then fails as junk).
    let e = err(&p.leaf.pem(), &pem_encode("RSA PRIVATE KEY", &rsa_pkcs1_der_of_bits(8192)), None);
    assert!(!e.contains("bit limit"), "{e}");
}

// ---------------------------------------------------------------------------
// PKCS#12 keystores

#[test]
fn a_keystore_opens_to_what_it_was_built_with_and_a_rebuild_holds_the_same() {
    use certdeploy_pki::{keystore_holds, pkcs12_keystore};
    let rsa = pki(Alg::Rsa);
    let p256 = pki(Alg::P256);
    let p384 = pki(Alg::P384);
    let rsa_pkcs1 = rsa_pkcs1_pem();
    let p256_sec1 = p256_sec1_pem(&p256.leaf.key_pem());
    let p384_sec1 = p384_sec1_pem(&p384.leaf.key_pem());
    // RSA as its leaf's key: the leaf of `rsa` is signed with the shared RSA key.
    let cases: [(&Pki, &str); 4] =
        [(&rsa, &rsa_pkcs1), (&p256, &p256.leaf.key_pem()), (&p256, &p256_sec1), (&p384, &p384_sec1)];
    for (i, (p, key)) in cases.into_iter().enumerate() {
        let chain = p.chain();
        let ks = pkcs12_keystore(&p.leaf.pem(), key, Some(&chain), "certdeploy", "s3cret").unwrap();
        assert_eq!(keystore_holds(&ks.bytes, "s3cret"), Some(ks.holds), "case {i}");
        let again = pkcs12_keystore(&p.leaf.pem(), key, Some(&chain), "certdeploy", "s3cret").unwrap();
        assert_ne!(*again.bytes, *ks.bytes, "case {i}: random salts");
        assert_eq!(again.holds, ks.holds, "case {i}: the same content");
        assert_eq!(keystore_holds(&ks.bytes, "other"), None, "case {i}: wrong password");
        let other_alias = pkcs12_keystore(&p.leaf.pem(), key, Some(&chain), "tomcat", "s3cret").unwrap();
        assert_ne!(other_alias.holds, ks.holds, "case {i}: another alias");
        let no_chain = pkcs12_keystore(&p.leaf.pem(), key, None, "certdeploy", "s3cret").unwrap();
        assert_ne!(no_chain.holds, ks.holds, "case {i}: another chain");
        assert_eq!(keystore_holds(&ks.bytes[..ks.bytes.len() - 1], "s3cret"), None, "case {i}: truncated");
        assert_eq!(keystore_holds(b"not a keystore", "s3cret"), None);
    }
    // A PKCS#1 key and its PKCS#8 form are the same key in the keystore.
    let pkcs8 = pkcs12_keystore(&rsa.leaf.pem(), rsa_pkcs8_pem(), None, "a", "pw").unwrap();
    let pkcs1 = pkcs12_keystore(&rsa.leaf.pem(), &rsa_pkcs1, None, "a", "pw").unwrap();
    assert_eq!(pkcs8.holds, pkcs1.holds);
}
