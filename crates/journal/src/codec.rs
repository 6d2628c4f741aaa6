//! Versioned values: one format-version byte, then JSON.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::FORMAT_VERSION;
use crate::error::Error;

pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(256);
    out.push(FORMAT_VERSION);
    serde_json::to_writer(&mut out, value).map_err(|source| Error::Encode { what, source })?;
    Ok(out)
}

pub(crate) fn decode<T: DeserializeOwned>(what: &'static str, key: &[u8], bytes: &[u8]) -> Result<T, Error> {
    let key = || printable_key(key);
    match bytes.split_first() {
        None => Err(Error::Corrupt { what, key: key(), problem: "empty value".into() }),
        Some((&FORMAT_VERSION, body)) => {
            serde_json::from_slice(body).map_err(|e| Error::Corrupt { what, key: key(), problem: e.to_string() })
        }
        Some((&found, _)) => Err(Error::UnknownVersion { what, key: key(), found, supported: FORMAT_VERSION }),
    }
}

/// `id` or `id#seq` for record keys.
pub(crate) fn printable_key(key: &[u8]) -> String {
    match key.iter().position(|&b| b == 0) {
        Some(i) if key.len() == i + 9 => {
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&key[i + 1..]);
            format!("{}#{}", String::from_utf8_lossy(&key[..i]), u64::from_be_bytes(seq))
        }
        _ => String::from_utf8_lossy(key).into_owned(),
    }
}

pub(crate) fn record_prefix(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 9);
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k
}

pub(crate) fn record_key(id: &str, seq: u64) -> Vec<u8> {
    let mut k = record_prefix(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The deployment id and sequence number of a record key.
pub(crate) fn record_seq(key: &[u8]) -> Result<(&[u8], u64), Error> {
    match key.iter().position(|&b| b == 0) {
        Some(i) if key.len() == i + 9 => {
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&key[i + 1..]);
            Ok((&key[..i], u64::from_be_bytes(seq)))
        }
        _ => {
            Err(Error::Corrupt { what: "record key", key: printable_key(key), problem: "not id ++ 0x00 ++ seq".into() })
        }
    }
}
