//! TLS checks of what the endpoint serves: before writing (identical
//! content: is it served?), after the reload (is the new certificate
//! served?) and, in a rollback, of the original certificate.

use super::commit::{CleaningUp, Committing, End};
use super::{Action, Failure, Fold, Next, Shared, State, Unfit, begun_first, reload, rollback};
use crate::event::Event;
use crate::model::{Digest, Timestamp, VerifyPlan};
use crate::step::Step;

/// One endpoint to ask, and the leaf it should serve.
#[derive(Clone, Debug)]
struct Probe {
    endpoint: String,
    sni: Option<String>,
    expected: Digest,
}

impl Probe {
    fn new(v: &VerifyPlan, expected: Digest) -> Probe {
        Probe { endpoint: v.endpoint.clone(), sni: v.sni.clone(), expected }
    }

    fn action(&self, step: Step) -> Action {
        Action::Verify { step, endpoint: self.endpoint.clone(), sni: self.sni.clone(), expected: self.expected }
    }
}

/// A check retried within the verify budget: a daemon may take a moment
/// to serve what it reloaded.
#[derive(Clone, Debug)]
pub(super) struct Check {
    step: Step,
    probe: Probe,
    /// The budget counts from here.
    since: Timestamp,
    /// Mismatches so far.
    attempts: u32,
    /// What the last mismatch saw.
    last: String,
}

impl Check {
    pub(super) fn new(step: Step, v: &VerifyPlan, expected: Digest, since: Timestamp) -> Check {
        Check { step, probe: Probe::new(v, expected), since, attempts: 0, last: String::new() }
    }

    /// Check again from `at` with a full budget (a later process took over).
    pub(super) fn restart(&mut self, at: Timestamp) {
        self.since = at;
        self.attempts = 0;
    }

    pub(super) fn next(&self, cx: &Shared, now: Timestamp) -> Next {
        if self.attempts > 0 {
            let policy = &cx.plan.policy;
            let budget_end = self.since.plus_ms(policy.verify_budget_ms);
            let delay = policy.verify_initial_ms.saturating_mul(1u64 << (self.attempts - 1).min(20));
            let retry_at = cx.last_at.plus_ms(delay);
            if retry_at > budget_end || now >= budget_end {
                return Next::Record(Event::GaveUp {
                    step: self.step,
                    reason: format!(
                        "after {} attempts over {} ms: {}",
                        self.attempts,
                        cx.last_at.since(self.since),
                        self.last
                    ),
                });
            }
            if now < retry_at {
                return Next::Wait(retry_at);
            }
        }
        Next::Perform(self.probe.action(self.step))
    }

    /// The result of the check: `true` if the expected leaf is served,
    /// else the mismatch is counted.
    pub(super) fn matched(&mut self, event: &Event) -> Option<bool> {
        let Event::Verified { step, served, matched, error } = event else { return None };
        if *step != self.step {
            return None;
        }
        if !matched {
            self.attempts += 1;
            self.last = match (error, served) {
                (Some(e), _) => e.clone(),
                (None, Some(s)) => format!("served certificate sha256:{s}"),
                (None, None) => "no certificate served".to_string(),
            };
        }
        Some(*matched)
    }
}

/// The files already hold the new content: if it is also served, there is
/// nothing to do; if not, a reload was lost.
#[derive(Clone, Debug)]
pub(super) struct PreVerifying {
    probe: Probe,
}

impl PreVerifying {
    pub(super) fn new(v: &VerifyPlan) -> PreVerifying {
        PreVerifying { probe: Probe::new(v, v.expected) }
    }

    pub(super) fn next(&self) -> Next {
        Next::Perform(self.probe.action(Step::Verify))
    }

    pub(super) fn apply(&self, cx: &Shared, event: &Event) -> Fold {
        match event {
            Event::Verified { step: Step::Verify, matched: true, .. } => Ok(Some(CleaningUp::state(End::Unchanged))),
            // Validate first (when configured), then reload.
            Event::Verified { step: Step::Verify, .. } => Ok(Some(reload::validate_then_reload(cx))),
            _ => Err(Unfit),
        }
    }
}

/// After the reload: is the new certificate served?
#[derive(Clone, Debug)]
pub(super) struct Verifying {
    /// `Begun { verify }` is journaled: the reload's success is durable,
    /// so a crash recovers as "reload succeeded, verify pending".
    begun: bool,
    pub(super) check: Check,
}

impl Verifying {
    pub(super) fn new(v: &VerifyPlan, since: Timestamp) -> Verifying {
        Verifying { begun: false, check: Check::new(Step::Verify, v, v.expected, since) }
    }

    pub(super) fn next(&self, cx: &Shared, now: Timestamp) -> Next {
        begun_first(Step::Verify, self.begun, || self.check.next(cx, now))
    }

    pub(super) fn apply(&mut self, event: &Event) -> Fold {
        match event {
            Event::Begun { step: Step::Verify } => {
                self.begun = true;
                Ok(None)
            }
            Event::GaveUp { reason, .. } => {
                let failure = Failure::new(Step::Verify, "verify failed: the new certificate is not served", reason);
                Ok(Some(rollback::start(failure, false)))
            }
            event => match self.check.matched(event) {
                Some(true) => Ok(Some(State::Commit(Committing::default()))),
                Some(false) => Ok(None),
                None => Err(Unfit),
            },
        }
    }
}
