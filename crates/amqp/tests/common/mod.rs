//! Test harness: a throw-away RabbitMQ vhost per test (deleted on drop).
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::process::Command;
use std::time::Duration;

use certdeploy_amqp::BrokerConfig;

pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl").args(args).output().expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Vhost {
    pub name: String,
}

impl Vhost {
    pub fn new() -> Self {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let name = format!("certdeploy-test-{:016x}", h.finish());
        rabbitmqctl(&["add_vhost", &name]);
        let v = Vhost { name };
        rabbitmqctl(&["set_permissions", "-p", &v.name, "guest", ".*", ".*", ".*"]);
        v
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", urlencode(&self.name))
    }

    pub fn config(&self, name: &str) -> BrokerConfig {
        let mut c = BrokerConfig::new(self.url(), name);
        c.prefetch = 10;
        c.rpc_timeout = Duration::from_secs(10);
        c
    }

    pub fn close_all_connections(&self) {
        rabbitmqctl(&["close_all_connections", "-p", &self.name, "test"]);
    }

    pub fn list_queues(&self) -> String {
        rabbitmqctl(&["list_queues", "-q", "-p", &self.name, "name", "type", "arguments", "messages"])
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.name]).output();
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Bound a test body so a broken confirm/ack can never hang the suite.
pub async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f).await.expect("test step timed out")
}
