//! A dry run: read the host as a deployment's snapshot step would, decide
//! supersede and `unchanged` as the deployment would, check what its later
//! steps need (writable directories, the commands' programs), and change
//! nothing on the host.
//!
//! It runs outside the deployment state machine and writes no journal
//! records: it has no side effect to recover from, and an id it answered is
//! not recorded, so a later request with that id deploys.

use std::collections::{BTreeMap, BTreeSet};

use crate::driver::{Clock, Host, Verifier, with_facts};
use crate::machine::{SnapshotRequest, file_unchanged, supersedes};
use crate::model::{Payload, Plan, Role};
use crate::report::{FailedStep, FileAction, Outcome, Report};
use crate::snapshot::{CertFacts, PreState, Snapshot};
use crate::step::Step;

/// Run a dry run of `plan`: `planned` with the per-file plan, or `failed`
/// naming what a deployment would fail on (nothing was changed either way).
pub async fn dry_run<H: Host, V: Verifier, C: Clock>(
    host: &H,
    verifier: &V,
    clock: &C,
    cert_facts: fn(&[u8]) -> Option<CertFacts>,
    plan: &Plan,
    payload: Option<&Payload>,
) -> Report {
    let started_at = clock.now();
    let mut report = Report {
        deployment_id: plan.deployment_id.clone(),
        target: plan.target.clone(),
        host: plan.host.clone(),
        outcome: Outcome::Planned,
        message: String::new(),
        details: Box::default(),
        attempts: 1,
        reload_shared_with: None,
        started_at,
        finished_at: started_at,
        reverts: None,
    };
    let fail = |mut report: Report, step: Step, message: String| {
        report.outcome = Outcome::Failed;
        report.details.failed_step = Some(FailedStep::Step(step));
        report.message = format!("dry run: {message}; nothing was changed on {}", plan.host);
        report.finished_at = clock.now();
        report
    };

    // The snapshot step's reads, without its backups.
    let requests: Vec<SnapshotRequest> =
        plan.files.iter().map(|f| SnapshotRequest { role: f.role, path: f.path.clone() }).collect();
    let mut found: BTreeMap<Role, Snapshot> = BTreeMap::new();
    for (req, r) in requests.iter().zip(host.inspect(&requests).await) {
        match r {
            Ok(s) => {
                found.insert(req.role, with_facts(cert_facts, payload, req.role, s));
            }
            Err(e) => {
                let msg = format!("reading {} {} failed: {}", req.role, req.path, e.message);
                return fail(report, Step::Snapshot, msg);
            }
        }
    }
    if found.len() != plan.files.len() {
        return fail(report, Step::Snapshot, "the host answered for fewer files than planned".into());
    }

    // The decisions of a deployment's snapshot step.
    let supersede = supersedes(plan, found.get(&Role::Cert).map(|s| &s.pre));
    let plans: BTreeMap<Role, FileAction> = plan
        .files
        .iter()
        .map(|f| {
            let action = if file_unchanged(f, found.get(&f.role).map(|s| &s.pre)) {
                FileAction::Unchanged
            } else {
                FileAction::Write
            };
            (f.role, action)
        })
        .collect();
    let identical = plans.values().all(|a| *a == FileAction::Unchanged);
    // Identical files with a verify endpoint: the deployment asks whether
    // they are served (a TLS handshake, no change) and reloads if not.
    let served = match (&plan.verify, identical && !supersede) {
        (Some(v), true) => Some(verifier.served_leaf(&v.endpoint, v.sni.as_deref()).await == Ok(v.expected)),
        _ => None,
    };
    let would = match (supersede, identical, served) {
        (true, _, _) => Outcome::Superseded,
        (false, true, None | Some(true)) => Outcome::Unchanged,
        (false, _, _) => Outcome::Deployed,
    };
    report.details.plans = plans.clone();
    report.details.plan_supersede = Some(supersede);
    report.details.plan_outcome = Some(would);
    if supersede && let Some(PreState::Existing { cert: Some(facts), .. }) = found.get(&Role::Cert).map(|s| &s.pre) {
        report.details.existing_not_before = Some(facts.not_before);
        report.details.new_not_before = plan.new_not_before;
    }

    // What the write and the reload need, checked by reading only.
    if would == Outcome::Deployed {
        let dirs: BTreeSet<String> = plan
            .files
            .iter()
            .filter(|f| plans.get(&f.role) == Some(&FileAction::Write))
            .filter_map(|f| found.get(&f.role).map(|s| parent_of(&s.live_path)))
            .collect();
        let mut commands: Vec<(Step, &str)> = Vec::new();
        if let Some(v) = &plan.validate_command {
            commands.push((Step::Validate, v));
        }
        commands.push((Step::Reload, &plan.reload_command));
        if let Err((step, msg)) = check(host, plan, &dirs, &commands).await {
            return fail(report, step, format!("a deployment would fail: {msg}"));
        }
    }

    let list = |want: FileAction| {
        let roles: Vec<&str> = plans.iter().filter(|(_, a)| **a == want).map(|(r, _)| r.as_str()).collect();
        roles.join(", ")
    };
    let (writes, same) = (list(FileAction::Write), list(FileAction::Unchanged));
    let what = match would {
        Outcome::Superseded => "a deployment would end superseded: the host has a newer certificate".to_string(),
        Outcome::Unchanged => "a deployment would end unchanged: the files are identical already".to_string(),
        _ if writes.is_empty() => "a deployment would reload: the files are identical but not served".to_string(),
        _ => format!("a deployment would write {writes}"),
    };
    let same = if same.is_empty() { String::new() } else { format!(" ({same} identical)") };
    report.message = format!("dry run on {}: {what}{same}; nothing was changed", plan.host);
    report.finished_at = clock.now();
    report
}

/// In one remote command: every directory in `dirs` exists and is
/// writable (`test -w`, no probe file), and every command's program is
/// found (`command -v` of its first word). The first problem, with the
/// step it would fail.
async fn check<H: Host>(
    host: &H,
    plan: &Plan,
    dirs: &BTreeSet<String>,
    commands: &[(Step, &str)],
) -> Result<(), (Step, String)> {
    let mut script = String::from("rc=0\n");
    for d in dirs {
        let q = sh_quote(d);
        script.push_str(&format!("if ! test -d {q} || ! test -w {q}; then echo dir {q}; rc=1; fi\n"));
    }
    for (_, cmd) in commands {
        let program = cmd.split_whitespace().next().unwrap_or("");
        let q = sh_quote(program);
        script.push_str(&format!("command -v {q} >/dev/null 2>&1 || {{ echo cmd {q}; rc=1; }}\n"));
    }
    script.push_str("exit $rc");
    let r = host
        .exec(&script, plan.policy.exec_timeout_ms)
        .await
        .map_err(|e| (Step::Snapshot, format!("checking directories and commands failed: {}", e.message)))?;
    if r.success() {
        return Ok(());
    }
    for line in r.output.lines() {
        if let Some(d) = line.strip_prefix("dir ") {
            return Err((Step::Write, format!("directory {d} does not exist or is not writable on {}", plan.host)));
        }
        if let Some(p) = line.strip_prefix("cmd ") {
            let (step, cmd) = commands
                .iter()
                .find(|(_, c)| c.split_whitespace().next() == Some(p))
                .copied()
                .unwrap_or((Step::Reload, p));
            return Err((step, format!("`{p}` (from the {step} command `{cmd}`) is not found on {}", plan.host)));
        }
    }
    Err((Step::Snapshot, format!("checking directories and commands failed: {}", r.describe())))
}

fn parent_of(path: &str) -> String {
    match path.rfind('/') {
        Some(0) => "/".into(),
        Some(i) => path[..i].to_string(),
        None => ".".into(),
    }
}

/// `s` as one shell word.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
