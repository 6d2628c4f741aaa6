//! One validated request run to a result: the recorded report of a
//! finished id, else a new attempt under the target lock (after finishing
//! an unfinished one), or `Deferred` while another worker's live lease
//! holds the target.

use std::time::{Duration, Instant};

use certdeploy_core::Report;
use certdeploy_core::attempt;
use certdeploy_core::coalesce::{Coalesce, Slot, Ticket, turn_to_deploy_alone};
use certdeploy_core::lock::{LockRecord, new_token};
use certdeploy_journal::DeploymentStatus;
use tracing::Instrument;

use super::locks::{LiveToken, token_entropy};
use super::{Error, Runtime};
use crate::intake::Validated;
use crate::metrics as m;

/// What [`Runtime::execute`] ended with.
#[derive(Debug)]
pub enum Executed {
    /// The result to publish.
    Report(Report),
    /// The target is locked by another live deployment: try again later.
    Deferred { holder: String },
}

impl Runtime {
    /// Run one validated request to a result: re-publishable report for a
    /// terminal id, else a new attempt (after resuming an unfinished one),
    /// or `Deferred` while another worker's live lease holds the target.
    pub async fn execute(&self, v: &Validated) -> Result<Executed, Error> {
        let _id_guard = self.ids.lock(&v.deployment_id).await;
        // After a shared validate or reload failed: this deployment's place
        // in the line of those deploying again alone (held until it ends).
        let mut alone: Option<Ticket> = None;
        // ... and its target, kept from the rollback to the lone redeploy:
        // whoever took it meanwhile could wait for the batch to end.
        let mut kept = None;
        loop {
            let attempt = match self.journal.status(&v.deployment_id)? {
                Some(DeploymentStatus::Finished { report, .. }) => return Ok(Executed::Report(report)),
                Some(DeploymentStatus::InFlight { .. }) => {
                    // Left by a crash (or a failed journal write): finish it
                    // per the recovery table, then look again.
                    self.resume(&v.deployment_id).await?;
                    continue;
                }
                Some(DeploymentStatus::Abandoned { attempts, .. }) => attempts + 1,
                None => 1,
            };
            // Everything the plan holds comes from the request as it was
            // checked (the configuration then), whatever a reload did since.
            let (plan, payload) = v.plan(attempt).map_err(Error::Plan)?;
            let target_guard = match kept.take() {
                Some(g) => g,
                None => self.targets.lock(&Self::target_key(&plan)).await,
            };
            let span =
                tracing::info_span!("deployment", deployment_id = %plan.deployment_id, target = %plan.target, attempt);
            let token = new_token(&self.journal_id, &plan.deployment_id, plan.attempt, token_entropy());
            let _live = LiveToken::new(&self.live_tokens, &token);
            let host = self.host(&plan, v.target_config.as_ref());
            let env = self.env(&host);
            let dead_own = |r: &LockRecord| self.dead_own(r);
            let w = self.worker(&dead_own);
            let started = Instant::now();
            let slot = Slot::default();
            let reload_key = Self::reload_key(&plan, v.target_config.as_ref());
            // Announced while it holds its target and has not written: an
            // open batch of its key waits for it (within the window) and
            // for nobody else once every announced deployment has joined.
            let expected = alone.is_none().then(|| self.reloads.expect(&reload_key));
            let coalesce = match alone {
                Some(_) => Coalesce::Alone,
                None => Coalesce::Join {
                    reloads: &self.reloads,
                    key: &reload_key,
                    slot: &slot,
                    expected: expected.as_ref(),
                },
            };
            metrics::gauge!(m::IN_FLIGHT).increment(1.0);
            let r = attempt::execute_coalesced(&env, &w, plan, &payload, token, coalesce).instrument(span).await;
            metrics::gauge!(m::IN_FLIGHT).decrement(1.0);
            match r? {
                attempt::Executed::Report(report) => {
                    metrics::counter!(m::DEPLOYMENTS, "outcome" => report.outcome.as_str()).increment(1);
                    metrics::histogram!(m::DEPLOY_SECONDS).record(started.elapsed().as_secs_f64());
                    tracing::info!(deployment_id = %report.deployment_id, target = %report.target, outcome = %report.outcome, "{}", report.message);
                    return Ok(Executed::Report(report));
                }
                attempt::Executed::Deferred { holder } => return Ok(Executed::Deferred { holder }),
                attempt::Executed::Abandoned(why) => {
                    tracing::warn!(deployment_id = %v.deployment_id, "attempt abandoned: {why}");
                    // A member of a batch whose shared validate or reload
                    // failed deploys again alone, once every member has
                    // rolled back, after those that joined first.
                    if let Some(ticket) = turn_to_deploy_alone(&slot).await {
                        alone = Some(ticket);
                        kept = Some(target_guard);
                    }
                    continue;
                }
            }
        }
    }

    /// A dry run of one validated request: the host read and compared as
    /// the deployment's snapshot step would, nothing changed on it, nothing
    /// journaled (the id stays free for a real deployment). Runs in turn
    /// with this process's deployments to the target, so that it never
    /// reads a deployment's files half-written; takes no host lock (that
    /// would be a file on the host).
    pub async fn dry_run(&self, v: &Validated) -> Result<Report, Error> {
        let (plan, payload) = v.plan(1).map_err(Error::Plan)?;
        let _target_guard = self.targets.lock(&Self::target_key(&plan)).await;
        let host = self.host(&plan, v.target_config.as_ref());
        let span = tracing::info_span!("dry_run", deployment_id = %plan.deployment_id, target = %plan.target);
        let report = certdeploy_core::dry_run::dry_run(
            &host,
            &self.verifier,
            &crate::clock::SystemClock,
            super::cert_facts,
            &plan,
            Some(&payload),
        )
        .instrument(span)
        .await;
        // Counted as `planned` only: a dry run that found a problem changed
        // nothing and is no failed deployment (no alert on it).
        if report.outcome == certdeploy_core::Outcome::Planned {
            metrics::counter!(m::DEPLOYMENTS, "outcome" => report.outcome.as_str()).increment(1);
        }
        tracing::info!(deployment_id = %report.deployment_id, target = %report.target, outcome = %report.outcome, dry_run = true, "{}", report.message);
        Ok(report)
    }

    /// [`Self::execute`] for the command line and the benchmark: a locked
    /// target is waited for here (`defer_delay_ms` between tries, at most
    /// `max_deferrals` tries) instead of in the retry queue.
    pub async fn execute_waiting(&self, v: &Validated) -> Result<Report, Error> {
        let mut n = 0;
        let w = self.cfg().worker.clone();
        loop {
            match self.execute(v).await? {
                Executed::Report(r) => return Ok(r),
                Executed::Deferred { holder } if n >= w.max_deferrals => {
                    let msg = format!(
                        "target locked by {holder}; gave up after {n} tries; the host was not changed by this request"
                    );
                    return Ok(Report::lock_failed(&v.deployment_id, &v.target_name, "", msg, crate::clock::now()));
                }
                Executed::Deferred { .. } => {
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(w.defer_delay_ms)).await;
                }
            }
        }
    }
}
