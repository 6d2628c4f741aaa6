//! The library behind the `certdeploy` binary: configuration, the trust
//! boundary, the runtime that wires the adapters to the core driver, the
//! worker loop, metrics and the subcommands.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod intake;
pub mod metrics;
pub mod notify;
pub mod runtime;
pub mod sealed;
pub mod status;
pub mod verify;
pub mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Exit codes: 0 success, 1 a deployment failed, 2 usage or configuration error.
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(name = "certdeploy", version, about = "Crash-safe certificate deployment over SSH, driven by RabbitMQ")]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "CERTDEPLOY_CONFIG", default_value = "/etc/certdeploy/certdeploy.toml")]
    pub config: PathBuf,
    /// Log format: `human` or `json`. Filter with RUST_LOG (default info).
    #[arg(long, global = true, env = "CERTDEPLOY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Consume deploy requests from RabbitMQ (the main job).
    #[command(after_help = "Example:\n  certdeploy worker --config /etc/certdeploy/certdeploy.toml\n\n\
        Recovers every unfinished deployment from the journal first, then consumes.\n\
        SIGTERM/SIGINT: stop consuming, let in-flight deployments finish (shutdown_grace_s), exit 0.\n\
        A second signal exits at once; unfinished work resumes on the next start.\n\
        SIGHUP: re-read the configuration and its include files and use the new targets for requests\n\
        received from then on (in-flight ones keep theirs); a file that does not load, or that changes\n\
        a [worker] or [ssh] key, is refused and logged, and the running configuration stays.")]
    Worker,
    /// Run one deployment right here (same state machine and journal, no broker).
    #[command(
        after_help = "Examples:\n  certdeploy deploy --target web1 --cert site.pem --key site.key --chain chain.pem\n  \
        certdeploy deploy --target web1 --cert site.pem --key site.key --dry-run   # what would change\n\n\
        Exit status: 0 deployed/unchanged (or planned, for a dry run), 1 any other outcome, 2 usage or config error."
    )]
    Deploy(cli::DeployArgs),
    /// Put back the files a deployed deployment replaced (from its kept backups), then reload and verify.
    #[command(after_help = "Example:\n  certdeploy revert --deployment-id renew-2026-11-27-web1-0001\n\n\
        Run it where that deployment's journal is (the same configuration). Only while the host still\n\
        holds exactly that deployment's files (by digest) and its backups are kept (keep_backups);\n\
        otherwise the result is failed, naming the path, and the host is not changed. The revert is\n\
        journaled as <ID>.revert: an interrupted one finishes on the next run, a finished one prints\n\
        its recorded result again.\n\n\
        Exit status: 0 reverted, 1 any other outcome, 2 usage or config error.")]
    Revert(cli::RevertArgs),
    /// Publish deploy requests (one, or a JSONL batch) and optionally wait for results.
    #[command(after_help = "Examples:\n  certdeploy submit --target web1 --cert site.pem --key site.key --wait\n  \
        certdeploy submit --batch renewals.jsonl --wait\n  \
        certdeploy submit --batch renewals.jsonl --dry-run --wait   # what would change, per request\n\n\
        Batch lines are deploy requests (schemas/deploy-request.v1.json); a missing deployment_id\n\
        (or schema) is filled in. With --wait: progress per outcome, a summary table, and exit 1\n\
        if any deployment did not succeed.")]
    Submit(cli::SubmitArgs),
    /// Inspect and clean the journal.
    #[command(
        subcommand,
        after_help = "Examples:\n  certdeploy journal list\n  \
        certdeploy journal show renew-2026-11-27-web1-0001\n  certdeploy journal gc --retention-days 7"
    )]
    Journal(cli::JournalCommand),
    /// Check targets without changing anything: host key, auth, SFTP extensions,
    /// writable directories, reload/validate programs.
    #[command(after_help = "Example:\n  certdeploy check --target web1")]
    Check(cli::CheckArgs),
    /// Write a new age identity for `[worker] key_identities` and print its recipient.
    #[command(after_help = "Example:\n  certdeploy keygen --out /etc/certdeploy/worker.agekey\n\n\
        Writes a standard age identity file (mode 0600, never over an existing file) and prints\n\
        only its recipient (age1...) on stdout: give that to submitters (submit --recipient,\n\
        [submit] key_recipients, or `age -r`). Needs no configuration file.")]
    Keygen(cli::KeygenArgs),
    /// Per target: the last deployment, the certificate in place, its notAfter and days left.
    #[command(after_help = "Examples:\n  certdeploy status\n  certdeploy status --target web1 --json\n\n\
        From the journal, or from the running worker that holds it (its admin socket). Exit status 0.")]
    Status(cli::StatusArgs),
    /// Pause, resume or drain a running worker's consumption (through its admin socket).
    #[command(
        after_help = "Examples:\n  certdeploy control pause\n  certdeploy control drain\n  certdeploy control resume\n\n\
        pause: take no new deliveries (those in flight finish); drain: pause, and return once\n\
        nothing is in flight; resume: consume again. The process keeps running throughout."
    )]
    Control {
        #[arg(value_enum)]
        action: cli::ControlAction,
    },
    /// Print a shell completion script (needs no configuration).
    #[command(after_help = "Examples:\n  certdeploy completions bash > /etc/bash_completion.d/certdeploy\n  \
        certdeploy completions zsh > \"${fpath[1]}/_certdeploy\"")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page, certdeploy(1), as roff (needs no configuration).
    #[command(after_help = "Example:\n  certdeploy man > /usr/local/share/man/man1/certdeploy.1")]
    Man,
}

/// Private keys live in this process's memory: no core dump may write
/// them to disk (`RLIMIT_CORE` 0, hard limit too) and no other process of
/// the same user may attach to it or read its memory (`PR_SET_DUMPABLE` 0,
/// which also makes `/proc/<pid>/mem` and friends root-only).
pub fn harden_process() -> Result<(), String> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) })
        .map_err(|e| format!("cannot disable core dumps (RLIMIT_CORE): {e}"))?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|e| format!("cannot disable core dumps (PR_SET_DUMPABLE): {e}"))?;
    Ok(())
}

/// The most verbose level the AMQP stack may log at, whatever `RUST_LOG`
/// asks (a filter of its own, after the user's, so no directive of theirs
/// can lift it): lapin logs every frame (message bodies: requests carry
/// keys) at trace and every message the broker returns, body included, at
/// warn; amq-protocol-tcp logs the broker URL (with its password) at trace.
pub const BROKER_LOG_CAPS: &[(&str, tracing::Level)] = &[
    ("lapin", tracing::Level::DEBUG),
    ("lapin::returned_messages", tracing::Level::ERROR),
    ("amq_protocol", tracing::Level::DEBUG),
    ("amq_protocol_tcp", tracing::Level::DEBUG),
    ("amq_protocol_types", tracing::Level::DEBUG),
    ("amq_protocol_uri", tracing::Level::DEBUG),
    ("tcp_stream", tracing::Level::DEBUG),
];

/// [`BROKER_LOG_CAPS`] as a filter layer (everything else passes).
pub fn broker_log_caps() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new()
        .with_default(tracing_subscriber::filter::LevelFilter::TRACE)
        .with_targets(BROKER_LOG_CAPS.iter().copied())
}

/// How log lines are written to stderr (`--log-format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One line per event, for a person.
    Human,
    /// One JSON object per event, with its spans.
    Json,
}

pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: files, pipes and journald get
    // plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    match format {
        LogFormat::Json => {
            builder.json().with_current_span(true).with_span_list(true).finish().with(broker_log_caps()).init()
        }
        LogFormat::Human => builder.finish().with(broker_log_caps()).init(),
    }
}
