//! The worker's local admin endpoint: a Unix socket (mode 0600, the
//! worker's user only) through which `certdeploy journal list|show` and
//! `certdeploy status` read a journal that a running worker holds (sled
//! allows one process per journal), and `certdeploy control` pauses,
//! resumes or drains consumption without stopping the process.
//!
//! One request per connection: a JSON line in, a JSON line out. Requests
//! are read with a size and time bound; an unknown request gets an error
//! answer, never a crash.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use certdeploy_journal::{DeploymentStatus, SledJournal};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use crate::config::{Config, LiveConfig};

/// The largest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The socket of a worker: `admin_socket`, or beside the journal.
pub fn socket_path(cfg: &Config) -> Option<PathBuf> {
    match cfg.worker.admin_socket.as_deref() {
        Some("") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => {
            // Beside the journal directory, never inside it (whatever a
            // trailing slash says): the journal secures every file in there.
            let mut s = cfg.worker.journal_path.components().as_path().as_os_str().to_os_string();
            s.push(".admin.sock");
            Some(PathBuf::from(s))
        }
    }
}

/// `journal list` rows.
pub fn list(j: &SledJournal) -> Result<Value, certdeploy_journal::Error> {
    Ok(Value::Array(
        j.list()?
            .iter()
            .map(|r| {
                json!({
                    "deployment_id": r.deployment_id,
                    "target": r.target,
                    "host": r.host,
                    "state": format!("{:?}", r.state).to_lowercase(),
                    "outcome": r.outcome.map(|o| o.as_str()),
                    "phase": r.phase,
                    "attempts": r.attempts,
                    "acked": r.acked,
                    "started_at": r.started_at.rfc3339(),
                    "updated_at": r.updated_at.rfc3339(),
                    "records_pruned": r.records_pruned,
                })
            })
            .collect(),
    ))
}

/// `journal show ID`: records and result; `None` when the journal has no such id.
pub fn show(j: &SledJournal, id: &str) -> Result<Option<Value>, certdeploy_journal::Error> {
    let records = j.records(id)?;
    let result = match j.status(id)? {
        Some(DeploymentStatus::Finished { report, .. }) => Some(report),
        _ => None,
    };
    if records.is_empty() && result.is_none() {
        return show_group(j, id);
    }
    let records: Vec<Value> = records
        .iter()
        .map(|r| json!({ "at": r.at.rfc3339(), "event": certdeploy_core::driver::event_name(&r.event), "detail": r.event }))
        .collect();
    Ok(Some(json!({ "deployment_id": id, "records": records, "result": result })))
}

/// A target group's records (the kept request shown only as sealed) and,
/// once it ended, its result.
fn show_group(j: &SledJournal, id: &str) -> Result<Option<Value>, certdeploy_journal::Error> {
    use certdeploy_core::group::GroupEvent;
    let records = j.group_records(id)?;
    if records.is_empty() {
        return Ok(None);
    }
    let mut result = None;
    let shown: Vec<Value> = records
        .iter()
        .map(|r| {
            if let GroupEvent::Ended { result: g } = &r.event {
                result = Some(g.clone());
            }
            let mut detail = serde_json::to_value(&r.event).unwrap_or_default();
            let event = detail.get("event").and_then(Value::as_str).unwrap_or_default().to_string();
            if let Some(o) = detail.as_object_mut() {
                o.remove("event");
                if o.contains_key("request") {
                    o.insert("request".into(), json!("[kept sealed]"));
                }
            }
            json!({ "at": r.at.rfc3339(), "event": event, "detail": detail })
        })
        .collect();
    Ok(Some(json!({ "deployment_id": id, "group": true, "records": shown, "result": result })))
}

/// `status` rows.
pub fn status(j: &SledJournal, cfg: &Config) -> Result<Value, certdeploy_journal::Error> {
    let configured: Vec<String> = cfg.targets.keys().cloned().collect();
    let now = crate::clock::now();
    Ok(Value::Array(crate::status::targets(j, &configured)?.iter().map(|r| r.to_json(now)).collect()))
}

/// What the admin endpoint can change in the worker's main loop.
#[derive(Debug)]
pub struct Control {
    /// True while consumption is paused (no new deliveries): the
    /// operator's `pause`, `resume`, `drain`.
    pub paused: watch::Sender<bool>,
    /// True while the journal housekeeping holds consumption for a
    /// compaction; apart from `paused`, so that neither undoes the other.
    pub compacting: watch::Sender<bool>,
    /// True while the main loop takes no deliveries (its consumer
    /// cancelled) because of `paused` or `compacting`.
    pub held: watch::Sender<bool>,
    /// Deliveries being handled right now.
    pub in_flight: AtomicUsize,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            paused: watch::channel(false).0,
            compacting: watch::channel(false).0,
            held: watch::channel(false).0,
            in_flight: AtomicUsize::new(0),
        }
    }
}

/// Bind the socket (replacing a stale socket of an earlier run, never any
/// other kind of file) and answer requests until the process ends.
pub async fn serve(
    path: PathBuf,
    j: Arc<SledJournal>,
    config: Arc<LiveConfig>,
    control: Arc<Control>,
) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(&path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %path.display(), "admin endpoint");
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("admin endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // The configured targets as of this request (a reload may add some).
        let (j, cfg, control) = (j.clone(), config.get(), control.clone());
        tokio::spawn(async move {
            let (read, mut write) = sock.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
            let answer = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
                Ok(Ok(_)) => match serde_json::from_str::<Value>(&line) {
                    Ok(req) => answer(&req, &j, &cfg, &control).await,
                    Err(e) => json!({ "error": format!("not a JSON request: {e}") }),
                },
                _ => return,
            };
            let mut out = answer.to_string();
            out.push('\n');
            let _ = write.write_all(out.as_bytes()).await;
        });
    }
}

async fn answer(req: &Value, j: &Arc<SledJournal>, cfg: &Arc<Config>, control: &Control) -> Value {
    let err = |e: certdeploy_journal::Error| json!({ "error": e.to_string() });
    let blocking = |f: Box<dyn FnOnce() -> Value + Send>| async move {
        tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| json!({ "error": e.to_string() }))
    };
    match (req["query"].as_str(), req["command"].as_str()) {
        (Some("list"), _) => {
            let j = j.clone();
            blocking(Box::new(move || list(&j).unwrap_or_else(err))).await
        }
        (Some("show"), _) => {
            let Some(id) = req["id"].as_str().map(str::to_string) else { return json!({ "error": "show needs `id`" }) };
            let j = j.clone();
            blocking(Box::new(move || match show(&j, &id) {
                Ok(Some(v)) => v,
                Ok(None) => json!({ "error": format!("no deployment `{id}`"), "not_found": true }),
                Err(e) => err(e),
            }))
            .await
        }
        (Some("status"), _) => {
            let (j, cfg) = (j.clone(), cfg.clone());
            blocking(Box::new(move || status(&j, &cfg).unwrap_or_else(err))).await
        }
        (_, Some("pause")) => {
            control.paused.send_replace(true);
            json!({ "paused": true, "in_flight": control.in_flight.load(Ordering::SeqCst) })
        }
        (_, Some("resume")) => {
            control.paused.send_replace(false);
            json!({ "paused": false, "in_flight": control.in_flight.load(Ordering::SeqCst) })
        }
        (_, Some("drain")) => {
            // Take nothing new, and answer once what was taken is done
            // (bounded by the deployment deadline; the client may also wait less).
            control.paused.send_replace(true);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.worker.deadline_s);
            while control.in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let left = control.in_flight.load(Ordering::SeqCst);
            json!({ "paused": true, "drained": left == 0, "in_flight": left })
        }
        _ => {
            json!({ "error": "unknown request: expected {\"query\": \"list\"|\"show\"|\"status\"} or {\"command\": \"pause\"|\"resume\"|\"drain\"}" })
        }
    }
}

/// Send one request to a worker's admin socket and read its answer.
pub fn ask(path: &Path, request: &Value, timeout: Duration) -> std::io::Result<Value> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = request.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_socket_sits_beside_the_journal_whatever_its_trailing_slash() {
        for jp in ["/var/lib/certdeploy/journal", "/var/lib/certdeploy/journal/"] {
            let text = format!("[worker]\njournal_path = \"{jp}\"\n");
            let cfg = crate::config::Config::parse(&text, "c.toml", &[]).expect("config");
            assert_eq!(
                super::socket_path(&cfg).as_deref(),
                Some(std::path::Path::new("/var/lib/certdeploy/journal.admin.sock")),
                "{jp}"
            );
        }
        let cfg = crate::config::Config::parse("[worker]\nadmin_socket = \"\"\n", "c.toml", &[]).expect("config");
        assert_eq!(super::socket_path(&cfg), None);
    }
}
