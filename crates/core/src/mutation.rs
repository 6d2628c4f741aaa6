//! Deliberately planted bugs, for mutation tests only.
//!
//! The property test of the state machine (`tests/state_machine.rs`) turns
//! one of these on for its own thread and asserts that the property then
//! fails, which proves that it would catch the bug. Compiled only with the
//! `mutations` feature, which only this crate's own tests enable; even
//! then every switch is off unless a test turns it on, on its thread.

use std::cell::Cell;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// The driver appends `Begun { step: Write }` but does not wait for it
    /// to be durable before writing (breaks the write-ahead rule).
    UnflushedBegunWrite,
    /// Recovery of a deployment that may have written abandons it without
    /// restoring the originals (skips the rollback).
    RecoveryWithoutRollback,
}

thread_local! {
    static ACTIVE: Cell<Option<Mutation>> = const { Cell::new(None) };
}

/// Turn one planted bug on (or all off) for the calling thread.
pub fn set(m: Option<Mutation>) {
    ACTIVE.with(|a| a.set(m));
}

/// Whether `m` is on for the calling thread.
pub fn active(m: Mutation) -> bool {
    ACTIVE.with(|a| a.get() == Some(m))
}
