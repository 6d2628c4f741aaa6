//! TLS checks of what the endpoint serves: before writing (identical
//! content: is it served?), after the reload (is the new certificate
//! served?) and, in a rollback, of the original certificate.

use super::commit::{CleaningUp, Committing, End};
use super::{Action, Failure, Fold, Next, Shared, State, Unfit, begun_first, reload, rollback};
use crate::event::Event;
use crate::model::{Digest, Policy, Timestamp, VerifyPlan};
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

/// A check that must see the expected leaf several handshakes in a row,
/// spread over a window, within the verify budget: after a graceful reload
/// the old worker may still accept for a moment, so one handshake that sees
/// the new leaf proves little (the very next client may get the old one).
///
/// A mismatch (another leaf, no leaf, an error) restarts the count and is
/// retried after a delay that doubles from `verify_initial_ms`; after a
/// match the next handshake waits so that `verify_consecutive` matches span
/// at least `verify_window_ms`. The check passes once both hold; it gives up
/// when the next handshake would start after the budget.
#[derive(Clone, Debug)]
pub(super) struct Check {
    step: Step,
    probe: Probe,
    /// The budget counts from here.
    since: Timestamp,
    /// Handshakes so far (matched or not).
    handshakes: u32,
    /// Mismatches so far: each makes the next retry wait longer.
    attempts: u32,
    /// What the last mismatch saw.
    last: String,
    /// The current run of matches: how many, and when the first was recorded.
    streak: u32,
    streak_since: Timestamp,
    /// Whether the last handshake matched (the next one is spaced, not backed off).
    last_matched: bool,
}

impl Check {
    pub(super) fn new(step: Step, v: &VerifyPlan, expected: Digest, since: Timestamp) -> Check {
        Check {
            step,
            probe: Probe::new(v, expected),
            since,
            handshakes: 0,
            attempts: 0,
            last: String::new(),
            streak: 0,
            streak_since: since,
            last_matched: false,
        }
    }

    /// Check again from `at` with a full budget and no match counted (a
    /// later process took over: what was seen before the crash is stale,
    /// however long ago it was, so the run of matches starts from zero).
    pub(super) fn restart(&mut self, at: Timestamp) {
        self.since = at;
        self.handshakes = 0;
        self.attempts = 0;
        self.streak = 0;
        self.last_matched = false;
    }

    /// How long to wait after a match before the next handshake: the
    /// window split over the gaps between `verify_consecutive` matches
    /// (rounded up, so that the gaps add up to the window at least).
    fn spacing(policy: &Policy) -> u64 {
        let gaps = u64::from(policy.verify_consecutive.max(2) - 1);
        policy.verify_window_ms.div_ceil(gaps)
    }

    pub(super) fn next(&self, cx: &Shared, now: Timestamp) -> Next {
        if self.handshakes > 0 {
            let policy = &cx.plan.policy;
            let budget_end = self.since.plus_ms(policy.verify_budget_ms);
            let delay = if self.last_matched {
                Check::spacing(policy)
            } else {
                policy.verify_initial_ms.saturating_mul(1u64 << (self.attempts.max(1) - 1).min(20))
            };
            let retry_at = cx.last_at.plus_ms(delay);
            if retry_at > budget_end || now >= budget_end {
                let last = if self.attempts == 0 { "none".to_string() } else { self.last.clone() };
                return Next::Record(Event::GaveUp {
                    step: self.step,
                    reason: format!(
                        "after {} handshakes over {} ms, {} in a row served the expected certificate \
                         ({} in a row over at least {} ms needed); last mismatch: {}",
                        self.handshakes,
                        cx.last_at.since(self.since),
                        self.streak,
                        policy.verify_consecutive.max(1),
                        policy.verify_window_ms,
                        last
                    ),
                });
            }
            if now < retry_at {
                return Next::Wait(retry_at);
            }
        }
        Next::Perform(self.probe.action(self.step))
    }

    /// The result of one handshake (recorded at `at`): `Some(true)` once
    /// enough matches in a row span the window, `Some(false)` while the
    /// check goes on.
    pub(super) fn matched(&mut self, policy: &Policy, at: Timestamp, event: &Event) -> Option<bool> {
        let Event::Verified { step, served, matched, error } = event else { return None };
        if *step != self.step {
            return None;
        }
        self.handshakes += 1;
        self.last_matched = *matched;
        if !matched {
            self.attempts += 1;
            self.streak = 0;
            self.last = match (error, served) {
                (Some(e), _) => e.clone(),
                (None, Some(s)) => format!("served certificate sha256:{s}"),
                (None, None) => "no certificate served".to_string(),
            };
            return Some(false);
        }
        if self.streak == 0 {
            self.streak_since = at;
        }
        self.streak += 1;
        Some(self.streak >= policy.verify_consecutive.max(1) && at.since(self.streak_since) >= policy.verify_window_ms)
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

    pub(super) fn apply(&mut self, cx: &Shared, event: &Event) -> Fold {
        match event {
            Event::Begun { step: Step::Verify } => {
                self.begun = true;
                Ok(None)
            }
            Event::GaveUp { reason, .. } => {
                let failure = Failure::new(Step::Verify, "verify failed: the new certificate is not served", reason);
                Ok(Some(rollback::start(failure, false)))
            }
            event => match self.check.matched(&cx.plan.policy, cx.last_at, event) {
                Some(true) => Ok(Some(State::Commit(Committing::default()))),
                Some(false) => Ok(None),
                None => Err(Unfit),
            },
        }
    }
}
