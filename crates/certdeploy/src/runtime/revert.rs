//! `certdeploy revert --deployment-id ID` (and a group's `on_failure =
//! "revert"`): the revert of a `deployed` deployment of this journal, an
//! attempt of its own journaled under `<ID>.revert`, run under the target
//! lock like a deployment. What it does on the host is the core's
//! ([`certdeploy_core::revert`]); this side finds the deployment in the
//! journal, refuses what cannot be reverted, and runs or resumes the
//! attempt.

use std::time::Duration;

use certdeploy_core::lock::{LockRecord, new_token};
use certdeploy_core::revert::{TargetNow, configured_now, revert_id, revert_plan};
use certdeploy_core::{Outcome, Payload, Report, attempt, same_host, valid_deployment_id};
use certdeploy_journal::DeploymentStatus;
use tracing::Instrument;

use super::locks::{LiveToken, token_entropy};
use super::{Error, Runtime};
use crate::clock::now;
use crate::metrics as m;

impl Runtime {
    /// Revert deployment `deployment_id`: the recorded result of an
    /// earlier revert of it, else a new attempt (after finishing an
    /// interrupted one). A deployment the journal says cannot be reverted
    /// (unknown, not finished, not `deployed`, records collected) gets a
    /// `failed` report naming why, journaled nowhere: nothing was tried.
    pub async fn revert(&self, deployment_id: &str) -> Result<Report, Error> {
        let key = revert_id(deployment_id);
        let _id_guard = self.ids.lock(&key).await;
        let mut deferrals = 0;
        loop {
            let attempt = match self.journal.status(&key)? {
                Some(DeploymentStatus::Finished { report, .. }) => {
                    if report.reverts.as_deref() == Some(deployment_id) {
                        return Ok(report);
                    }
                    let why = format!("{key} is the id of a deployment, not of a revert of {deployment_id}");
                    return Ok(Report::revert_refused(deployment_id, &report.target, &report.host, why, now()));
                }
                Some(DeploymentStatus::InFlight { .. }) => {
                    // Interrupted: finish it per the recovery table, then look again.
                    self.resume(&key).await?;
                    continue;
                }
                Some(DeploymentStatus::Abandoned { attempts, .. }) => attempts + 1,
                None => 1,
            };
            let plan = match self.revertible(deployment_id, attempt)? {
                Ok(plan) => plan,
                Err(refused) => {
                    tracing::warn!(deployment_id, "revert refused: {}", refused.message);
                    return Ok(refused);
                }
            };
            let _target_guard = self.targets.lock(&Self::target_key(&plan)).await;
            let span =
                tracing::info_span!("revert", deployment_id = %plan.deployment_id, target = %plan.target, attempt);
            let token = new_token(&self.journal_id, &plan.deployment_id, plan.attempt, token_entropy());
            let _live = LiveToken::new(&self.live_tokens, &token);
            let cfg = self.cfg();
            let host = self.host(&plan, cfg.targets.get(&plan.target));
            let env = self.env(&host);
            let dead_own = |r: &LockRecord| self.dead_own(r);
            let w = self.worker(&dead_own);
            let (target, host_name) = (plan.target.clone(), plan.host.clone());
            let r = attempt::execute(&env, &w, plan, &Payload::default(), token).instrument(span).await;
            match r? {
                attempt::Executed::Report(report) => {
                    metrics::counter!(m::DEPLOYMENTS, "outcome" => report.outcome.as_str()).increment(1);
                    tracing::info!(deployment_id = %report.deployment_id, target = %report.target, outcome = %report.outcome, "{}", report.message);
                    return Ok(report);
                }
                attempt::Executed::Deferred { holder } if deferrals >= cfg.worker.max_deferrals => {
                    let msg = format!(
                        "target locked by {holder}; gave up after {deferrals} tries; the host was not changed by this revert"
                    );
                    let mut r = Report::lock_failed(&key, &target, &host_name, msg, now());
                    r.reverts = Some(deployment_id.to_string());
                    return Ok(r);
                }
                attempt::Executed::Deferred { .. } => {
                    deferrals += 1;
                    tokio::time::sleep(Duration::from_millis(cfg.worker.defer_delay_ms)).await;
                }
                attempt::Executed::Abandoned(why) => {
                    tracing::warn!(deployment_id = %key, "revert attempt abandoned: {why}");
                }
            }
        }
    }

    /// The plan of attempt `attempt` of the revert of `deployment_id`, or
    /// the report refusing it (the journal alone says why).
    fn revertible(&self, deployment_id: &str, attempt: u32) -> Result<Result<certdeploy_core::Plan, Report>, Error> {
        let refuse = |target: &str, host: &str, why: String| {
            Ok(Err(Report::revert_refused(deployment_id, target, host, why, now())))
        };
        if !valid_deployment_id(deployment_id) {
            return refuse(
                "",
                "",
                format!("`{deployment_id}` is not a deployment id (1-128 characters of [A-Za-z0-9._:-])"),
            );
        }
        let journal = self.journal.path().display().to_string();
        let (target, host) = match self.journal.status(deployment_id)? {
            None => {
                return refuse(
                    "",
                    "",
                    format!(
                        "no deployment {deployment_id} in the journal {journal}; run revert where that deployment's journal is"
                    ),
                );
            }
            Some(DeploymentStatus::InFlight { .. }) => {
                return refuse(
                    "",
                    "",
                    format!("deployment {deployment_id} has not finished yet; there is nothing to revert"),
                );
            }
            Some(DeploymentStatus::Abandoned { .. }) => {
                return refuse(
                    "",
                    "",
                    format!(
                        "deployment {deployment_id} was abandoned (its host was rolled back); there is nothing to revert"
                    ),
                );
            }
            Some(DeploymentStatus::Finished { report, .. }) if report.outcome != Outcome::Deployed => {
                return refuse(
                    &report.target,
                    &report.host,
                    format!(
                        "deployment {deployment_id} ended {}, not deployed; only a deployed deployment can be reverted",
                        report.outcome
                    ),
                );
            }
            Some(DeploymentStatus::Finished { report, .. }) => (report.target, report.host),
        };
        let records = self.journal.records(deployment_id)?;
        if records.is_empty() {
            return refuse(
                &target,
                &host,
                format!(
                    "the journal records of deployment {deployment_id} were garbage-collected; what it replaced and where its backups are is no longer known"
                ),
            );
        }
        Ok(match revert_plan(deployment_id, &records, attempt) {
            Ok(mut plan) => {
                // Validate, reload and verify as the target is configured
                // now, when it still names the same account.
                let cfg = self.cfg();
                if let Some(t) = cfg.targets.get(&plan.target).filter(|t| {
                    same_host(&t.host, &plan.remote.host) && t.port == plan.remote.port && t.user == plan.remote.user
                }) {
                    let now = TargetNow {
                        validate_command: t.validate_command.clone(),
                        reload_command: t.reload_command.clone(),
                        verify_endpoint: t.verify_endpoint.clone(),
                        verify_sni: t.verify_sni.clone(),
                        policy: cfg.policy(Some(t)),
                    };
                    configured_now(&mut plan, now);
                }
                plan.certificate = self.certificate_put_back(&plan, deployment_id)?;
                Ok(plan)
            }
            Err(why) => Err(Report::revert_refused(deployment_id, &target, &host, why, now())),
        })
    }

    /// What the certificate a revert puts back is (for `status` and the
    /// expiry gauge): the newest finished deployment of the same target
    /// in this journal, other than the one reverted, that wrote exactly
    /// that certificate file; `None` when none did (the file was there
    /// before certdeploy).
    fn certificate_put_back(
        &self,
        plan: &certdeploy_core::Plan,
        reverted: &str,
    ) -> Result<Option<certdeploy_core::CertificateInfo>, Error> {
        use certdeploy_core::{Event, Role};
        let Some(want) = plan.file(Role::Cert).map(|f| f.sha256) else { return Ok(None) };
        let mut candidates: Vec<_> = self
            .journal
            .list()?
            .into_iter()
            .filter(|s| {
                s.target == plan.target && s.deployment_id != reverted && s.outcome.is_some_and(|o| o.success())
            })
            .collect();
        candidates.sort_by_key(|s| std::cmp::Reverse(s.updated_at));
        for s in candidates {
            let found = self.journal.records(&s.deployment_id)?.into_iter().rev().find_map(|r| match r.event {
                Event::Started { plan: p } => Some(p),
                _ => None,
            });
            if let Some(p) = found
                && p.file(Role::Cert).is_some_and(|f| f.sha256 == want)
                && p.certificate.is_some()
            {
                return Ok(p.certificate);
            }
        }
        Ok(None)
    }
}
