//! Stable-toolchain stand-in for `cargo fuzz`: replays every file of the
//! checked-in corpus (`fuzz/corpus/<target>/`) and >= 10,000
//! proptest-generated inputs through the fuzz entry points
//! (`fuzz/src/lib.rs`, included below), asserting no panic and a typed
//! error for every invalid input.
//!
//! Corpus files named `ok-*` must be accepted, `err-*` refused; any other
//! name (e.g. what `cargo fuzz` adds) must merely not panic. Regenerate the
//! named files with `cargo test --test fuzz_replay -- --ignored regenerate`.

#[path = "../../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod entry;

use std::path::{Path, PathBuf};

use certdeploy_core::testkit::{Rig, Sim, test_plan};
use certdeploy_testbed::certs::{Bundle, TestCa, request};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestRunner};
use serde_json::{Value, json};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read corpus file")))
        .collect();
    files.sort();
    files
}

fn replay<T, E: std::fmt::Debug>(target: &str, f: impl Fn(&[u8]) -> Result<T, E>) -> usize {
    let files = corpus(target);
    assert!(files.len() >= 8, "{target}: only {} corpus files", files.len());
    assert!(files.iter().any(|(n, _)| n.starts_with("ok-")), "{target}: no valid example");
    let mut wrong = Vec::new();
    for (name, data) in &files {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(data)));
        match r {
            Err(_) => wrong.push(format!("{name}: panicked")),
            Ok(Ok(_)) if name.starts_with("err-") => wrong.push(format!("{name}: accepted")),
            Ok(Err(e)) if name.starts_with("ok-") => wrong.push(format!("{name}: refused: {e:?}")),
            Ok(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{target}:\n{}", wrong.join("\n"));
    files.len()
}

#[test]
fn corpus_request() {
    replay("request", entry::request);
}

#[test]
fn corpus_journal_record() {
    replay("journal_record", entry::journal_record);
}

#[test]
fn corpus_config() {
    replay("config", entry::config);
}

// ---------------------------------------------------------------------------
// Generated inputs (2,500 + 3,000 + 2,500 + 2,500 = 10,500).

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(PtConfig { cases, failure_persistence: None, ..PtConfig::default() })
}

fn valid_bundle() -> Bundle {
    use std::sync::OnceLock;
    static B: OnceLock<Bundle> = OnceLock::new();
    B.get_or_init(|| {
        let ca = TestCa::new();
        let now = entry::NOW_S as i64;
        ca.leaf_at("www.example.com", now - 86_400, now + 365 * 86_400)
    })
    .clone()
}

#[test]
fn generated_bytes_as_requests() {
    runner(2_500)
        .run(&proptest::collection::vec(any::<u8>(), 0..600), |data| {
            let r = entry::request(&data);
            prop_assert!(r.is_err(), "random bytes accepted");
            Ok(())
        })
        .unwrap();
}

/// Interesting strings: shell and path metacharacters, PEM fragments,
/// control characters, long runs.
fn nasty_string() -> impl Strategy<Value = String> {
    let b = valid_bundle();
    prop_oneof![
        "[A-Za-z0-9._:-]{0,10}",
        "[ -~]{0,40}",
        "\\PC{0,20}",
        Just("web1".to_string()),
        Just("certdeploy.deploy-request.v1".to_string()),
        Just("/etc/ssl/../shadow".to_string()),
        Just("/etc/ssl/site.pem\n".to_string()),
        Just("systemctl reload nginx; reboot".to_string()),
        Just("systemctl reload nginx".to_string()),
        Just("$(id)`id`".to_string()),
        Just("-oProxyCommand=x".to_string()),
        Just("web9.internal".to_string()),
        Just("0644".to_string()),
        Just("0666".to_string()),
        Just(b.cert_pem.clone()),
        Just(b.key_pem.clone()),
        Just(b.chain_pem.clone()),
        Just(b.cert_pem[..b.cert_pem.len() / 2].to_string()),
        (0usize..300).prop_map(|n| "a".repeat(n)),
    ]
}

fn json_value(depth: u32) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..70_000).prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        nasty_string().prop_map(Value::from),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    prop_oneof![
        6 => leaf,
        1 => proptest::collection::vec(json_value(depth - 1), 0..3).prop_map(Value::from),
        1 => proptest::collection::btree_map("[a-z_]{1,8}", json_value(depth - 1), 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
    ]
    .boxed()
}

const TOP: [&str; 8] = [
    "schema",
    "deployment_id",
    "target",
    "target_spec",
    "certificate_pem",
    "private_key_pem",
    "chain_pem",
    "requested_at",
];
const SPEC: [&str; 12] = [
    "host",
    "port",
    "user",
    "cert_path",
    "key_path",
    "chain_path",
    "cert_mode",
    "key_mode",
    "validate_command",
    "reload_command",
    "verify_endpoint",
    "verify_sni",
];

/// A mostly-valid request with a few fields dropped, replaced or added.
fn structured_request() -> impl Strategy<Value = Value> {
    let mutations =
        proptest::collection::vec((0usize..TOP.len() + SPEC.len() + 2, 0u8..3, json_value(2), "[a-z_]{1,10}"), 0..4);
    (any::<bool>(), mutations).prop_map(|(inline, muts)| {
        let b = valid_bundle();
        let mut v: Value = serde_json::from_slice(&request("gen-1", "web1", &b, true)).unwrap();
        if inline {
            v.as_object_mut().unwrap().remove("target");
            v["target_spec"] = json!({
                "host": "web9.internal", "user": "deploy", "cert_path": "/etc/ssl/a.pem",
                "key_path": "/etc/ssl/a.key", "reload_command": "systemctl reload nginx"
            });
        }
        for (i, op, value, name) in muts {
            let (obj, key) = if i < TOP.len() {
                (v.as_object_mut().unwrap(), TOP[i].to_string())
            } else if i < TOP.len() + SPEC.len() {
                match v.get_mut("target_spec").and_then(Value::as_object_mut) {
                    Some(o) => (o, SPEC[i - TOP.len()].to_string()),
                    None => continue,
                }
            } else {
                (v.as_object_mut().unwrap(), name)
            };
            match op {
                0 => {
                    obj.remove(&key);
                }
                _ => {
                    obj.insert(key, value);
                }
            }
        }
        v
    })
}

#[test]
fn generated_structured_requests() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/deploy-request.v1.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let schema = jsonschema::draft202012::new(&schema).unwrap();
    let counts = std::cell::Cell::new((0u32, 0u32));
    runner(3_000)
        .run(&structured_request(), |v| {
            let body = serde_json::to_vec(&v).unwrap();
            let r = entry::request(&body);
            let (ok, err) = counts.get();
            counts.set(if r.is_ok() { (ok + 1, err) } else { (ok, err + 1) });
            // What the schema accepts, the decoder accepts (the schema is
            // the published contract for producers).
            // Known gap: JSON Schema cannot tell 22.0 from 22, serde's u16 can.
            let float_port = v.pointer("/target_spec/port").is_some_and(Value::is_f64);
            if schema.is_valid(&v) && !float_port {
                let d = certdeploy_core::wire::decode_request(&body);
                prop_assert!(d.is_ok(), "schema-valid body refused by decode_request: {:?}", d.err());
            }
            Ok(())
        })
        .unwrap();
    let (accepted, refused) = counts.get();
    assert!(accepted > 50 && refused > 50, "generator covers both sides: {accepted} accepted, {refused} refused");
}

/// TOML assembled from plausible and hostile fragments.
fn config_text() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        Just("\"web1.internal\"".to_string()),
        Just("\"/etc/ssl/site.pem\"".to_string()),
        Just("\"../etc\"".to_string()),
        Just("\"-oProxyCommand=x\"".to_string()),
        Just("\"0600\"".to_string()),
        Just("\"600\"".to_string()),
        Just("\"accept-new\"".to_string()),
        Just("\"a\\nb\"".to_string()),
        Just("\"\\u0000\"".to_string()),
        Just("true".to_string()),
        Just("[\"*.internal\"]".to_string()),
        Just("0".to_string()),
        Just("65536".to_string()),
        Just("-1".to_string()),
        Just("99999999999999999999".to_string()),
        Just("\"amqps://u:p@h/v\"".to_string()),
        Just("\"127.0.0.1:9464\"".to_string()),
        "[0-9]{1,6}",
        "\"[ -~]{0,12}\"",
    ];
    let key = prop_oneof![
        Just("host"),
        Just("port"),
        Just("user"),
        Just("cert_path"),
        Just("key_path"),
        Just("chain_path"),
        Just("cert_mode"),
        Just("key_mode"),
        Just("reload_command"),
        Just("validate_command"),
        Just("verify_endpoint"),
        Just("host_key_policy"),
        Just("exec_timeout_s"),
        Just("amqp_url"),
        Just("concurrency"),
        Just("per_host_concurrency"),
        Just("metrics_listen"),
        Just("allow_inline_targets"),
        Just("journal_durability"),
        Just("deadline_s"),
        Just("bogus"),
    ];
    let header = prop_oneof![
        Just("[worker]".to_string()),
        Just("[ssh]".to_string()),
        Just("[targets.web1]".to_string()),
        Just("[targets.\"we b\"]".to_string()),
        Just("[targets.t2]".to_string()),
        Just("[[targets]]".to_string()),
        Just("#ENV CERTDEPLOY_CONCURRENCY=0".to_string()),
        Just("#ENV CERTDEPLOY_ALLOW_INLINE_TARGETS=maybe".to_string()),
        "[ -~]{0,20}",
    ];
    let line = prop_oneof![3 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")), 1 => header];
    (any::<bool>(), proptest::collection::vec(line, 0..14)).prop_map(|(base, lines)| {
        let mut s = if base {
            "[targets.web1]\nhost = \"h\"\nuser = \"u\"\ncert_path = \"/a\"\nkey_path = \"/b\"\nreload_command = \"r\"\n"
                .to_string()
        } else {
            String::new()
        };
        s.push_str(&lines.join("\n"));
        s
    })
}

#[test]
fn generated_configs() {
    runner(2_000)
        .run(&config_text(), |text| {
            let _ = entry::config(text.as_bytes());
            Ok(())
        })
        .unwrap();
    runner(500)
        .run(&proptest::collection::vec(any::<u8>(), 0..300), |data| {
            let _ = entry::config(&data);
            Ok(())
        })
        .unwrap();
}

/// Journal values of a real deployment (deploy, then a rolled-back one).
fn real_records() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (id, fail) in [("j-1", false), ("j-2", true)] {
        let sim = Sim::new();
        if fail {
            sim.exit_codes("systemctl reload nginx", &[1]);
        }
        let rig = Rig::new(sim.clone());
        let (plan, payload) = test_plan(id, b"CERT a nb=1\n", b"KEY", Some(b"CHAIN\n"), true, true);
        let _ = rig.deploy(plan, &payload);
        let w = sim.world();
        let mut lines = Vec::new();
        for (_, rec, _) in w.records.iter() {
            let mut v = vec![certdeploy_journal::FORMAT_VERSION];
            v.extend(serde_json::to_vec(rec).unwrap());
            lines.push(v);
        }
        out.push(lines.join(&b'\n'));
    }
    out
}

#[test]
fn generated_journal_values() {
    let seeds = real_records();
    for s in &seeds {
        assert!(entry::journal_record(s).is_ok(), "real records replay");
    }
    let mutated =
        (0..seeds.len(), proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6))
            .prop_map(move |(i, edits)| {
                let mut d = seeds[i].clone();
                for (at, byte, op) in edits {
                    if d.is_empty() {
                        break;
                    }
                    let at = at.index(d.len());
                    match op {
                        0 => d[at] = byte,
                        1 => d.truncate(at),
                        2 => d.insert(at, byte),
                        _ => {
                            d.remove(at);
                        }
                    }
                }
                d
            });
    runner(2_000)
        .run(&mutated, |data| {
            let _ = entry::journal_record(&data);
            Ok(())
        })
        .unwrap();
    runner(500)
        .run(&proptest::collection::vec(any::<u8>(), 0..200), |data| {
            let r = entry::journal_record(&data);
            prop_assert!(r.is_err() || data.first() == Some(&1));
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------
// Corpus (re)generation.

#[test]
#[ignore = "writes fuzz/corpus; run by hand after changing the formats"]
fn regenerate() {
    let b = valid_bundle();
    let ca = TestCa::new();
    let now = entry::NOW_S as i64;
    let other = ca.leaf_at("other.example", now - 86_400, now + 86_400 * 30);
    let expired = ca.leaf_at("www.example.com", now - 86_400 * 90, now - 86_400);
    let v: Value = serde_json::from_slice(&request("corpus-1", "web1", &b, true)).unwrap();
    let with = |k: &str, x: Value| {
        let mut v = v.clone();
        v[k] = x;
        serde_json::to_vec(&v).unwrap()
    };
    let mut inline = v.clone();
    inline.as_object_mut().unwrap().remove("target");
    inline["target_spec"] = json!({
        "host": "web9.internal", "port": 22, "user": "deploy", "cert_path": "/etc/ssl/a.pem",
        "key_path": "/etc/ssl/a.key", "reload_command": "systemctl reload nginx", "validate_command": "nginx -t"
    });
    let inline_with = |k: &str, x: Value| {
        let mut v = inline.clone();
        v["target_spec"][k] = x;
        serde_json::to_vec(&v).unwrap()
    };
    let text = serde_json::to_string(&v).unwrap();
    let req: Vec<(&str, Vec<u8>)> = vec![
        ("ok-configured.json", serde_json::to_vec(&v).unwrap()),
        ("ok-no-chain.json", request("corpus-2", "web1", &b, false)),
        ("ok-inline.json", serde_json::to_vec(&inline).unwrap()),
        ("err-wrong-key.json", request("c-3", "web1", &b.with_key_of(&other), true)),
        ("err-expired.json", request("c-4", "web1", &expired, false)),
        ("err-reversed-chain.json", with("chain_pem", json!(b.reversed_chain()))),
        ("err-truncated-cert.json", with("certificate_pem", json!(b.cert_pem[..200].to_string()))),
        ("err-trailing-garbage.json", with("certificate_pem", json!(format!("{}x\n", b.cert_pem)))),
        ("err-unknown-target.json", with("target", json!("db7"))),
        ("err-schema-v2.json", with("schema", json!("certdeploy.deploy-request.v2"))),
        ("err-long-id.json", with("deployment_id", json!("a".repeat(129)))),
        ("err-id-chars.json", with("deployment_id", json!("a/../b"))),
        ("err-both-targets.json", with("target_spec", inline["target_spec"].clone())),
        (
            "err-dup-key.json",
            text.replacen("\"target\":\"web1\"", "\"target\":\"web1\",\"target\":\"x\"", 1).into_bytes(),
        ),
        ("err-deep.json", format!("{}{}", "[".repeat(4000), "]".repeat(4000)).into_bytes()),
        ("err-empty-field-name.json", br#"{"":0}"#.to_vec()),
        ("err-array.json", b"[\"certdeploy.deploy-request.v1\",\"a\",\"web1\"]".to_vec()),
        ("err-not-utf8.json", vec![b'{', 0xff, 0xfe, b'}']),
        ("err-empty.json", Vec::new()),
        ("err-wrong-type.json", with("deployment_id", json!(12))),
        ("err-inline-command.json", inline_with("reload_command", json!("systemctl reload nginx; reboot"))),
        ("err-inline-path.json", inline_with("cert_path", json!("/etc/ssl/../passwd"))),
        ("err-inline-nul.json", inline_with("key_path", json!("/etc/ssl/a\u{0}.key"))),
        ("err-inline-host.json", inline_with("host", json!("db.prod.example.com"))),
        ("err-inline-key-mode.json", inline_with("key_mode", json!("0644"))),
        ("err-inline-port.json", inline_with("port", json!(70000))),
    ];
    write_corpus("request", &req);

    let mut journal: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, r) in real_records().into_iter().enumerate() {
        let lines: Vec<&[u8]> = r.split(|c| *c == b'\n').collect();
        journal.push((format!("ok-deployment-{i}.bin"), r.clone()));
        journal.push((format!("ok-started-{i}.bin"), lines[0].to_vec()));
        journal.push((format!("ok-prefix-{i}.bin"), lines[..lines.len() / 2].join(&b'\n')));
        let mut v2 = lines[0].to_vec();
        v2[0] = 2;
        journal.push((format!("err-version-2-{i}.bin"), v2));
        journal.push((format!("err-truncated-{i}.bin"), lines[0][..lines[0].len() / 2].to_vec()));
        journal.push((format!("err-not-started-{i}.bin"), lines[1].to_vec()));
    }
    journal.push(("err-empty.bin".into(), Vec::new()));
    journal.push(("err-version-0.bin".into(), b"\x00{}".to_vec()));
    journal.push(("err-json-array.bin".into(), b"\x01[]".to_vec()));
    journal.push(("err-unknown-event.bin".into(), b"\x01{\"at\":1,\"event\":{\"Exploded\":{}}}".to_vec()));
    let journal: Vec<(&str, Vec<u8>)> = journal.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    write_corpus("journal_record", &journal);

    let spec_example = r#"[worker]
amqp_url = "amqp://guest:guest@127.0.0.1:5672/%2f"
journal_path = "/var/lib/certdeploy/journal"
concurrency = 64
per_host_concurrency = 4
metrics_listen = "127.0.0.1:9464"
allow_inline_targets = false
inline_host_allowlist = []
inline_command_allowlist = []

[ssh]
known_hosts = "/etc/certdeploy/known_hosts"
identity_file = "/etc/certdeploy/id_ed25519"
connect_timeout_s = 10

[targets.web1]
host = "web1.internal"
port = 22
user = "deploy"
cert_path = "/etc/ssl/certs/site.pem"
key_path = "/etc/ssl/private/site.key"
chain_path = "/etc/ssl/certs/chain.pem"
cert_mode = "0644"
key_mode = "0600"
validate_command = "nginx -t"
reload_command = "systemctl reload nginx"
verify_endpoint = "web1.internal:443"
verify_sni = "www.example.com"
"#;
    let target = "[targets.web1]\nhost = \"web1.internal\"\nuser = \"deploy\"\ncert_path = \"/etc/ssl/site.pem\"\n\
                  key_path = \"/etc/ssl/site.key\"\nreload_command = \"systemctl reload nginx\"\n";
    let cfg: Vec<(&str, Vec<u8>)> = vec![
        ("ok-spec-example.toml", spec_example.into()),
        ("ok-minimal.toml", target.into()),
        ("ok-empty.toml", Vec::new()),
        ("ok-env.toml", format!("#ENV CERTDEPLOY_CONCURRENCY=8\n{target}").into_bytes()),
        (
            "ok-inline.toml",
            format!("[worker]\nallow_inline_targets = true\ninline_host_allowlist = [\"*.internal\"]\n{target}")
                .into_bytes(),
        ),
        ("err-relative-path.toml", target.replace("/etc/ssl/site.key", "site.key").into_bytes()),
        ("err-dotdot.toml", target.replace("/etc/ssl/site.key", "/etc/../site.key").into_bytes()),
        ("err-host-option.toml", target.replace("web1.internal", "-oProxyCommand=x").into_bytes()),
        ("err-mode.toml", format!("{target}key_mode = \"600\"\n").into_bytes()),
        ("err-unknown-key.toml", "[worker]\nbogus = 1\n".into()),
        ("err-concurrency.toml", "[worker]\nconcurrency = 0\n".into()),
        ("err-env.toml", format!("#ENV CERTDEPLOY_CONCURRENCY=many\n{target}").into_bytes()),
        ("err-newline-command.toml", target.replace("systemctl reload nginx", "a\\nb").into_bytes()),
        ("err-syntax.toml", "[targets.web1\nhost = ".into()),
        ("err-not-utf8.toml", vec![b'[', 0xff, b']']),
        ("err-amqp-url.toml", "[worker]\namqp_url = \"http://x\"\n".into()),
        ("err-host-key-policy.toml", format!("{target}host_key_policy = \"yolo\"\n").into_bytes()),
        ("err-port-range.toml", format!("{target}port = 70000\n").into_bytes()),
    ];
    write_corpus("config", &cfg);
}

fn write_corpus(target: &str, files: &[(&str, Vec<u8>)]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in files {
        std::fs::write(dir.join(name), data).unwrap();
    }
}
