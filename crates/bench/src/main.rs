//! `certdeploy-bench`: N deployments over H hosts (one real sshd listening
//! on 127.0.0.2..), reload `true` (or a realistic sleep), through RabbitMQ
//! with the real worker binary, then the same N without the broker (the
//! driver loop in-process). Prints wall time, deploys/s, request→result
//! latency percentiles, worker CPU per deploy, peak RSS, journal flushes per
//! deploy, SSH masters opened and ssh processes at peak, for the durable
//! journal and with durability off. Every run verifies every host's final
//! files. `--rtt-ms` puts every host behind a latency proxy; `--kex` and
//! `--max-masters` set the `[ssh]` keys of the same names; `--kex-cpu N`
//! only measures the ssh client's CPU per connection for OpenSSH's default
//! key exchange and for curve25519-sha256.
//!
//! `--paths-per-host P` gives each host P targets (certificate paths) with
//! the same reload command, and `--reload-coalesce-ms 200,0` repeats every
//! run per value of `[worker] reload_coalesce_ms`; the table then shows
//! reloads per deployment (counted by the reload command itself).
//!
//! Run: `cargo build --release -p certdeploy -p certdeploy-bench &&
//!       target/release/certdeploy-bench --n 1000 --hosts 20`
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use certdeploy_core::wire::ResultEvent;
use certdeploy_testbed::certs::{Bundle, TestCa, request};
use certdeploy_testbed::proxy::LatencyProxy;
use certdeploy_testbed::rabbit::Vhost;
use certdeploy_testbed::{SshdFixture, TEST_USER};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// Deployments per run.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Hosts (loopback addresses 127.0.0.2 .., 250 per /24).
    #[arg(long, default_value_t = 20)]
    hosts: usize,
    /// Reload command on the hosts.
    #[arg(long, default_value = "true")]
    reload: String,
    /// Worker concurrency (prefetch).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Runs: any of broker-fsync, broker-off, direct-fsync, direct-off.
    #[arg(long, value_delimiter = ',', default_value = "broker-fsync,broker-off,direct-fsync,direct-off")]
    runs: Vec<String>,
    /// Publish everything before the worker starts (memory test: peak RSS
    /// with a full queue).
    #[arg(long)]
    queued_first: bool,
    /// Publish at this many requests per second (0: as fast as possible,
    /// which saturates the worker and measures queueing, not latency).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Soak mode: the worker collects its journal every this many seconds
    /// with `journal_retention_days = 0`; the broker runs sample the
    /// journal's size every 5 s and time `certdeploy journal list` against
    /// the running worker (0: the worker's defaults, no sampling).
    #[arg(long, default_value_t = 0)]
    gc_interval_s: u64,
    /// Soak mode: the worker's `journal_compact_min_mb` (default: the
    /// worker's default; 0 turns compaction off).
    #[arg(long)]
    compact_min_mb: Option<u64>,
    /// Put every host behind a latency proxy adding this round trip (half
    /// each way; 0: connect directly).
    #[arg(long, default_value_t = 0)]
    rtt_ms: u64,
    /// `[ssh] kex_algorithms` (default: OpenSSH's own).
    #[arg(long)]
    kex: Option<String>,
    /// `[ssh] max_masters` (default: the worker's, from its limits).
    #[arg(long)]
    max_masters: Option<usize>,
    /// `[worker] reload_coalesce_ms` values: every run once per value.
    #[arg(long, value_delimiter = ',', default_value = "200")]
    reload_coalesce_ms: Vec<u64>,
    /// Only measure the ssh client's CPU per connection (handshake,
    /// authentication and one `true`), this many connections with
    /// OpenSSH's default key exchange and as many with curve25519-sha256.
    #[arg(long, default_value_t = 0)]
    kex_cpu: usize,
    /// Targets per host (each its own cert, key and chain in the host's
    /// directory); request i goes to target i mod (hosts × this), so
    /// consecutive requests go to different hosts.
    /// With the same reload command on a host, many certificates per
    /// host (`--paths-per-host` is the same flag).
    #[arg(long, alias = "paths-per-host", default_value_t = 1)]
    targets_per_host: usize,
    /// The worker's default `warm_masters = false`: masters open during
    /// the run, on first use, instead of before the clock starts.
    #[arg(long)]
    cold: bool,
    /// Print the floor of the shape (handshake CPU × hosts ÷ cores, or
    /// RTT × round trips × deployments ÷ concurrency, whichever binds),
    /// from a handshake CPU measured here, and each run's ratio to it.
    #[arg(long)]
    floor: bool,
    /// Sample the peak PSS of the worker plus its ssh processes
    /// (`/proc/*/smaps_rollup`, every 100 ms; broker runs).
    #[arg(long)]
    pss: bool,
    /// After the runs, deploy the same requests with the hand-written ssh
    /// loop next to the benchmark (`crates/bench/ssh-loop.sh`), over the
    /// same hosts, and print its rate and the ratio.
    #[arg(long)]
    ssh_loop: bool,
}

struct Fleet {
    sshd: SshdFixture,
    dirs: Vec<PathBuf>,
    /// Where each host is reached: its own address, or its latency proxy.
    endpoints: Vec<(String, u16)>,
    _proxies: Vec<LatencyProxy>,
    tmp: tempfile::TempDir,
}

#[derive(Default, Debug)]
struct Figures {
    run: String,
    /// `reload_coalesce_ms` of the run.
    coalesce_ms: u64,
    /// Reload command runs per deployment.
    reloads: f64,
    wall_s: f64,
    per_s: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    cpu_s: f64,
    rss_mib: f64,
    flushes: f64,
    flush_ms: f64,
    masters: f64,
    /// ssh master processes alive at once under the run's control
    /// directory, at most (sampled every 20 ms; a master's `ssh -f` parent
    /// and child, alive together for a moment as it forks, count once).
    ssh_peak: usize,
    /// What the deployments cost on the wire (see [`Wire`]).
    wire: Wire,
    /// Peak PSS of the worker plus its ssh processes (`--pss`).
    pss: PssAtPeak,
    outcomes: BTreeMap<String, usize>,
}

/// SFTP requests, SFTP round trips and remote commands over a run, from the
/// worker's counters (`certdeploy_sftp_requests_total`,
/// `certdeploy_sftp_round_trips_total`, `certdeploy_ssh_commands_total`).
#[derive(Default, Debug, Clone, Copy)]
struct Wire {
    requests: f64,
    round_trips: f64,
    commands: f64,
}

impl Wire {
    fn of_pool(pool: &certdeploy_ssh::SshPool) -> Wire {
        Wire {
            requests: pool.sftp_requests() as f64,
            round_trips: pool.sftp_round_trips() as f64,
            commands: pool.commands_run() as f64,
        }
    }
    fn of_metrics(body: &str) -> Wire {
        Wire {
            requests: metric(body, "certdeploy_sftp_requests_total"),
            round_trips: metric(body, "certdeploy_sftp_round_trips_total"),
            commands: metric(body, "certdeploy_ssh_commands_total"),
        }
    }
    fn since(self, before: Wire) -> Wire {
        Wire {
            requests: self.requests - before.requests,
            round_trips: self.round_trips - before.round_trips,
            commands: self.commands - before.commands,
        }
    }
    /// `round trips / requests / commands` per deployment.
    fn per(self, n: f64) -> String {
        format!("{:.1} / {:.1} / {:.2}", self.round_trips / n, self.requests / n, self.commands / n)
    }
}

/// Samples the ssh processes under a control directory until finished.
struct SshPeak {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<usize>,
}

impl SshPeak {
    fn start(dir: PathBuf) -> SshPeak {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            while !s.load(Ordering::SeqCst) {
                peak = peak.max(certdeploy_testbed::ssh_masters_under(&dir));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        SshPeak { stop, handle }
    }
    fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or(0)
    }
}

/// Samples the PSS of a process plus the ssh processes under a control
/// directory (`/proc/<pid>/smaps_rollup`), every 100 ms, until finished:
/// the peak of the sum, MiB. PSS shares each shared page among the
/// processes mapping it, so the sum counts the ssh binary's pages once.
struct PssPeak {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<PssAtPeak>,
}

/// The sample with the largest sum: the worker's share and the ssh
/// processes' (MiB), and how many ssh processes there were.
#[derive(Clone, Copy, Debug, Default)]
struct PssAtPeak {
    total_mib: f64,
    worker_mib: f64,
    ssh_mib: f64,
    ssh_procs: usize,
}

impl PssPeak {
    fn start(pid: u32, dir: PathBuf) -> PssPeak {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = PssAtPeak::default();
            while !s.load(Ordering::SeqCst) {
                let ssh = ssh_pids_under(&dir);
                let worker_mib = pss_kib(pid) / 1024.0;
                let ssh_mib = ssh.iter().copied().map(pss_kib).sum::<f64>() / 1024.0;
                if worker_mib + ssh_mib > peak.total_mib {
                    peak = PssAtPeak { total_mib: worker_mib + ssh_mib, worker_mib, ssh_mib, ssh_procs: ssh.len() };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        PssPeak { stop, handle }
    }
    fn finish(self) -> PssAtPeak {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or_default()
    }
}

/// The `ssh` processes whose command line names a path under `dir`.
fn ssh_pids_under(dir: &Path) -> Vec<u32> {
    let needle = format!("{}/", dir.display());
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim_end() == "ssh"))
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(&needle))
        })
        .collect()
}

/// A process's PSS in KiB (0 when gone).
fn pss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// `run`: the journal's durability and `reload_coalesce_ms`.
fn config(
    f: &Fleet,
    args: &Args,
    amqp_url: &str,
    (durability, coalesce_ms): (&str, u64),
    metrics: &str,
    journal: &Path,
    control: &Path,
) -> String {
    let mut c = format!(
        "[worker]\namqp_url = \"{amqp_url}\"\njournal_path = \"{}\"\nconcurrency = {}\nper_host_concurrency = 4\n\
         metrics_listen = \"{metrics}\"\njournal_durability = \"{durability}\"\nshutdown_grace_s = 30\n\
         reload_coalesce_ms = {coalesce_ms}\n{gc}\n\
         [ssh]\nknown_hosts = \"{}\"\nidentity_file = \"{}\"\nconnect_timeout_s = 10\nwarm_masters = {}\ncontrol_dir = \"{}\"\n{ssh}\n",
        journal.display(),
        args.concurrency,
        f.sshd.known_hosts_path().display(),
        f.sshd.identity_path().display(),
        !args.cold,
        control.display(),
        ssh = args.kex.as_ref().map_or(String::new(), |k| format!("kex_algorithms = \"{k}\"\n"))
            + &args.max_masters.map_or(String::new(), |m| format!("max_masters = {m}\n")),
        gc = if args.gc_interval_s > 0 {
            let compact = args.compact_min_mb.map_or(String::new(), |mb| format!("journal_compact_min_mb = {mb}\n"));
            format!("journal_gc_interval_s = {}\njournal_retention_days = 0\n{compact}", args.gc_interval_s)
        } else {
            String::new()
        },
    );
    for j in 0..f.dirs.len() * args.targets_per_host {
        let (host, port) = &f.endpoints[j % f.dirs.len()];
        let [cert, key, chain] = target_files(f, j);
        // The reload command counts its runs in the host's directory.
        let reload = format!("echo r >> {}; {}", f.dirs[j % f.dirs.len()].join("reloads.log").display(), args.reload);
        c.push_str(&format!(
            "[targets.{}]\nhost = \"{host}\"\nport = {port}\nuser = \"{TEST_USER}\"\ncert_path = \"{}\"\n\
             key_path = \"{}\"\nchain_path = \"{}\"\nreload_command = \"{}\"\n\n",
            target_name(j),
            cert.display(),
            key.display(),
            chain.display(),
            reload.replace('"', "\\\""),
        ));
    }
    c
}

/// Target `j` is on host `j mod hosts`; its name.
fn target_name(j: usize) -> String {
    format!("h{j}")
}

/// Target `j`'s cert, key and chain paths (`site.pem`, `site.key`,
/// `chain.pem` for the first target of a host; numbered for the others).
fn target_files(f: &Fleet, j: usize) -> [PathBuf; 3] {
    let hosts = f.dirs.len();
    let d = &f.dirs[j % hosts];
    let k = j / hosts;
    let n = if k == 0 { String::new() } else { k.to_string() };
    [d.join(format!("site{n}.pem")), d.join(format!("site{n}.key")), d.join(format!("chain{n}.pem"))]
}

/// Reload command runs on every host so far.
fn reload_runs(f: &Fleet) -> usize {
    f.dirs.iter().map(|d| std::fs::read_to_string(d.join("reloads.log")).map_or(0, |s| s.lines().count())).sum()
}

/// One sample of a soak run.
struct Sample {
    /// Seconds since the start.
    t: f64,
    /// The journal's size on disk and its deployments (the worker's gauges,
    /// exported after each gc and compaction).
    size: f64,
    deployments: f64,
    /// How long `journal list` took against the running worker (`None`: it
    /// failed).
    list_ms: Option<f64>,
    /// Bytes of the journal directory and of a compaction's copy beside it,
    /// walked by the benchmark itself (between compactions too).
    disk: f64,
    /// The worker's compactions so far, and the last one's duration.
    compactions: f64,
    compact_s: f64,
}

static SOAK: std::sync::Mutex<Vec<Sample>> = std::sync::Mutex::new(Vec::new());

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

async fn soak_sampler(bin: PathBuf, cfg: PathBuf, metrics: String, journal: PathBuf, t0: Instant) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let body = http_get(&metrics, "/metrics").map(|r| r.1).unwrap_or_default();
        let (bin, cfg) = (bin.clone(), cfg.clone());
        let listed = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let out = Command::new(&bin)
                .arg("--config")
                .arg(&cfg)
                .args(["journal", "list", "--json"])
                .stderr(Stdio::null())
                .output()
                .ok()?;
            let ok = out.status.success() && serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok();
            ok.then(|| t.elapsed().as_secs_f64() * 1000.0)
        })
        .await
        .ok()
        .flatten();
        let mut beside = journal.clone().into_os_string();
        beside.push(".compact");
        let sample = Sample {
            t: t0.elapsed().as_secs_f64(),
            size: metric(&body, "certdeploy_journal_size_bytes"),
            deployments: metric(&body, "certdeploy_journal_deployments"),
            list_ms: listed,
            disk: (dir_size(&journal) + dir_size(Path::new(&beside))) as f64,
            compactions: metric(&body, "certdeploy_journal_compactions_total"),
            compact_s: metric(&body, "certdeploy_journal_last_compaction_duration_seconds"),
        };
        SOAK.lock().unwrap_or_else(|e| e.into_inner()).push(sample);
    }
}

fn print_soak(samples: &[Sample]) {
    let answered: Vec<f64> = samples.iter().filter_map(|s| s.list_ms).collect();
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let max_mib = mib(samples.iter().map(|s| s.size).fold(0.0, f64::max));
    let max_disk = mib(samples.iter().map(|s| s.disk).fold(0.0, f64::max));
    let compactions = samples.last().map_or(0.0, |s| s.compactions);
    let longest = samples.iter().map(|s| s.compact_s).fold(0.0, f64::max);
    println!(
        "  soak: {} samples; journal size max {max_mib:.1} MiB (gauge), {max_disk:.1} MiB on disk (walked, copy \
         included); {compactions:.0} compactions (longest seen {longest:.2} s); `journal list` answered {}/{} times \
         (max {:.0} ms)",
        samples.len(),
        answered.len(),
        samples.len(),
        answered.iter().copied().fold(0.0, f64::max)
    );
    for s in samples.iter().step_by((samples.len() / 12).max(1)) {
        println!(
            "    t={:>6.0} s  journal {:>7.1} MiB  on disk {:>7.1} MiB  deployments {:>6.0}  compactions {:>3.0}  list {}",
            s.t,
            mib(s.size),
            mib(s.disk),
            s.deployments,
            s.compactions,
            s.list_ms.map_or("failed".to_string(), |ms| format!("{ms:.0} ms"))
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(19464)
}

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default()))
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// utime+stime of a process, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Files on each host must be exactly the bundle whose deployment finished
/// last for it (and the key must belong to that certificate).
fn verify_hosts(f: &Fleet, last: &BTreeMap<usize, Bundle>) -> anyhow::Result<()> {
    for (h, b) in last {
        let [cert, key, chain] = target_files(f, *h);
        let cert = std::fs::read_to_string(cert).with_context(|| format!("target {h} cert"))?;
        let key = std::fs::read_to_string(key).with_context(|| format!("target {h} key"))?;
        let chain = std::fs::read_to_string(chain).with_context(|| format!("target {h} chain"))?;
        if cert != b.cert_pem || key != b.key_pem || chain != b.chain_pem {
            bail!("target {h}: files do not match its last deployment");
        }
    }
    Ok(())
}

fn latencies(sent: &BTreeMap<String, Instant>, got: &BTreeMap<String, (Instant, ResultEvent)>) -> Vec<f64> {
    let mut v: Vec<f64> = got
        .iter()
        .filter_map(|(id, (t, _))| sent.get(id).map(|s| t.duration_since(*s).as_secs_f64() * 1000.0))
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Publish every request with confirms; returns when each was sent. With
/// `rate > 0` an open loop sends each request at its slot; otherwise 100
/// are in flight at a time.
async fn publish_all(
    broker: Arc<certdeploy_amqp::Broker>,
    bundles: Vec<(String, usize, Bundle)>,
    names: Arc<Vec<String>>,
    rate: f64,
) -> anyhow::Result<BTreeMap<String, Instant>> {
    let mut times = BTreeMap::new();
    let t0 = tokio::time::Instant::now();
    let per_chunk = if rate > 0.0 { bundles.len().max(1) } else { 100 };
    let mut i = 0usize;
    for chunk in bundles.chunks(per_chunk) {
        let mut set = tokio::task::JoinSet::new();
        for (id, h, b) in chunk {
            if rate > 0.0 {
                tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / rate)).await;
            }
            i += 1;
            let body = request(id, &names[*h], b, true);
            let broker = broker.clone();
            let id = id.clone();
            set.spawn(async move {
                let t = Instant::now();
                broker.publish_request(&body).await.map(|_| (id, t))
            });
        }
        while let Some(r) = set.join_next().await {
            let (id, t) = r??;
            times.insert(id, t);
        }
    }
    Ok(times)
}

async fn broker_run(
    f: &Fleet,
    args: &Args,
    durability: &str,
    bundles: &[(String, usize, Bundle)],
    coalesce_ms: u64,
) -> anyhow::Result<Figures> {
    let names: Arc<Vec<String>> = Arc::new((0..f.dirs.len() * args.targets_per_host).map(target_name).collect());
    let reloads0 = reload_runs(f);
    let vhost = Vhost::new();
    let metrics = format!("127.0.0.1:{}", free_port());
    let journal = f.tmp.path().join(format!("journal-broker-{durability}"));
    let cfg_path = f.tmp.path().join(format!("broker-{durability}.toml"));
    let control = f.tmp.path().join(format!("ssh-broker-{durability}"));
    std::fs::write(&cfg_path, config(f, args, &vhost.url(), (durability, coalesce_ms), &metrics, &journal, &control))?;
    let peak = SshPeak::start(control.clone());
    let bin = std::env::current_exe()?.with_file_name("certdeploy");
    let mut bcfg = certdeploy_amqp::BrokerConfig::new(vhost.url(), "bench");
    bcfg.rpc_timeout = Duration::from_secs(30);
    let broker = Arc::new(certdeploy_amqp::connect(&bcfg).await?);
    let mut results = broker.subscribe_results().await?;
    let mut sent = BTreeMap::new();
    if args.queued_first {
        sent = publish_all(broker.clone(), bundles.to_vec(), names.clone(), 0.0).await?;
    }
    let log = std::fs::File::create(f.tmp.path().join(format!("worker-{durability}.log")))?;
    let child: Child = Command::new(&bin)
        .arg("--config")
        .arg(&cfg_path)
        .arg("worker")
        // BENCH_WORKER_LOG: another filter for the worker's log, which is
        // kept (with the journals) under $TMPDIR when BENCH_KEEP is set.
        .env("RUST_LOG", std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn,certdeploy::runtime=info".into()))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("spawn {} (build it: cargo build --release -p certdeploy)", bin.display()))?;
    let pid = child.id();
    let pss = args.pss.then(|| PssPeak::start(pid, control.clone()));
    // Killed however this function ends (a failed run must not leave a
    // worker behind).
    let mut child = KillOnDrop(child);
    let start_wait = Instant::now();
    while http_get(&metrics, "/readyz").map(|r| r.0) != Some(200) {
        if start_wait.elapsed() > Duration::from_secs(60) {
            bail!("worker not ready after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wire0 = Wire::of_metrics(&http_get(&metrics, "/metrics").map(|r| r.1).unwrap_or_default());
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let publisher = if args.queued_first {
        None
    } else {
        Some(tokio::spawn(publish_all(broker.clone(), bundles.to_vec(), names.clone(), args.rate)))
    };
    let sampler = (args.gc_interval_s > 0)
        .then(|| tokio::spawn(soak_sampler(bin.clone(), cfg_path.clone(), metrics.clone(), journal.clone(), t0)));
    let mut got: BTreeMap<String, (Instant, ResultEvent)> = BTreeMap::new();
    // However long the run (shape (c) with the default key exchange takes
    // longer than ten minutes here), it is given up only when no result
    // has come for this long.
    const STALL: Duration = Duration::from_secs(180);
    while got.len() < bundles.len() {
        match tokio::time::timeout(STALL, results.next()).await {
            Ok(Some(Ok(ev))) => {
                let r: ResultEvent = serde_json::from_slice(&ev.body)?;
                got.entry(r.deployment_id.clone()).or_insert((Instant::now(), r));
            }
            Ok(Some(Err(e))) => bail!("results: {e}"),
            _ => bail!("only {} of {} results: none for {} s", got.len(), bundles.len(), STALL.as_secs()),
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    if let Some(s) = sampler {
        s.abort();
        let _ = s.await;
        print_soak(&SOAK.lock().unwrap_or_else(|e| e.into_inner()));
    }
    if let Some(p) = publisher {
        sent = p.await??;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await; // metrics tick
    let body = http_get(&metrics, "/metrics").map(|r| r.1).unwrap_or_default();
    let rss = peak_rss_mib(pid);
    if std::env::var_os("BENCH_STEPS").is_some() {
        // Mean time per step (and publish), from the worker's histograms.
        for l in body.lines().filter(|l| {
            (l.starts_with("certdeploy_step_duration_seconds_") || l.starts_with("certdeploy_result_publish"))
                && (l.contains("_sum") || l.contains("_count"))
        }) {
            eprintln!("  {l}");
        }
    }
    let ssh_peak = peak.finish();
    let pss = pss.map_or_else(PssAtPeak::default, PssPeak::finish);
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = child.0.wait();
    broker.close().await;
    // Anything the worker warned about (deferrals, retries) is part of the figure.
    let text = std::fs::read_to_string(f.tmp.path().join(format!("worker-{durability}.log"))).unwrap_or_default();
    let warnings: Vec<&str> =
        text.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("deferring")).collect();
    if !warnings.is_empty() {
        eprintln!("  worker logged {} warning(s); the first ones:", warnings.len());
        for l in warnings.iter().take(5) {
            eprintln!("    {l}");
        }
    }

    let mut last: BTreeMap<usize, (String, Bundle)> = BTreeMap::new();
    let mut outcomes = BTreeMap::new();
    let by_id: BTreeMap<&str, (usize, &Bundle)> = bundles.iter().map(|(id, h, b)| (id.as_str(), (*h, b))).collect();
    let mut order: Vec<(&String, &(Instant, ResultEvent))> = got.iter().collect();
    order.sort_by_key(|(_, (_, r))| r.finished_at.clone());
    for (id, (_, r)) in order {
        *outcomes.entry(r.outcome.as_str().to_string()).or_insert(0) += 1;
        if r.success
            && let Some((h, b)) = by_id.get(id.as_str())
        {
            last.insert(*h, (id.clone(), (*b).clone()));
        }
    }
    verify_hosts(f, &last.into_iter().map(|(h, (_, b))| (h, b)).collect())?;
    let lat = latencies(&sent, &got);
    let n = bundles.len() as f64;
    Ok(Figures {
        run: format!("broker, journal {durability}"),
        coalesce_ms,
        reloads: (reload_runs(f) - reloads0) as f64 / n,
        wall_s: wall,
        per_s: n / wall,
        p50_ms: percentile(&lat, 0.5),
        p95_ms: percentile(&lat, 0.95),
        p99_ms: percentile(&lat, 0.99),
        cpu_s: cpu,
        rss_mib: rss,
        flushes: metric(&body, "certdeploy_journal_flushes_total"),
        flush_ms: metric(&body, "certdeploy_journal_flush_seconds_total") * 1000.0
            / metric(&body, "certdeploy_journal_flushes_total").max(1.0),
        masters: metric(&body, "certdeploy_ssh_masters_opened_total"),
        ssh_peak,
        wire: Wire::of_metrics(&body).since(wire0),
        pss,
        outcomes,
    })
}

async fn direct_run(
    f: &Fleet,
    args: &Args,
    durability: &str,
    bundles: &[(String, usize, Bundle)],
    coalesce_ms: u64,
) -> anyhow::Result<Figures> {
    let reloads0 = reload_runs(f);
    let journal = f.tmp.path().join(format!("journal-direct-{durability}"));
    let control = f.tmp.path().join(format!("ssh-direct-{durability}"));
    let text =
        config(f, args, "amqp://guest:guest@127.0.0.1:5672/%2f", (durability, coalesce_ms), "", &journal, &control);
    let peak = SshPeak::start(control);
    let cfg = certdeploy::config::Config::parse(&text, "bench.toml", &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rt = Arc::new(certdeploy::runtime::Runtime::open(cfg.clone())?);
    let now = certdeploy::clock::now();
    let mut validated = Vec::new();
    for (id, h, b) in bundles {
        let v = certdeploy::intake::validate_body(&request(id, &target_name(*h), b, true), &cfg, now)
            .map_err(|r| anyhow::anyhow!("{}", r.error))?;
        validated.push(v);
    }
    // As the worker does with `warm_masters = true` before it consumes:
    // the masters' handshakes are not part of the figure in either mode.
    if !args.cold {
        rt.warm_masters().await;
    }
    let wire0 = Wire::of_pool(&rt.pool);
    let pid = std::process::id();
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let mut set = tokio::task::JoinSet::new();
    for v in validated {
        let rt = rt.clone();
        let permit = sem.clone().acquire_owned().await?;
        set.spawn(async move {
            let r = rt.execute_waiting(&v).await;
            drop(permit);
            r.map(|rep| (v.deployment_id.clone(), Instant::now(), rep))
        });
    }
    let mut lat = Vec::new();
    let mut outcomes = BTreeMap::new();
    let mut finished: Vec<(String, certdeploy_core::Report)> = Vec::new();
    while let Some(r) = set.join_next().await {
        let (id, t, rep) = r??;
        lat.push(t.duration_since(t0).as_secs_f64() * 1000.0);
        *outcomes.entry(rep.outcome.as_str().to_string()).or_insert(0) += 1;
        finished.push((id, rep));
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    lat.sort_by(f64::total_cmp);
    finished.sort_by_key(|(_, r)| r.finished_at);
    let by_id: BTreeMap<&str, (usize, &Bundle)> = bundles.iter().map(|(id, h, b)| (id.as_str(), (*h, b))).collect();
    let mut last = BTreeMap::new();
    for (id, r) in &finished {
        if r.outcome.success()
            && let Some((h, b)) = by_id.get(id.as_str())
        {
            last.insert(*h, (*b).clone());
        }
    }
    verify_hosts(f, &last)?;
    let reloads = (reload_runs(f) - reloads0) as f64 / bundles.len().max(1) as f64;
    let flushes = rt.journal.flushes() as f64;
    let stats = rt.journal.stats();
    let flush_ms = stats.flush_latency.sum_us as f64 / 1000.0 / (stats.flush_latency.count.max(1) as f64);
    let masters = rt.pool.masters_opened() as f64;
    let wire = Wire::of_pool(&rt.pool).since(wire0);
    let ssh_peak = peak.finish();
    rt.pool.close_all().await;
    let n = bundles.len() as f64;
    Ok(Figures {
        run: format!("direct (no broker), journal {durability}"),
        coalesce_ms,
        reloads,
        wall_s: wall,
        per_s: n / wall,
        p50_ms: percentile(&lat, 0.5),
        p95_ms: percentile(&lat, 0.95),
        p99_ms: percentile(&lat, 0.99),
        cpu_s: cpu,
        rss_mib: peak_rss_mib(pid),
        flushes,
        flush_ms,
        masters,
        ssh_peak,
        wire,
        pss: PssAtPeak::default(),
        outcomes,
    })
}

/// The ssh client's CPU per connection (key exchange, authentication, one
/// `true`) against the fleet's sshd: `n` connections one after the other
/// from one shell, whose reaped children's user + system time
/// (`cutime + cstime` in `/proc/<shell>/stat`) is theirs.
fn client_cpu_ms(f: &Fleet, kex: Option<&str>, n: usize) -> anyhow::Result<f64> {
    let kex = kex.map_or(String::new(), |k| format!("-o KexAlgorithms={k}"));
    let ssh = format!(
        "ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} \
         -o GlobalKnownHostsFile=/dev/null -o IdentitiesOnly=yes -i {} {kex} -p {} {TEST_USER}@127.0.0.2 true",
        f.sshd.known_hosts_path().display(),
        f.sshd.identity_path().display(),
        f.sshd.port()
    );
    let script = format!("i=0; while [ $i -lt {n} ]; do {ssh} || exit 1; i=$((i+1)); done; cat /proc/$$/stat");
    let out = Command::new("sh").args(["-c", &script]).stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("ssh failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stat = String::from_utf8_lossy(&out.stdout);
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // cutime and cstime are fields 16 and 17; the first after `)` is 3.
    Ok((tick(13) + tick(14)) * 10.0 / n as f64)
}

fn kex_cpu(f: &Fleet, n: usize) -> anyhow::Result<()> {
    let g = Command::new("ssh").args(["-F", "/dev/null", "-G", "x"]).output()?;
    let default = String::from_utf8_lossy(&g.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("kexalgorithms ").map(|v| v.split(',').next().unwrap_or("").to_string()))
        .unwrap_or_default();
    let version = Command::new("ssh").arg("-V").output()?;
    let mut rows = Vec::new();
    for (name, kex) in
        [(format!("OpenSSH default ({default})"), None), ("curve25519-sha256".to_string(), Some("curve25519-sha256"))]
    {
        // One connection first, outside the measure (page cache, sshd).
        client_cpu_ms(f, kex, 1)?;
        rows.push((name, client_cpu_ms(f, kex, n)?));
    }
    println!(
        "\nssh client CPU per connection (key exchange, authentication, one `true`), {n} connections each, {}",
        String::from_utf8_lossy(&version.stderr).trim()
    );
    println!("| key exchange | client CPU ms per connection |");
    println!("|---|---|");
    for (name, ms) in rows {
        println!("| {name} | {ms:.1} |");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // 127.0.0.2 .. 127.0.0.251, then 127.0.1.2 ..: all loopback.
    let addrs: Vec<String> = (0..args.hosts).map(|i| format!("127.0.{}.{}", i / 250, i % 250 + 2)).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    eprintln!("starting sshd on {} addresses; generating {} certificates per run", args.hosts, args.n);
    let sshd = SshdFixture::start(&refs);
    let dirs = addrs.iter().map(|a| sshd.root_dir_for(a)).collect();
    let (mut endpoints, mut proxies) = (Vec::new(), Vec::new());
    for a in &addrs {
        if args.rtt_ms > 0 {
            let upstream = format!("{a}:{}", sshd.port()).parse()?;
            let p = LatencyProxy::start(upstream, Duration::from_micros(args.rtt_ms * 500));
            sshd.trust("127.0.0.1", p.addr().port());
            endpoints.push(("127.0.0.1".to_string(), p.addr().port()));
            proxies.push(p);
        } else {
            endpoints.push((a.clone(), sshd.port()));
        }
    }
    let mut tmp = tempfile::Builder::new().prefix("certdeploy-bench-").tempdir()?;
    if std::env::var_os("BENCH_KEEP").is_some() {
        tmp.disable_cleanup(true);
        eprintln!("keeping {}", tmp.path().display());
    }
    let fleet = Fleet { sshd, dirs, endpoints, _proxies: proxies, tmp };
    if args.kex_cpu > 0 {
        return kex_cpu(&fleet, args.kex_cpu);
    }
    let ca = TestCa::new();
    let mut table = Vec::new();
    let runs: Vec<(&String, u64)> =
        args.runs.iter().flat_map(|r| args.reload_coalesce_ms.iter().map(move |c| (r, *c))).collect();
    let mut loop_bundles = Vec::new();
    for (k, (run, coalesce_ms)) in runs.into_iter().enumerate() {
        // Fresh certificates per run (same notBefore within a run: order
        // between requests of one host never makes one `superseded`).
        // One instant for the whole run: generating takes seconds, and a
        // notBefore one second later would make the earlier ones `superseded`.
        let day = 86_400;
        let nb = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64
            - (30 - k as i64) * day;
        let targets = args.hosts * args.targets_per_host;
        let bundles: Vec<(String, usize, Bundle)> = (0..args.n)
            .map(|i| {
                let cn = format!("h{}.bench", i % targets);
                (format!("bench-{run}-{coalesce_ms}-{i}"), i % targets, ca.leaf_at(&cn, nb, nb + 365 * day))
            })
            .collect();
        if k == 0 {
            loop_bundles = bundles.iter().map(|(id, j, b)| (format!("loop-{id}"), *j, b.clone())).collect();
        }
        eprintln!("run {run}, reload_coalesce_ms = {coalesce_ms} ...");
        let fig = match run.as_str() {
            "broker-fsync" => broker_run(&fleet, &args, "fsync", &bundles, coalesce_ms).await?,
            "broker-off" => broker_run(&fleet, &args, "off", &bundles, coalesce_ms).await?,
            "direct-fsync" => direct_run(&fleet, &args, "fsync", &bundles, coalesce_ms).await?,
            "direct-off" => direct_run(&fleet, &args, "off", &bundles, coalesce_ms).await?,
            other => bail!("unknown run {other}"),
        };
        eprintln!("{fig:?}");
        table.push(fig);
    }
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "\ncertdeploy-bench: N={} hosts={} targets/host={} reload=`{}` concurrency={} cpus={cpus} rate={}{} rtt={} kex={} max_masters={}",
        args.n,
        args.hosts,
        args.targets_per_host,
        args.reload,
        args.concurrency,
        if args.rate > 0.0 { format!("{}/s", args.rate) } else { "max".into() },
        if args.queued_first { " (queue filled before the worker started)" } else { "" },
        if args.rtt_ms > 0 { format!("{} ms (latency proxy)", args.rtt_ms) } else { "loopback".into() },
        args.kex.as_deref().unwrap_or("OpenSSH default"),
        args.max_masters
            .map_or_else(|| format!("default ({})", certdeploy_ssh::default_max_masters()), |m| m.to_string()),
    );
    println!(
        "| run | coalesce ms | reloads/deploy | wall s | deploys/s | p50 ms | p95 ms | p99 ms | worker CPU ms/deploy | peak RSS MiB | flushes/deploy | ms/flush | ssh masters | ssh procs peak | SFTP round trips / requests / commands per deploy | outcomes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for f in &table {
        let n = f.outcomes.values().sum::<usize>().max(1) as f64;
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2} | {:.2} | {:.0} | {} | {} | {:?} |",
            f.run,
            f.coalesce_ms,
            f.reloads,
            f.wall_s,
            f.per_s,
            f.p50_ms,
            f.p95_ms,
            f.p99_ms,
            f.cpu_s * 1000.0 / n,
            f.rss_mib,
            f.flushes / n,
            f.flush_ms,
            f.masters,
            f.ssh_peak,
            f.wire.per(n),
            f.outcomes
        );
    }
    println!("every run verified every target's final cert, key and chain");
    if args.pss {
        for f in table.iter().filter(|f| f.pss.total_mib > 0.0) {
            let p = f.pss;
            println!(
                "{}: peak PSS of the worker and its ssh processes {:.1} MiB (worker {:.1} MiB, {} ssh processes {:.1} MiB, {:.2} MiB each)",
                f.run,
                p.total_mib,
                p.worker_mib,
                p.ssh_procs,
                p.ssh_mib,
                p.ssh_mib / p.ssh_procs.max(1) as f64
            );
        }
    }
    if args.floor {
        print_floor(&fleet, &args, &table, cpus)?;
    }
    if args.ssh_loop
        && let Some(first) = table.first()
    {
        run_ssh_loop(&fleet, &args, &loop_bundles, first)?;
    }
    Ok(())
}

/// Round trips a remote command costs over an open master (channel open,
/// then the command's exit and output), assumed for the floor.
const COMMAND_ROUND_TRIPS: f64 = 2.0;

/// The shape's floor and each run's ratio to it: the handshakes' CPU
/// (client and sshd, measured here with the run's key exchange) spread over
/// the cores, or the round trips (SFTP round trips and commands per
/// deployment as measured, times the RTT) over the concurrency, whichever
/// binds.
fn print_floor(f: &Fleet, args: &Args, table: &[Figures], cpus: usize) -> anyhow::Result<()> {
    let n_hs = 20;
    client_cpu_ms(f, args.kex.as_deref(), 1)?;
    let server0 = sshd_reaped_cpu_s(f);
    let client_ms = client_cpu_ms(f, args.kex.as_deref(), n_hs)?;
    let server_ms = (sshd_reaped_cpu_s(f) - server0) * 1000.0 / n_hs as f64;
    let hs_s = (client_ms + server_ms) / 1000.0;
    let hosts = f.dirs.len() as f64;
    let hs_floor = hs_s * hosts / cpus.max(1) as f64;
    println!(
        "\nfloor: handshake CPU {client_ms:.1} ms client + {server_ms:.1} ms sshd ({}) × {hosts} hosts ÷ {cpus} cores = {hs_floor:.2} s",
        args.kex.as_deref().unwrap_or("OpenSSH default key exchange")
    );
    println!(
        "| run | round trips per deploy (SFTP + {COMMAND_ROUND_TRIPS} per command) | RTT floor s | floor s | wall s | ratio |"
    );
    println!("|---|---|---|---|---|---|");
    for fig in table {
        let n = fig.outcomes.values().sum::<usize>().max(1) as f64;
        let rts = (fig.wire.round_trips + COMMAND_ROUND_TRIPS * fig.wire.commands) / n;
        let rtt_floor = args.rtt_ms as f64 / 1000.0 * rts * n / args.concurrency.max(1) as f64;
        let floor = hs_floor.max(rtt_floor);
        println!(
            "| {} | {rts:.1} | {rtt_floor:.2} | {floor:.2} | {:.2} | {:.2} |",
            fig.run,
            fig.wall_s,
            fig.wall_s / floor.max(1e-9)
        );
    }
    Ok(())
}

/// CPU seconds of the sshd processes the fixture's listeners reaped.
fn sshd_reaped_cpu_s(f: &Fleet) -> f64 {
    let Ok(rd) = std::fs::read_dir(f.sshd.dir()) else { return 0.0 };
    rd.flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("sshd") && n.ends_with(".pid")
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse::<u32>().ok())
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("").to_string();
            let v: Vec<f64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
            // cutime and cstime (fields 16 and 17; the first after `)` is 3).
            (v.get(13).copied().unwrap_or(0.0) + v.get(14).copied().unwrap_or(0.0)) / 100.0
        })
        .sum()
}

/// The hand-written ssh loop (`ssh-loop.sh` next to this source, copied
/// into the run's directory) over the same hosts and targets, with the
/// requests of the first run's shape: its rate and the ratio to `first`.
fn run_ssh_loop(f: &Fleet, args: &Args, bundles: &[(String, usize, Bundle)], first: &Figures) -> anyhow::Result<()> {
    let dir = f.tmp.path().join("ssh-loop");
    let ctl = f.tmp.path().join("ssh-loop-ctl");
    std::fs::create_dir_all(&ctl)?;
    let script = dir.join("ssh-loop.sh");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(&script, include_str!("../ssh-loop.sh"))?;
    let mut manifest = String::new();
    for (i, (_, j, b)) in bundles.iter().enumerate() {
        let d = dir.join(i.to_string());
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("cert"), &b.cert_pem)?;
        std::fs::write(d.join("key"), &b.key_pem)?;
        std::fs::write(d.join("chain"), &b.chain_pem)?;
        let (host, port) = &f.endpoints[j % f.dirs.len()];
        let [cert, key, chain] = target_files(f, *j);
        manifest.push_str(&format!(
            "{j} {host} {port} {} {} {} {}\n",
            d.display(),
            cert.display(),
            key.display(),
            chain.display()
        ));
    }
    std::fs::write(dir.join("manifest"), manifest)?;
    let t0 = Instant::now();
    let out = Command::new("sh")
        .arg(&script)
        .arg(dir.join("manifest"))
        .arg(args.concurrency.to_string())
        .env("LOOP_KNOWN_HOSTS", f.sshd.known_hosts_path())
        .env("LOOP_IDENTITY", f.sshd.identity_path())
        .env("LOOP_USER", TEST_USER)
        .env("LOOP_CONTROL_DIR", &ctl)
        .env("LOOP_KEX", args.kex.as_deref().unwrap_or(""))
        .env("LOOP_RELOAD", &args.reload)
        .stdin(Stdio::null())
        .output()?;
    let wall = t0.elapsed().as_secs_f64();
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("for s in {}/*; do ssh -o ControlPath=$s -O exit x 2>/dev/null; done", ctl.display()))
        .status();
    if !out.status.success() {
        bail!("ssh loop failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let per_s = bundles.len() as f64 / wall;
    println!(
        "\nhand-written ssh loop (crates/bench/ssh-loop.sh: one ssh command per deployment over a master per host, {} lanes): {} deployments in {wall:.2} s = {per_s:.1}/s; {}: {:.1}/s = {:.1}× the loop",
        args.concurrency,
        bundles.len(),
        first.run,
        first.per_s,
        first.per_s / per_s.max(1e-9)
    );
    Ok(())
}

/// A child process killed (SIGKILL) and reaped when dropped, unless it has
/// exited already.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
