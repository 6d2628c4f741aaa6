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
    match split_record_key(key) {
        Some((id, seq)) => format!("{}#{seq}", String::from_utf8_lossy(id)),
        None => String::from_utf8_lossy(key).into_owned(),
    }
}

/// `id ++ 0x00`: the prefix of every record key of `id`.
pub(crate) fn record_prefix(id: impl AsRef<[u8]>) -> Vec<u8> {
    let id = id.as_ref();
    let mut k = Vec::with_capacity(id.len() + 9);
    k.extend_from_slice(id);
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
    split_record_key(key).ok_or_else(|| Error::Corrupt {
        what: "record key",
        key: printable_key(key),
        problem: "not id ++ 0x00 ++ seq".into(),
    })
}

/// `id ++ 0x00 ++ big-endian seq`, split; `None` for any other shape.
fn split_record_key(key: &[u8]) -> Option<(&[u8], u64)> {
    let i = key.iter().position(|&b| b == 0)?;
    let seq: [u8; 8] = key.get(i + 1..)?.try_into().ok()?;
    Some((&key[..i], u64::from_be_bytes(seq)))
}
