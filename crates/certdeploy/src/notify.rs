//! The service manager's notification protocol (systemd `Type=notify`).
//!
//! Every call is a no-op unless the service manager set `NOTIFY_SOCKET`,
//! so the worker behaves the same under a terminal, a container or systemd.
//! - `READY=1` only once recovery is done and the broker consumer runs: a
//!   unit ordered after the worker starts against a worker that takes work.
//! - While the journal opens and a long recovery runs, `EXTEND_TIMEOUT_USEC` keeps the unit's
//!   start timeout from killing it half-way (recovery is crash-safe, but a
//!   kill loop would never finish it).
//! - With `WatchdogSec=`, `WATCHDOG=1` at half the interval from a task on
//!   the worker's runtime: a wedged runtime (no task scheduled any more) is
//!   restarted by the service manager. A broker outage does not stop the
//!   pets: the worker is healthy and reconnecting, and a restart would not
//!   help.
//! - `STOPPING=1` when a graceful shutdown starts.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("service manager notification failed: {e}");
    }
}

/// Startup finished: recovery done, consuming.
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("consuming")]);
}

/// A graceful shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("finishing in-flight deployments")]);
}

/// How often the start timeout is extended while recovery runs, and by how
/// much each time (a generous multiple, so a late tick is harmless).
const EXTEND_EVERY: Duration = Duration::from_secs(10);
const EXTEND_BY: Duration = Duration::from_secs(30);

/// Extends the start timeout until the returned task is aborted.
pub fn extend_start_timeout_while_recovering() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            let usec = u32::try_from(EXTEND_BY.as_micros()).unwrap_or(u32::MAX);
            send(&[NotifyState::ExtendTimeoutUsec(usec), NotifyState::Status("recovering interrupted deployments")]);
            tokio::time::sleep(EXTEND_EVERY).await;
        }
    })
}

/// Pets the watchdog for the life of the process, when one is configured.
pub fn spawn_watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else { return };
    let every = (interval / 2).max(Duration::from_millis(10));
    tracing::info!(interval_ms = interval.as_millis() as u64, "service manager watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}
