//! Latency of SshHost steps on loopback against a real sshd (needs root and
//! /usr/sbin/sshd; see certdeploy-testbed). Prints figures, asserts nothing.
//!
//!     cargo run --release -p certdeploy-ssh --example ssh_bench [-- ITERATIONS]

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use certdeploy_core::driver::{self, Clock, Env, Host, NoVerifier};
use certdeploy_core::testkit::{MemJournal, Sim, fake_cert_facts};
use certdeploy_core::*;
use certdeploy_ssh::{HostAddr, SshConfig, SshHost, SshPool};
use certdeploy_testbed::SshdFixture;

const ADDR: &str = "127.0.0.2";

struct RealClock;
impl Clock for RealClock {
    fn now(&self) -> Timestamp {
        Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0))
    }
    async fn sleep_until(&self, t: Timestamp) {
        tokio::time::sleep(Duration::from_millis(t.since(self.now()))).await;
    }
}

fn report(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    println!(
        "{name:<44} n={:<4} mean {:>7.2} ms  p50 {:>7.2} ms  p90 {:>7.2} ms  max {:>7.2} ms",
        v.len(),
        mean,
        ms(v[v.len() / 2]),
        ms(v[v.len() * 9 / 10]),
        ms(v[v.len() - 1])
    );
}

fn new_pool(sshd: &SshdFixture, control: &Path) -> SshPool {
    SshPool::new(SshConfig {
        known_hosts: sshd.known_hosts_path().to_path_buf(),
        identity_file: sshd.identity_path().to_path_buf(),
        connect_timeout: Duration::from_secs(5),
        control_dir: control.to_path_buf(),
        idle_timeout: Duration::from_secs(60),
        per_host_concurrency: 4,
        max_masters: certdeploy_ssh::default_max_masters(),
        kex_algorithms: None,
    })
    .expect("pool")
}

fn plan_for(dir: &Path, id: &str, n: usize) -> (Plan, Payload) {
    let target = TargetSpec {
        host: ADDR.into(),
        port: 22,
        user: "certdeploy-test".into(),
        cert_path: dir.join("site.pem").display().to_string(),
        key_path: dir.join("site.key").display().to_string(),
        chain_path: Some(dir.join("chain.pem").display().to_string()),
        cert_mode: "0644".into(),
        key_mode: "0600".into(),
        validate_command: None,
        reload_command: "true".into(),
        verify_endpoint: None,
        verify_sni: None,
    };
    let cert = format!("CERT bench nb={n}\n{}\n", "A".repeat(1800));
    let material = Material {
        certificate_pem: cert.clone(),
        private_key_pem: Secret::new(format!("KEY {n}\n{}\n", "K".repeat(1700)).into_bytes()),
        chain_pem: Some(format!("CHAIN\n{}\n", "C".repeat(1800))),
    };
    let facts = fake_cert_facts(cert.as_bytes())
        .map(|f| MaterialFacts { leaf_sha256: Some(f.leaf_sha256), not_before: Some(f.not_before) })
        .unwrap_or_default();
    build_plan(id, "bench", &target, &material, &facts, Policy::default(), 1).expect("plan")
}

async fn deploy(host: &SshHost<'_>, journal: &MemJournal, dir: &Path, id: &str, n: usize) -> Outcome {
    let (plan, payload) = plan_for(dir, id, n);
    let env = Env { host, verifier: &NoVerifier, journal, clock: &RealClock, cert_facts: fake_cert_facts };
    match driver::start(&env, plan, &payload).await.expect("driver") {
        Terminal::Finished(r) => r.outcome,
        Terminal::Abandoned(w) => panic!("abandoned: {w}"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    let sshd = SshdFixture::start(&[ADDR]);
    let control = tempfile::Builder::new().prefix("cdb").tempdir_in("/tmp").expect("control dir");
    let pool = new_pool(&sshd, control.path());
    let addr = HostAddr::new(ADDR, sshd.port(), sshd.user());
    let host = SshHost::new(&pool, addr.clone());
    let dir = sshd.root_dir_for(ADDR).join("bench");
    sshd.mkdir(&dir, 0o755);

    // Put files in place, warm the master.
    let journal = MemJournal(Sim::new());
    let t = Instant::now();
    assert_eq!(deploy(&host, &journal, &dir, "warmup", 0).await, Outcome::Deployed);
    println!("first deployment incl. opening the master: {:.1} ms", t.elapsed().as_secs_f64() * 1000.0);

    let (mut snap, mut write, mut exec, mut restore) = (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let id = format!("step-{i}");
        let (plan, payload) = plan_for(&dir, &id, i + 1);
        let reqs: Vec<SnapshotRequest> =
            plan.files.iter().map(|f| SnapshotRequest { role: f.role, path: f.path.clone() }).collect();
        let t = Instant::now();
        let snaps = host.snapshot(&id, &reqs).await;
        snap.push(t.elapsed());
        let snaps: Vec<Snapshot> = snaps.into_iter().map(|r| r.expect("snapshot").snapshot).collect();
        let writes: Vec<(WriteRequest, &[u8])> = plan
            .files
            .iter()
            .zip(&snaps)
            .map(|(f, s)| {
                let w = WriteRequest { role: f.role, live_path: s.live_path.clone(), mode: f.mode };
                (w, payload.get(f.role).expect("payload"))
            })
            .collect();
        let t = Instant::now();
        let r = host.write(&id, &writes).await;
        write.push(t.elapsed());
        assert!(r.iter().all(|r| r.is_ok()) && r.len() == 3, "{r:?}");
        let t = Instant::now();
        let e = host.exec("true", 10_000).await.expect("exec");
        exec.push(t.elapsed());
        assert!(e.success());
        let rr: Vec<RestoreRequest> = plan
            .files
            .iter()
            .zip(&snaps)
            .map(|(f, s)| RestoreRequest { role: f.role, live_path: s.live_path.clone(), pre: s.pre.clone() })
            .collect();
        let t = Instant::now();
        let r = host.restore(&id, &rr).await;
        restore.push(t.elapsed());
        assert!(r.iter().all(|r| r.as_ref().is_ok_and(|s| *s == RestoreStatus::Restored)), "{r:?}");
    }
    println!("per step, 3 files (cert, key, chain; ~2 KB each), warm master:");
    report("  snapshot (stat, hardlink, read+sha256)", snap);
    report("  write (temps, fsync, 3 renames, dir sync)", write);
    report("  exec `true`", exec);
    report("  restore (3 renames back, dir sync)", restore);

    let mut warm = vec![];
    for i in 0..n {
        let t = Instant::now();
        let o = deploy(&host, &journal, &dir, &format!("warm-{i}"), 1000 + i).await;
        warm.push(t.elapsed());
        assert_eq!(o, Outcome::Deployed);
    }
    let cold_n = n.min(30);
    let mut cold = vec![];
    for i in 0..cold_n {
        let c = tempfile::Builder::new().prefix("cdb").tempdir_in("/tmp").expect("control dir");
        let t = Instant::now();
        let p = new_pool(&sshd, c.path());
        let h = SshHost::new(&p, addr.clone());
        let o = deploy(&h, &journal, &dir, &format!("cold-{i}"), 5000 + i).await;
        p.close_all().await;
        cold.push(t.elapsed());
        assert_eq!(o, Outcome::Deployed);
    }
    println!("deployment end to end (snapshot, write, reload `true`, prune; in-memory journal):");
    report("  warm master (reused)", warm);
    report("  new connection per deployment", cold);
    println!("masters opened by the warm pool: {}", pool.masters_opened());
}
