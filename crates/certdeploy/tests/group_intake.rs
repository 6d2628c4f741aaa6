//! A group request at the trust boundary: checked whole (every member's
//! request as its child's) before any host is contacted, each refusal
//! naming the field; the request the worker keeps holds its key sealed to
//! the worker, never in clear.

use certdeploy::config::Config;
use certdeploy::intake::validate_group_body;
use certdeploy_testbed::WEB1_CONFIG;
use certdeploy_testbed::certs::{Bundle, TestCa, request};
use serde_json::Value;

/// `web1`, `web2` (serving www.example.com), a group `web` of both, and
/// an identity when `identity` is set.
fn config(dir: &std::path::Path, identity: bool) -> Config {
    let mut extra = String::new();
    if identity {
        let ident = dir.join("worker.agekey");
        certdeploy::sealed::keygen(&ident).expect("keygen");
        extra = format!("key_identities = [\"{}\"]\n", ident.display());
    }
    let text = WEB1_CONFIG.replace("[worker]\n", &format!("[worker]\n{extra}"))
        + "[targets.web2]\nhost = \"web2.internal\"\nuser = \"deploy\"\ncert_path = \"/etc/ssl/site.pem\"\n\
           key_path = \"/etc/ssl/site.key\"\nreload_command = \"systemctl reload nginx\"\n\
           server_names = [\"www.example.com\"]\n\
           [groups.web]\ntargets = [\"web1\", \"web2\"]\nwaves = [1]\n";
    let mut cfg = Config::parse(&text, "groups.toml", &[]).unwrap_or_else(|e| panic!("{e}"));
    cfg.load_keys().expect("keys");
    cfg
}

fn group_body(id: &str, group: &str, b: &Bundle) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&request(id, "x", b, true)).expect("json");
    let o = v.as_object_mut().expect("object");
    o.remove("target");
    o.insert("group".into(), group.into());
    serde_json::to_vec(&v).expect("json")
}

#[test]
fn a_group_request_is_checked_whole_and_kept_sealed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), true);
    let now = certdeploy::clock::now();
    let b = TestCa::new().leaf_for_names(&["www.example.com"]);
    let g = validate_group_body(&group_body("g1", "web", &b), &cfg, now).unwrap_or_else(|r| panic!("{}", r.error));
    assert_eq!(g.spec.members, vec!["web1".to_string(), "web2".to_string()]);
    assert_eq!(g.spec.waves, vec![1, 2]);
    let ids: Vec<&str> = g.members.iter().map(|m| m.deployment_id.as_str()).collect();
    assert_eq!(ids, vec!["g1:web1", "g1:web2"]);
    let key_line = b.key_pem.lines().find(|l| !l.starts_with("-----")).expect("key body");
    assert!(!g.kept.contains(key_line) && !g.kept.contains("private_key_pem"), "kept in clear: {}", g.kept);
    assert!(g.kept.contains("private_key_age"), "{}", g.kept);
    // The kept request checks again (after a restart) to the same members.
    let again = certdeploy::intake::group_members(&g.kept, &g.spec, &cfg, now);
    assert!(again.iter().all(Result::is_ok), "{:?}", again.iter().filter_map(|r| r.as_ref().err()).collect::<Vec<_>>());

    // Refusals, each naming the field.
    let refused = |body: &[u8], cfg: &Config| validate_group_body(body, cfg, now).err().expect("refused").error;
    let e = refused(&group_body("g2", "nope", &b), &cfg);
    assert_eq!(e.field, "group", "{e}");
    let wrong = TestCa::new().leaf_for_names(&["other.example.com"]);
    let e = refused(&group_body("g3", "web", &wrong), &cfg);
    assert!(e.field == "certificate_pem" && e.problem.starts_with("member web2:"), "{e}");
    let e = refused(&group_body("g:4", "web", &b), &cfg);
    assert_eq!(e.field, "deployment_id", "{e}");
    let no_identity = config(dir.path(), false);
    let e = refused(&group_body("g5", "web", &b), &no_identity);
    assert!(e.field == "group" && e.problem.contains("key_identities"), "{e}");
}
