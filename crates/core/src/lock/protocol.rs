//! Taking the lock: exclusive create, lease check, takeover through a
//! claim, and re-taking after a restart.

use super::Planted;
use super::held::{margin_ms, sweep};
use super::record::{Created, LOCK_VERSION, LockPhase, LockRecord, Parsed, claim_path};
use crate::driver::{Clock, Host};
use crate::step::StepError;

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
async fn create_claim<H: Host>(host: &H, claim: &str, bytes: &[u8], planted: Planted) -> Result<Created, StepError> {
    #[cfg(feature = "testkit")]
    if planted == Planted::ClaimNotExclusive {
        let host_now = host.lock_replace(claim, bytes, false, &|| true).await?.unwrap_or(0);
        return Ok(Created { created: true, host_now });
    }
    let _ = planted;
    host.lock_create(claim, bytes).await
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
            // No sweep here: this holder's release sweeps (a listing of
            // the directory less per deployment), and what a killed worker
            // left stays harmless until then.
            return Ok(Acquired::Ours { took_over: None, written: Box::new(mine.clone()), host_now: c.host_now });
        }
        let Some(file) = host.lock_read(path).await? else { continue };
        let cur = match LockRecord::parse(path, &file.bytes)? {
            Parsed::Lock(r) => r,
            Parsed::Newer(v) => return Ok(newer(path, v)),
        };
        if !dead_own(&cur) && !cur.expired_bounded(file.mtime, c.host_now, mine.lease_ms) {
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
            let created = create_claim(host, &claim, &bytes, planted).await?.created;
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
            // Our own leftover from an earlier round is dead too: we may
            // have stalled since, and another taker may have judged it
            // expired and claimed the next link; so we claim the next one
            // as well (never "ours again": two winners).
            if holder.token != mine.token
                && !dead_own(&holder)
                && !holder.expired_bounded(cf.mtime, c.host_now, mine.lease_ms)
            {
                return Ok(Acquired::Held { holder: format!("being taken over by {}", holder.describe()) });
            }
            next_link(&mut token);
        }
        if !won {
            return Ok(Acquired::Held { holder: format!("a chain of {CHAIN} dead claims on {path}") });
        }
        // Only the winner of this claim may replace the lock, and only if it
        // still is the very version judged expired: same token *and* same
        // rewrite count (a restarted holder re-takes its lock under the
        // same token, through the same claim). A claim is removed only
        // once the lock it was for has been replaced: removing one that
        // another taker judged expired and chained past would let a third
        // taker create it again and win beside that one.
        let still = match host.lock_read(path).await? {
            Some(f) => matches!(
                LockRecord::parse(path, &f.bytes)?,
                Parsed::Lock(r) if r.token == cur.token && r.seq == cur.seq
            ),
            None => false,
        };
        if !still {
            // Our claim may go only while its own lease holds (nobody can
            // have judged it expired and chained past it); otherwise it is
            // left for the sweep (older than a lease).
            if clock.mono_ms() < claim_valid_until
                && let Some(mine_claim) = claims.last()
            {
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
        // The same check again before the rename (a stall can come after
        // the temp file is written).
        let fence = || clock.mono_ms() < claim_valid_until;
        let durable = written.phase == LockPhase::Writing;
        let Some(host_now) = host.lock_replace(path, &written.bytes(), durable, &fence).await? else {
            return Ok(Acquired::Held {
                holder: format!("a takeover of {path} that took longer than its claim's lease"),
            });
        };
        for claim in claims.iter().rev() {
            let _ = host.lock_remove(claim).await;
        }
        sweep(host, path, host_now, mine.lease_ms).await;
        return Ok(Acquired::Ours { took_over: Some(cur), written: Box::new(written), host_now });
    }
    Ok(Acquired::Held { holder: format!("{path} changed hands {ROUNDS} times while this worker tried to take it") })
}

/// The name of the next claim in a chain, after a dead claimant's: derived
/// from the name alone, so that every taker follows the same chain whatever
/// the dead claims hold (a restarted holder's claim holds the very token
/// it claims; naming the next link after a claim's content would lead back
/// to the same claim).
fn next_link(token: &mut String) {
    token.push('+');
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
    // Claim our own lock, as a taker would (a claim is never removed
    // before the lock is replaced: that would break the exclusive create's
    // compare-and-swap). A claim found in the way that is our own from
    // before the restart, or expired, is dead: claim the next link.
    let bytes = next.bytes();
    let mut claimed = token.to_string();
    let mut claims = Vec::new();
    let mut claim_valid_until = 0;
    let mut won = false;
    for _ in 0..CHAIN {
        let claim = claim_path(path, &claimed);
        let c_start = clock.mono_ms();
        let c = create_claim(host, &claim, &bytes, planted).await?;
        claims.push(claim.clone());
        if c.created {
            claim_valid_until = c_start + next.lease_ms.saturating_sub(margin_ms(next.lease_ms));
            won = true;
            break;
        }
        let Some(cf) = host.lock_read(&claim).await? else {
            // Its winner replaced the lock and removed it: look again.
            claims.pop();
            continue;
        };
        let holder = match LockRecord::parse(&claim, &cf.bytes)? {
            Parsed::Lock(r) => r,
            Parsed::Newer(_) => return Ok(None),
        };
        if holder.token != token && !holder.expired_bounded(cf.mtime, c.host_now, next.lease_ms) {
            // Another worker is taking it over right now.
            return Ok(None);
        }
        next_link(&mut claimed);
    }
    if !won {
        return Ok(None);
    }
    let still = match host.lock_read(path).await? {
        Some(f) => matches!(LockRecord::parse(path, &f.bytes)?, Parsed::Lock(r) if r.token == token),
        None => false,
    };
    // Stalled since the claim: treat it as lost (another worker may be
    // taking it over); the lock then expires or is taken over.
    let fence = || clock.mono_ms() < claim_valid_until;
    let mut host_now = None;
    if still && fence() {
        host_now = host.lock_replace(path, &next.bytes(), false, &fence).await?;
    }
    let still = host_now.is_some();
    let host_now = host_now.unwrap_or(0);
    // Once the lock is replaced, the whole chain (ours, and the dead links
    // before it); otherwise only our own claim, while its lease holds (see
    // `acquire`), else the sweep removes it.
    if still {
        for claim in claims.iter().rev() {
            let _ = host.lock_remove(claim).await;
        }
        sweep(host, path, host_now, next.lease_ms).await;
    } else if fence()
        && let Some(ours) = claims.last()
    {
        let _ = host.lock_remove(ours).await;
    }
    Ok(still.then_some((next, host_now)))
}
