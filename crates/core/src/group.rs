//! A target group's fan-out: waves of child deployments, the failure
//! budget, the halt or the revert, and the group's result.
//!
//! The group is a value folded from its journaled records ([`Group::fold`]);
//! [`Group::next`] says what to do now. The runtime acts on that answer,
//! journals what it did, and asks again; after a crash it folds the records
//! on disk and asks again. Every decision is a function of the records
//! alone, so a restarted worker decides exactly what the killed one would
//! have: a wave is started once, only after every member of the waves
//! before it ended, and a member never belongs to two waves.
//!
//! Running a started member is the runtime's ordinary journaled deployment
//! under the child id `<group id>:<target>` (a finished child id returns its
//! recorded report, so running a member again after a crash deploys it at
//! most once).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::Timestamp;
use crate::report::{Outcome, Report};

/// Schema name of the group result event.
pub const GROUP_RESULT_SCHEMA: &str = "certdeploy.group-result.v1";

/// What a group does when its failure budget is exceeded.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Start no further wave.
    #[default]
    Halt,
    /// Start no further wave, and revert every member that was deployed.
    Revert,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Halt => "halt",
            OnFailure::Revert => "revert",
        }
    }
}

/// One entry of a group's `waves`: a cumulative count of members, or a
/// cumulative share of them in percent (rounded up).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum WaveSize {
    Count(usize),
    Percent(u32),
}

/// The cumulative member counts of each wave for a group of `members`:
/// strictly increasing, the last one `members`. Entries that would not
/// add a member are dropped; the last wave always reaches every member;
/// no entries means one wave of everyone.
pub fn cumulative_waves(sizes: &[WaveSize], members: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for s in sizes {
        let c = match *s {
            WaveSize::Count(n) => n,
            WaveSize::Percent(p) => (members * p as usize).div_ceil(100),
        }
        .min(members);
        if c > out.last().copied().unwrap_or(0) {
            out.push(c);
        }
    }
    if out.last().copied().unwrap_or(0) < members {
        out.push(members);
    }
    out
}

/// What a group request fixed when it was accepted: journaled, so every
/// later decision uses these and not the configuration of the day.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    /// The request's `deployment_id`.
    pub group_id: String,
    /// The group's name in the configuration.
    pub group: String,
    /// The member targets, in order.
    pub members: Vec<String>,
    /// Cumulative member count after each wave (see [`cumulative_waves`]).
    pub waves: Vec<usize>,
    pub max_failed: usize,
    pub on_failure: OnFailure,
}

impl GroupSpec {
    /// The child deployment id of a member.
    pub fn child_id(&self, member: &str) -> String {
        child_id(&self.group_id, member)
    }

    /// The members of wave `w` (indexes into `members`).
    pub fn wave_members(&self, w: usize) -> std::ops::Range<usize> {
        let start = if w == 0 { 0 } else { self.waves[w - 1] };
        start..self.waves[w]
    }
}

/// `<group id>:<target>`.
pub fn child_id(group_id: &str, member: &str) -> String {
    format!("{group_id}:{member}")
}

/// One journaled fact of a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GroupEvent {
    /// The request was checked and the fan-out fixed. `request` is the
    /// request as the worker keeps it (never a private key in clear: the
    /// runtime seals it), opaque here.
    Accepted {
        spec: GroupSpec,
        request: String,
        /// The request's AMQP `reply_to` queue (results go there too).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<String>,
        /// The broker-validated AMQP `user_id` of the request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        submitted_by: Option<String>,
    },
    /// Every member of this wave is started (runs until it ends).
    WaveStarted { wave: usize },
    /// A started member's child deployment ended with this report.
    MemberEnded { member: String, report: Report },
    /// The budget was exceeded with `on_failure = "revert"`: every
    /// deployed member is reverted from here on.
    RevertStarted,
    /// A deployed member's revert ended (`outcome` as its result spells
    /// it; `reverted` is the one success).
    RevertEnded { member: String, outcome: String, message: String },
    /// The group ended; its result is published from this record only.
    Ended { result: GroupResult },
    /// Results of these ended members were published (not a decision:
    /// after a crash, unmarked ones are published again).
    ChildrenPublished { members: Vec<String> },
    /// The group result (and the halted members' results) were published.
    Published,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub at: Timestamp,
    #[serde(flatten)]
    pub event: GroupEvent,
}

/// The group's result outcome.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupOutcome {
    /// Every wave ran within the failure budget and some member's
    /// certificate is in place.
    Deployed,
    /// It halted (or a revert failed) with some member deployed.
    Partial,
    /// It halted, and every deployed member was reverted.
    Reverted,
    /// No member deployed.
    Failed,
}

impl GroupOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupOutcome::Deployed => "deployed",
            GroupOutcome::Partial => "partial",
            GroupOutcome::Reverted => "reverted",
            GroupOutcome::Failed => "failed",
        }
    }
}

impl std::fmt::Display for GroupOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The group result event (schema `certdeploy.group-result.v1`), fixed in
/// the `Ended` record: every copy published is this one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupResult {
    pub schema: String,
    pub deployment_id: String,
    pub group: String,
    pub outcome: GroupOutcome,
    pub success: bool,
    pub message: String,
    /// Per member target: its child's outcome (`failed` for a halted one).
    pub children: BTreeMap<String, Outcome>,
    /// Per reverted member target: its revert's outcome.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reverts: BTreeMap<String, String>,
    /// Members per child outcome, plus `halted` (never started) and
    /// `reverted` (reverted successfully).
    pub counts: BTreeMap<String, usize>,
    pub members: usize,
    pub waves: usize,
    pub waves_run: usize,
    pub max_failed: usize,
    pub on_failure: OnFailure,
    pub started_at: String,
    pub finished_at: String,
    pub worker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
}

impl GroupResult {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A record that does not follow from the ones before it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("group journal record {index} ({event}) is out of order: {problem}")]
pub struct GroupError {
    pub index: usize,
    pub event: &'static str,
    pub problem: String,
}

/// What the runtime does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Journal `WaveStarted { wave }`.
    StartWave(usize),
    /// Run these started members (indexes) to their end, each then
    /// journaled `MemberEnded`. After a crash: the ones that had not ended.
    Run(Vec<usize>),
    /// Journal `RevertStarted`.
    StartRevert,
    /// Revert these deployed members (indexes), each then journaled
    /// `RevertEnded`.
    Revert(Vec<usize>),
    /// Journal `Ended` with [`Group::result`].
    End,
    /// Publish the recorded result (and the halted members'), then journal
    /// `Published`.
    Publish,
    /// Nothing left.
    Done,
}

/// A group's state, folded from its records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub spec: GroupSpec,
    pub request: String,
    pub reply_to: Option<String>,
    pub submitted_by: Option<String>,
    pub accepted_at: Timestamp,
    /// When the `Ended` record was written.
    pub ended_at: Option<Timestamp>,
    pub waves_started: usize,
    /// Per member index: the ended child's report.
    pub ended: BTreeMap<usize, Report>,
    pub reverting: bool,
    /// Per member index: the revert's outcome and message.
    pub reverts: BTreeMap<usize, (String, String)>,
    pub result: Option<GroupResult>,
    /// Members whose child result was published.
    pub children_published: std::collections::BTreeSet<usize>,
    pub published: bool,
}

fn event_name(e: &GroupEvent) -> &'static str {
    match e {
        GroupEvent::Accepted { .. } => "accepted",
        GroupEvent::WaveStarted { .. } => "wave_started",
        GroupEvent::MemberEnded { .. } => "member_ended",
        GroupEvent::RevertStarted => "revert_started",
        GroupEvent::RevertEnded { .. } => "revert_ended",
        GroupEvent::Ended { .. } => "ended",
        GroupEvent::ChildrenPublished { .. } => "children_published",
        GroupEvent::Published => "published",
    }
}

/// A member's outcome counts against `max_failed` unless it is one of these.
pub fn in_place(o: Outcome) -> bool {
    matches!(o, Outcome::Deployed | Outcome::Unchanged)
}

/// The outcome of a successful revert.
pub const REVERTED: &str = "reverted";

impl Group {
    /// The state the records describe. The first record must be
    /// `Accepted`; every later one must follow from the state before it
    /// (the decision the runtime acted on): anything else is an error.
    pub fn fold(records: &[GroupRecord]) -> Result<Group, GroupError> {
        let err = |index: usize, e: &GroupEvent, problem: String| GroupError { index, event: event_name(e), problem };
        let Some(first) = records.first() else {
            return Err(GroupError { index: 0, event: "-", problem: "no records".into() });
        };
        let GroupEvent::Accepted { spec, request, reply_to, submitted_by } = &first.event else {
            return Err(err(0, &first.event, "the first record must be `accepted`".into()));
        };
        if spec.waves.is_empty()
            || spec.waves.last() != Some(&spec.members.len())
            || spec.waves.windows(2).any(|w| w[0] >= w[1])
            || spec.waves[0] == 0
        {
            return Err(err(
                0,
                &first.event,
                format!("waves {:?} do not cover {} members", spec.waves, spec.members.len()),
            ));
        }
        let mut g = Group {
            spec: spec.clone(),
            request: request.clone(),
            reply_to: reply_to.clone(),
            submitted_by: submitted_by.clone(),
            accepted_at: first.at,
            ended_at: None,
            waves_started: 0,
            ended: BTreeMap::new(),
            reverting: false,
            reverts: BTreeMap::new(),
            result: None,
            children_published: Default::default(),
            published: false,
        };
        for (i, r) in records.iter().enumerate().skip(1) {
            g.apply(&r.event).map_err(|p| err(i, &r.event, p))?;
            if matches!(r.event, GroupEvent::Ended { .. }) {
                g.ended_at = Some(r.at);
            }
        }
        Ok(g)
    }

    fn member_index(&self, name: &str) -> Result<usize, String> {
        self.spec.members.iter().position(|m| m == name).ok_or_else(|| format!("`{name}` is not a member"))
    }

    /// Members started so far: those of the started waves.
    pub fn started(&self) -> usize {
        if self.waves_started == 0 { 0 } else { self.spec.waves[self.waves_started - 1] }
    }

    fn apply(&mut self, e: &GroupEvent) -> Result<(), String> {
        if self.published && !matches!(e, GroupEvent::ChildrenPublished { .. }) {
            return Err("the group is over".into());
        }
        match e {
            GroupEvent::Accepted { .. } => return Err("accepted twice".into()),
            GroupEvent::WaveStarted { wave } => {
                if self.next() != Next::StartWave(*wave) {
                    return Err(format!("wave {wave} may not start now ({:?})", self.next()));
                }
                self.waves_started += 1;
            }
            GroupEvent::MemberEnded { member, report } => {
                let i = self.member_index(member)?;
                if i >= self.started() {
                    return Err(format!("`{member}` was never started"));
                }
                if self.ended.contains_key(&i) {
                    return Err(format!("`{member}` ended twice"));
                }
                self.ended.insert(i, report.clone());
            }
            GroupEvent::RevertStarted => {
                if self.next() != Next::StartRevert {
                    return Err(format!("a revert may not start now ({:?})", self.next()));
                }
                self.reverting = true;
            }
            GroupEvent::RevertEnded { member, outcome, message } => {
                let i = self.member_index(member)?;
                if !self.reverting || !self.to_revert().contains(&i) || self.reverts.contains_key(&i) {
                    return Err(format!("`{member}` is not being reverted"));
                }
                self.reverts.insert(i, (outcome.clone(), message.clone()));
            }
            GroupEvent::Ended { result } => {
                if self.next() != Next::End {
                    return Err(format!("the group may not end now ({:?})", self.next()));
                }
                self.result = Some(result.clone());
            }
            GroupEvent::ChildrenPublished { members } => {
                for m in members {
                    let i = self.member_index(m)?;
                    if !self.ended.contains_key(&i) {
                        return Err(format!("`{m}` has not ended"));
                    }
                    self.children_published.insert(i);
                }
            }
            GroupEvent::Published => {
                if self.result.is_none() {
                    return Err("published before it ended".into());
                }
                self.published = true;
            }
        }
        Ok(())
    }

    /// Ended members whose outcome counts against `max_failed`.
    pub fn failed(&self) -> usize {
        self.ended.values().filter(|r| !in_place(r.outcome)).count()
    }

    /// Every started member has ended and the budget is exceeded.
    pub fn halted(&self) -> bool {
        self.failed() > self.spec.max_failed
    }

    /// The deployed members a revert puts back (in member order).
    pub fn to_revert(&self) -> Vec<usize> {
        if self.spec.on_failure != OnFailure::Revert {
            return Vec::new();
        }
        self.ended.iter().filter(|(_, r)| r.outcome == Outcome::Deployed).map(|(i, _)| *i).collect()
    }

    /// What to do now.
    pub fn next(&self) -> Next {
        if self.result.is_some() {
            return if self.published { Next::Done } else { Next::Publish };
        }
        let running: Vec<usize> = (0..self.started()).filter(|i| !self.ended.contains_key(i)).collect();
        if !running.is_empty() {
            return Next::Run(running);
        }
        if self.halted() {
            let revert = self.to_revert();
            if !revert.is_empty() {
                if !self.reverting {
                    return Next::StartRevert;
                }
                let pending: Vec<usize> = revert.into_iter().filter(|i| !self.reverts.contains_key(i)).collect();
                if !pending.is_empty() {
                    return Next::Revert(pending);
                }
            }
            return Next::End;
        }
        if self.waves_started < self.spec.waves.len() {
            return Next::StartWave(self.waves_started);
        }
        Next::End
    }

    /// Ended members whose child result is not yet known published
    /// (publish them, then journal `ChildrenPublished`).
    pub fn unpublished_children(&self) -> Vec<usize> {
        self.ended.keys().filter(|i| !self.children_published.contains(i)).copied().collect()
    }

    /// Members never started (indexes): halted ones, once the group ended.
    pub fn never_started(&self) -> std::ops::Range<usize> {
        self.started()..self.spec.members.len()
    }

    /// The report of a member that never started (`failed`,
    /// `failed_step = "halted"`), as of the group's end `at`.
    pub fn halted_report(&self, i: usize, at: Timestamp) -> Report {
        let m = &self.spec.members[i];
        let msg = format!(
            "not started: group {} halted after {} of {} wave(s) ({} member(s) failed, max_failed {}); the host was not \
             touched",
            self.spec.group,
            self.waves_started,
            self.spec.waves.len(),
            self.failed(),
            self.spec.max_failed
        );
        Report::halted(&self.spec.child_id(m), m, msg, at)
    }

    /// The group's outcome from its members' (and reverts') ends.
    pub fn outcome(&self) -> GroupOutcome {
        let deployed = self.ended.values().filter(|r| r.outcome == Outcome::Deployed).count();
        let ok = self.ended.values().filter(|r| in_place(r.outcome)).count();
        if !self.halted() {
            return if ok == 0 { GroupOutcome::Failed } else { GroupOutcome::Deployed };
        }
        if deployed == 0 {
            return GroupOutcome::Failed;
        }
        let revert = self.to_revert();
        let all_reverted =
            !revert.is_empty() && revert.iter().all(|i| self.reverts.get(i).is_some_and(|(o, _)| o == REVERTED));
        if all_reverted { GroupOutcome::Reverted } else { GroupOutcome::Partial }
    }

    /// The result to journal in `Ended` (when [`Group::next`] is `End`).
    pub fn result(&self, finished_at: Timestamp, worker: &str) -> GroupResult {
        let mut children = BTreeMap::new();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (i, m) in self.spec.members.iter().enumerate() {
            let o = self.ended.get(&i).map_or(Outcome::Failed, |r| r.outcome);
            children.insert(m.clone(), o);
            *counts.entry(o.as_str().to_string()).or_default() += 1;
        }
        let halted = self.never_started().len();
        counts.insert("halted".into(), halted);
        let reverts: BTreeMap<String, String> =
            self.reverts.iter().map(|(i, (o, _))| (self.spec.members[*i].clone(), o.clone())).collect();
        counts.insert("reverted".into(), reverts.values().filter(|o| *o == REVERTED).count());
        let outcome = self.outcome();
        let n = self.spec.members.len();
        let ok = self.ended.values().filter(|r| in_place(r.outcome)).count();
        let message = match outcome {
            GroupOutcome::Deployed => format!(
                "group {}: {ok} of {n} member(s) in place after {} wave(s); {} failed (max_failed {})",
                self.spec.group,
                self.waves_started,
                self.failed(),
                self.spec.max_failed
            ),
            _ => {
                let mut m = format!(
                    "group {}: {} member(s) failed (max_failed {}) after {} of {} wave(s); {ok} in place, {halted} not \
                     started",
                    self.spec.group,
                    self.failed(),
                    self.spec.max_failed,
                    self.waves_started,
                    self.spec.waves.len()
                );
                if self.reverting {
                    let failed: Vec<String> = self
                        .reverts
                        .iter()
                        .filter(|(_, (o, _))| o != REVERTED)
                        .map(|(i, (o, msg))| format!("{}: {o}: {msg}", self.spec.members[*i]))
                        .collect();
                    m.push_str(&format!("; {} reverted", reverts.values().filter(|o| *o == REVERTED).count()));
                    if !failed.is_empty() {
                        m.push_str(&format!("; revert failed for {}", failed.join("; ")));
                    }
                }
                m
            }
        };
        GroupResult {
            schema: GROUP_RESULT_SCHEMA.to_string(),
            deployment_id: self.spec.group_id.clone(),
            group: self.spec.group.clone(),
            outcome,
            success: outcome == GroupOutcome::Deployed,
            message,
            children,
            reverts,
            counts,
            members: n,
            waves: self.spec.waves.len(),
            waves_run: self.waves_started,
            max_failed: self.spec.max_failed,
            on_failure: self.spec.on_failure,
            started_at: self.accepted_at.rfc3339(),
            finished_at: finished_at.rfc3339(),
            worker: worker.to_string(),
            submitted_by: self.submitted_by.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successful_revert_is_spelled_as_its_outcome() {
        assert_eq!(REVERTED, Outcome::Reverted.as_str());
    }

    #[test]
    fn waves_are_cumulative_rounded_up_and_reach_everyone() {
        use WaveSize::*;
        assert_eq!(cumulative_waves(&[Count(1), Percent(25), Percent(100)], 12), vec![1, 3, 12]);
        assert_eq!(cumulative_waves(&[Count(1), Percent(25)], 12), vec![1, 3, 12]);
        assert_eq!(cumulative_waves(&[], 5), vec![5]);
        assert_eq!(cumulative_waves(&[Percent(10)], 30), vec![3, 30]);
        assert_eq!(cumulative_waves(&[Percent(1)], 30), vec![1, 30]);
        // An entry adding nobody is dropped; a count beyond the group is all of it.
        assert_eq!(cumulative_waves(&[Count(5), Percent(25), Count(40)], 12), vec![5, 12]);
        assert_eq!(cumulative_waves(&[Count(1)], 1), vec![1]);
    }
}
