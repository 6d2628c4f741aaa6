//! `certdeploy status --live`: read a target's certificate file as it is
//! now, changing nothing on the host.

use std::path::Path;
use std::time::Duration;

use crate::error::{is_no_such_file, sftp_detail};
use crate::pool::{HostAddr, SshPool};

/// The bytes of the (public) file at `path` on the host; `None` when there
/// is no such file. Refuses a file larger than `max` bytes; gives up after
/// `timeout`.
pub async fn read_public_file(
    pool: &SshPool,
    addr: &HostAddr,
    path: &str,
    max: usize,
    timeout: Duration,
) -> Result<Option<Vec<u8>>, String> {
    let work = async {
        let lease = pool.lease(addr).await.map_err(|e| e.message)?;
        let mut f = match lease.sftp().open(Path::new(path)).await {
            Ok(f) => f,
            Err(e) if is_no_such_file(&e) => return Ok(None),
            Err(e) => return Err(format!("{addr}: open {path}: {}", sftp_detail(&e))),
        };
        let mut out = Vec::new();
        loop {
            match f.read(64 * 1024, Default::default()).await {
                Ok(Some(chunk)) => {
                    out.extend_from_slice(&chunk);
                    if out.len() > max {
                        return Err(format!("{addr}: {path} is larger than {max} bytes"));
                    }
                }
                Ok(None) => return Ok(Some(out)),
                Err(e) => return Err(format!("{addr}: read {path}: {}", sftp_detail(&e))),
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(format!("{addr}: reading {path} took longer than {} s", timeout.as_secs())))
}
