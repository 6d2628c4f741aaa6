//! Retrying a step after a transient error: when, and why.

use super::Shared;
use crate::model::Timestamp;
use crate::step::{Step, StepError};

/// A retry a phase waits for.
#[derive(Clone, Debug)]
pub(super) struct Retry {
    /// Not before this time.
    pub(super) at: Timestamp,
    /// The transient error that asked for it.
    pub(super) error: String,
}

impl Shared {
    /// Count a transient error of `step` and schedule the retry: full
    /// jitter over a delay that doubles per error of the same step, from
    /// the policy's initial delay up to its maximum.
    pub(super) fn retry(&mut self, step: Step, error: &StepError) -> Retry {
        let n = self.transient_errors.entry(step).or_insert(0);
        *n += 1;
        let policy = &self.plan.policy;
        let seed = fnv(&self.plan.deployment_id) ^ self.plan.attempt as u64;
        let delay = retry_delay(policy.retry_initial_ms, policy.retry_max_ms, *n, seed);
        Retry { at: self.last_at.plus_ms(delay), error: error.message.clone() }
    }
}

fn retry_delay(initial: u64, max: u64, attempt: u32, seed: u64) -> u64 {
    let exp = initial.saturating_mul(1u64 << attempt.saturating_sub(1).min(30)).min(max);
    // Full jitter from a deterministic hash, so replays agree.
    let mut x = seed ^ (attempt as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % (exp + 1)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}
