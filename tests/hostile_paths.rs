//! Targets never share a path: two targets on one host and port may not
//! write the same file, nor one target use a path twice. Two configured
//! targets on one host and port sharing a path stop the worker at start
//! (exit 2, naming both); an inline target whose paths collide (with each
//! other, with a configured target, with certdeploy's own names) is
//! `rejected` naming the field, once, never redelivered.

#![allow(clippy::type_complexity)] // common/mod.rs (Fleet::files)

mod common;

use std::time::Duration;

use certdeploy_core::Outcome;
use certdeploy_testbed::certs::{TestCa, request};
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn inline_targets_colliding_with_a_path_are_rejected_naming_the_field_and_never_redelivered() {
    let fleet = Fleet::new(1, true);
    let t = &fleet.targets[0];
    let reload = format!("echo reload >> {}", t.reload_log.display());
    let cfg = fleet.write_config(&Opts {
        worker_extra: format!(
            "allow_inline_targets = true\ninline_host_allowlist = [\"{}\"]\n\
             inline_command_allowlist = [\"{reload}\"]\ninline_path_allowlist = [\"{}/*\"]\n",
            t.addr,
            t.dir.display()
        ),
        ..Opts::default()
    });
    let ca = TestCa::new();
    let d = t.dir.display().to_string();
    let inline = |id: &str, cert: &str, key: &str, chain: &str| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&request(id, &t.name, &ca.leaf("inline.example", 1), true)).expect("request JSON");
        let o = v.as_object_mut().expect("object");
        o.remove("target");
        o.insert(
            "target_spec".into(),
            serde_json::json!({
                "host": t.addr, "port": fleet.sshd.port(), "user": fleet.sshd.user(),
                "cert_path": cert, "key_path": key, "chain_path": chain, "reload_command": reload,
            }),
        );
        serde_json::to_vec(&v).unwrap()
    };
    let (icert, ikey, ichain) = (format!("{d}/inline.pem"), format!("{d}/inline.key"), format!("{d}/inline-chain.pem"));
    let cases: Vec<(&str, Vec<u8>, &str, String)> = vec![
        (
            "hp-key-is-cert",
            inline("hp-key-is-cert", &icert, &icert, &ichain),
            "target_spec.key_path",
            format!("`{icert}` is also this target's cert_path"),
        ),
        (
            "hp-configured-chain",
            inline("hp-configured-chain", &icert, &ikey, &t.chain.display().to_string()),
            "target_spec.chain_path",
            format!("is also configured target {}'s chain_path on the same host", t.name),
        ),
        (
            "hp-lock-name",
            inline("hp-lock-name", &format!("{}.certdeploy-lock", t.cert.display()), &ikey, &ichain),
            "target_spec.cert_path",
            "uses certdeploy's own names".to_string(),
        ),
        (
            "hp-backup-name",
            inline("hp-backup-name", &icert, &format!("{}.certdeploy-bak.x", t.key.display()), &ichain),
            "target_spec.key_path",
            "uses certdeploy's own names".to_string(),
        ),
    ];
    let mut client = Client::connect(&fleet).await;
    let _w = Proc::worker(&fleet, &cfg, &[], "worker");
    for (_, body, _, _) in &cases {
        client.publish(body).await;
    }
    // A control: the same worker deploys an inline target with paths of its own.
    client.publish(&inline("hp-control", &icert, &ikey, &ichain)).await;
    let mut ids: Vec<String> = cases.iter().map(|c| c.0.to_string()).collect();
    ids.push("hp-control".into());
    let mut seen = client.collect(Duration::from_secs(120), all_ids(&ids)).await;
    client.settle(&mut seen).await;
    for (id, _, field, problem) in &cases {
        let rs = seen.get(*id).unwrap_or_else(|| panic!("no result for {id}: {seen:?}"));
        assert_eq!(rs.len(), 1, "{id}: one result, not one per redelivery: {rs:?}");
        let r = &rs[0];
        assert_eq!(r.outcome, Outcome::Rejected, "{id}: {}", r.message);
        assert!(r.message.contains(&format!("{field}: ")), "{id}: the result names {field}: {}", r.message);
        assert!(r.message.contains(problem.as_str()), "{id}: {}", r.message);
    }
    assert_eq!(seen["hp-control"][0].outcome, Outcome::Deployed, "{}", seen["hp-control"][0].message);
    // Nothing is left waiting to come back, and no configured file moved.
    let (ready, unacked) =
        wait_queue_empty(fleet.vhost.as_ref().unwrap(), "certdeploy.requests", Duration::from_secs(30)).unwrap();
    assert_eq!((ready, unacked), (0, 0));
    assert!(!t.cert.exists() && !t.chain.exists(), "the configured target's files were never written");
    assert_eq!(names_with(&t.dir, ".certdeploy-"), Vec::<String>::new(), "no leftovers");
}

#[test]
fn worker_with_two_targets_sharing_a_path_on_one_host_exits_2_naming_both() {
    let fleet = Fleet::new(2, false);
    let (t0, t1) = (&fleet.targets[0], &fleet.targets[1]);
    let cfg = fleet.write_config(&Opts::default());
    let text = std::fs::read_to_string(&cfg).unwrap();
    // t1 moved onto t0's host, its key where t0 keeps its chain.
    let clash = text
        .replace(&format!("host = \"{}\"", t1.addr), &format!("host = \"{}\"", t0.addr))
        .replace(&format!("key_path = \"{}\"", t1.key.display()), &format!("key_path = \"{}\"", t0.chain.display()));
    assert_ne!(clash, text);
    let path = cfg.with_file_name("clash.toml");
    std::fs::write(&path, &clash).unwrap();
    let mut w = Proc::spawn(&path, &["worker"], &[], fleet.tmp.path().join("clash.log"));
    let status = w.wait_timeout(Duration::from_secs(30)).expect("the worker exits");
    let log = w.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains(&format!("targets.{}.key_path", t1.name)), "names the field: {log}");
    assert!(log.contains(&format!("targets.{}.chain_path", t0.name)), "names the other target's field: {log}");
    assert!(log.contains(&format!("targets {} and {}", t0.name, t1.name)), "{log}");
    // The same two targets on their own hosts share paths freely (the
    // fleet's targets all use the same file names).
    let path = cfg.with_file_name("apart.toml");
    std::fs::write(&path, text.replace(&t1.dir.display().to_string(), &t0.dir.display().to_string())).unwrap();
    let (code, out, err) = run(&path, &["check"]);
    assert_ne!(code, 2, "targets on different hosts may share paths: {out}{err}");
}
