//! Test harness: a throw-away RabbitMQ vhost per test (the shared testbed
//! fixture, deleted on drop), plus broker configs for it.
#![allow(dead_code)]

use std::time::Duration;

use certdeploy_amqp::BrokerConfig;
pub use certdeploy_testbed::rabbit::{Vhost, rabbitmqctl};

/// Broker settings for a test vhost.
pub trait VhostExt {
    fn config(&self, name: &str) -> BrokerConfig;
    fn list_queues(&self) -> String;
}

impl VhostExt for Vhost {
    fn config(&self, name: &str) -> BrokerConfig {
        let mut c = BrokerConfig::new(self.url(), name);
        c.prefetch = 10;
        c.rpc_timeout = Duration::from_secs(10);
        c
    }

    fn list_queues(&self) -> String {
        rabbitmqctl(&["list_queues", "-q", "-p", &self.name, "name", "type", "arguments", "messages"])
    }
}

/// Bound a test body so a broken confirm/ack can never hang the suite.
pub async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f).await.expect("test step timed out")
}
