//! What the worker declares and how it connects: topology names, request options, broker settings.

use std::fmt;
use std::time::Duration;

/// Names and limits of the RabbitMQ objects the worker declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Durable quorum queue of deploy requests.
    pub requests_queue: String,
    /// Fanout exchange receiving dead letters.
    pub dead_exchange: String,
    /// Durable quorum queue bound to `dead_exchange`.
    pub dead_queue: String,
    /// Durable topic exchange for result events.
    pub events_exchange: String,
    /// `x-delivery-limit` of the requests queue.
    pub delivery_limit: u32,
    /// Durable quorum queue of deferred requests: each message carries its
    /// own TTL and dead-letters back to `requests_queue` when it expires.
    pub retry_queue: String,
    /// Durable quorum queue bound to `events_exchange` with `result.#` and
    /// `group.#`, keeping results while no consumer listens (`""`: none).
    pub results_queue: String,
    /// `x-max-length` of `results_queue` (overflow drops the oldest).
    pub results_max_length: u64,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            requests_queue: "certdeploy.requests".into(),
            dead_exchange: "certdeploy.dead".into(),
            dead_queue: "certdeploy.dead".into(),
            events_exchange: "certdeploy.events".into(),
            delivery_limit: 20,
            retry_queue: "certdeploy.retry".into(),
            results_queue: "certdeploy.results".into(),
            results_max_length: 1_000_000,
        }
    }
}

/// Properties of a request published with [`Broker::publish_request_with`].
#[derive(Clone, Debug, Default)]
pub struct RequestOptions {
    /// Queue the result should also go to (through the default exchange).
    pub reply_to: Option<String>,
    /// `user_id` property (must be the connection's user).
    pub user_id: Option<String>,
    /// Integer headers.
    pub int_headers: Vec<(String, i64)>,
}

/// How to reach the broker.
#[derive(Clone)]
pub struct BrokerConfig {
    /// `amqp://` or `amqps://` URL (vhost URL-encoded; `?heartbeat=N` accepted).
    pub url: String,
    /// Other nodes of the same cluster, tried in order after `url` when a
    /// connection attempt fails ([`connect_with_backoff`]).
    pub failover_urls: Vec<String>,
    /// Shown in the management UI / `rabbitmqctl list_connections client_properties`.
    pub connection_name: String,
    /// Objects to declare.
    pub topology: Topology,
    /// `basic.qos` prefetch of [`Broker::consume`] (the worker sets it to its concurrency).
    pub prefetch: u16,
    /// Bound on every connect/declare/publish/confirm/ack/cancel.
    pub rpc_timeout: Duration,
}

impl BrokerConfig {
    /// Config with default topology, prefetch 64 and a 30 s RPC timeout.
    pub fn new(url: impl Into<String>, connection_name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            failover_urls: Vec::new(),
            connection_name: connection_name.into(),
            topology: Topology::default(),
            prefetch: 64,
            rpc_timeout: Duration::from_secs(30),
        }
    }
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("url", &redact_url(&self.url))
            .field("failover_urls", &self.failover_urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>())
            .field("connection_name", &self.connection_name)
            .field("topology", &self.topology)
            .field("prefetch", &self.prefetch)
            .field("rpc_timeout", &self.rpc_timeout)
            .finish()
    }
}

/// The URL with any password replaced by `***` (safe to log).
#[must_use]
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// The user name an `amqp://` URL authenticates as (`guest` when it names
/// none, as the client library does).
#[must_use]
pub fn url_user(url: &str) -> String {
    url.parse::<lapin::uri::AMQPUri>().map(|u| u.authority.userinfo.username).unwrap_or_else(|_| "guest".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password() {
        assert_eq!(redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact_url("amqp://host/%2f"), "amqp://host/%2f");
        assert_eq!(redact_url("amqps://u:p@a@h:1/v?heartbeat=5"), "amqps://u:***@h:1/v?heartbeat=5");
    }
}
