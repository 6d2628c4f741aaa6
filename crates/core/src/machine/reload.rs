//! Validating the configuration with the new files (when a validate
//! command is configured), then reloading the daemon.

use super::commit::Committing;
use super::retry::Retry;
use super::verify::Verifying;
use super::{Failure, Fold, Next, Shared, State, Unfit, begun_first, rollback};
use crate::event::Event;
use crate::step::{ExecResult, Step};

/// Running the validate command.
#[derive(Clone, Debug)]
pub(super) struct Validating {
    command: String,
    pub(super) retry: Option<Retry>,
}

/// Reloading the daemon. Begun once `Touched::daemon` is set.
#[derive(Clone, Debug, Default)]
pub(super) struct Reloading {
    pub(super) retry: Option<Retry>,
}

/// The files are in place: validate first when configured, then reload.
pub(super) fn validate_then_reload(cx: &Shared) -> State {
    match &cx.plan.validate_command {
        Some(command) => State::Validate(Validating { command: command.clone(), retry: None }),
        None => State::Reload(Reloading::default()),
    }
}

/// A command failed or could not run, for good: roll back. A command
/// shared with other deployments failed for all of them: each rolls back
/// and then deploys again alone.
fn failed(cx: &Shared, step: Step, summary: &str, detail: &str) -> Fold {
    let failure = Failure::new(step, summary, detail);
    Ok(Some(match cx.shared_with {
        Some(n) if n > 1 => rollback::start_shared(failure, n),
        _ => rollback::start(failure, false),
    }))
}

fn gave_up(cx: &Shared, step: Step, reason: &str) -> Fold {
    failed(cx, step, &format!("{step} gave up"), reason)
}

/// A command shared with other deployments is run once, for all: a
/// transient error is not retried by each on its own but fails the batch.
fn shared(cx: &Shared) -> bool {
    cx.shared_with.is_some_and(|n| n > 1)
}

impl Validating {
    pub(super) fn next(&self, cx: &Shared) -> Next {
        cx.exec(Step::Validate, &self.command)
    }

    pub(super) fn apply(&mut self, cx: &mut Shared, event: &Event) -> Fold {
        match event {
            Event::Executed { step: Step::Validate, result } if result.success() => {
                Ok(Some(State::Reload(Reloading::default())))
            }
            Event::Executed { step: Step::Validate, result } => {
                failed(cx, Step::Validate, "validate command failed", &result.describe())
            }
            Event::StepFailed { step: Step::Validate, error, .. } => {
                if error.is_transient() && !shared(cx) {
                    self.retry = Some(cx.retry(Step::Validate, error));
                    return Ok(None);
                }
                failed(cx, Step::Validate, "validate command could not run", &error.message)
            }
            Event::GaveUp { step, reason } => gave_up(cx, *step, reason),
            _ => Err(Unfit),
        }
    }
}

impl Reloading {
    pub(super) fn next(&self, cx: &Shared) -> Next {
        begun_first(Step::Reload, cx.touched.daemon, || cx.exec(Step::Reload, &cx.plan.reload_command))
    }

    pub(super) fn apply(&mut self, cx: &mut Shared, event: &Event) -> Fold {
        let begun = cx.touched.daemon;
        match event {
            Event::Begun { step: Step::Reload } => {
                cx.touched.daemon = true;
                Ok(None)
            }
            Event::Executed { step: Step::Reload, result } if begun => Self::reloaded(cx, result),
            Event::StepFailed { step: Step::Reload, error, .. } if begun => {
                if error.is_transient() && !shared(cx) {
                    self.retry = Some(cx.retry(Step::Reload, error));
                    return Ok(None);
                }
                failed(cx, Step::Reload, "reload command could not run", &error.message)
            }
            Event::GaveUp { step, reason } => gave_up(cx, *step, reason),
            _ => Err(Unfit),
        }
    }

    /// Reloaded: verify that the new certificate is served (when an
    /// endpoint is configured), else commit.
    fn reloaded(cx: &Shared, result: &ExecResult) -> Fold {
        if !result.success() {
            return failed(cx, Step::Reload, "reload command failed", &result.describe());
        }
        Ok(Some(match &cx.plan.verify {
            Some(v) => State::Verify(Verifying::new(v, cx.last_at)),
            None => State::Commit(Committing::default()),
        }))
    }
}
