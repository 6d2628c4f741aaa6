//! The broker reconnect schedule the README states: 0.5 s doubling to 30 s,
//! jittered (each delay anywhere in the upper half of its step).

use std::time::Duration;

use certdeploy_amqp::{BACKOFF_INITIAL, BACKOFF_MAX, backoff_delay};

#[test]
fn reconnect_delays_double_from_half_a_second_to_30s_with_jitter() {
    assert_eq!(BACKOFF_INITIAL, Duration::from_millis(500));
    assert_eq!(BACKOFF_MAX, Duration::from_secs(30));
    for attempt in 0..12u32 {
        let step = (BACKOFF_INITIAL * 2u32.pow(attempt)).min(BACKOFF_MAX);
        let samples: Vec<Duration> = (0..64).map(|_| backoff_delay(attempt)).collect();
        for d in &samples {
            assert!(*d >= step / 2 && *d <= step, "attempt {attempt}: {d:?} outside [{:?}, {step:?}]", step / 2);
        }
        let distinct: std::collections::BTreeSet<_> = samples.iter().collect();
        assert!(distinct.len() > 8, "attempt {attempt}: not jittered: {samples:?}");
    }
}
