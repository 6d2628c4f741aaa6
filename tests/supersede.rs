//! Supersede protection end to end: deploying an older certificate after a
//! newer one (later notBefore) is `superseded` and writes nothing, with real PEM
//! and the real `cert_facts` (pki) — in memory and over a real sshd.

#![allow(clippy::type_complexity)] // common/mod.rs (Fleet::files)

mod common;

use certdeploy::config::Config;
use certdeploy::intake::validate_body;
use certdeploy_core::driver::{self, Env};
use certdeploy_core::testkit::{OpKind, Rig, Sim, block_on};
use certdeploy_core::{Outcome, Report, Terminal};
use certdeploy_testbed::WEB1_CONFIG;
use common::*;

/// validate → plan → driver, with the pki's `cert_facts` reading the host.
fn deploy(rig: &Rig, cfg: &Config, id: &str, b: &Bundle) -> Report {
    let v = validate_body(&request(id, "web1", b, true), cfg, certdeploy::clock::now()).expect("valid request");
    let (plan, payload) = v.plan(1).expect("plan");
    let env = Env {
        host: &rig.host,
        verifier: &rig.verifier,
        journal: &rig.journal,
        clock: &rig.clock,
        cert_facts: certdeploy::runtime::cert_facts,
    };
    match block_on(driver::start(&env, plan, &payload)).expect("driver") {
        Terminal::Finished(r) => r,
        Terminal::Abandoned(w) => panic!("abandoned: {w}"),
    }
}

#[test]
fn older_certificate_after_newer_is_superseded_in_memory() {
    let cfg = Config::parse(WEB1_CONFIG, "t.toml", &[]).unwrap();
    let ca = TestCa::new();
    let newer = ca.leaf("www.example.com", 1);
    let older = ca.leaf("www.example.com", 30);
    let sim = Sim::new();
    let rig = Rig::new(sim.clone());

    let r = deploy(&rig, &cfg, "new-1", &newer);
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    let files = |s: &Sim| (s.get("/etc/ssl/site.pem"), s.get("/etc/ssl/site.key"), s.get("/etc/ssl/chain.pem"));
    let before = files(&sim);
    assert_eq!(before.0.as_ref().map(|f| f.0.clone()), Some(newer.cert_pem.clone().into_bytes()));
    let ops_before = sim.world().op_log.len();

    let r = deploy(&rig, &cfg, "old-1", &older);
    assert_eq!(r.outcome, Outcome::Superseded, "{}", r.message);
    assert!(!r.outcome.success());
    assert_eq!(files(&sim), before, "files unchanged");
    let ops: Vec<OpKind> = sim.world().op_log[ops_before..].to_vec();
    assert!(
        !ops.iter().any(|o| matches!(o, OpKind::Write(_) | OpKind::Exec(_) | OpKind::Restore(_))),
        "nothing written, no reload: {ops:?}"
    );
    assert_eq!(r.metadata().get("new_not_before"), Some(&older.not_before.to_string()));
    assert_eq!(r.metadata().get("existing_not_before"), Some(&newer.not_before.to_string()));
    assert!(r.message.contains("already has a newer certificate"), "{}", r.message);
    assert!(sim.list().iter().all(|p| !p.contains(".certdeploy-bak.old-1")), "no backup left: {:?}", sim.list());

    // The same certificate again is `unchanged`, and a newer one deploys.
    assert_eq!(deploy(&rig, &cfg, "new-2", &newer).outcome, Outcome::Unchanged);
    let newest = ca.leaf("www.example.com", 0);
    assert_eq!(deploy(&rig, &cfg, "newest-1", &newest).outcome, Outcome::Deployed);
}

#[test]
fn older_certificate_after_newer_is_superseded_over_sshd() {
    let fleet = Fleet::new(1, false);
    let cfg = fleet.write_config(&Opts::default());
    let ca = TestCa::new();
    let t = &fleet.targets[0];
    let dir = fleet.tmp.path();
    let run_deploy = |id: &str, b: &Bundle| {
        let args = deploy_args(dir, &t.name, id, b, true, true);
        let (code, out, err) = run(&cfg, &strs(&args));
        let ev: certdeploy_core::wire::ResultEvent =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
        (code, ev)
    };
    let newer = ca.leaf("www.example.com", 1);
    let older = ca.leaf("www.example.com", 30);
    let (code, ev) = run_deploy("sshd-new", &newer);
    assert_eq!((code, ev.outcome), (0, Outcome::Deployed), "{}", ev.message);
    let before = fleet.files(t);
    let reloads = fleet.reloads(t);
    let (code, ev) = run_deploy("sshd-old", &older);
    assert_eq!((code, ev.outcome), (1, Outcome::Superseded), "{}", ev.message);
    assert_eq!(fleet.files(t), before, "files unchanged");
    assert_eq!(fleet.reloads(t), reloads, "no reload");
    assert!(fleet.leftovers(t).is_empty(), "{:?}", fleet.leftovers(t));
    let backups: Vec<String> = std::fs::read_dir(&t.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".certdeploy-bak.sshd-old"))
        .collect();
    assert!(backups.is_empty(), "superseded attempt left backups: {backups:?}");
}
