//! The subcommands other than `worker`'s loop.

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use certdeploy_core::driver::Verifier as _;
use certdeploy_core::wire::{self, DeployRequest, ResultEvent, SecretString};
use certdeploy_core::{Digest, Outcome, Report, Timestamp};
use certdeploy_journal::{JournalOptions, SledJournal};
use clap::{Args, Subcommand};
use tokio::sync::watch;

use crate::clock::now;
use crate::config::Config;
use crate::intake;
use crate::runtime::Runtime;
use crate::{Cli, Command, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// Target name from the configuration.
    #[arg(long)]
    pub target: String,
    /// Certificate PEM file.
    #[arg(long)]
    pub cert: PathBuf,
    /// Private key PEM file.
    #[arg(long)]
    pub key: PathBuf,
    /// Chain PEM file (issuing order).
    #[arg(long)]
    pub chain: Option<PathBuf>,
    /// Deployment id (default: generated).
    #[arg(long)]
    pub id: Option<String>,
    /// Print the result event as JSON.
    #[arg(long)]
    pub json: bool,
    /// Read the host and compare, change nothing: print what a deployment
    /// would do (outcome `planned`; exit 0 when planned). Not journaled.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct RevertArgs {
    /// The deployed deployment to revert (an id in this configuration's journal).
    #[arg(long)]
    pub deployment_id: String,
    /// Print the result event as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[arg(long, required_unless_present = "batch", conflicts_with = "batch")]
    pub target: Option<String>,
    #[arg(long, requires = "target")]
    pub cert: Option<PathBuf>,
    #[arg(long, requires = "target")]
    pub key: Option<PathBuf>,
    #[arg(long, requires = "target")]
    pub chain: Option<PathBuf>,
    /// Deployment id for a single request (default: generated).
    #[arg(long, requires = "target")]
    pub id: Option<String>,
    /// A JSONL file of deploy requests, one per line.
    #[arg(long)]
    pub batch: Option<PathBuf>,
    /// Follow the results until every request has one.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// No progress bar (for logs and scripts).
    #[arg(long)]
    pub quiet: bool,
    /// Seal private keys to this age recipient (`age1…`; repeatable);
    /// default `[submit] key_recipients`.
    #[arg(long = "recipient", value_name = "AGE_RECIPIENT")]
    pub recipients: Vec<String>,
    /// Send every request as a dry run (`"dry_run": true`): the worker reads
    /// and compares, changes nothing, and answers `planned` with the plan.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Identity file to create (mode 0600; an existing file is never overwritten).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum JournalCommand {
    /// A table of deployments in the journal.
    List {
        /// One JSON array of objects instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Every event of one deployment, with timestamps.
    Show {
        id: String,
        /// One JSON object (`deployment_id`, `records`, `result`) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Remove terminal records older than the retention (dedupe keys are kept).
    Gc {
        /// Days to keep (default: worker.journal_retention_days).
        #[arg(long)]
        retention_days: Option<u64>,
    },
    /// Rewrite the journal into fresh files, giving back the space gc freed
    /// (a stopped worker's; a running worker compacts by itself).
    Compact,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Only this target (default: every configured target and every target in the journal).
    #[arg(long)]
    pub target: Option<String>,
    /// One JSON array of objects (`target`, `deployment_id`, `outcome`, `finished_at`, `subject`,
    /// `not_after`, `days_left`; with `--live` also `live`) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also read each configured target's certificate file over SSH and, where `verify_endpoint`
    /// is set, the leaf it serves; flag a target whose file or served certificate is not what
    /// certdeploy last deployed there (exit 1). Changes nothing on the hosts.
    #[arg(long)]
    pub live: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Only this target (default: all).
    #[arg(long)]
    pub target: Option<String>,
    /// One JSON array (per target: `target`, `host`, `ok`, `checks`) instead of lines.
    #[arg(long)]
    pub json: bool,
}

async fn status(cfg: Config, a: StatusArgs) -> anyhow::Result<u8> {
    let rows = Reader::open(&cfg)?.query(&cfg, serde_json::json!({ "query": "status" }))?;
    if let Some(e) = answer_error(&rows) {
        anyhow::bail!("{e}");
    }
    let mut rows = rows.as_array().cloned().unwrap_or_default();
    if let Some(t) = &a.target {
        rows.retain(|r| r["target"].as_str() == Some(t));
        if rows.is_empty() {
            eprintln!("certdeploy: --target: `{t}` is neither configured nor in the journal");
            return Ok(EXIT_USAGE);
        }
    }
    let mut all_match = true;
    if a.live {
        all_match = live_status(&cfg, &mut rows).await?;
    }
    let code = if all_match { EXIT_OK } else { EXIT_FAILED };
    if a.json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(code);
    }
    println!(
        "{:<16} {:<40} {:<12} {:<40} {:<20} {:>9}",
        "TARGET", "LAST DEPLOYMENT", "OUTCOME", "SUBJECT", "NOT AFTER", "DAYS LEFT"
    );
    for r in &rows {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
        let days = r["days_left"].as_i64().map_or("-".to_string(), |d| d.to_string());
        println!(
            "{:<16} {:<40} {:<12} {:<40} {:<20} {:>9}",
            s("target"),
            s("deployment_id"),
            s("outcome"),
            s("subject"),
            s("not_after"),
            days
        );
        if let Some(live) = r.get("live").filter(|l| !l.is_null()) {
            let mark = if live["matches"].as_bool() == Some(true) { "live: ok" } else { "live: MISMATCH" };
            println!("{:<16} {mark}: {}", "", live["detail"].as_str().unwrap_or(""));
        }
    }
    Ok(code)
}

/// `status --live`: for every row of a configured target, what its
/// certificate file holds now (over SFTP, read only) and, with a
/// `verify_endpoint`, the leaf served there; `live.matches` says whether
/// both are what the journal says certdeploy last put in place. Returns
/// whether every checked target matches.
async fn live_status(cfg: &Config, rows: &mut [serde_json::Value]) -> anyhow::Result<bool> {
    let control_dir = std::env::temp_dir().join(format!("certdeploy-status-{}", std::process::id()));
    let pool = certdeploy_ssh::SshPool::new(cfg.ssh_config(control_dir, Duration::from_secs(30)))?;
    let verifier = crate::verify::TlsVerifier::new(Duration::from_secs(10));
    let mut all = true;
    for row in rows.iter_mut() {
        let Some(t) = row["target"].as_str().and_then(|n| cfg.targets.get(n)) else { continue };
        let want = (row["subject"].as_str().map(str::to_string), row["not_after"].as_str().map(str::to_string));
        let read =
            certdeploy_ssh::read_public_file(&pool, &t.host_addr(), &t.cert_path, 1 << 20, Duration::from_secs(30))
                .await;
        let mut problems = Vec::new();
        let mut live = serde_json::Map::new();
        let file = match read {
            Err(e) => {
                problems.push(e);
                None
            }
            Ok(None) => {
                problems.push(format!("{} does not exist", t.cert_path));
                None
            }
            Ok(Some(bytes)) => match certdeploy_pki::cert_facts(&bytes) {
                None => {
                    problems.push(format!("{} holds no certificate", t.cert_path));
                    None
                }
                Some(f) => Some(f),
            },
        };
        if let Some(f) = &file {
            let not_after = Timestamp(u64::try_from(f.not_after).unwrap_or(0).saturating_mul(1000)).rfc3339();
            live.insert("file_subject".into(), f.subject.clone().into());
            live.insert("file_not_after".into(), not_after.clone().into());
            if want.0.is_none() {
                problems.push("certdeploy has deployed nothing here that it knows of".into());
            } else if (Some(f.subject.clone()), Some(not_after)) != want {
                problems.push(format!(
                    "{} holds {} (notAfter {}), not what certdeploy last deployed",
                    t.cert_path,
                    f.subject,
                    live["file_not_after"].as_str().unwrap_or("")
                ));
            }
        }
        if let Some(endpoint) = &t.verify_endpoint {
            match verifier.served_leaf(endpoint, t.verify_sni.as_deref()).await {
                Ok(served) => {
                    let same = file.as_ref().is_some_and(|f| Digest(f.leaf_sha256) == served);
                    live.insert("served_matches_file".into(), same.into());
                    if !same {
                        problems.push(format!("{endpoint} serves another certificate than {}", t.cert_path));
                    }
                }
                Err(e) => problems.push(format!("{endpoint}: {e}")),
            }
        }
        let ok = problems.is_empty();
        all &= ok;
        live.insert("matches".into(), ok.into());
        live.insert(
            "detail".into(),
            if ok { "file and endpoint as deployed".to_string() } else { problems.join("; ") }.into(),
        );
        row["live"] = serde_json::Value::Object(live);
    }
    pool.close_all().await;
    let _ = std::fs::remove_dir_all(pool.config().control_dir.as_path());
    Ok(all)
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ControlAction {
    Pause,
    Resume,
    Drain,
}

fn control(cfg: Config, action: ControlAction) -> anyhow::Result<u8> {
    let Some(sock) = crate::admin::socket_path(&cfg) else {
        anyhow::bail!("the admin socket is disabled (admin_socket = \"\")");
    };
    let command = match action {
        ControlAction::Pause => "pause",
        ControlAction::Resume => "resume",
        ControlAction::Drain => "drain",
    };
    // A drain waits for in-flight deployments: as long as their deadline.
    let wait = Duration::from_secs(cfg.worker.deadline_s + 30);
    let v = crate::admin::ask(&sock, &serde_json::json!({ "command": command }), wait)
        .with_context(|| format!("no worker answers at {}", sock.display()))?;
    if let Some(e) = answer_error(&v) {
        anyhow::bail!("{e}");
    }
    println!("{v}");
    Ok(if command == "drain" && v["drained"] != true { EXIT_FAILED } else { EXIT_OK })
}

/// Completions and the man page describe the command line itself: no
/// configuration is read.
fn describe_cli(c: &Command) -> Option<u8> {
    use clap::CommandFactory;
    use std::io::Write;
    let mut cmd = Cli::command();
    // Rendered into memory first: clap_complete panics on a write error
    // (a closed pipe, as with `| head`), a buffer cannot fail.
    let mut text = Vec::new();
    let what = match c {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut cmd, "certdeploy", &mut text);
            "completions"
        }
        Command::Man => {
            if let Err(e) = clap_mangen::Man::new(cmd).render(&mut text) {
                eprintln!("certdeploy: man: {e}");
                return Some(EXIT_FAILED);
            }
            "man"
        }
        _ => return None,
    };
    let mut out = std::io::stdout().lock();
    Some(match out.write_all(&text).and_then(|()| out.flush()) {
        Ok(()) => EXIT_OK,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(e) => {
            eprintln!("certdeploy: {what}: {e}");
            EXIT_FAILED
        }
    })
}

pub async fn dispatch(cli: Cli) -> u8 {
    if let Command::Keygen(a) = &cli.command {
        return keygen(a);
    }
    if let Some(code) = describe_cli(&cli.command) {
        return code;
    }
    let mut cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("certdeploy: config error: {e}");
            return EXIT_USAGE;
        }
    };
    if matches!(cli.command, Command::Worker)
        && let Err(e) = cfg.load_keys()
    {
        eprintln!("certdeploy: config error: {}: {}: {}", cli.config.display(), e.key, e.problem);
        return EXIT_USAGE;
    }
    let r = match cli.command {
        Command::Worker => run_worker(cfg, cli.config.clone()).await,
        Command::Deploy(a) => deploy(cfg, a).await,
        Command::Revert(a) => revert(cfg, a).await,
        Command::Submit(a) => submit(cfg, a).await,
        Command::Journal(c) => journal(cfg, c),
        Command::Check(a) => check(cfg, a).await,
        Command::Keygen(_) => unreachable!("answered before the configuration is read"),
        Command::Status(a) => status(cfg, a).await,
        Command::Control { action } => control(cfg, action),
        Command::Completions { .. } | Command::Man => unreachable!("answered by describe_cli"),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("certdeploy: {e:#}");
            EXIT_FAILED
        }
    }
}

fn keygen(a: &KeygenArgs) -> u8 {
    match crate::sealed::keygen(&a.out) {
        Ok(recipient) => {
            println!("{recipient}");
            eprintln!("certdeploy: identity written to {} (mode 0600)", a.out.display());
            EXIT_OK
        }
        Err(e) => {
            eprintln!("certdeploy: keygen --out {}: {e}", a.out.display());
            EXIT_FAILED
        }
    }
}

async fn run_worker(cfg: Config, path: PathBuf) -> anyhow::Result<u8> {
    use tokio::signal::unix::{SignalKind, signal};
    // SIGHUP reloads the configuration; its handler is in place before
    // anything else, so an early SIGHUP never ends the process (the default
    // action). Requests that arrive while one is pending are one reload.
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            let _ = reload_tx.try_send(());
        }
    });
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received: graceful shutdown (a second signal exits at once)");
        let _ = tx.send(true);
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        eprintln!("certdeploy: second signal: exiting now; unfinished deployments resume on next start");
        std::process::exit(130);
    });
    let reloads = crate::worker::Reloads { path, requests: reload_rx };
    crate::worker::run(cfg, Some(reloads), rx).await?;
    Ok(EXIT_OK)
}

fn read(path: &PathBuf, what: &str) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("--{what} {}", path.display()))?;
    if meta.len() > wire::MAX_MESSAGE_BYTES as u64 {
        anyhow::bail!("--{what} {}: larger than 1 MiB", path.display());
    }
    std::fs::read_to_string(path).with_context(|| format!("--{what} {}", path.display()))
}

pub fn generate_id(target: &str) -> String {
    let t = now();
    let secs = t.0 / 1000;
    let rnd = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(t.0);
        h.write_u32(std::process::id());
        h.finish()
    };
    let safe: String = target.chars().filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c)).take(64).collect();
    format!("cd-{safe}-{secs}-{:08x}", rnd as u32)
}

fn print_report(report: &Report, worker: &str, json: bool) {
    if json {
        println!("{}", String::from_utf8_lossy(&ResultEvent::from_report(report, worker).to_json()));
        return;
    }
    println!("{}: {} ({})", report.deployment_id, report.outcome, report.message);
    if let Some(of) = &report.reverts {
        println!("  reverts = {of}");
    }
    for (k, v) in report.metadata() {
        println!("  {k} = {v}");
    }
}

async fn deploy(cfg: Config, a: DeployArgs) -> anyhow::Result<u8> {
    let id = a.id.clone().unwrap_or_else(|| generate_id(&a.target));
    let req = DeployRequest {
        schema: wire::REQUEST_SCHEMA.into(),
        deployment_id: id.clone(),
        target: Some(a.target.clone()),
        target_spec: None,
        group: None,
        certificate_pem: read(&a.cert, "cert")?,
        private_key_pem: Some(SecretString::new(read(&a.key, "key")?)),
        private_key_age: None,
        chain_pem: a.chain.as_ref().map(|c| read(c, "chain")).transpose()?,
        requested_at: None,
        dry_run: a.dry_run,
    };
    if !certdeploy_core::valid_deployment_id(&id) {
        eprintln!("certdeploy: --id: must be 1-128 characters of [A-Za-z0-9._:-]");
        return Ok(EXIT_USAGE);
    }
    let now = now();
    let v = match intake::validate_request(req, &cfg, now) {
        Ok(v) => v,
        Err(e) => {
            let report = Report::rejected(&id, &a.target, "", format!("request rejected: {e}"), now);
            print_report(&report, &cfg.worker_name(), a.json);
            return Ok(EXIT_FAILED);
        }
    };
    // One deployment: nobody to share a reload with, so no window to wait.
    let mut cfg = cfg;
    cfg.worker.reload_coalesce_ms = 0;
    let rt = Arc::new(Runtime::open(cfg)?);
    if v.dry_run {
        // Nothing journaled and nothing recovered: a dry run only reads.
        let report = rt.dry_run(&v).await?;
        print_report(&report, &rt.worker_name, a.json);
        rt.close_ssh().await;
        return Ok(if report.outcome.success() { EXIT_OK } else { EXIT_FAILED });
    }
    rt.recover_all().await?;
    let report = rt.execute_waiting(&v).await?;
    print_report(&report, &rt.worker_name, a.json);
    let _ = rt.journal.mark_acked(&report.deployment_id);
    rt.close_ssh().await;
    Ok(if report.outcome.success() { EXIT_OK } else { EXIT_FAILED })
}

/// `certdeploy revert`: like `deploy`, right here, with the journal's
/// unfinished work (an interrupted revert too) finished first; the result
/// is printed. Exit 0 only when `reverted`.
async fn revert(cfg: Config, a: RevertArgs) -> anyhow::Result<u8> {
    let rt = Arc::new(Runtime::open(cfg)?);
    rt.recover_all().await?;
    let report = rt.revert(&a.deployment_id).await?;
    print_report(&report, &rt.worker_name, a.json);
    let _ = rt.journal.mark_acked(&report.deployment_id);
    rt.close_ssh().await;
    Ok(if report.outcome == Outcome::Reverted { EXIT_OK } else { EXIT_FAILED })
}

/// Where a read of the journal goes: the journal itself, or — while a
/// worker holds it — that worker's admin socket.
enum Reader {
    Journal(SledJournal),
    Worker(PathBuf),
}

impl Reader {
    fn open(cfg: &Config) -> anyhow::Result<Reader> {
        match SledJournal::open(&cfg.worker.journal_path, JournalOptions::default()) {
            Ok(j) => Ok(Reader::Journal(j)),
            Err(e @ certdeploy_journal::JournalOpenError::Locked { .. }) => match crate::admin::socket_path(cfg) {
                Some(sock) if sock.exists() => Ok(Reader::Worker(sock)),
                _ => Err(anyhow::anyhow!("{e} (and it has no admin socket to ask)")),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// The answer to `query` (`list`, `show`, `status`), as JSON.
    fn query(&self, cfg: &Config, request: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        match self {
            Reader::Worker(sock) => {
                let v = crate::admin::ask(sock, &request, Duration::from_secs(60))
                    .with_context(|| format!("asking the worker at {}", sock.display()))?;
                Ok(v)
            }
            Reader::Journal(j) => Ok(match request["query"].as_str() {
                Some("list") => crate::admin::list(j)?,
                Some("status") => crate::admin::status(j, cfg)?,
                Some("show") => {
                    let id = request["id"].as_str().unwrap_or_default();
                    crate::admin::show(j, id)?.unwrap_or_else(
                        || serde_json::json!({ "error": format!("no deployment `{id}`"), "not_found": true }),
                    )
                }
                _ => anyhow::bail!("unknown query {request}"),
            }),
        }
    }
}

fn answer_error(v: &serde_json::Value) -> Option<&str> {
    v.get("error").and_then(|e| e.as_str())
}

fn journal(cfg: Config, c: JournalCommand) -> anyhow::Result<u8> {
    if let JournalCommand::List { json } = c {
        let rows = Reader::open(&cfg)?.query(&cfg, serde_json::json!({ "query": "list" }))?;
        if let Some(e) = answer_error(&rows) {
            anyhow::bail!("{e}");
        }
        if json {
            println!("{rows}");
            return Ok(EXIT_OK);
        }
        let rows = rows.as_array().cloned().unwrap_or_default();
        println!(
            "{:<40} {:<16} {:<28} {:>8} {:<5} {:<24}",
            "DEPLOYMENT", "TARGET", "STATE", "ATTEMPTS", "ACKED", "UPDATED"
        );
        for r in &rows {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
            let state = match (r["outcome"].as_str(), r["phase"].as_str()) {
                (Some(o), _) => o.to_string(),
                (None, Some(p)) => format!("{}:{p}", s("state")),
                (None, None) => s("state"),
            };
            println!(
                "{:<40} {:<16} {:<28} {:>8} {:<5} {:<24}",
                s("deployment_id"),
                s("target"),
                state,
                r["attempts"].as_u64().unwrap_or(0),
                if r["acked"].as_bool() == Some(true) { "yes" } else { "no" },
                s("updated_at")
            );
        }
        println!("{} deployment(s)", rows.len());
        return Ok(EXIT_OK);
    }
    if let JournalCommand::Show { id, json } = &c {
        let shown = Reader::open(&cfg)?.query(&cfg, serde_json::json!({ "query": "show", "id": id }))?;
        if shown.get("not_found").is_some() {
            eprintln!("certdeploy: no deployment `{id}` in {}", cfg.worker.journal_path.display());
            return Ok(EXIT_FAILED);
        }
        if let Some(e) = answer_error(&shown) {
            anyhow::bail!("{e}");
        }
        if *json {
            println!("{shown}");
            return Ok(EXIT_OK);
        }
        let records = shown["records"].as_array().cloned().unwrap_or_default();
        if records.is_empty() {
            let report: certdeploy_core::Report =
                serde_json::from_value(shown["result"].clone()).context("the recorded result")?;
            println!("{id}: records garbage-collected; result kept for redelivery:");
            print_report(&report, "", false);
            return Ok(EXIT_OK);
        }
        for r in &records {
            let detail = serde_json::to_string(&r["detail"]).unwrap_or_default();
            println!("{}  {:<16} {}", r["at"].as_str().unwrap_or(""), r["event"].as_str().unwrap_or(""), detail);
        }
        return Ok(EXIT_OK);
    }
    let j = match SledJournal::open(&cfg.worker.journal_path, JournalOptions::default()) {
        Ok(j) => j,
        Err(e @ certdeploy_journal::JournalOpenError::Locked { .. }) => {
            anyhow::bail!(
                "{e}: a running worker collects its journal itself, and compacts it (journal_gc_interval_s, \
                 journal_compact_min_mb)"
            )
        }
        Err(e) => return Err(e.into()),
    };
    match c {
        JournalCommand::List { .. } | JournalCommand::Show { .. } => unreachable!("answered above"),
        JournalCommand::Gc { retention_days } => {
            let days = retention_days.unwrap_or(cfg.worker.journal_retention_days);
            let policy = cfg.worker.gc_policy(days);
            let stats = j.gc_with(&policy, now())?;
            println!(
                "pruned {} finished deployment(s) ({} records; their results are kept for redelivery); \
                 dropped {} expired result(s)",
                stats.deployments_pruned, stats.records_removed, stats.dedupe_entries_removed
            );
        }
        JournalCommand::Compact => {
            let stats = j.compact()?;
            let mib = |b: u64| b as f64 / 1048576.0;
            println!(
                "compacted {}: {:.1} MiB -> {:.1} MiB ({} keys, {:.1} s)",
                cfg.worker.journal_path.display(),
                mib(stats.size_before),
                mib(stats.size_after),
                stats.entries,
                stats.duration.as_secs_f64()
            );
        }
    }
    Ok(EXIT_OK)
}

async fn check(cfg: Config, a: CheckArgs) -> anyhow::Result<u8> {
    let names: Vec<String> = match &a.target {
        Some(t) if !cfg.targets.contains_key(t) => {
            eprintln!("certdeploy: --target: unknown target `{t}`");
            return Ok(EXIT_USAGE);
        }
        Some(t) => vec![t.clone()],
        None => cfg.targets.keys().cloned().collect(),
    };
    let control_dir = cfg.ssh.control_dir.clone().unwrap_or_else(std::env::temp_dir);
    let pool = certdeploy_ssh::SshPool::new(cfg.ssh_config(control_dir, Duration::from_secs(30)))?;
    let mut ok = true;
    let mut report = Vec::new();
    for name in names {
        let t = &cfg.targets[&name];
        let addr = t.host_addr();
        if !a.json {
            let via = if t.sudo { format!(", through sudo -n {}", t.sftp_server) } else { String::new() };
            println!("target {name} ({}@{}:{}{via})", t.user, t.host, t.port);
        }
        let mut checks = Vec::new();
        let mut target_ok = true;
        let extra: Vec<(certdeploy_core::Role, &str)> = [
            (certdeploy_core::Role::Bundle, t.bundle_path.as_deref()),
            (certdeploy_core::Role::Pkcs12, t.pkcs12_path.as_deref()),
        ]
        .into_iter()
        .filter_map(|(r, p)| p.map(|p| (r, p)))
        .collect();
        for line in certdeploy_ssh::check_with_extra(&pool, &addr, &t.spec(), &extra, &t.host_policy()).await {
            target_ok &= line.ok;
            if a.json {
                checks.push(serde_json::json!({ "name": line.name, "ok": line.ok, "detail": line.detail }));
            } else {
                println!("  [{}] {}: {}", if line.ok { "ok" } else { "FAIL" }, line.name, line.detail);
            }
        }
        ok &= target_ok;
        report.push(serde_json::json!({
            "target": name,
            "host": format!("{}@{}:{}", t.user, t.host, t.port),
            "ok": target_ok,
            "checks": checks,
        }));
    }
    if a.json {
        println!("{}", serde_json::Value::Array(report));
    }
    pool.close_all().await;
    // Its own control directory (sockets, ssh_config): nothing to keep.
    pool.remove_control_dir();
    Ok(if ok { EXIT_OK } else { EXIT_FAILED })
}

/// One line of a batch, re-serialized with an id and schema filled in, its
/// key sealed when there are recipients.
fn batch_line(
    line: &str,
    n: usize,
    recipients: &[age::x25519::Recipient],
    dry_run: bool,
) -> anyhow::Result<(String, Vec<u8>)> {
    let mut v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("--batch line {n}: not a JSON object"))?;
    let obj = v.as_object_mut().with_context(|| format!("--batch line {n}: not a JSON object"))?;
    obj.entry("schema").or_insert_with(|| wire::REQUEST_SCHEMA.into());
    if dry_run {
        obj.insert("dry_run".into(), true.into());
    }
    if !recipients.is_empty()
        && let Some(serde_json::Value::String(pem)) = obj.remove(crate::sealed::PEM_FIELD)
    {
        let pem = certdeploy_core::Secret::new(pem.into_bytes());
        let sealed =
            crate::sealed::seal(recipients, pem.expose()).map_err(|e| anyhow::anyhow!("--batch line {n}: {e}"))?;
        obj.insert(crate::sealed::AGE_FIELD.into(), sealed.into());
    }
    let id = match obj.get("deployment_id").and_then(|i| i.as_str()) {
        Some(id) => id.to_string(),
        None => {
            let target =
                obj.get("target").or_else(|| obj.get("group")).and_then(|t| t.as_str()).unwrap_or("inline").to_string();
            let id = format!("{}-{n}", generate_id(&target));
            obj.insert("deployment_id".into(), id.clone().into());
            id
        }
    };
    Ok((id, serde_json::to_vec(&v)?))
}

async fn submit(cfg: Config, a: SubmitArgs) -> anyhow::Result<u8> {
    let given = if a.recipients.is_empty() { &cfg.submit.key_recipients } else { &a.recipients };
    let mut recipients = Vec::new();
    for r in given {
        match crate::sealed::parse_recipient(r) {
            Ok(r) => recipients.push(r),
            Err(e) => {
                eprintln!("certdeploy: --recipient: {e}");
                return Ok(EXIT_USAGE);
            }
        }
    }
    let mut requests: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(batch) = &a.batch {
        let text = std::fs::read_to_string(batch).with_context(|| format!("--batch {}", batch.display()))?;
        for (i, line) in text.lines().enumerate() {
            if !line.trim().is_empty() {
                requests.push(batch_line(line, i + 1, &recipients, a.dry_run)?);
            }
        }
    } else {
        let target = a.target.clone().unwrap_or_default();
        let (Some(cert), Some(key)) = (&a.cert, &a.key) else {
            eprintln!("certdeploy: submit --target needs --cert and --key");
            return Ok(EXIT_USAGE);
        };
        let id = a.id.clone().unwrap_or_else(|| generate_id(&target));
        let chain = a.chain.as_ref().map(|c| read(c, "chain")).transpose()?;
        let pem = certdeploy_core::Secret::new(read(key, "key")?.into_bytes());
        let sealed = if recipients.is_empty() {
            None
        } else {
            Some(crate::sealed::seal(&recipients, pem.expose()).map_err(|e| anyhow::anyhow!("--key: {e}"))?)
        };
        let key = match &sealed {
            Some(s) => wire::KeyField::Age(s),
            None => wire::KeyField::Pem(std::str::from_utf8(pem.expose()).unwrap_or_default()),
        };
        let body = wire::encode_request(&id, &target, &read(cert, "cert")?, key, chain.as_deref(), now());
        let body = if a.dry_run {
            let line = String::from_utf8(body).context("encoded request")?;
            batch_line(&line, 1, &[], true)?.1
        } else {
            body
        };
        requests.push((id, body));
    }
    let bcfg = crate::worker::broker_config(&cfg, &format!("certdeploy-submit-{}", std::process::id()));
    let broker = certdeploy_amqp::connect(&bcfg).await.context("broker")?;
    // Subscribe before publishing: results published while nobody is
    // bound would be dropped.
    // A group line (`"group": NAME`) is answered by one result per member
    // (`parent_id` = its id) and a group result (`group.<outcome>`).
    let groups: BTreeMap<String, Option<usize>> = requests
        .iter()
        .filter_map(|(id, body)| {
            let name = wire::salvage_group(body)?;
            Some((id.clone(), cfg.groups.get(&name).map(|g| g.targets.len())))
        })
        .collect();
    let mut results = match (a.wait, groups.is_empty()) {
        (false, _) => None,
        (true, true) => Some(broker.subscribe_results().await?),
        (true, false) => Some(broker.subscribe_results_matching("#").await?),
    };
    // user_id: the broker checks it is our user, and the worker records
    // it in the results as `submitted_by`.
    let opts = certdeploy_amqp::RequestOptions { user_id: Some(broker.user().to_string()), ..Default::default() };
    for (id, body) in &requests {
        broker.publish_request_with(body, &opts).await.with_context(|| format!("publishing {id}"))?;
        if !a.wait {
            println!("{id}");
        }
    }
    let Some(results) = results.as_mut() else {
        eprintln!("published {} request(s)", requests.len());
        broker.close().await;
        return Ok(EXIT_OK);
    };
    let wanted: HashSet<String> =
        requests.iter().map(|(id, _)| id.clone()).filter(|id| !groups.contains_key(id)).collect();
    let mut seen: BTreeMap<String, ResultEvent> = BTreeMap::new();
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    // The bar counts deployments: a group's members (as configured here,
    // else one until its result says how many).
    let mut group_results: BTreeMap<String, certdeploy_core::group::GroupResult> = BTreeMap::new();
    let total = wanted.len() + groups.values().map(|n| n.unwrap_or(1)).sum::<usize>();
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.timeout);
    let done = |seen: &BTreeMap<String, ResultEvent>, g: &BTreeMap<String, certdeploy_core::group::GroupResult>| {
        wanted.iter().all(|id| seen.contains_key(id)) && g.len() == groups.len()
    };
    while !done(&seen, &group_results) {
        let ev = match tokio::time::timeout_at(deadline, results.next()).await {
            Err(_) => break,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                bar.abandon();
                anyhow::bail!("result stream: {e}");
            }
            Ok(Some(Ok(ev))) => ev,
        };
        if ev.routing_key.starts_with(certdeploy_amqp::GROUP_ROUTING_PREFIX) {
            if let Ok(g) = serde_json::from_slice::<certdeploy_core::group::GroupResult>(&ev.body)
                && groups.contains_key(&g.deployment_id)
                && !group_results.contains_key(&g.deployment_id)
            {
                // Now the member count is known.
                if groups[&g.deployment_id].is_none() {
                    bar.inc_length(g.members.saturating_sub(1) as u64);
                }
                group_results.insert(g.deployment_id.clone(), g);
            }
            continue;
        }
        let Ok(res) = serde_json::from_slice::<ResultEvent>(&ev.body) else { continue };
        let member =
            res.parent_id.as_ref().is_some_and(|p| groups.contains_key(p)) && !res.deployment_id.ends_with(".revert");
        if !(wanted.contains(&res.deployment_id) || member) || seen.contains_key(&res.deployment_id) {
            continue;
        }
        *counts.entry(res.outcome.as_str()).or_default() += 1;
        seen.insert(res.deployment_id.clone(), res);
        bar.inc(1);
        bar.set_message(counts.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "));
    }
    bar.finish_and_clear();
    broker.close().await;
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .chain(groups.keys().filter(|id| !group_results.contains_key(*id)))
        .collect();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{:<28} {:>6}", "OUTCOME", "COUNT");
    for o in Outcome::ALL {
        if let Some(n) = counts.get(o.as_str()) {
            let _ = writeln!(out, "{:<28} {n:>6}", o.as_str());
        }
    }
    if !missing.is_empty() {
        let _ = writeln!(out, "{:<28} {:>6}", "(no result before timeout)", missing.len());
    }
    let failures: Vec<&ResultEvent> = seen.values().filter(|r| !r.success).collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\nFAILED:");
        for r in &failures {
            let _ = writeln!(out, "  {} {} {}: {}", r.deployment_id, r.target, r.outcome.as_str(), r.message);
        }
    }
    for id in &missing {
        let _ = writeln!(out, "  {id}: no result");
    }
    if !group_results.is_empty() {
        let _ = writeln!(out, "\nGROUPS:");
        for g in group_results.values() {
            let _ = writeln!(out, "  {} {} {}: {}", g.deployment_id, g.group, g.outcome, g.message);
        }
    }
    let groups_ok = group_results.values().all(|g| g.success);
    let planned: Vec<&ResultEvent> = seen.values().filter(|r| r.outcome == Outcome::Planned).collect();
    if !planned.is_empty() {
        let _ = writeln!(out, "\nPLANNED:");
        for r in planned {
            let plan: Vec<String> =
                r.metadata.iter().filter(|(k, _)| k.starts_with("plan_")).map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(out, "  {} {} {}", r.deployment_id, r.target, plan.join(" "));
        }
    }
    Ok(if failures.is_empty() && missing.is_empty() && groups_ok { EXIT_OK } else { EXIT_FAILED })
}
