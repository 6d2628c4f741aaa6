//! Extra files of a configured target (bundle, PKCS#12 keystore) against the
//! simulated host: planned, written, rolled back with the others, and a
//! keystore that holds the same as the one to write counts as identical
//! although its bytes differ (random salts).

mod common;

use certdeploy_core::testkit::*;
use certdeploy_core::*;
use common::*;

const BUNDLE: &str = "/etc/haproxy/site.pem";
const P12: &str = "/etc/java/site.p12";

const NEW_KEY: &[u8] = b"-----BEGIN PRIVATE KEY-----\nSECRET-KEY-MARKER-7f3a\n-----END PRIVATE KEY-----\n";
const NEW_CHAIN: &[u8] = b"NEW CHAIN\n";

/// A stand-in keystore: `KS|<password>|<salt>|<content>`. Opening it with
/// the right password tells the digest of the content, whatever the salt.
fn fake_keystore(password: &str, salt: &str, content: &str) -> Vec<u8> {
    format!("KS|{password}|{salt}|{content}").into_bytes()
}

fn open_fake(bytes: &[u8], password: &Secret) -> Option<Digest> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(4, '|');
    let (Some("KS"), Some(p), Some(_salt), Some(content)) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    (p.as_bytes() == password.expose()).then(|| Digest::of(content.as_bytes()))
}

fn target() -> TargetSpec {
    TargetSpec {
        host: "web1.internal".into(),
        port: 22,
        user: "deploy".into(),
        cert_path: CERT.into(),
        key_path: KEY.into(),
        chain_path: None,
        cert_mode: "0644".into(),
        key_mode: "0600".into(),
        validate_command: None,
        reload_command: RELOAD.into(),
        verify_endpoint: None,
        verify_sni: None,
    }
}

/// A plan with a bundle and a keystore built with `salt` (new bytes each
/// build) holding `content` under `password`.
fn plan(id: &str, password: &str, salt: &str, content: &str) -> (Plan, Payload) {
    let material = Material {
        certificate_pem: String::from_utf8_lossy(NEW_CERT).into_owned(),
        private_key_pem: Secret::new(NEW_KEY.to_vec()),
        chain_pem: Some(String::from_utf8_lossy(NEW_CHAIN).into_owned()),
    };
    let facts = fake_cert_facts(NEW_CERT)
        .map(|f| MaterialFacts { leaf_sha256: Some(f.leaf_sha256), not_before: Some(f.not_before) })
        .unwrap_or_default();
    let bytes = fake_keystore(password, salt, content);
    let password = Secret::new(password.as_bytes().to_vec());
    let holds = open_fake(&bytes, &password).unwrap();
    let formats = Formats {
        bundle: Some(ExtraFile { path: BUNDLE.into(), mode: "0640".into() }),
        pkcs12: Some((
            ExtraFile { path: P12.into(), mode: "0600".into() },
            Keystore { bytes: Secret::new(bytes), holds, password, open: open_fake },
        )),
    };
    build_plan_with(id, "web1", &target(), &material, &facts, Policy::default(), 1, &formats).unwrap()
}

fn finished(t: Terminal) -> Report {
    match t {
        Terminal::Finished(r) => r,
        Terminal::Abandoned(why) => panic!("abandoned: {why}"),
    }
}

fn meta(r: &Report, k: &str) -> String {
    r.metadata().get(k).cloned().unwrap_or_else(|| "<absent>".into())
}

#[test]
fn the_bundle_is_certificate_chain_and_key_in_that_order() {
    let (p, payload) = plan("d-1", "pw", "s1", "c");
    let bundle = payload.get(Role::Bundle).unwrap();
    let want = [NEW_CERT, NEW_CHAIN, NEW_KEY].concat();
    assert_eq!(bundle, &want[..]);
    let f = p.file(Role::Bundle).unwrap();
    assert_eq!((f.path.as_str(), f.mode, f.sha256), (BUNDLE, 0o640, Digest::of(&want)));
    // The chain also stays in the certificate file (no chain_path).
    assert_eq!(payload.get(Role::Cert).unwrap(), &[NEW_CERT, NEW_CHAIN].concat()[..]);
    assert_eq!(p.roles().collect::<Vec<_>>(), [Role::Cert, Role::Key, Role::Bundle, Role::Pkcs12]);
    // The journaled plan has digests, never the bytes or the password.
    let json = serde_json::to_string(&p).unwrap();
    assert!(!json.contains("SECRET-KEY-MARKER") && !json.contains("KS|pw"), "{json}");
    assert!(json.contains(&format!("\"holds\":\"{}\"", Digest::of(b"c").to_hex())), "{json}");
}

#[test]
fn extra_files_are_written_and_rolled_back_with_the_others() {
    let rig = rig();
    rig.sim.put(CERT, b"CERT old nb=100\n", 0o644);
    rig.sim.put(KEY, b"OLD KEY\n", 0o600);
    rig.sim.put(BUNDLE, b"OLD BUNDLE\n", 0o600);
    rig.sim.put(P12, b"OLD P12", 0o640);
    // The first reload succeeds, the second fails.
    rig.sim.exit_codes(RELOAD, &[0, 1]);
    let (p, payload) = plan("d-ok", "pw", "s1", "c");
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::Deployed, "{}", r.message);
    assert_eq!(rig.sim.get(BUNDLE).unwrap().1, 0o640);
    assert_eq!(rig.sim.get(P12), Some((fake_keystore("pw", "s1", "c"), 0o600)));
    assert_eq!(
        (meta(&r, "backup_status_bundle"), meta(&r, "backup_status_pkcs12")),
        ("snapshotted".into(), "snapshotted".into())
    );

    // A failed reload puts every file back, the extra ones too.
    let (p, payload) = plan("d-fail", "pw", "s2", "c2");
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::RolledBack, "{}", r.message);
    assert_eq!(meta(&r, "backup_status_pkcs12"), "restored");
    assert_eq!(meta(&r, "backup_status_bundle"), "restored");
    assert_eq!(rig.sim.get(P12), Some((fake_keystore("pw", "s1", "c"), 0o600)));
    assert_eq!(rig.sim.get(BUNDLE).unwrap().0, [NEW_CERT, NEW_CHAIN, NEW_KEY].concat());
}

#[test]
fn a_keystore_holding_the_same_is_unchanged_and_anything_else_is_written() {
    let rig = rig();
    let (p, payload) = plan("d-1", "pw", "s1", "c");
    assert_eq!(finished(rig.deploy(p, &payload).unwrap()).outcome, Outcome::Deployed);
    // The same request again: a new build (other salt), same content.
    let (p, payload) = plan("d-2", "pw", "s2", "c");
    let r = finished(rig.deploy(p, &payload).unwrap());
    assert_eq!(r.outcome, Outcome::Unchanged, "{}", r.message);
    assert_eq!(rig.sim.get(P12).unwrap().0, fake_keystore("pw", "s1", "c"), "the keystore in place is kept");
    // Another password: the keystore in place does not open with it.
    let (p, payload) = plan("d-3", "pw2", "s3", "c");
    assert_eq!(finished(rig.deploy(p, &payload).unwrap()).outcome, Outcome::Deployed);
    assert_eq!(rig.sim.get(P12).unwrap().0, fake_keystore("pw2", "s3", "c"));
    // Other content (another alias, say) under the same password.
    let (p, payload) = plan("d-4", "pw2", "s4", "other");
    assert_eq!(finished(rig.deploy(p, &payload).unwrap()).outcome, Outcome::Deployed);
    // The mode counts, as for every file.
    let (bytes, _) = rig.sim.get(P12).unwrap();
    rig.sim.put(P12, &bytes, 0o644);
    let (p, payload) = plan("d-5", "pw2", "s5", "other");
    assert_eq!(finished(rig.deploy(p, &payload).unwrap()).outcome, Outcome::Deployed);
    assert_eq!(rig.sim.get(P12).unwrap().1, 0o600);
    let (p, payload) = plan("d-6", "pw2", "s6", "other");
    assert_eq!(finished(rig.deploy(p, &payload).unwrap()).outcome, Outcome::Unchanged);
}

#[test]
fn results_without_extra_files_read_as_before() {
    let rig = rig();
    let (p, payload) = test_plan("d-plain", NEW_CERT, NEW_KEY, None, false, false);
    let r = finished(rig.deploy(p, &payload).unwrap());
    let m = r.metadata();
    assert!(m.keys().all(|k| !k.ends_with("_bundle") && !k.ends_with("_pkcs12")), "{m:?}");
    assert_eq!(m["backup_status_chain"], "n/a");
}
