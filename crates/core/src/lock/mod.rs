//! The cross-worker target lock: a file on the host next to the
//! certificate, `<cert_path>.certdeploy-lock`, holding a [`LockRecord`].
//! Everything here decides; the host operations it asks for
//! ([`crate::driver::Host`]'s `lock_*`) only move whole small files and
//! report the host's clock, and time comes in from the caller's
//! [`crate::driver::Clock`].
//!
//! - **Acquire** ([`acquire`]): create the file exclusively (content
//!   complete from the first instant). If it exists and its lease is live:
//!   the caller defers.
//! - **Lease** ([`Held`]): judged by the host's clock alone; the holder
//!   stops touching the host a margin before it could expire, by its own
//!   monotonic clock, and renews it every quarter lease.
//! - **Takeover** of an expired lock is a compare-and-swap built from
//!   exclusive creates: the taker first creates `<lock>.claim.<hash of the
//!   expired token>`; exactly one taker can, and only it replaces the lock.
//!   A claimant that dies leaves a claim that expires like a lock, and is
//!   itself claimed by the next taker (a chain, followed to its end).
//! - **Content**: the lock records the deployment whose state the host may
//!   be in: its id, its phase (`locked` → nothing changed yet; `writing` →
//!   snapshots taken, writes and a reload may have happened; `committing`
//!   → deployed, pruning old backups) and its snapshots (paths, digests,
//!   modes, backup names: never key bytes). A taker rolls a `writing`
//!   deployment back from exactly that, and finishes a `committing` one's
//!   prune: a deployment whose `deployed` may already be journaled is
//!   never rolled back ([`crate::attempt`]).
//! - **Version**: a lock of a newer format than [`LOCK_VERSION`] is never
//!   interpreted, only waited for.

mod held;
mod protocol;
mod record;

pub use held::{Either, Held, margin_ms, race, sweep};
pub use protocol::{Acquired, acquire, inherit, reacquire};
pub use record::*;

/// Deliberately broken variants of the protocol, switched on only by the
/// fleet simulation's tests to show that they catch each one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Planted {
    /// The protocol as designed.
    #[default]
    None,
    /// A claim is written over instead of created exclusively: two takers
    /// of one expired lock can both win.
    #[cfg(feature = "testkit")]
    ClaimNotExclusive,
    /// A renewal rewrites the lock even after the holder's lease ran out by
    /// its own clock.
    #[cfg(feature = "testkit")]
    RenewSkipsFence,
    /// A rewrite of the lock checks the fence before it writes its temp
    /// file but not again before the rename: a holder stalled in between
    /// installs its stale lock over a taker's.
    #[cfg(feature = "testkit")]
    RewriteRenameSkipsFence,
    /// A taker rolls back a `committing` deployment instead of finishing
    /// its prune.
    #[cfg(feature = "testkit")]
    RollBackCommitting,
    /// A write carrying the lock's `writing` rewrite changes the live files
    /// before that rewrite's rename is confirmed.
    #[cfg(feature = "testkit")]
    WriteBeforeLockSaysWriting,
}
