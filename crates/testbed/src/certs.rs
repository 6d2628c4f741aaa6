//! Real X.509 material for tests (rcgen): a CA, an intermediate, and leaf
//! certificates with chosen validity.

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair};
use sha2::Digest as _;

const DAY: i64 = 86_400;

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn t(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).expect("valid time")
}

fn params(cn: &str, not_before: i64, not_after: i64, ca: bool) -> CertificateParams {
    let mut p = CertificateParams::new(vec![cn.to_string()]).expect("params");
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

/// A leaf certificate with its key and chain, as PEM.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub cert_pem: String,
    pub key_pem: String,
    pub chain_pem: String,
    /// SHA-256 of the leaf DER (what a TLS handshake presents).
    pub leaf_sha256: String,
    pub not_before: i64,
}

/// A root CA and an intermediate that issues leaves (P-256).
pub struct TestCa {
    inter_params: CertificateParams,
    inter_key: KeyPair,
    chain_pem: String,
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

impl TestCa {
    pub fn new() -> TestCa {
        let n = now();
        let root_params = params("certdeploy test root", n - 365 * DAY, n + 3650 * DAY, true);
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let root = root_params.self_signed(&root_key).expect("root");
        let inter_params = params("certdeploy test intermediate", n - 300 * DAY, n + 3000 * DAY, true);
        let inter_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let issuer = Issuer::from_params(&root_params, &root_key);
        let inter = inter_params.signed_by(&inter_key, &issuer).expect("intermediate");
        let chain_pem = format!("{}{}", inter.pem(), root.pem());
        TestCa { inter_params, inter_key, chain_pem }
    }

    /// A leaf for `cn`, valid from `not_before_days_ago` days ago for a year.
    pub fn leaf(&self, cn: &str, not_before_days_ago: i64) -> Bundle {
        let n = now();
        let nb = n - not_before_days_ago * DAY;
        self.leaf_at(cn, nb, nb + 365 * DAY)
    }

    /// A leaf with explicit validity (unix seconds).
    pub fn leaf_at(&self, cn: &str, not_before: i64, not_after: i64) -> Bundle {
        self.signed(params(cn, not_before, not_after, false), not_before)
    }

    /// A leaf whose subject alternative names are exactly `names` (the
    /// first is also its common name), valid from a day ago for a year.
    pub fn leaf_for_names(&self, names: &[&str]) -> Bundle {
        let nb = now() - DAY;
        let mut p = params(names[0], nb, nb + 365 * DAY, false);
        p.subject_alt_names =
            names.iter().map(|n| rcgen::SanType::DnsName((*n).try_into().expect("a DNS name"))).collect();
        self.signed(p, nb)
    }

    /// A renewal of `old` that keeps its private key (as many ACME clients
    /// do): a new leaf for `cn`, valid from `not_before_days_ago` days ago.
    pub fn renewal_keeping_key(&self, old: &Bundle, cn: &str, not_before_days_ago: i64) -> Bundle {
        let nb = now() - not_before_days_ago * DAY;
        let key = KeyPair::from_pem(&old.key_pem).expect("the old bundle's key");
        self.signed_with(params(cn, nb, nb + 365 * DAY, false), nb, key)
    }

    fn signed(&self, p: CertificateParams, not_before: i64) -> Bundle {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        self.signed_with(p, not_before, key)
    }

    fn signed_with(&self, p: CertificateParams, not_before: i64, key: KeyPair) -> Bundle {
        let issuer = Issuer::from_params(&self.inter_params, &self.inter_key);
        let cert = p.signed_by(&key, &issuer).expect("leaf");
        Bundle {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain_pem: self.chain_pem.clone(),
            leaf_sha256: hex::encode(sha2::Sha256::digest(cert.der())),
            not_before,
        }
    }
}

impl TestCa {
    /// A leaf whose validity ended `days_ago` days ago.
    pub fn expired_leaf(&self, cn: &str, days_ago: i64) -> Bundle {
        let end = now() - days_ago * DAY;
        self.leaf_at(cn, end - 90 * DAY, end)
    }

    /// A leaf that becomes valid only `days_ahead` days from now.
    pub fn future_leaf(&self, cn: &str, days_ahead: i64) -> Bundle {
        let start = now() + days_ahead * DAY;
        self.leaf_at(cn, start, start + 365 * DAY)
    }
}

impl Bundle {
    /// The same certificate with another bundle's private key (mismatch).
    pub fn with_key_of(&self, other: &Bundle) -> Bundle {
        Bundle { key_pem: other.key_pem.clone(), ..self.clone() }
    }

    /// The chain's certificates in reverse (root first: not issuing order).
    pub fn reversed_chain(&self) -> String {
        const END: &str = "-----END CERTIFICATE-----";
        let mut blocks: Vec<String> = self
            .chain_pem
            .split_inclusive(END)
            .map(|b| b.trim().to_string())
            .filter(|b| b.contains(END))
            .map(|b| format!("{b}\n"))
            .collect();
        blocks.reverse();
        blocks.concat()
    }
}

/// A deploy request body (schema v1) for a configured target.
pub fn request(id: &str, target: &str, b: &Bundle, with_chain: bool) -> Vec<u8> {
    let mut v = serde_json::json!({
        "schema": "certdeploy.deploy-request.v1",
        "deployment_id": id,
        "target": target,
        "certificate_pem": b.cert_pem,
        "private_key_pem": b.key_pem,
        "requested_at": "2026-11-27T21:00:00Z",
    });
    if with_chain {
        v["chain_pem"] = serde_json::Value::String(b.chain_pem.clone());
    }
    serde_json::to_vec(&v).expect("json")
}
