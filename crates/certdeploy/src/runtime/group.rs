//! A target group's fan-out, driven from its journaled records: the core
//! ([`certdeploy_core::group::Group`]) decides, this file acts and
//! journals what it did. A member runs as the ordinary deployment of its
//! child id `<group id>:<target>` (a finished child returns its recorded
//! report, an unfinished one is resumed first), so running it again after
//! a crash never deploys it twice.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use certdeploy_core::group::{Group, GroupEvent, GroupRecord, GroupResult, Next};
use certdeploy_core::wire::RequestError;
use certdeploy_core::{Report, Timestamp};
use certdeploy_journal::DeploymentStatus;
use tokio::sync::watch;

use super::{Error, Runtime};
use crate::intake::{GroupValidated, Validated};

/// Where a group's results go (the bus, for the worker).
pub trait GroupSink: Send + Sync {
    /// A member's (or a member's revert's) result.
    fn child(&self, g: &Group, report: &Report) -> impl Future<Output = Result<(), String>> + Send;
    /// The group result, exactly as recorded.
    fn group(&self, g: &Group, result: &GroupResult) -> impl Future<Output = Result<(), String>> + Send;
}

/// Groups this process drives right now (one driver per group).
#[derive(Default)]
pub struct ActiveGroups(std::sync::Mutex<HashSet<String>>);

struct Driving<'a>(&'a ActiveGroups, String);

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        self.0.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
    }
}

/// How long a driver waits before trying again after the bus or the
/// journal failed it.
const RETRY: Duration = Duration::from_secs(1);

impl Runtime {
    /// Journal a checked group request (durably), its key sealed. False
    /// when the journal already holds this group (a redelivery).
    pub async fn accept_group(
        &self,
        g: &GroupValidated,
        reply_to: Option<String>,
        submitted_by: Option<String>,
    ) -> Result<bool, Error> {
        let id = &g.spec.group_id;
        let _one = self.ids.lock(&group_lock_key(id)).await;
        if !self.journal.group_records(id)?.is_empty() {
            return Ok(false);
        }
        let event = GroupEvent::Accepted { spec: g.spec.clone(), request: g.kept.clone(), reply_to, submitted_by };
        self.append_group(id, event).await?;
        Ok(true)
    }

    /// The group's state from its records (`None`: the journal has none).
    pub fn group_state(&self, id: &str) -> Result<Option<Group>, Error> {
        let records = self.journal.group_records(id)?;
        if records.is_empty() {
            return Ok(None);
        }
        Group::fold(&records).map(Some).map_err(|e| Error::Group(format!("group {id}: {e}")))
    }

    /// Groups of the journal that are not done.
    pub fn unfinished_groups(&self) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for id in self.journal.group_ids()? {
            match self.group_state(&id) {
                Ok(Some(g)) if g.next() != Next::Done => out.push(id),
                Ok(_) => {}
                Err(e) => tracing::error!(group_id = %id, "group cannot be resumed: {e}"),
            }
        }
        Ok(out)
    }

    async fn append_group(&self, id: &str, event: GroupEvent) -> Result<(), Error> {
        let seq = self.journal.append_group(id, &GroupRecord { at: crate::clock::now(), event })?;
        self.journal.sync_seq(seq).await?;
        Ok(())
    }

    /// Drive group `id` until it is done, or until `stop` (it resumes from
    /// the journal on the next start). `members`: the members' checked
    /// requests when the caller has them (else they are checked again from
    /// the kept request). Returns at once when this process drives the
    /// group already. Failures of the bus or the journal are retried
    /// (after [`RETRY`]); a poisoned journal ends the drive with its error.
    pub async fn drive_group<S: GroupSink>(
        &self,
        id: &str,
        members: Option<Vec<Validated>>,
        sink: &S,
        stop: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        {
            let mut active = self.groups.0.lock().unwrap_or_else(|e| e.into_inner());
            if !active.insert(id.to_string()) {
                return Ok(());
            }
        }
        let _driving = Driving(&self.groups, id.to_string());
        let mut members: Option<Vec<Result<Validated, RequestError>>> =
            members.map(|m| m.into_iter().map(Ok).collect());
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            // Boxed: a member's deployment and a revert are large futures;
            // on the heap they do not grow the delivery task's stack.
            match Box::pin(self.group_step(id, &mut members, sink, &stop)).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) if e.is_journal_poisoned() => return Err(e),
                Err(e) => {
                    tracing::warn!(group_id = %id, "group: {e}; trying again in {RETRY:?}");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// One decision of the group and what it asks for; true when done.
    async fn group_step<S: GroupSink>(
        &self,
        id: &str,
        members: &mut Option<Vec<Result<Validated, RequestError>>>,
        sink: &S,
        stop: &watch::Receiver<bool>,
    ) -> Result<bool, Error> {
        let Some(g) = self.group_state(id)? else { return Err(Error::Group(format!("group {id}: no records"))) };
        // Results of members that ended before a crash and were not yet
        // published: at least once.
        let unpublished = g.unpublished_children();
        if !unpublished.is_empty() {
            for i in &unpublished {
                if let Err(e) = sink.child(&g, &g.ended[i]).await {
                    tracing::warn!(group_id = %id, "publishing a member's result failed: {e}");
                    tokio::time::sleep(RETRY).await;
                    return Ok(false);
                }
            }
            let names = unpublished.iter().map(|&i| g.spec.members[i].clone()).collect();
            self.journal.append_group(
                id,
                &GroupRecord { at: crate::clock::now(), event: GroupEvent::ChildrenPublished { members: names } },
            )?;
            return Ok(false);
        }
        match g.next() {
            Next::Done => return Ok(true),
            Next::StartWave(k) => {
                let range = g.spec.wave_members(k);
                tracing::info!(group_id = %id, group = %g.spec.group, wave = k + 1, waves = g.spec.waves.len(), members = range.len(), "group: starting wave");
                #[cfg(feature = "failpoints")]
                fail::fail_point!("group_before_wave");
                self.append_group(id, GroupEvent::WaveStarted { wave: k }).await?;
            }
            Next::Run(run) => {
                let checked = members.get_or_insert_with(|| {
                    crate::intake::group_members(&g.request, &g.spec, &self.cfg(), crate::clock::now())
                });
                Box::pin(self.run_members(&g, &run, checked, sink, stop)).await?;
            }
            Next::StartRevert => {
                tracing::warn!(group_id = %id, group = %g.spec.group, "group: failure budget exceeded; reverting the deployed members");
                self.append_group(id, GroupEvent::RevertStarted).await?;
            }
            Next::Revert(todo) => {
                for i in todo {
                    if *stop.borrow() {
                        return Ok(false);
                    }
                    let member = g.spec.members[i].clone();
                    let child = g.spec.child_id(&member);
                    // Its result is published with the group's end (from
                    // the journal, at least once), not here.
                    let (outcome, message) = match Box::pin(self.revert(&child)).await {
                        Ok(r) => (r.outcome.as_str().to_string(), r.message),
                        Err(e) if e.is_journal_poisoned() => return Err(e),
                        Err(e) => ("failed".to_string(), format!("revert of {child} could not run: {e}")),
                    };
                    self.append_group(id, GroupEvent::RevertEnded { member, outcome, message }).await?;
                }
            }
            Next::End => {
                let result = g.result(crate::clock::now(), &self.worker_name);
                tracing::info!(group_id = %id, group = %g.spec.group, outcome = %result.outcome, "{}", result.message);
                #[cfg(feature = "failpoints")]
                fail::fail_point!("group_before_end");
                self.append_group(id, GroupEvent::Ended { result }).await?;
            }
            Next::Publish => {
                let result = g.result.clone().expect("Publish follows Ended");
                let at = g.ended_at.unwrap_or(Timestamp(0));
                // Each revert's recorded result, again until the group's
                // publication is recorded: at least once, every copy the
                // journal's.
                for i in g.reverts.keys() {
                    let revert = certdeploy_core::revert::revert_id(&g.spec.child_id(&g.spec.members[*i]));
                    let Some(DeploymentStatus::Finished { report, .. }) = self.journal.status(&revert)? else {
                        continue;
                    };
                    if let Err(e) = sink.child(&g, &report).await {
                        tracing::warn!(group_id = %id, "publishing a revert's result failed: {e}");
                        tokio::time::sleep(RETRY).await;
                        return Ok(false);
                    }
                }
                for i in g.never_started() {
                    if let Err(e) = sink.child(&g, &g.halted_report(i, at)).await {
                        tracing::warn!(group_id = %id, "publishing a halted member's result failed: {e}");
                        tokio::time::sleep(RETRY).await;
                        return Ok(false);
                    }
                }
                if let Err(e) = sink.group(&g, &result).await {
                    tracing::warn!(group_id = %id, "publishing the group result failed: {e}");
                    tokio::time::sleep(RETRY).await;
                    return Ok(false);
                }
                // Crash tests: the group result is out, its publication not recorded.
                #[cfg(feature = "failpoints")]
                fail::fail_point!("group_after_publish");
                self.append_group(id, GroupEvent::Published).await?;
            }
        }
        Ok(false)
    }

    /// Run the started members that have not ended, `concurrency` at a
    /// time; each end is journaled, then its result published.
    async fn run_members<S: GroupSink>(
        &self,
        g: &Group,
        run: &[usize],
        checked: &[Result<Validated, RequestError>],
        sink: &S,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let limit = Arc::new(tokio::sync::Semaphore::new(self.cfg().worker.concurrency.max(1)));
        let id = &g.spec.group_id;
        let one = |i: usize| {
            let limit = limit.clone();
            async move {
                let _permit = limit.acquire().await.expect("never closed");
                if *stop.borrow() {
                    return Ok(());
                }
                let member = &g.spec.members[i];
                let report = match &checked[i] {
                    Ok(v) => Box::pin(self.execute_waiting(v)).await?,
                    Err(e) => Report::rejected(
                        &g.spec.child_id(member),
                        member,
                        "",
                        format!("request rejected: {e}"),
                        crate::clock::now(),
                    ),
                };
                let event = GroupEvent::MemberEnded { member: member.clone(), report: report.clone() };
                self.append_group(id, event).await?;
                if sink.child(g, &report).await.is_ok() {
                    let event = GroupEvent::ChildrenPublished { members: vec![member.clone()] };
                    self.journal.append_group(id, &GroupRecord { at: crate::clock::now(), event })?;
                }
                Ok::<(), Error>(())
            }
        };
        let results = futures_util::future::join_all(run.iter().map(|&i| one(i))).await;
        results.into_iter().collect::<Result<Vec<()>, Error>>().map(drop)
    }
}

/// The key of a group in the runtime's per-id locks (apart from any
/// deployment id: a NUL is in no id).
fn group_lock_key(id: &str) -> String {
    format!("group\0{id}")
}
