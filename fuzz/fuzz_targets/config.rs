#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Panics inside are the bugs; typed errors are expected.
    let _ = certdeploy_fuzz::config(data);
});
