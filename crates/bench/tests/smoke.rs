//! The benchmark command stays runnable: a tiny run through RabbitMQ and
//! without it, which also verifies every target's final files; every host
//! behind the latency proxy, with `--kex` and `--max-masters` set.

use std::process::Command;

#[test]
fn bench_runs_and_prints_its_table() {
    let bench = env!("CARGO_BIN_EXE_certdeploy-bench");
    let worker = std::path::Path::new(bench).with_file_name("certdeploy");
    assert!(
        worker.exists(),
        "{} is missing: build the worker too (`cargo build -p certdeploy`; the workspace test run does)",
        worker.display()
    );
    let out = Command::new(bench)
        .args(["--n", "24", "--hosts", "3", "--runs", "broker-fsync,direct-fsync"])
        .args(["--rtt-ms", "4", "--kex", "curve25519-sha256", "--max-masters", "2"])
        .output()
        .expect("run certdeploy-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("| broker, journal fsync |"), "{stdout}");
    assert!(stdout.contains("| direct (no broker), journal fsync |"), "{stdout}");
    assert!(stdout.contains("every run verified every target's final cert, key and chain"), "{stdout}");
    assert!(stdout.contains("{\"deployed\": 24}"), "all 24 deployed in each run:\n{stdout}");
    assert!(stdout.contains("rtt=4 ms (latency proxy) kex=curve25519-sha256 max_masters=2"), "{stdout}");
    // The worker kept at most two ssh processes (masters) at once.
    let header: Vec<&str> = stdout.lines().find(|l| l.starts_with("| run |")).expect("table").split('|').collect();
    let col = header.iter().position(|h| h.trim() == "ssh procs peak").expect("ssh procs peak column");
    for row in stdout.lines().filter(|l| l.starts_with("| broker") || l.starts_with("| direct")) {
        let peak: usize = row.split('|').nth(col).and_then(|v| v.trim().parse().ok()).expect(row);
        assert!((1..=2).contains(&peak), "{peak} ssh processes at once with --max-masters 2: {row}");
    }
}
