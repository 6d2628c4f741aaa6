//! Reverting a `deployed` deployment: a deployment-like attempt of its own,
//! journaled under `<id>.revert`, whose plan puts back the files that
//! deployment replaced, from the backups it kept, instead of writing new
//! content.
//!
//! The attempt runs through the same state machine as a deployment: it
//! snapshots the live files (its own backups, named after the revert's
//! id), and goes on only if every file still holds exactly what the
//! reverted deployment wrote (by digest) and every backup it needs still
//! holds what that deployment found (else `failed`, nothing changed);
//! then it links each backup back over its live path (the backup stays,
//! so an interrupted revert can run again) or removes a file that did not
//! exist before, validates, reloads, verifies that the old certificate is
//! served, and commits (`reverted`). Any failure after its first change
//! rolls the host back to the reverted deployment's files, from the
//! revert's own snapshots, exactly as a deployment's rollback would.

use crate::event::Record;
use crate::machine::{Deployment, Terminal};
use crate::model::{Digest, FilePlan, Plan, Policy, RevertFile, RevertOf, Role, VerifyPlan};
use crate::report::Outcome;
use crate::snapshot::PreState;

/// What a revert's id adds to the id of the deployment it reverts.
pub const REVERT_SUFFIX: &str = ".revert";

/// The id (and journal key) of the revert of `deployment_id`.
pub fn revert_id(deployment_id: &str) -> String {
    format!("{deployment_id}{REVERT_SUFFIX}")
}

/// The plan of attempt `attempt` of the revert of the deployment whose
/// journal records are `records`. Refused (the message says why, naming
/// the deployment) unless its latest attempt ended `deployed`.
pub fn revert_plan(deployment_id: &str, records: &[Record], attempt: u32) -> Result<Plan, String> {
    let dep = Deployment::replay(records)
        .map_err(|e| format!("deployment {deployment_id} cannot be read back from the journal: {e}"))?;
    let plan = dep.plan();
    match dep.terminal() {
        None => return Err(format!("deployment {deployment_id} has not finished yet; there is nothing to revert")),
        Some(Terminal::Abandoned(_)) => {
            return Err(format!(
                "deployment {deployment_id} was abandoned (its host was rolled back); there is nothing to revert"
            ));
        }
        Some(Terminal::Finished(r)) if r.outcome != Outcome::Deployed => {
            return Err(format!(
                "deployment {deployment_id} ended {}, not deployed; only a deployed deployment can be reverted",
                r.outcome
            ));
        }
        Some(Terminal::Finished(_)) => {}
    }
    if plan.revert.is_some() {
        return Err(format!("{deployment_id} is a revert; only a deployed deployment can be reverted"));
    }
    let snapshots = dep.snapshots();
    let mut files = Vec::with_capacity(plan.files.len());
    let mut reverted = Vec::with_capacity(plan.files.len());
    for f in &plan.files {
        let Some(s) = snapshots.get(&f.role) else {
            return Err(format!("deployment {deployment_id} has no snapshot of its {} file in the journal", f.role));
        };
        // What the revert puts back: the file found before (a removed
        // file has no content: the empty digest).
        let (sha256, size, mode) = match &s.pre {
            PreState::Existing { sha256, size, mode, .. } => (*sha256, *size, *mode),
            PreState::Missing => (Digest::of(b""), 0, f.mode),
        };
        files.push(FilePlan { role: f.role, path: f.path.clone(), mode, sha256, size, holds: None });
        reverted.push(RevertFile { role: f.role, written: f.sha256, before: s.clone() });
    }
    let revert = RevertOf { deployment_id: deployment_id.to_string(), files: reverted };
    let verify = plan.verify.as_ref().and_then(|v| old_leaf_check(&revert, &v.endpoint, v.sni.as_deref()));
    Ok(Plan {
        deployment_id: revert_id(deployment_id),
        target: plan.target.clone(),
        host: plan.host.clone(),
        remote: plan.remote.clone(),
        attempt,
        files,
        validate_command: plan.validate_command.clone(),
        reload_command: plan.reload_command.clone(),
        verify,
        new_not_before: None,
        policy: plan.policy.clone(),
        lock: None,
        certificate: None,
        revert: Some(revert),
    })
}

/// The old certificate must be served again: checked when an endpoint is
/// configured and the certificate found before the reverted deployment is
/// known.
fn old_leaf_check(revert: &RevertOf, endpoint: &str, sni: Option<&str>) -> Option<VerifyPlan> {
    let cert = revert.files.iter().find(|f| f.role == Role::Cert)?;
    match &cert.before.pre {
        PreState::Existing { cert: Some(c), .. } => {
            Some(VerifyPlan { endpoint: endpoint.to_string(), sni: sni.map(str::to_string), expected: c.leaf_sha256 })
        }
        _ => None,
    }
}

/// How the target is configured now, for a revert of one of its
/// deployments: its commands, verify endpoint and policy.
#[derive(Clone, Debug)]
pub struct TargetNow {
    pub validate_command: Option<String>,
    pub reload_command: String,
    pub verify_endpoint: Option<String>,
    pub verify_sni: Option<String>,
    pub policy: Policy,
}

/// A revert validates, reloads and verifies as the target is configured
/// now (the files and the account stay the reverted deployment's: the
/// caller passes `now` only for the same account).
pub fn configured_now(plan: &mut Plan, now: TargetNow) {
    let Some(revert) = &plan.revert else { return };
    plan.verify = now.verify_endpoint.as_deref().and_then(|e| old_leaf_check(revert, e, now.verify_sni.as_deref()));
    plan.validate_command = now.validate_command;
    plan.reload_command = now.reload_command;
    plan.policy = now.policy;
}
