//! The worker process itself: no core dump and no attaching
//! (keys live in its memory), and a metrics listener that a flood of idle
//! connections cannot use to starve deployments of descriptors.

#![allow(clippy::type_complexity)] // common/mod.rs (Fleet::files)

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use certdeploy_core::Outcome;
use certdeploy_testbed::certs::{TestCa, request};
use common::*;

/// A worker started as `nobody` (so that the owner of its /proc files
/// tells whether it is dumpable: the kernel gives a non-dumpable process's
/// /proc entries to root) with a broker that never answers: it stays up,
/// retrying, and is looked at from outside.
#[test]
fn the_worker_cannot_dump_core_and_is_not_dumpable() {
    let base = tempfile::Builder::new().prefix("cd-nodump").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(base.path(), Some(65534), Some(65534)).unwrap();
    let cfg = base.path().join("certdeploy.toml");
    let closed = free_port();
    std::fs::write(
        &cfg,
        format!(
            "[worker]\namqp_url = \"amqp://guest:guest@127.0.0.1:{closed}/%2f\"\njournal_path = \"{}\"\n\
             metrics_listen = \"\"\n",
            base.path().join("journal").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = base.path().join("worker.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(bin())
        .arg("--config")
        .arg(&cfg)
        .arg("worker")
        .env("RUST_LOG", "info")
        .env("TMPDIR", "/tmp")
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let start = Instant::now();
    while !text().contains("recovery done") {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("the worker exited ({s}): {}", text());
        }
        assert!(start.elapsed() < Duration::from_secs(30), "worker not up: {}", text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).expect("core limit line");
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "soft and hard core limits are 0: {core}");
    let status = std::fs::metadata(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status.uid(), 0, "a dumpable process's /proc files belong to its own user (65534)");
    let _ = child.kill();
    let _ = child.wait();
}

/// 2,000 idle TCP connections to the metrics port, each reopened as soon
/// as the worker closes it (the worker limited to 300 descriptors): a
/// deployment still completes while they are held, and the endpoint
/// answers again once they are gone.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_to_the_metrics_port_do_not_stop_a_deployment() {
    // The test's own descriptors: 2,000 connections and the fleet.
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit { current: hard, maximum: hard },
    )
    .unwrap();
    assert!(hard.is_none_or(|h| h >= 4096), "hard RLIMIT_NOFILE {hard:?}");

    let fleet = Fleet::new(1, true);
    let t = &fleet.targets[0];
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = fleet.write_config(&Opts::default());
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("metrics_listen = \"\"", &format!("metrics_listen = \"{metrics}\""));
    std::fs::write(&cfg, text).unwrap();
    let mut client = Client::connect(&fleet).await;
    let log = fleet.tmp.path().join("worker.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut worker = Command::new("prlimit")
        .args(["--nofile=300:300", "--", bin(), "--config"])
        .arg(&cfg)
        .arg("worker")
        .env("RUST_LOG", "info,certdeploy=debug")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("/readyz 200", Duration::from_secs(60), || get(&metrics, "/readyz").is_some_and(|(c, _)| c == 200));

    // The flood: 2,000 clients, each keeping a connection open and idle,
    // and opening another as soon as the worker closes it. Those the
    // listen backlog has no room for keep trying (SYN retries) meanwhile.
    let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..2000 {
        let (addr, open) = (metrics.clone(), open.clone());
        flood.spawn(async move {
            loop {
                match tokio::net::TcpStream::connect(&addr).await {
                    Ok(mut s) => {
                        open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let mut b = [0u8; 1];
                        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut b).await;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let opened = open.load(std::sync::atomic::Ordering::SeqCst);
    assert!(opened > 150, "only {opened} idle connections opened");
    // The flood holds on while the deployment runs.

    client.publish(&request("flood-1", &t.name, &TestCa::new().leaf("flood.example", 1), true)).await;
    let ids = vec!["flood-1".to_string()];
    let seen = client.collect(Duration::from_secs(90), all_ids(&ids)).await;
    let r = seen.get("flood-1").map(|v| &v[0]);
    assert!(
        r.is_some_and(|r| r.outcome == Outcome::Deployed),
        "after {} idle metrics connections: {r:?}\n{}",
        open.load(std::sync::atomic::Ordering::SeqCst),
        tail(&text(), 40)
    );
    assert!(worker.try_wait().unwrap().is_none(), "the worker is still running");

    flood.abort_all();
    while flood.join_next().await.is_some() {}
    wait_for("/metrics answers again", Duration::from_secs(30), || {
        get(&metrics, "/metrics").is_some_and(|(c, body)| c == 200 && body.contains("certdeploy_deployments_total"))
    });
    let _ = worker.kill();
    let _ = worker.wait();
}
