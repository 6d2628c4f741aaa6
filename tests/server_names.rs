//! `[targets.NAME] server_names`: a certificate that does not cover every
//! name a target serves is `rejected` naming `certificate_pem` before any
//! host is contacted; one that covers them deploys. A real worker over
//! RabbitMQ and a real sshd.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use certdeploy_core::Outcome;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_not_covering_a_targets_server_names_is_rejected_before_any_connection() {
    let fleet = Fleet::new(1, true);
    let t0 = &fleet.targets[0];
    // A second target whose "host" is a listener of this test's: any
    // connection attempt (SSH or otherwise) would be accepted and seen.
    let trap = TcpListener::bind("127.0.0.1:0").expect("listener");
    trap.set_nonblocking(true).expect("nonblocking");
    let trap_port = trap.local_addr().expect("addr").port();
    let cfg = fleet.write_config(&Opts::default());
    let mut text = std::fs::read_to_string(&cfg).expect("config");
    text = text.replace(
        &format!("[targets.{}]\n", t0.name),
        &format!("[targets.{}]\nserver_names = [\"www.example.test\", \"*.api.example.test\"]\n", t0.name),
    );
    text.push_str(&format!(
        "\n[targets.trap]\nhost = \"127.0.0.1\"\nport = {trap_port}\nuser = \"nobody\"\n\
         cert_path = \"/srv/trap/site.pem\"\nkey_path = \"/srv/trap/site.key\"\nreload_command = \"true\"\n\
         server_names = [\"shop.example.test\"]\n"
    ));
    std::fs::write(&cfg, text).expect("config");

    let ca = certdeploy_testbed::certs::TestCa::new();
    let both = ca.leaf_for_names(&["www.example.test", "*.api.example.test"]);
    let www_only = ca.leaf_for_names(&["www.example.test"]);
    let mut w = Proc::worker(&fleet, &cfg, &[], "worker");
    let mut client = Client::connect(&fleet).await;
    let cases = [
        ("names-trap", "trap", &both),
        ("names-partial", t0.name.as_str(), &www_only),
        ("names-ok", t0.name.as_str(), &both),
    ];
    for (id, target, b) in cases {
        client.publish(&certdeploy_testbed::certs::request(id, target, b, true)).await;
    }
    let ids: Vec<String> = cases.iter().map(|c| c.0.to_string()).collect();
    let seen = client.collect(Duration::from_secs(90), all_ids(&ids)).await;
    let first =
        |id: &str| seen.get(id).and_then(|v| v.first()).cloned().unwrap_or_else(|| panic!("no result for {id}"));

    let trap_result = first("names-trap");
    assert_eq!(trap_result.outcome, Outcome::Rejected, "{trap_result:?}");
    assert!(
        trap_result.message.starts_with("request rejected: certificate_pem: ")
            && trap_result.message.contains("shop.example.test"),
        "the rejection names the field and the name not covered: {}",
        trap_result.message
    );
    let partial = first("names-partial");
    assert_eq!(partial.outcome, Outcome::Rejected, "{partial:?}");
    assert!(
        partial.message.starts_with("request rejected: certificate_pem: ")
            && partial.message.contains("*.api.example.test")
            && !partial.message.contains("(www.example.test"),
        "only the name not covered is named: {}",
        partial.message
    );
    let ok = first("names-ok");
    assert_eq!(ok.outcome, Outcome::Deployed, "{ok:?}");
    assert_eq!(fleet.files(t0).0.as_deref(), Some(both.cert_pem.as_bytes()), "the covering certificate is in place");
    assert_eq!(fleet.reloads(t0), 1, "only the covering certificate reached the host");
    match trap.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a rejected request connected to its host: {other:?}"),
    }
    w.signal("TERM");
    assert!(w.wait_timeout(Duration::from_secs(30)).is_some(), "the worker stops on SIGTERM");
}
