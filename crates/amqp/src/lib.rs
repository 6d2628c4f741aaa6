#![forbid(unsafe_code)]
//! RabbitMQ building blocks for the certdeploy worker: topology, consuming, result publishing.
//!
//! # Model
//!
//! A [`Broker`] owns exactly one AMQP connection and, on it:
//!
//! * one **confirm channel** (publisher confirms enabled) shared by every
//!   publish ([`Broker::publish_result`], [`Broker::publish_request`],
//!   [`Broker::dead_letter`]);
//! * one channel **per consumer** ([`Broker::consume`], [`Broker::subscribe_results`]),
//!   so `basic.qos` prefetch applies to that consumer only and a consumer-side
//!   channel error never breaks publishing;
//! * a short-lived channel for topology declarations (a failed declaration
//!   closes the channel it was made on, so it must not be the confirm channel).
//!
//! # Concurrency model for publishing
//!
//! `Broker` is `Send + Sync`; share it with `Arc<Broker>`. Every publish method
//! takes `&self` and may be called from any number of tasks at once. Each call
//! sends its message on the single confirm channel and then waits for *its own*
//! confirm (lapin matches broker acks to publishes by delivery tag, including
//! the broker's `multiple=true` acks). So N concurrent `publish_result` calls
//! put N messages in flight and the broker confirms them in batches — there is
//! no per-message round trip serialisation. [`Broker::publish_results`] does the
//! same for a slice from a single task (publish all, then await all confirms).
//! Each publish and each confirm wait is bounded by [`BrokerConfig::rpc_timeout`];
//! a timeout, nack, or connection loss is an error for that message only, and
//! the caller must treat the message as *not* published (it may still have
//! reached the broker: publishing is at-least-once, consumers dedupe on
//! `deployment_id`).
//!
//! # Acknowledgements
//!
//! Deliveries are consumed with manual acks. [`Delivery::ack`] returns
//! `Ok(false)` when the channel/connection it came from is gone: the broker
//! will redeliver the message (with `redelivered = true`), so the worker must
//! be idempotent on `deployment_id`. A [`Delivery`] keeps its
//! channel alive; the channel closes (and all its unacked messages return to
//! the queue) when the [`Consumer`] **and** every `Delivery` from it are dropped.
//!
//! # Reject with reason
//!
//! AMQP 0-9-1 `basic.reject(requeue=false)` dead-letters a message but cannot
//! attach a reason. [`Broker::dead_letter`] therefore realises "reject without
//! requeue, dead-lettered with the reason" as: publish a copy of the message
//! (same body and properties) to the dead-letter exchange with header
//! `x-certdeploy-reason`, wait for the publisher confirm, then ack the original.
//! If the process dies between the two steps the message is redelivered and
//! dead-lettered again (a duplicate in `certdeploy.dead`, never a loss).
//! Messages exceeding `x-delivery-limit` are dead-lettered by the broker itself
//! into the same queue (with the standard `x-death`/`x-first-death-reason`
//! headers, reason `delivery_limit`).

use std::time::Duration;

/// Header carrying the reason on messages published by [`Broker::dead_letter`].
pub const REASON_HEADER: &str = "x-certdeploy-reason";
/// Header counting how often [`Broker::defer`] sent a request to wait.
pub const DEFERRALS_HEADER: &str = "x-certdeploy-deferrals";
/// Header of a deferred copy naming who submitted the original request
/// (its broker-validated `user_id`): the copy itself carries the worker's
/// `user_id`, which is what makes its [`DEFERRALS_HEADER`] trustworthy.
pub const SUBMITTED_BY_HEADER: &str = "x-certdeploy-submitted-by";
/// Quorum queues count failed deliveries in this header.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// Binding pattern matching every group result event.
pub const GROUP_BINDING_ALL: &str = "group.#";
/// Content type of requests and results.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Routing-key prefix of result events (`result.<outcome>`).
pub const RESULT_ROUTING_PREFIX: &str = "result.";
/// Routing key prefix of group result events (`group.<outcome>`).
pub const GROUP_ROUTING_PREFIX: &str = "group.";
/// Binding pattern matching every result event.
pub const RESULT_BINDING_ALL: &str = "result.#";
/// Longest reason stored in [`REASON_HEADER`] (bytes; longer reasons are truncated).
pub const MAX_REASON_BYTES: usize = 4096;

pub(crate) const DELIVERY_MODE_PERSISTENT: u8 = 2;
pub(crate) const REPLY_SUCCESS: u16 = 200;
/// Lower bound of the reconnect backoff.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Upper bound of the reconnect backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

mod broker;
mod config;
mod connect;
mod delivery;
mod error;
mod results;

pub use broker::{Broker, result_routing_key};
pub use config::{BrokerConfig, RequestOptions, Topology, redact_url, url_user};
pub use connect::{backoff_delay, connect, connect_with_backoff};
pub use delivery::{Consumer, Delivery};
pub use error::AmqpError;
pub use results::{ResultEvent, ResultStream};

#[cfg(test)]
mod tests {
    use super::*;

    fn _assert_send_sync() {
        fn f<T: Send + Sync>() {}
        f::<Broker>();
        f::<Delivery>();
        fn g<T: Send>() {}
        g::<Consumer>();
        g::<ResultStream>();
    }
}
