//! certdeploy's core: the deployment model, the pure state machine, its
//! journaled events and the driver loop that runs it against traits.
//!
//! Nothing here performs I/O, reads the clock or depends on an async
//! runtime; hosts, journals, verifiers and clocks are passed in.
#![forbid(unsafe_code)]

pub mod attempt;
pub mod coalesce;
pub mod driver;
pub mod dry_run;
pub mod event;
pub mod group;
pub mod lock;
pub mod machine;
pub mod model;
pub mod report;
pub mod revert;
pub mod snapshot;
pub mod step;
pub mod wire;

#[cfg(feature = "testkit")]
pub mod testkit;

#[cfg(feature = "mutations")]
pub mod mutation;

pub use event::*;
pub use machine::*;
pub use model::*;
pub use report::*;
pub use snapshot::*;
pub use step::*;
