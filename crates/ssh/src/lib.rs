//! certdeploy's remote host: file operations over SFTP and commands over
//! exec, both multiplexed over one OpenSSH ControlMaster connection per
//! host (the system `ssh` client, driven by the `openssh` crate with its
//! native mux client, and `openssh-sftp-client`).
//!
//! - [`SshPool`] owns the connections: one master and one SFTP session per
//!   host, reused across deployments, a bounded number of concurrent exec
//!   channels per host, at most `max_masters` masters (least recently used
//!   idle ones closed to make room), idle masters closed, dead masters
//!   reopened.
//! - [`SshHost`] implements [`certdeploy_core::driver::Host`] for one host
//!   with the semantics of the core's in-memory `MemHost`.
//! - [`check`] probes a target without changing anything.
//! - A [`HostAddr`] with `sudo` set gains privilege through `sudo -n` (the
//!   SFTP server and the configured commands), for an unprivileged SSH
//!   user with the sudoers rule [`sudoers_rule`] gives.
#![forbid(unsafe_code)]

mod check;
mod count;
mod error;
mod host;
mod hostile;
mod live;
mod lock;
mod pool;
mod sudo;

pub use check::{CheckLine, check, check_with_extra};
pub use error::shell_quote;
pub use host::SshHost;
pub use hostile::{TargetPolicy, valid_id_name};
pub use live::read_public_file;
pub use pool::{
    DEFAULT_MAX_MASTERS_CAP, HostAddr, PoolError, SshConfig, SshPool, check_kex_syntax, default_max_masters,
};
pub use sudo::{sudo_expressible, sudoers_command, sudoers_escape, sudoers_rule};
