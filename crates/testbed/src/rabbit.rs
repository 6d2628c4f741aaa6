//! A throw-away RabbitMQ vhost per test, deleted on drop, so tests run in
//! parallel against the machine's broker and leave nothing behind.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::process::Command;

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

impl Default for Vhost {
    fn default() -> Self {
        Vhost::new()
    }
}

impl Vhost {
    pub fn new() -> Vhost {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let name = format!("certdeploy-test-{:016x}", h.finish());
        rabbitmqctl(&["add_vhost", &name]);
        let v = Vhost { name };
        rabbitmqctl(&["set_permissions", "-p", &v.name, "guest", ".*", ".*", ".*"]);
        v
    }

    pub fn url(&self) -> String {
        let enc: String = self
            .name
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        format!("amqp://guest:guest@127.0.0.1:5672/{enc}")
    }

    /// Close every client connection of this vhost (only).
    pub fn close_all_connections(&self) {
        rabbitmqctl(&["close_all_connections", "-p", &self.name, "test"]);
    }

    /// `name messages messages_unacknowledged` per queue.
    pub fn queue_counts(&self) -> Vec<(String, u64, u64)> {
        rabbitmqctl(&["list_queues", "-q", "-p", &self.name, "name", "messages_ready", "messages_unacknowledged"])
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let n = it.next()?.to_string();
                let m = it.next()?.parse().ok()?;
                let u = it.next()?.parse().ok()?;
                Some((n, m, u))
            })
            .collect()
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.name]).output();
    }
}
