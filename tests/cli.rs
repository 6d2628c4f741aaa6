//! Command-line conventions: completions and the man page without a
//! configuration, and `--json` on the inspecting commands (journal list and
//! show, check), parsed as a script would. Real binary, real sshd.

mod common;

use std::process::Command;

use common::*;

fn run_no_config(args: &[&str]) -> (i32, Vec<u8>, String) {
    let out = Command::new(bin())
        .args(["--config", "/nonexistent/certdeploy.toml"])
        .args(args)
        .output()
        .expect("run certdeploy");
    (out.status.code().unwrap_or(-1), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn completions_and_the_man_page_need_no_configuration() {
    let dir = tempfile::tempdir().expect("tmp");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (code, out, err) = run_no_config(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        let text = String::from_utf8(out).expect("utf-8");
        for sub in ["worker", "deploy", "submit", "journal", "check"] {
            assert!(text.contains(sub), "{shell} completion lacks `{sub}`");
        }
        if shell == "bash" {
            let f = dir.path().join("certdeploy.bash");
            std::fs::write(&f, &text).expect("write");
            let st = Command::new("bash").arg("-n").arg(&f).status().expect("bash -n");
            assert!(st.success(), "the bash completion script does not parse");
        }
    }
    let (code, out, err) = run_no_config(&["completions", "tcsh"]);
    assert_eq!(code, 2, "an unknown shell is a usage error: {out:?}");
    assert!(err.contains("tcsh"), "{err}");

    let (code, roff, err) = run_no_config(&["man"]);
    assert_eq!(code, 0, "{err}");
    let page = dir.path().join("certdeploy.1");
    std::fs::write(&page, &roff).expect("write");
    // groff renders it without a warning.
    let out = Command::new("groff").args(["-man", "-Tutf8", "-ww", "-z"]).arg(&page).output().expect("groff");
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&roff);
    assert!(text.contains(".TH certdeploy 1"), "{text}");
    assert!(text.contains("worker") && text.contains("journal"), "{text}");
}

#[test]
fn json_output_of_journal_list_show_and_check() {
    let fleet = Fleet::new(1, false);
    let cfg = fleet.write_config(&Opts::default());
    let ca = TestCa::new();
    let args = deploy_args(fleet.tmp.path(), "t0", "json-1", &ca.leaf("json.example", 1), true, false);
    let (code, out, err) = run(&cfg, &strs(&args));
    assert_eq!(code, 0, "{out}{err}");

    let (code, out, err) = run(&cfg, &["journal", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("journal list --json is one JSON value");
    let row = rows.as_array().expect("array").iter().find(|r| r["deployment_id"] == "json-1").expect("json-1 listed");
    assert_eq!(
        (row["target"].as_str(), row["outcome"].as_str(), row["state"].as_str()),
        (Some("t0"), Some("deployed"), Some("finished"))
    );

    let (code, out, err) = run(&cfg, &["journal", "show", "json-1", "--json"]);
    assert_eq!(code, 0, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).expect("journal show --json is one JSON value");
    assert_eq!(shown["result"]["outcome"], "deployed", "{shown}");
    let events: Vec<&str> =
        shown["records"].as_array().expect("records").iter().filter_map(|r| r["event"].as_str()).collect();
    assert_eq!(events.first(), Some(&"started"), "{events:?}");
    assert_eq!(events.last(), Some(&"finished"), "{events:?}");
    let (code, _, _) = run(&cfg, &["journal", "show", "no-such-id", "--json"]);
    assert_eq!(code, 1);

    let (code, out, err) = run(&cfg, &["check", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("check --json is one JSON value");
    let t0 = &report[0];
    assert_eq!(t0["target"], "t0");
    assert_eq!(t0["ok"], true, "{report}");
    let checks = t0["checks"].as_array().expect("checks");
    assert!(!checks.is_empty() && checks.iter().all(|c| c["ok"] == true && c["name"].is_string()), "{report}");
}

/// `certdeploy check` reports what the link and owner rules (a link only
/// when owned by root or the SSH user and leading where allowed; a file
/// kept only when owned by them)
/// would refuse, one line per configured path, and exits 1; a clean target
/// passes. Nothing on the host changes.
#[test]
fn check_reports_paths_the_link_and_owner_rules_refuse() {
    let (attacker_uid, _) = certdeploy_testbed::ensure_attacker();
    let fleet = Fleet::new(2, false);
    let cfg = fleet.write_config(&Opts::default());
    let (bad, good) = (&fleet.targets[0], &fleet.targets[1]);
    // t0: the cert a link out of its directory, the key another user's.
    let outside = fleet.sshd.dir().join("hosts").join("outside");
    fleet.sshd.mkdir(&outside, 0o755);
    fleet.sshd.write(outside.join("other.pem"), b"someone else's certificate\n", 0o644);
    fleet.sshd.symlink(outside.join("other.pem"), &bad.cert);
    fleet.sshd.write(&bad.key, b"old key\n", 0o644);
    std::os::unix::fs::chown(&bad.key, Some(attacker_uid), None).expect("chown key to the attacker");
    // t1: plain files of the SSH user's.
    fleet.sshd.write(&good.cert, b"old certificate\n", 0o644);
    fleet.sshd.write(&good.key, b"old key\n", 0o600);
    let before = (fleet.sshd.list(&bad.dir), fleet.sshd.list(&good.dir), fleet.sshd.list(&outside));

    let (code, out, err) = run(&cfg, &["check"]);
    assert_eq!(code, 1, "{out}{err}");
    let (pem, key) = (bad.cert.display().to_string(), bad.key.display().to_string());
    let (t0, t1) = out.split_once("target t1").expect("both targets reported");
    let line = |text: &str, prefix: &str| -> String {
        text.lines().find(|l| l.trim_start().starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}: {out}")).into()
    };
    let c = line(t0, &format!("[FAIL] cert {pem}: "));
    assert!(c.contains("outside") && c.contains(&outside.join("other.pem").display().to_string()), "{out}");
    let k = line(t0, &format!("[FAIL] key {key}: "));
    assert!(k.contains(&format!("owned by uid {attacker_uid}")), "{out}");
    line(t0, &format!("[ok] chain {}: ", bad.chain.display()));
    for (what, p) in [("cert", &good.cert), ("key", &good.key), ("chain", &good.chain)] {
        line(t1, &format!("[ok] {what} {}: ", p.display()));
    }
    assert!(!t1.contains("[FAIL]"), "{out}");
    let (code, out, err) = run(&cfg, &["check", "--target", "t1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!((fleet.sshd.list(&bad.dir), fleet.sshd.list(&good.dir), fleet.sshd.list(&outside)), before);
    assert_eq!(fleet.sshd.stat(&bad.key).uid, attacker_uid);
}

#[test]
fn status_shows_each_targets_certificate_and_days_left() {
    let fleet = Fleet::new(3, false);
    let cfg = fleet.write_config(&Opts::default());
    let ca = TestCa::new();
    // t0 and t1 deployed (t1 twice: the later certificate counts); t2 never.
    for (target, id, cn, days_ago) in
        [("t0", "s-0", "zero.example", 10), ("t1", "s-1a", "one-a.example", 20), ("t1", "s-1b", "one-b.example", 5)]
    {
        let args = deploy_args(fleet.tmp.path(), target, id, &ca.leaf(cn, days_ago), false, false);
        let (code, out, err) = run(&cfg, &strs(&args));
        assert_eq!(code, 0, "{id}: {out}{err}");
    }
    let (code, out, err) = run(&cfg, &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("status --json is one JSON value");
    let row = |t: &str| rows.as_array().expect("array").iter().find(|r| r["target"] == t).cloned().expect(t);
    // A leaf from `leaf(cn, d)` is valid for 365 days from d days ago.
    for (t, id, cn, days_ago) in [("t0", "s-0", "zero.example", 10), ("t1", "s-1b", "one-b.example", 5)] {
        let r = row(t);
        assert_eq!(r["deployment_id"], id, "{r}");
        assert_eq!(r["outcome"], "deployed", "{r}");
        assert!(r["subject"].as_str().is_some_and(|s| s.contains(cn)), "{r}");
        assert!(r["not_after"].as_str().is_some_and(|s| s.ends_with('Z')), "{r}");
        let days = r["days_left"].as_i64().expect("days_left");
        assert!((364 - days_ago..=365 - days_ago).contains(&days), "{t}: {days} days left: {r}");
        assert!(r["finished_at"].is_string(), "{r}");
    }
    let never = row("t2");
    assert!(never["deployment_id"].is_null() && never["days_left"].is_null(), "{never}");

    let (code, out, _) = run(&cfg, &["status", "--target", "t1"]);
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("t1 ") && l.contains("s-1b") && l.contains("one-b.example")), "{out}");
    let (code, _, _) = run(&cfg, &["status", "--target", "nope"]);
    assert_eq!(code, 2);
}

/// `status --live` reads the target's certificate file (read only) and
/// flags a certificate changed behind certdeploy's back (exit 1).
#[test]
fn status_live_detects_a_certificate_changed_behind_certdeploys_back() {
    let fleet = Fleet::new(1, false);
    let cfg = fleet.write_config(&Opts::default());
    let ca = TestCa::new();
    let args = deploy_args(fleet.tmp.path(), "t0", "live-1", &ca.leaf("live.example", 1), false, false);
    let (code, out, err) = run(&cfg, &strs(&args));
    assert_eq!(code, 0, "{out}{err}");
    let live = |expect: i32| {
        let (code, out, err) = run(&cfg, &["status", "--live", "--json"]);
        assert_eq!(code, expect, "{out}{err}");
        let rows: serde_json::Value = serde_json::from_str(&out).expect("status --live --json is one JSON value");
        rows.as_array().expect("array").iter().find(|r| r["target"] == "t0").expect("t0")["live"].clone()
    };
    let l = live(0);
    assert_eq!(l["matches"], true, "{l}");
    assert!(l["file_subject"].as_str().is_some_and(|s| s.contains("live.example")), "{l}");
    let listing = |d: &std::path::Path| {
        let mut v: Vec<String> =
            std::fs::read_dir(d).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    let dir = fleet.targets[0].dir.clone();
    let before = listing(&dir);

    // Someone replaces the certificate by hand.
    let other = ca.leaf("by-hand.example", 1);
    fleet.sshd.write(&fleet.targets[0].cert, other.cert_pem.as_bytes(), 0o644);
    let l = live(1);
    assert_eq!(l["matches"], false, "{l}");
    assert!(l["file_subject"].as_str().is_some_and(|s| s.contains("by-hand.example")), "{l}");
    assert!(l["detail"].as_str().is_some_and(|d| d.contains("not what certdeploy last deployed")), "{l}");
    assert_eq!(listing(&dir), before, "status --live changed nothing on the host");
}
