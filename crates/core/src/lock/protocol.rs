//! Taking the lock: exclusive create, lease check, takeover through a
//! claim, and re-taking after a restart.

use super::Planted;
use super::held::{margin_ms, sweep};
use super::record::{LOCK_VERSION, LockPhase, LockRecord, Parsed, claim_path};
use crate::driver::{Clock, Host};
use crate::event::StepError;

/// What [`acquire`] found.
#[derive(Debug)]
pub enum Acquired {
    /// The lock is ours. `took_over`: the expired lock it replaced (its
    /// holder is dead); our lock now carries that deployment's state
    /// (`inherited`) until the caller has dealt with it. `host_now`: the
    /// host's clock when it became ours.
    Ours { took_over: Option<Box<LockRecord>>, written: Box<LockRecord>, host_now: u64 },
    /// Held by a live lease, being taken over right now by another worker,
    /// or written by a newer certdeploy: the caller defers.
    Held { holder: String },
}

/// How many times contention (a lock released or replaced between our
/// steps) is retried before deferring.
const ROUNDS: usize = 4;
/// Longest claim chain followed.
const CHAIN: usize = 8;

fn newer(path: &str, v: u32) -> Acquired {
    Acquired::Held {
        holder: format!(
            "a certdeploy with lock format version {v} (this worker reads up to {LOCK_VERSION}; upgrade it) at {path}"
        ),
    }
}

/// Create a claim: exclusively, unless the claim is deliberately broken.
async fn create_claim<H: Host>(host: &H, claim: &str, bytes: &[u8], planted: Planted) -> Result<bool, StepError> {
    #[cfg(feature = "testkit")]
    if planted == Planted::ClaimNotExclusive {
        host.lock_replace(claim, bytes, false).await?;
        return Ok(true);
    }
    let _ = planted;
    Ok(host.lock_create(claim, bytes).await?.created)
}

/// Take the lock at `path` for `mine`. `dead_own(record)`: the record is
/// one of this worker's own journal's that no live deployment holds (a
/// previous process of this worker died holding it): it is taken over
/// without waiting for its lease.
pub async fn acquire<H: Host, C: Clock>(
    host: &H,
    clock: &C,
    path: &str,
    mine: &LockRecord,
    dead_own: &(dyn Fn(&LockRecord) -> bool + Sync),
    planted: Planted,
) -> Result<Acquired, StepError> {
    let bytes = mine.bytes();
    for _ in 0..ROUNDS {
        let c = host.lock_create(path, &bytes).await?;
        if c.created {
            sweep(host, path, c.host_now, mine.lease_ms).await;
            return Ok(Acquired::Ours { took_over: None, written: Box::new(mine.clone()), host_now: c.host_now });
        }
        let Some(file) = host.lock_read(path).await? else { continue };
        let cur = match LockRecord::parse(path, &file.bytes)? {
            Parsed::Lock(r) => r,
            Parsed::Newer(v) => return Ok(newer(path, v)),
        };
        if !dead_own(&cur) && !cur.expired(file.mtime, c.host_now) {
            return Ok(Acquired::Held { holder: cur.describe() });
        }
        // Expired: claim it (compare-and-swap by exclusive create),
        // following the chain of dead claimants.
        let mut token = cur.token.clone();
        let mut claims = Vec::new();
        let mut won = false;
        // A claim is a lease of its own: it expires like a lock. Past this
        // (by our clock, from the start of the winning create) we may no
        // longer act on it.
        let mut claim_valid_until = 0;
        for _ in 0..CHAIN {
            let claim = claim_path(path, &token);
            claim_valid_until = clock.mono_ms() + mine.lease_ms.saturating_sub(margin_ms(mine.lease_ms));
            let created = create_claim(host, &claim, &bytes, planted).await?;
            claims.push(claim.clone());
            if created {
                won = true;
                break;
            }
            let Some(cf) = host.lock_read(&claim).await? else {
                claims.pop();
                continue;
            };
            let holder = match LockRecord::parse(&claim, &cf.bytes)? {
                Parsed::Lock(r) => r,
                Parsed::Newer(v) => return Ok(newer(&claim, v)),
            };
            if holder.token == mine.token {
                // Our own leftover (same acquisition): ours.
                won = true;
                break;
            }
            if !dead_own(&holder) && !holder.expired(cf.mtime, c.host_now) {
                return Ok(Acquired::Held { holder: format!("being taken over by {}", holder.describe()) });
            }
            token = holder.token;
        }
        if !won {
            return Ok(Acquired::Held { holder: format!("a chain of {CHAIN} dead claims on {path}") });
        }
        // Only the winner of this claim may replace the lock, and only if it
        // still is the very version judged expired: same token *and* same
        // rewrite count (a restarted holder re-takes its lock under the
        // same token, through the same claim, which it then removes).
        let still = match host.lock_read(path).await? {
            Some(f) => matches!(
                LockRecord::parse(path, &f.bytes)?,
                Parsed::Lock(r) if r.token == cur.token && r.seq == cur.seq
            ),
            None => false,
        };
        if !still {
            if let Some(mine_claim) = claims.last() {
                let _ = host.lock_remove(mine_claim).await;
            }
            continue;
        }
        if clock.mono_ms() >= claim_valid_until {
            // Stalled since the claim: another taker may have claimed it
            // as expired by now. Leave everything as it is.
            return Ok(Acquired::Held {
                holder: format!("a takeover of {path} that took longer than its claim's lease"),
            });
        }
        let written = inherit(mine, &cur);
        let host_now = host.lock_replace(path, &written.bytes(), written.phase == LockPhase::Writing).await?;
        for claim in claims.iter().rev() {
            let _ = host.lock_remove(claim).await;
        }
        sweep(host, path, host_now, mine.lease_ms).await;
        return Ok(Acquired::Ours { took_over: Some(cur), written: Box::new(written), host_now });
    }
    Ok(Acquired::Held { holder: format!("{path} changed hands {ROUNDS} times while this worker tried to take it") })
}

/// Our lock content after taking over `dead`: while its deployment may have
/// changed the host, the lock keeps describing it, so that a worker dying
/// in the middle of the rollback leaves the same instructions behind.
pub fn inherit(mine: &LockRecord, dead: &LockRecord) -> LockRecord {
    let mut r = mine.clone();
    if dead.phase != LockPhase::Locked {
        r.deployment_id = dead.deployment_id.clone();
        r.attempt = dead.attempt;
        r.phase = dead.phase;
        r.snapshots = dead.snapshots.clone();
    }
    r
}

/// After a restart: is the lock with `token` (from our journal) still ours?
/// If so it is rewritten (a fresh lease) and returned with the host's
/// clock. Goes through the claim like a taker: the lease may have expired
/// while this worker was down, and another worker may be taking over
/// right now.
pub async fn reacquire<H: Host, C: Clock>(
    host: &H,
    clock: &C,
    path: &str,
    token: &str,
    planted: Planted,
) -> Result<Option<(LockRecord, u64)>, StepError> {
    let Some(file) = host.lock_read(path).await? else { return Ok(None) };
    let mut next = match LockRecord::parse(path, &file.bytes)? {
        Parsed::Lock(r) if r.token == token => *r,
        _ => return Ok(None),
    };
    next.seq += 1;
    let claim = claim_path(path, token);
    let mut claim_valid_until = clock.mono_ms() + next.lease_ms.saturating_sub(margin_ms(next.lease_ms));
    if !create_claim(host, &claim, &next.bytes(), planted).await? {
        // Ours from before the restart, or another worker's claim.
        let theirs = match host.lock_read(&claim).await? {
            Some(cf) => !matches!(LockRecord::parse(&claim, &cf.bytes)?, Parsed::Lock(r) if r.token == token),
            None => false,
        };
        if theirs {
            return Ok(None);
        }
        host.lock_remove(&claim).await?;
        claim_valid_until = clock.mono_ms() + next.lease_ms.saturating_sub(margin_ms(next.lease_ms));
        if !create_claim(host, &claim, &next.bytes(), planted).await? {
            return Ok(None);
        }
    }
    let still = match host.lock_read(path).await? {
        Some(f) => matches!(LockRecord::parse(path, &f.bytes)?, Parsed::Lock(r) if r.token == token),
        None => false,
    };
    // Stalled since the claim: treat it as lost (another worker may be
    // taking it over); the lock then expires or is taken over.
    let still = still && clock.mono_ms() < claim_valid_until;
    let mut host_now = 0;
    if still {
        host_now = host.lock_replace(path, &next.bytes(), false).await?;
    }
    let _ = host.lock_remove(&claim).await;
    if still {
        sweep(host, path, host_now, next.lease_ms).await;
    }
    Ok(still.then_some((next, host_now)))
}
