//! PKCS#12 keystores (for Java services): built from a request's validated
//! material with the p12-keystore crate (PBES2: PBKDF2-HMAC-SHA256 and
//! AES-256-CBC, HMAC-SHA256 MAC: what keytool and OpenSSL 3 write by
//! default), and opened again to tell what one holds.
//!
//! A keystore's bytes differ at every build (random salts and IVs), so two
//! keystores are compared by what they hold: [`keystore_holds`] is a digest
//! of every entry (alias, key, certificates) of a keystore that opens with
//! the password, and a freshly built keystore's digest is read back from its
//! own bytes the same way.

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use p12_keystore::{Certificate, EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm, PrivateKeyChain};

use crate::{FIELD_CERT, FIELD_CHAIN, FIELD_KEY, PkiError, cert_blocks, key_err, parse_pem};

/// PBKDF2 iterations of the keys that encrypt the keystore and compute its
/// MAC (the JDK's default).
pub const KEYSTORE_ITERATIONS: u64 = 10_000;

/// A keystore found on a host is opened only when at most this large and
/// its MAC takes at most [`MAX_MAC_ITERATIONS`]: opening one costs PBKDF2
/// rounds, and the file is not certdeploy's to trust.
pub const MAX_KEYSTORE_BYTES: usize = 1024 * 1024;
pub const MAX_MAC_ITERATIONS: i32 = 1_000_000;

/// A keystore built for one request.
pub struct Pkcs12 {
    pub bytes: Zeroizing<Vec<u8>>,
    /// [`keystore_holds`] of `bytes`.
    pub holds: [u8; 32],
}

impl std::fmt::Debug for Pkcs12 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pkcs12([redacted])")
    }
}

/// Build a PKCS#12 keystore holding the key with the certificate and the
/// chain (in that order) under `alias`, encrypted and authenticated with
/// `password`. The material must have passed [`crate::validate_bundle`].
pub fn pkcs12_keystore(
    certificate_pem: &str,
    private_key_pem: &str,
    chain_pem: Option<&str>,
    alias: &str,
    password: &str,
) -> Result<Pkcs12, PkiError> {
    let key = private_key_pkcs8(private_key_pem)?;
    let mut certs = Vec::new();
    for (field, text) in [(FIELD_CERT, Some(certificate_pem)), (FIELD_CHAIN, chain_pem)] {
        let Some(text) = text.filter(|t| !t.trim().is_empty()) else { continue };
        for b in cert_blocks(field, text)? {
            certs.push(
                Certificate::from_der(&b.der)
                    .map_err(|e| PkiError::new(field, format!("cannot go into a PKCS#12 keystore: {e}")))?,
            );
        }
    }
    let Some(leaf) = certs.first() else { return Err(PkiError::new(FIELD_CERT, "holds no certificate")) };
    // The local key id ties the key to its certificate inside the file.
    let local_key_id = Sha256::digest(leaf.as_der())[..20].to_vec();
    let mut store = KeyStore::new();
    store.add_entry(alias, KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(&*key, local_key_id, certs)));
    let bytes = store
        .writer(password)
        .encryption_algorithm(EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
        .encryption_iterations(KEYSTORE_ITERATIONS)
        .mac_algorithm(MacAlgorithm::HmacSha256)
        .mac_iterations(KEYSTORE_ITERATIONS)
        .write()
        .map_err(|e| key_err(format!("cannot build the PKCS#12 keystore: {}", keystore_error(&e))))?;
    let bytes = Zeroizing::new(bytes);
    let holds = keystore_holds(&bytes, password)
        .ok_or_else(|| key_err("the PKCS#12 keystore just built does not open again".to_string()))?;
    Ok(Pkcs12 { bytes, holds })
}

/// What a keystore holds, as a digest of every entry (alias and kind, key,
/// certificates in chain order), when it opens with `password` and its MAC
/// verifies. `None` otherwise: a keystore without MAC, one larger than
/// [`MAX_KEYSTORE_BYTES`] or whose MAC takes more than
/// [`MAX_MAC_ITERATIONS`], one holding secret keys.
pub fn keystore_holds(bytes: &[u8], password: &str) -> Option<[u8; 32]> {
    use der07::Decode as _;
    if bytes.len() > MAX_KEYSTORE_BYTES {
        return None;
    }
    // Without a MAC the crate would decrypt whatever the file says; with a
    // wrong password the MAC fails before any bag is decrypted.
    let pfx = pkcs12::pfx::Pfx::from_der(bytes).ok()?;
    if !pfx.mac_data.is_some_and(|m| (1..=MAX_MAC_ITERATIONS).contains(&m.iterations)) {
        return None;
    }
    let store = KeyStore::from_pkcs12(bytes, password).ok()?;
    let mut h = Sha256::new();
    h.update(b"certdeploy pkcs12 holds v1\0");
    let put = |h: &mut Sha256, bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    for (alias, entry) in store.entries() {
        put(&mut h, alias.as_bytes());
        match entry {
            KeyStoreEntry::PrivateKeyChain(chain) => {
                put(&mut h, b"key");
                put(&mut h, chain.key());
                h.update((chain.chain().len() as u64).to_be_bytes());
                for c in chain.chain() {
                    put(&mut h, c.as_der());
                }
            }
            KeyStoreEntry::Certificate(c) => {
                put(&mut h, b"trusted");
                put(&mut h, c.as_der());
            }
            KeyStoreEntry::Secret(_) => return None,
        }
    }
    Some(h.finalize().into())
}

/// The private key as PKCS#8 DER (a keystore holds PKCS#8): a `PRIVATE KEY`
/// block as it is, PKCS#1 and SEC1 keys converted.
fn private_key_pkcs8(text: &str) -> Result<Zeroizing<Vec<u8>>, PkiError> {
    use pkcs8::EncodePrivateKey as _;
    let blocks = parse_pem(FIELD_KEY, text)?;
    let Some(block) = blocks.iter().find(|b| b.label != "EC PARAMETERS") else {
        return Err(key_err("contains no private key block"));
    };
    let invalid = || key_err(format!("{} block cannot be converted to PKCS#8", block.label));
    let doc = match block.label.as_str() {
        "PRIVATE KEY" => return Ok(Zeroizing::new(block.der.to_vec())),
        "RSA PRIVATE KEY" => {
            let key = <rsa::PrivateKey as rsa::pkcs1::DecodeRsaPrivateKey>::from_pkcs1_der(&block.der)
                .map_err(|_| invalid())?;
            key.to_pkcs8_der().map_err(|_| invalid())?
        }
        "EC PRIVATE KEY" => match p256::SecretKey::from_sec1_der(&block.der) {
            Ok(k) => k.to_pkcs8_der().map_err(|_| invalid())?,
            Err(_) => p384::SecretKey::from_sec1_der(&block.der)
                .map_err(|_| invalid())?
                .to_pkcs8_der()
                .map_err(|_| invalid())?,
        },
        _ => return Err(invalid()),
    };
    Ok(Zeroizing::new(doc.as_bytes().to_vec()))
}

/// The crate's error without anything taken from the material.
fn keystore_error(e: &p12_keystore::error::Error) -> String {
    // Its messages name encodings and algorithms, never key bytes.
    e.to_string().chars().take(200).collect()
}
