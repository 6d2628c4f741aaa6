//! The process's clocks: wall-clock time (journal records, deadlines,
//! reports) and a monotonic clock (the holder's side of a lock lease), as
//! the driver's [`Clock`].

use std::time::Duration;

use certdeploy_core::driver::Clock;
use certdeploy_core::model::Timestamp;

/// Wall-clock time and tokio sleeps; the monotonic clock is `Instant`
/// (CLOCK_MONOTONIC), counted from the first use in this process.
pub struct SystemClock;

fn mono_anchor() -> std::time::Instant {
    static ANCHOR: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *ANCHOR.get_or_init(std::time::Instant::now)
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        now()
    }
    async fn sleep_until(&self, t: Timestamp) {
        let wait = t.since(now());
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
    fn mono_ms(&self) -> u64 {
        mono_anchor().elapsed().as_millis() as u64
    }
    async fn sleep_mono_until(&self, ms: u64) {
        tokio::time::sleep_until((mono_anchor() + Duration::from_millis(ms)).into()).await;
    }
}

/// Wall-clock time now, in milliseconds since the Unix epoch.
pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Timestamp(d.as_millis() as u64)
}
