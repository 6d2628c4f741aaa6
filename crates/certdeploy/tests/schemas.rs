//! `schemas/deploy-request.v1.json` and `schemas/deploy-result.v1.json`
//! agree with the documented request and result examples and with the
//! serde types: those examples and
//! everything the code produces validate; invalid bodies are refused by
//! both the schema and `decode_request`.

use std::collections::BTreeMap;

use certdeploy_core::testkit::{Rig, Sim, test_plan};
use certdeploy_core::wire::{self, ResultEvent, decode_request};
use certdeploy_core::{Details, Outcome, Report, Terminal, Timestamp};
use certdeploy_testbed::certs::{TestCa, request};
use jsonschema::Validator;
use serde_json::{Value, json};

fn load(name: &str) -> Value {
    let path = format!("{}/../../schemas/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn validator(name: &str) -> Validator {
    let schema = load(name);
    assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema", "{name}");
    jsonschema::meta::validate(&schema).unwrap_or_else(|e| panic!("{name} is not a valid schema: {e}"));
    jsonschema::draft202012::new(&schema).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn errors(v: &Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

/// The documented example of a deploy request, verbatim.
const SPEC_REQUEST: &str = r#"{
  "schema": "certdeploy.deploy-request.v1",
  "deployment_id": "renew-2026-11-27-web1-0001",
  "target": "web1",
  "certificate_pem": "-----BEGIN CERTIFICATE-----...",
  "private_key_pem": "-----BEGIN PRIVATE KEY-----...",
  "chain_pem": "-----BEGIN CERTIFICATE-----...",
  "requested_at": "2026-11-27T21:00:00Z"
}"#;

/// The documented example of a result event, verbatim.
const SPEC_RESULT: &str = r#"{
  "schema": "certdeploy.deploy-result.v1",
  "deployment_id": "...", "target": "web1", "host": "web1.internal:22",
  "outcome": "deployed",
  "success": true,
  "message": "certificate deployed to web1.internal:22",
  "metadata": {
    "backup_status_cert": "snapshotted", "backup_status_key": "snapshotted",
    "backup_status_chain": "n/a"
  },
  "attempts": 1, "started_at": "...", "finished_at": "...", "duration_ms": 412,
  "worker": "worker-hostname-pid"
}"#;

fn inline_request() -> Value {
    json!({
        "schema": "certdeploy.deploy-request.v1",
        "deployment_id": "inline-1",
        "target_spec": {
            "host": "web9.internal", "port": 2222, "user": "deploy",
            "cert_path": "/etc/ssl/a.pem", "key_path": "/etc/ssl/a.key", "chain_path": null,
            "cert_mode": "0644", "key_mode": "0600",
            "validate_command": "nginx -t", "reload_command": "systemctl reload nginx",
            "verify_endpoint": "web9.internal:443", "verify_sni": "www.example.com"
        },
        "certificate_pem": "c", "private_key_pem": "k", "chain_pem": null, "requested_at": null
    })
}

#[test]
fn spec_examples_validate_and_decode() {
    let req = validator("deploy-request.v1.json");
    let res = validator("deploy-result.v1.json");
    let example: Value = serde_json::from_str(SPEC_REQUEST).unwrap();
    assert_eq!(errors(&req, &example), Vec::<String>::new());
    decode_request(SPEC_REQUEST.as_bytes()).expect("the documented request decodes");
    let example: Value = serde_json::from_str(SPEC_RESULT).unwrap();
    assert_eq!(errors(&res, &example), Vec::<String>::new());
    let ev: ResultEvent = serde_json::from_str(SPEC_RESULT).expect("the documented result is a ResultEvent");
    assert_eq!(ev.outcome, Outcome::Deployed);
    // The inline form, with every optional field (null counts as absent).
    let inline = inline_request();
    assert_eq!(errors(&req, &inline), Vec::<String>::new());
    decode_request(&serde_json::to_vec(&inline).unwrap()).expect("inline request decodes");
}

#[test]
fn testbed_and_submit_requests_validate() {
    let req = validator("deploy-request.v1.json");
    let ca = TestCa::new();
    let b = ca.leaf("web1.example", 1);
    let mut bodies = vec![request("tb-1", "web1", &b, true), request("tb:2.x_y-z", "t0", &b, false)];
    bodies.push(wire::encode_request(
        "submit-1",
        "web1",
        &b.cert_pem,
        wire::KeyField::Pem(&b.key_pem),
        Some(&b.chain_pem),
        Timestamp(1_790_000_000_000),
    ));
    bodies.push(wire::encode_request(
        "submit-2",
        "web1",
        &b.cert_pem,
        wire::KeyField::Pem(&b.key_pem),
        None,
        Timestamp(0),
    ));
    for body in bodies {
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(errors(&req, &v), Vec::<String>::new(), "{v}");
        decode_request(&body).expect("decodes");
    }
}

fn report(outcome: Outcome) -> Report {
    let mut metadata = BTreeMap::new();
    let (cert, key, chain) = match outcome {
        Outcome::Deployed | Outcome::Unchanged | Outcome::Superseded | Outcome::Failed | Outcome::Reverted => {
            ("snapshotted", "no_pre_existing", "n/a")
        }
        Outcome::RolledBack | Outcome::RolledBackDaemonUnknown => ("restored", "removed", "n/a"),
        Outcome::RollbackFailed => ("restore_failed", "remove_failed", "restored"),
        Outcome::Rejected => ("n/a", "n/a", "n/a"),
        Outcome::Planned => ("n/a", "n/a", "n/a"),
    };
    metadata.insert("backup_status_cert".to_string(), cert.to_string());
    metadata.insert("backup_status_key".to_string(), key.to_string());
    metadata.insert("backup_status_chain".to_string(), chain.to_string());
    let mut set = |k: &str, v: &str| {
        metadata.insert(k.to_string(), v.to_string());
    };
    match outcome {
        Outcome::RolledBack => {
            set("rolled_back", "true");
            set("failed_step", "reload");
            set("reload_error", "exit status 1 (output: nginx: [emerg] ...)");
        }
        Outcome::RolledBackDaemonUnknown => {
            set("rolled_back", "true");
            set("daemon_state_unknown", "true");
            set("retry_reload_error", "exit status 1");
        }
        Outcome::RollbackFailed => {
            set("rolled_back", "false");
            set("manual_action_required", "true");
            set("rollback_error", "permission denied");
            set("backup_path_cert", "/etc/ssl/site.pem.certdeploy-bak.x");
        }
        Outcome::Failed => set("failed_step", "snapshot"),
        Outcome::Superseded => {
            set("existing_not_before", "1790000000");
            set("new_not_before", "1780000000");
        }
        Outcome::Rejected => set("failed_step", "validate_request"),
        Outcome::Planned => {
            set("plan_cert", "write");
            set("plan_key", "unchanged");
            set("plan_chain", "write");
            set("plan_supersede", "false");
            set("plan_outcome", "deployed");
        }
        Outcome::Deployed | Outcome::Unchanged | Outcome::Reverted => {}
    }
    Report {
        deployment_id: format!("r-{}", outcome.as_str()),
        target: "web1".into(),
        host: "web1.internal:22".into(),
        outcome,
        message: format!("{outcome}: details"),
        details: Details::from_metadata(metadata).into(),
        attempts: 2,
        reload_shared_with: None,
        started_at: Timestamp(1_790_000_000_000),
        finished_at: Timestamp(1_790_000_000_412),
        reverts: (outcome == Outcome::Reverted).then(|| "r-deployed".to_string()),
    }
}

#[test]
fn result_events_of_every_outcome_validate() {
    let res = validator("deploy-result.v1.json");
    let schema = load("deploy-result.v1.json");
    let listed: Vec<&str> =
        schema["properties"]["outcome"]["enum"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let strings: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
    assert_eq!(listed, strings, "the schema lists exactly the 10 outcomes");
    assert_eq!(
        strings,
        [
            "deployed",
            "unchanged",
            "rolled_back",
            "rolled_back_daemon_unknown",
            "rollback_failed",
            "failed",
            "rejected",
            "superseded",
            "planned",
            "reverted"
        ]
    );
    for outcome in Outcome::ALL {
        let ev = ResultEvent::from_report(&report(outcome), "worker-host-1");
        let v: Value = serde_json::from_slice(&ev.to_json()).unwrap();
        assert_eq!(errors(&res, &v), Vec::<String>::new(), "{outcome}: {v}");
        assert_eq!(v["outcome"], outcome.as_str());
        assert_eq!(v["success"], outcome.success());
        assert_eq!(v["duration_ms"], 412);
        // A revert's result names the deployment it reverts; no other has the field.
        if outcome == Outcome::Reverted {
            assert_eq!(v["reverts"], "r-deployed", "{v}");
            assert!(schema["properties"]["reverts"].is_object(), "the schema lists `reverts`");
        } else {
            assert!(v.get("reverts").is_none(), "{v}");
        }
        // A rejected report as the worker builds it.
        let r = Report::rejected("", "", "", "body: not valid JSON".into(), Timestamp(5));
        let v: Value = serde_json::from_slice(&ResultEvent::from_report(&r, "w").to_json()).unwrap();
        assert_eq!(errors(&res, &v), Vec::<String>::new(), "{v}");
    }
}

#[test]
fn result_events_from_real_deployments_validate() {
    let res = validator("deploy-result.v1.json");
    let mut seen = Vec::new();
    let run = |setup: &dyn Fn(&Sim), id: &str, cert: &[u8]| {
        let sim = Sim::new();
        setup(&sim);
        let rig = Rig::new(sim);
        let (plan, payload) = test_plan(id, cert, b"KEY", Some(b"CHAIN\n"), true, false);
        match rig.deploy(plan, &payload).expect("no crash") {
            Terminal::Finished(r) => r,
            Terminal::Abandoned(w) => panic!("abandoned {w}"),
        }
    };
    let none = |_: &Sim| {};
    seen.push(run(&none, "real-1", b"CERT a nb=100\n"));
    seen.push(run(&|s: &Sim| s.exit_codes("systemctl reload nginx", &[1]), "real-2", b"CERT a nb=100\n"));
    seen.push(run(&|s: &Sim| s.exit_codes("systemctl reload nginx", &[1, 1]), "real-3", b"CERT a nb=100\n"));
    seen.push(run(&|s: &Sim| s.exit_codes("nginx -t", &[1]), "real-4", b"CERT a nb=100\n"));
    seen.push(run(&|s: &Sim| s.put("/etc/ssl/site.pem", b"CERT newer nb=500\n", 0o644), "real-5", b"CERT a nb=100\n"));
    let mut outcomes: Vec<Outcome> = seen.iter().map(|r| r.outcome).collect();
    outcomes.dedup();
    assert!(outcomes.len() >= 3, "{outcomes:?}");
    for r in &seen {
        let v: Value = serde_json::from_slice(&ResultEvent::from_report(r, "w-1").to_json()).unwrap();
        assert_eq!(errors(&res, &v), Vec::<String>::new(), "{}: {v}", r.outcome);
    }
}

#[test]
fn invalid_results_are_refused_by_the_schema() {
    let res = validator("deploy-result.v1.json");
    let good: Value = serde_json::from_str(SPEC_RESULT).unwrap();
    let bad = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v
    };
    let cases = [
        bad(&|v| v["outcome"] = json!("success")),
        bad(&|v| v["outcome"] = json!("Deployed")),
        bad(&|v| v["success"] = json!(false)),
        bad(&|v| {
            v["outcome"] = json!("failed");
        }),
        bad(&|v| v["metadata"]["attempt"] = json!(1)),
        bad(&|v| v["metadata"]["backup_status_cert"] = json!("maybe")),
        bad(&|v| {
            v.as_object_mut().unwrap().remove("worker");
        }),
        bad(&|v| v["attempts"] = json!(-1)),
        bad(&|v| v["schema"] = json!("certdeploy.deploy-result.v2")),
        bad(&|v| v["metadata"]["plan_cert"] = json!("maybe")),
        bad(&|v| v["metadata"]["plan_bundle"] = json!("rewrite")),
        bad(&|v| v["metadata"]["plan_supersede"] = json!("yes")),
        bad(&|v| {
            v["outcome"] = json!("planned");
            v["success"] = json!(false);
        }),
    ];
    for v in cases {
        assert!(!res.is_valid(&v), "accepted: {v}");
    }
}

#[test]
fn invalid_requests_are_refused_by_schema_and_decoder() {
    let req = validator("deploy-request.v1.json");
    let good: Value = serde_json::from_str(SPEC_REQUEST).unwrap();
    let bad = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v
    };
    let cases: Vec<(&str, Value)> = vec![
        ("schema v2", bad(&|v| v["schema"] = json!("certdeploy.deploy-request.v2"))),
        ("no schema", bad(&|v| drop(v.as_object_mut().unwrap().remove("schema")))),
        ("no id", bad(&|v| drop(v.as_object_mut().unwrap().remove("deployment_id")))),
        ("empty id", bad(&|v| v["deployment_id"] = json!(""))),
        ("long id", bad(&|v| v["deployment_id"] = json!("x".repeat(129)))),
        ("id with space", bad(&|v| v["deployment_id"] = json!("a b"))),
        ("id with slash", bad(&|v| v["deployment_id"] = json!("a/b"))),
        ("id non-ascii", bad(&|v| v["deployment_id"] = json!("dé"))),
        ("id number", bad(&|v| v["deployment_id"] = json!(7))),
        ("no target", bad(&|v| drop(v.as_object_mut().unwrap().remove("target")))),
        ("null target", bad(&|v| v["target"] = Value::Null)),
        ("target with space", bad(&|v| v["target"] = json!("web 1"))),
        ("empty target", bad(&|v| v["target"] = json!(""))),
        ("both targets", bad(&|v| v["target_spec"] = inline_request()["target_spec"].clone())),
        ("target_spec not object", {
            let mut v = inline_request();
            v["target_spec"] = json!("web9.internal");
            v
        }),
        ("target_spec array", {
            let mut v = inline_request();
            v["target_spec"] = json!(["h", 22, "u", "/a", "/b", null, "0644", "0600", null, "r", null, null]);
            v
        }),
        ("target_spec unknown field", {
            let mut v = inline_request();
            v["target_spec"]["proxy_command"] = json!("x");
            v
        }),
        ("target_spec missing host", {
            let mut v = inline_request();
            v["target_spec"].as_object_mut().unwrap().remove("host");
            v
        }),
        ("target_spec port too big", {
            let mut v = inline_request();
            v["target_spec"]["port"] = json!(65536);
            v
        }),
        ("target_spec port string", {
            let mut v = inline_request();
            v["target_spec"]["port"] = json!("22");
            v
        }),
        ("no certificate", bad(&|v| drop(v.as_object_mut().unwrap().remove("certificate_pem")))),
        ("no key", bad(&|v| drop(v.as_object_mut().unwrap().remove("private_key_pem")))),
        ("null key", bad(&|v| v["private_key_pem"] = Value::Null)),
        ("both keys", bad(&|v| v["private_key_age"] = json!("-----BEGIN AGE ENCRYPTED FILE-----"))),
        ("sealed key number", {
            let mut v = good.clone();
            v.as_object_mut().unwrap().remove("private_key_pem");
            v["private_key_age"] = json!(7);
            v
        }),
        ("chain number", bad(&|v| v["chain_pem"] = json!(1))),
        ("requested_at number", bad(&|v| v["requested_at"] = json!(1790000000))),
        ("unknown field", bad(&|v| v["command"] = json!("reboot"))),
        ("dry_run string", bad(&|v| v["dry_run"] = json!("true"))),
        ("array body", json!(["certdeploy.deploy-request.v1", "a", "web1", null, "c", "k", null, null])),
        ("string body", json!("certdeploy.deploy-request.v1")),
        ("null body", Value::Null),
    ];
    for (name, v) in &cases {
        let body = serde_json::to_vec(v).unwrap();
        assert!(!req.is_valid(v), "{name}: schema accepted {v}");
        let e = decode_request(&body).err().unwrap_or_else(|| panic!("{name}: decode_request accepted {v}"));
        assert!(!e.field.is_empty() && !e.problem.is_empty(), "{name}: {e}");
    }
}

/// A request may carry its key sealed (`private_key_age`) instead of in
/// clear; results may carry fields a consumer does not know, such as
/// `submitted_by`.
#[test]
fn sealed_requests_and_results_with_more_fields_validate() {
    let req = validator("deploy-request.v1.json");
    let mut sealed: Value = serde_json::from_str(SPEC_REQUEST).unwrap();
    sealed.as_object_mut().unwrap().remove("private_key_pem");
    sealed["private_key_age"] = json!("-----BEGIN AGE ENCRYPTED FILE-----\n...\n-----END AGE ENCRYPTED FILE-----\n");
    assert_eq!(errors(&req, &sealed), Vec::<String>::new());
    let decoded = decode_request(&serde_json::to_vec(&sealed).unwrap()).expect("decodes");
    assert!(decoded.private_key_pem.is_none() && decoded.private_key_age.is_some());

    let res = validator("deploy-result.v1.json");
    let mut v: Value = serde_json::from_str(SPEC_RESULT).unwrap();
    v["submitted_by"] = json!("renewals-bot");
    v["added_in_a_later_version"] = json!({"any": "thing"});
    assert_eq!(errors(&res, &v), Vec::<String>::new());
    let parsed: ResultEvent = serde_json::from_value(v).expect("consumers ignore unknown fields");
    assert_eq!(parsed.submitted_by.as_deref(), Some("renewals-bot"));
    v = serde_json::from_str(SPEC_RESULT).unwrap();
    v["submitted_by"] = json!(7);
    assert!(!res.is_valid(&v), "submitted_by must be a string");
    // The result schema says so itself; request schemas stay strict.
    assert_eq!(load("deploy-result.v1.json")["additionalProperties"], json!(true));
    assert_eq!(load("deploy-request.v1.json")["additionalProperties"], json!(false));
}

/// A dry-run request is a request like any other, with `dry_run` a boolean.
#[test]
fn dry_run_requests_validate_and_decode() {
    let req = validator("deploy-request.v1.json");
    let mut v: Value = serde_json::from_str(SPEC_REQUEST).unwrap();
    v["dry_run"] = json!(true);
    assert_eq!(errors(&req, &v), Vec::<String>::new());
    let decoded = decode_request(&serde_json::to_vec(&v).unwrap()).expect("decodes");
    assert!(decoded.dry_run);
    v["dry_run"] = json!(false);
    assert!(!decode_request(&serde_json::to_vec(&v).unwrap()).expect("decodes").dry_run);
    v.as_object_mut().unwrap().remove("dry_run");
    assert!(!decode_request(&serde_json::to_vec(&v).unwrap()).expect("decodes").dry_run);
}

/// A group request (`group` instead of `target`) validates and decodes;
/// the schema and the decoder refuse the same variants of it: `group`
/// with `target`, an id longer than 64 or with `:`, a dry run.
#[test]
fn group_requests_validate_and_decode_and_the_same_variants_are_refused() {
    let req = validator("deploy-request.v1.json");
    let mut v: Value = serde_json::from_str(SPEC_REQUEST).unwrap();
    v.as_object_mut().unwrap().remove("target");
    v["group"] = json!("web");
    v["deployment_id"] = json!("renew-2026-11-27-web");
    assert_eq!(errors(&req, &v), Vec::<String>::new());
    let decoded = decode_request(&serde_json::to_vec(&v).unwrap()).expect("decodes");
    assert_eq!(decoded.group.as_deref(), Some("web"));
    let variants: [(&str, Value); 4] = [
        ("target too", json!({"target": "web1"})),
        ("long id", json!({"deployment_id": "a".repeat(65)})),
        ("colon in id", json!({"deployment_id": "a:b"})),
        ("dry run", json!({"dry_run": true})),
    ];
    for (what, patch) in variants {
        let mut bad = v.clone();
        for (k, val) in patch.as_object().unwrap() {
            bad[k] = val.clone();
        }
        assert!(!req.is_valid(&bad), "{what}: the schema accepts {bad}");
        let body = serde_json::to_vec(&bad).unwrap();
        let decoded = decode_request(&body);
        // A dry run decodes; the worker refuses a group dry run when it checks the request.
        if what != "dry run" {
            assert!(decoded.is_err(), "{what}: decodes");
        }
    }
}

/// The group result the core builds validates against
/// `schemas/group-result.v1.json`.
#[test]
fn group_results_validate() {
    use certdeploy_core::group::*;
    let res = validator("group-result.v1.json");
    let spec = GroupSpec {
        group_id: "g1".into(),
        group: "web".into(),
        members: vec!["a".into(), "b".into(), "c".into()],
        waves: cumulative_waves(&[WaveSize::Count(1), WaveSize::Percent(50)], 3),
        max_failed: 0,
        on_failure: OnFailure::Halt,
    };
    let at = Timestamp(1_800_000_000_000);
    let rec = |event| GroupRecord { at, event };
    let mut failed = Report::lock_failed("g1:a", "a", "h:22", "no".into(), at);
    failed.outcome = Outcome::RolledBack;
    let records = vec![
        rec(GroupEvent::Accepted { spec, request: String::new(), reply_to: None, submitted_by: Some("bot".into()) }),
        rec(GroupEvent::WaveStarted { wave: 0 }),
        rec(GroupEvent::MemberEnded { member: "a".into(), report: failed }),
    ];
    let g = Group::fold(&records).expect("folds");
    assert_eq!(g.next(), Next::End);
    let r = g.result(at, "worker-1");
    assert_eq!(r.outcome, GroupOutcome::Failed);
    let v: Value = serde_json::from_slice(&r.to_json()).unwrap();
    assert_eq!(errors(&res, &v), Vec::<String>::new());
    assert_eq!(v["children"], json!({"a": "rolled_back", "b": "failed", "c": "failed"}));
    assert_eq!(v["counts"]["halted"], json!(2));
    let mut bad = v.clone();
    bad["outcome"] = json!("rolled_back");
    assert!(!res.is_valid(&bad), "a group outcome is one of four");
    assert_eq!(load("group-result.v1.json")["additionalProperties"], json!(true));
}
