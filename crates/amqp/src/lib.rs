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

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, Event, ExchangeKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;

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
/// Binding pattern matching every result event.
pub const RESULT_BINDING_ALL: &str = "result.#";
/// Longest reason stored in [`REASON_HEADER`] (bytes; longer reasons are truncated).
pub const MAX_REASON_BYTES: usize = 4096;

const DELIVERY_MODE_PERSISTENT: u8 = 2;
const REPLY_SUCCESS: u16 = 200;
/// Lower bound of the reconnect backoff.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Upper bound of the reconnect backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Every failure of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// Could not open the connection (TCP, TLS, auth, vhost...).
    #[error("connecting to broker {url} failed: {source}")]
    Connect {
        /// URL with the password redacted.
        url: String,
        /// Cause.
        #[source]
        source: lapin::Error,
    },
    /// An existing queue/exchange has arguments different from ours
    /// (PRECONDITION_FAILED). Needs operator action, retrying will not help.
    #[error(
        "topology mismatch declaring {what}: {source} (an existing object has different \
         arguments; delete it or align the configuration)"
    )]
    TopologyMismatch {
        /// Which object.
        what: String,
        /// Cause.
        #[source]
        source: lapin::Error,
    },
    /// An AMQP operation failed (channel/connection closed, protocol error, I/O).
    #[error("{op} failed: {source}")]
    Protocol {
        /// Operation, e.g. `basic.publish`.
        op: &'static str,
        /// Cause.
        #[source]
        source: lapin::Error,
    },
    /// An operation did not complete within [`BrokerConfig::rpc_timeout`].
    #[error("{op} timed out after {timeout:?}")]
    Timeout {
        /// Operation.
        op: &'static str,
        /// The bound that was exceeded.
        timeout: Duration,
    },
    /// The broker answered the publish with `basic.nack`: not stored.
    #[error("broker rejected (nack) publish to exchange {exchange:?} routing key {routing_key:?}")]
    Nacked {
        /// Target exchange (`""` = default exchange).
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
    /// A mandatory publish had no matching queue and was returned.
    #[error("publish to exchange {exchange:?} routing key {routing_key:?} was unroutable: {reply_code} {reply_text}")]
    Unroutable {
        /// Target exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// AMQP reply code (312 NO_ROUTE).
        reply_code: u16,
        /// AMQP reply text.
        reply_text: String,
    },
    /// The confirm channel is not in confirm mode (internal invariant broken).
    #[error("publisher confirms were not enabled on the publishing channel")]
    ConfirmsNotEnabled,
    /// The outcome cannot be used as a routing-key segment.
    #[error("invalid outcome {0:?}: must be 1-64 chars of [a-z0-9_]")]
    InvalidOutcome(String),
    /// The connection is closed or closing.
    #[error("not connected to the broker")]
    NotConnected,
    /// The shutdown future resolved while connecting.
    #[error("shutdown requested while connecting to the broker")]
    Shutdown,
}

impl AmqpError {
    /// True when retrying after a reconnect may succeed (connection loss,
    /// timeouts, nacks). False for configuration problems.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            AmqpError::Connect { source, .. } | AmqpError::Protocol { source, .. } => {
                !matches!(source.kind(), ErrorKind::AuthProviderError(_))
            }
            AmqpError::Timeout { .. } | AmqpError::Nacked { .. } | AmqpError::NotConnected => true,
            AmqpError::TopologyMismatch { .. }
            | AmqpError::Unroutable { .. }
            | AmqpError::ConfirmsNotEnabled
            | AmqpError::InvalidOutcome(_)
            | AmqpError::Shutdown => false,
        }
    }
}

fn proto(op: &'static str) -> impl FnOnce(lapin::Error) -> AmqpError {
    move |source| AmqpError::Protocol { op, source }
}

fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

async fn bounded<T>(
    op: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, AmqpError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(proto(op)),
        Err(_) => Err(AmqpError::Timeout { op, timeout }),
    }
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------

/// Reconnect delay before attempt `attempt + 1` (0-based): exponential from
/// [`BACKOFF_INITIAL`] doubling up to [`BACKOFF_MAX`], with "equal jitter"
/// (uniform in `[d/2, d]`), so the result is always within 0.25 s..30 s.
#[must_use]
pub fn backoff_delay(attempt: u32) -> Duration {
    let base = BACKOFF_INITIAL.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_MAX);
    let half = base / 2;
    let half_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut h = RandomState::new().build_hasher();
    h.write_u32(attempt);
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    half + Duration::from_millis(h.finish() % (half_ms + 1))
}

// ---------------------------------------------------------------------------
// Broker
// ---------------------------------------------------------------------------

/// One connection to RabbitMQ with the certdeploy topology declared.
pub struct Broker {
    conn: Connection,
    publish: Channel,
    topology: Topology,
    prefetch: u16,
    rpc_timeout: Duration,
    dead_tx: Arc<watch::Sender<bool>>,
    watcher: JoinHandle<()>,
    /// The user this connection authenticated as (what the broker puts
    /// in, and checks against, a published `user_id`).
    user: String,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("connected", &self.is_connected())
            .field("topology", &self.topology)
            .finish_non_exhaustive()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// Open one connection, enable confirms, declare the topology (idempotent).
///
/// Must be called inside a tokio runtime.
pub async fn connect(cfg: &BrokerConfig) -> Result<Broker, AmqpError> {
    let url = redact_url(&cfg.url);
    let props = ConnectionProperties::default().with_connection_name(LongString::from(cfg.connection_name.clone()));
    let conn = match tokio::time::timeout(cfg.rpc_timeout, Connection::connect(&cfg.url, props)).await {
        Ok(Ok(c)) => c,
        Ok(Err(source)) => return Err(AmqpError::Connect { url, source }),
        Err(_) => {
            return Err(AmqpError::Timeout { op: "connection.open", timeout: cfg.rpc_timeout });
        }
    };

    let (dead_tx, _) = watch::channel(false);
    let dead_tx = Arc::new(dead_tx);
    let mut events = conn.events_listener();
    let tx = Arc::clone(&dead_tx);
    let name = cfg.connection_name.clone();
    let watcher = tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            match ev {
                Event::Error(e) => {
                    tracing::warn!(connection = %name, error = %e, "AMQP connection error");
                    tx.send_replace(true);
                }
                Event::ConnectionBlocked(reason) => {
                    tracing::warn!(connection = %name, %reason, "AMQP connection blocked by broker");
                }
                Event::ConnectionUnblocked => {
                    tracing::info!(connection = %name, "AMQP connection unblocked");
                }
                _ => {}
            }
        }
        tx.send_replace(true);
    });

    let publish = bounded("channel.open", cfg.rpc_timeout, conn.create_channel()).await;
    let publish = match publish {
        Ok(c) => c,
        Err(e) => {
            watcher.abort();
            return Err(e);
        }
    };
    let user = url_user(&cfg.url);
    let broker = Broker {
        conn,
        publish,
        topology: cfg.topology.clone(),
        prefetch: cfg.prefetch,
        rpc_timeout: cfg.rpc_timeout,
        dead_tx,
        watcher,
        user,
    };
    bounded("confirm.select", broker.rpc_timeout, broker.publish.confirm_select(ConfirmSelectOptions::default()))
        .await?;
    broker.declare_topology().await?;
    tracing::info!(url = %url, connection = %cfg.connection_name, "connected to AMQP broker");
    Ok(broker)
}

/// [`connect`] until it succeeds, trying `url` then each of
/// `failover_urls` in turn (the nodes of one cluster), sleeping
/// [`backoff_delay`] after each round in which every node failed and
/// logging each failure with `tracing::warn`. Returns
/// [`AmqpError::Shutdown`] as soon as `shutdown` resolves. A
/// [`AmqpError::TopologyMismatch`] is returned immediately (retrying cannot fix it).
pub async fn connect_with_backoff(cfg: &BrokerConfig, shutdown: impl Future<Output = ()>) -> Result<Broker, AmqpError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let urls: Vec<&String> = std::iter::once(&cfg.url).chain(&cfg.failover_urls).collect();
    let mut attempt: u32 = 0;
    let mut round: u32 = 0;
    loop {
        let url = urls[attempt as usize % urls.len()];
        let node = BrokerConfig { url: url.clone(), ..cfg.clone() };
        let result = tokio::select! {
            r = connect(&node) => r,
            () = &mut shutdown => return Err(AmqpError::Shutdown),
        };
        match result {
            Ok(b) => {
                if attempt > 0 {
                    tracing::info!(attempts = attempt + 1, url = %redact_url(url), "reconnected to AMQP broker");
                }
                return Ok(b);
            }
            Err(e @ AmqpError::TopologyMismatch { .. }) => return Err(e),
            Err(e) => {
                attempt = attempt.saturating_add(1);
                let next = urls[attempt as usize % urls.len()];
                // Another node to try at once, unless this round is over.
                let delay = if (attempt as usize).is_multiple_of(urls.len()) {
                    round = round.saturating_add(1);
                    backoff_delay(round - 1)
                } else {
                    Duration::ZERO
                };
                tracing::warn!(
                    attempt,
                    url = %redact_url(url),
                    next = %redact_url(next),
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    error = %e,
                    "AMQP connect failed; retrying"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut shutdown => return Err(AmqpError::Shutdown),
                }
            }
        }
    }
}

fn quorum_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    t
}

impl Broker {
    /// The declared topology.
    #[must_use]
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Declare every exchange, queue and binding of the topology. Idempotent;
    /// [`connect`] calls it. Uses a throw-away channel.
    pub async fn declare_topology(&self) -> Result<(), AmqpError> {
        let t = &self.topology;
        let to = self.rpc_timeout;
        let ch = bounded("channel.open", to, self.conn.create_channel()).await?;
        let durable_ex = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        let durable_q = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        let declare = async {
            check_decl(
                format!("exchange {:?}", t.dead_exchange),
                to,
                ch.exchange_declare(
                    t.dead_exchange.as_str().into(),
                    ExchangeKind::Fanout,
                    durable_ex,
                    FieldTable::default(),
                ),
            )
            .await?;
            check_decl(
                format!("queue {:?}", t.dead_queue),
                to,
                ch.queue_declare(t.dead_queue.as_str().into(), durable_q, quorum_args()),
            )
            .await?;
            bounded(
                "queue.bind",
                to,
                ch.queue_bind(
                    t.dead_queue.as_str().into(),
                    t.dead_exchange.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
            check_decl(
                format!("exchange {:?}", t.events_exchange),
                to,
                ch.exchange_declare(
                    t.events_exchange.as_str().into(),
                    ExchangeKind::Topic,
                    durable_ex,
                    FieldTable::default(),
                ),
            )
            .await?;
            let mut args = quorum_args();
            args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(t.delivery_limit)));
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(t.dead_exchange.as_str().into()));
            check_decl(
                format!("queue {:?}", t.requests_queue),
                to,
                ch.queue_declare(t.requests_queue.as_str().into(), durable_q, args),
            )
            .await?;
            // Deferred requests wait here; expired ones go back to the
            // requests queue through the default exchange. Each message
            // expires at the head at its own TTL (every message of one
            // worker config has the same TTL). A quorum queue: a classic
            // durable queue lives on one node of a cluster, and while that
            // node is down no other node can declare it, so no worker could
            // connect anywhere.
            let mut retry = quorum_args();
            retry.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
            retry.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(t.requests_queue.as_str().into()));
            check_decl(
                format!("queue {:?}", t.retry_queue),
                to,
                ch.queue_declare(t.retry_queue.as_str().into(), durable_q, retry),
            )
            .await?;
            if !t.results_queue.is_empty() {
                // Results wait here for whoever reads them; the journal
                // keeps every result, so the bound drops the oldest.
                let mut args = quorum_args();
                let max = i64::try_from(t.results_max_length).unwrap_or(i64::MAX);
                args.insert("x-max-length".into(), AMQPValue::LongLongInt(max));
                args.insert("x-overflow".into(), AMQPValue::LongString("drop-head".into()));
                check_decl(
                    format!("queue {:?}", t.results_queue),
                    to,
                    ch.queue_declare(t.results_queue.as_str().into(), durable_q, args),
                )
                .await?;
                for pattern in [RESULT_BINDING_ALL, GROUP_BINDING_ALL] {
                    bounded(
                        "queue.bind",
                        to,
                        ch.queue_bind(
                            t.results_queue.as_str().into(),
                            t.events_exchange.as_str().into(),
                            pattern.into(),
                            QueueBindOptions::default(),
                            FieldTable::default(),
                        ),
                    )
                    .await?;
                }
            }
            Ok::<(), AmqpError>(())
        };
        let res = declare.await;
        if ch.status().connected() {
            let _ = tokio::time::timeout(to, ch.close(REPLY_SUCCESS, "OK".into())).await;
        }
        res
    }

    /// Start consuming the requests queue on a dedicated channel with manual
    /// acks and `basic.qos(prefetch)`.
    pub async fn consume(&self, consumer_tag: &str) -> Result<Consumer, AmqpError> {
        self.consume_queue(&self.topology.requests_queue, consumer_tag).await
    }

    /// Like [`Broker::consume`] for any queue (e.g. the dead-letter queue).
    pub async fn consume_queue(&self, queue: &str, consumer_tag: &str) -> Result<Consumer, AmqpError> {
        let to = self.rpc_timeout;
        let ch = bounded("channel.open", to, self.conn.create_channel()).await?;
        bounded("basic.qos", to, ch.basic_qos(self.prefetch, BasicQosOptions::default())).await?;
        let inner = bounded(
            "basic.consume",
            to,
            ch.basic_consume(queue.into(), consumer_tag.into(), BasicConsumeOptions::default(), FieldTable::default()),
        )
        .await?;
        Ok(Consumer { tag: inner.tag().to_string(), inner, channel: ch, rpc_timeout: to })
    }

    /// Messages ready in `queue` (a passive declare on a throw-away
    /// channel: it never creates the queue). For the backlog gauge.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, AmqpError> {
        let to = self.rpc_timeout;
        let ch = bounded("channel.open", to, self.conn.create_channel()).await?;
        let opts = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let q = bounded("queue.declare", to, ch.queue_declare(queue.into(), opts, FieldTable::default())).await?;
        let _ = tokio::time::timeout(to, ch.close(REPLY_SUCCESS, "OK".into())).await;
        Ok(q.message_count())
    }

    /// Fetch one message from `queue` (`basic.get`, manual ack); `None` when empty.
    pub async fn get(&self, queue: &str) -> Result<Option<Delivery>, AmqpError> {
        let to = self.rpc_timeout;
        let ch = bounded("channel.open", to, self.conn.create_channel()).await?;
        let msg = bounded("basic.get", to, ch.basic_get(queue.into(), BasicGetOptions::default())).await?;
        Ok(msg.map(|m| Delivery::from_lapin(m.delivery, ch, to)))
    }

    /// Publish a result event to the events exchange with routing key
    /// `result.<outcome>` (persistent, JSON) and wait for the broker's confirm.
    /// Safe to call concurrently (see the crate docs).
    pub async fn publish_result(&self, outcome: &str, body: &[u8]) -> Result<(), AmqpError> {
        let rk = result_routing_key(outcome)?;
        self.publish_confirmed(&self.topology.events_exchange, &rk, false, body, json_props()).await
    }

    /// Publish a result event `mandatory`, with `correlation_id`, and wait
    /// for the confirm. [`AmqpError::Unroutable`] when no queue is bound
    /// for it (the broker returned it): the caller decides what that means.
    pub async fn publish_event(&self, outcome: &str, body: &[u8], correlation_id: &str) -> Result<(), AmqpError> {
        let rk = result_routing_key(outcome)?;
        let props = json_props().with_correlation_id(correlation_id.into());
        self.publish_confirmed(&self.topology.events_exchange, &rk, true, body, props).await
    }

    /// Publish a result to a requester's `reply_to` queue through the
    /// default exchange (`mandatory`, confirmed, with `correlation_id`).
    /// [`AmqpError::Unroutable`] when that queue does not exist.
    pub async fn publish_reply(&self, reply_to: &str, body: &[u8], correlation_id: &str) -> Result<(), AmqpError> {
        let props = json_props().with_correlation_id(correlation_id.into());
        self.publish_confirmed("", reply_to, true, body, props).await
    }

    /// The user this connection authenticated as.
    #[must_use]
    pub fn user(&self) -> &str {
        &self.user
    }

    /// [`Broker::dead_letter`] with another body (e.g. one without secrets).
    pub async fn dead_letter_body(&self, delivery: &Delivery, body: &[u8], reason: &str) -> Result<bool, AmqpError> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(truncate_utf8(reason, MAX_REASON_BYTES).into()));
        let props = delivery.properties.clone().with_headers(headers).with_delivery_mode(DELIVERY_MODE_PERSISTENT);
        let rk = if delivery.routing_key.is_empty() {
            self.topology.requests_queue.clone()
        } else {
            delivery.routing_key.clone()
        };
        self.publish_confirmed(&self.topology.dead_exchange, &rk, true, body, props).await?;
        delivery.ack().await
    }

    /// Defer a request as our own copy: like [`Broker::defer`], with `body`
    /// (e.g. its key sealed), `user_id` = ours (so that the deferral count
    /// can be trusted when it comes back), the submitter kept in
    /// [`SUBMITTED_BY_HEADER`], and the broker's delivery count of the
    /// original left behind.
    pub async fn defer_copy(
        &self,
        delivery: &Delivery,
        body: &[u8],
        delay: Duration,
        deferrals: u32,
    ) -> Result<bool, AmqpError> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let mut inner = headers.inner().clone();
        inner.retain(|k, _| ![DELIVERY_COUNT_HEADER, SUBMITTED_BY_HEADER, REASON_HEADER].contains(&k.as_str()));
        headers = FieldTable::from(inner);
        headers.insert(DEFERRALS_HEADER.into(), AMQPValue::LongLongInt(i64::from(deferrals)));
        if let Some(who) = delivery.submitted_by(&self.user) {
            headers.insert(SUBMITTED_BY_HEADER.into(), AMQPValue::LongString(who.as_str().into()));
        }
        let props = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_user_id(self.user.as_str().into())
            .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
            .with_expiration(delay.as_millis().max(1).to_string().into());
        self.publish_confirmed("", &self.topology.retry_queue, true, body, props).await?;
        delivery.ack().await
    }

    /// Publish many results from one task: all are sent, then all confirms are
    /// awaited together. Returns one result per input, in order.
    pub async fn publish_results(&self, items: &[(&str, &[u8])]) -> Vec<Result<(), AmqpError>> {
        join_all(items.iter().map(|(outcome, body)| self.publish_result(outcome, body))).await
    }

    /// Publish a deploy request to the default exchange, routing key
    /// = requests queue (persistent, JSON, `mandatory`), confirmed.
    pub async fn publish_request(&self, body: &[u8]) -> Result<(), AmqpError> {
        self.publish_confirmed("", &self.topology.requests_queue, true, body, json_props()).await
    }

    /// [`Broker::publish_request`] with properties a requester may set:
    /// `reply_to`, `user_id` (the broker refuses one that is not the
    /// connection's user) and integer headers.
    pub async fn publish_request_with(&self, body: &[u8], opts: &RequestOptions) -> Result<(), AmqpError> {
        let mut props = json_props();
        if let Some(r) = &opts.reply_to {
            props = props.with_reply_to(r.as_str().into());
        }
        if let Some(u) = &opts.user_id {
            props = props.with_user_id(u.as_str().into());
        }
        if !opts.int_headers.is_empty() {
            let mut h = FieldTable::default();
            for (k, v) in &opts.int_headers {
                h.insert(k.as_str().into(), AMQPValue::LongLongInt(*v));
            }
            props = props.with_headers(h);
        }
        self.publish_confirmed("", &self.topology.requests_queue, true, body, props).await
    }

    /// "Reject without requeue, dead-lettered with the reason": publish a copy
    /// of the delivery (body and properties) to the dead-letter exchange with
    /// header [`REASON_HEADER`] = `reason` (truncated to [`MAX_REASON_BYTES`]),
    /// wait for the confirm, then ack the original. Returns the ack result:
    /// `Ok(false)` means the original's channel was lost and it will be
    /// redelivered (and dead-lettered again: duplicates possible, no loss).
    pub async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<bool, AmqpError> {
        self.dead_letter_body(delivery, &delivery.body, reason).await
    }

    /// Defer a request: publish a copy (body, properties, headers) to the
    /// retry queue with a per-message TTL of `delay` and header
    /// [`DEFERRALS_HEADER`] = `deferrals`, wait for the confirm, then ack
    /// the original. When the TTL expires the broker dead-letters the copy
    /// back to the requests queue as a new message: its delivery count
    /// starts again, so waiting never burns the delivery limit. Returns the
    /// ack result (`Ok(false)`: the original comes back too; deployments
    /// are idempotent by id).
    pub async fn defer(&self, delivery: &Delivery, delay: Duration, deferrals: u32) -> Result<bool, AmqpError> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(DEFERRALS_HEADER.into(), AMQPValue::LongLongInt(i64::from(deferrals)));
        let props = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
            .with_expiration(delay.as_millis().max(1).to_string().into());
        self.publish_confirmed("", &self.topology.retry_queue, true, &delivery.body, props).await?;
        delivery.ack().await
    }

    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), AmqpError> {
        let to = self.rpc_timeout;
        if *self.dead_tx.borrow() {
            return Err(AmqpError::NotConnected);
        }
        let confirm = bounded(
            "basic.publish",
            to,
            self.publish.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions { mandatory, ..BasicPublishOptions::default() },
                body,
                props,
            ),
        )
        .await?;
        let confirmation = bounded("publisher confirm", to, confirm).await?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => Err(AmqpError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                reply_code: returned.reply_code,
                reply_text: returned.reply_text.to_string(),
            }),
            Confirmation::Nack(None) => {
                Err(AmqpError::Nacked { exchange: exchange.to_owned(), routing_key: routing_key.to_owned() })
            }
            Confirmation::NotRequested => Err(AmqpError::ConfirmsNotEnabled),
        }
    }

    /// Follow results: a private exclusive auto-delete queue bound to the
    /// events exchange with `result.#` (auto-ack). Subscribe *before*
    /// publishing the requests whose results you wait for: events published
    /// while no queue is bound are dropped by the broker.
    pub async fn subscribe_results(&self) -> Result<ResultStream, AmqpError> {
        self.subscribe_results_matching(RESULT_BINDING_ALL).await
    }

    /// [`Broker::subscribe_results`] with a custom binding pattern
    /// (e.g. `result.deployed`).
    pub async fn subscribe_results_matching(&self, pattern: &str) -> Result<ResultStream, AmqpError> {
        let to = self.rpc_timeout;
        let ch = bounded("channel.open", to, self.conn.create_channel()).await?;
        let q = bounded(
            "queue.declare",
            to,
            ch.queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() },
                FieldTable::default(),
            ),
        )
        .await?;
        bounded(
            "queue.bind",
            to,
            ch.queue_bind(
                q.name().clone(),
                self.topology.events_exchange.as_str().into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let inner = bounded(
            "basic.consume",
            to,
            ch.basic_consume(
                q.name().clone(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(ResultStream { queue: q.name().to_string(), inner, _channel: ch })
    }

    /// True while the connection and the publishing channel are usable.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        !*self.dead_tx.borrow() && self.conn.status().connected() && self.publish.status().connected()
    }

    /// Resolves once the connection (or the publishing channel) is dead, for
    /// the reconnect loop. Resolves immediately if already dead.
    pub async fn closed(&self) {
        let mut rx = self.dead_tx.subscribe();
        while self.is_connected() {
            tokio::select! {
                _ = rx.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// Close the connection gracefully (bounded by the RPC timeout).
    /// Unacked deliveries return to their queue.
    pub async fn close(&self) {
        if self.conn.status().connected() {
            let _ = tokio::time::timeout(self.rpc_timeout, self.conn.close(REPLY_SUCCESS, "certdeploy closing".into()))
                .await;
        }
        self.dead_tx.send_replace(true);
    }
}

fn json_props() -> BasicProperties {
    BasicProperties::default().with_content_type(CONTENT_TYPE_JSON.into()).with_delivery_mode(DELIVERY_MODE_PERSISTENT)
}

/// `result.<outcome>`, validating the outcome (1-64 chars of `[a-z0-9_]`).
pub fn result_routing_key(outcome: &str) -> Result<String, AmqpError> {
    let ok = !outcome.is_empty()
        && outcome.len() <= 64
        && outcome.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(format!("{RESULT_ROUTING_PREFIX}{outcome}"))
    } else {
        Err(AmqpError::InvalidOutcome(outcome.to_owned()))
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

async fn check_decl(
    what: String,
    timeout: Duration,
    fut: impl Future<Output = Result<impl Sized, lapin::Error>>,
) -> Result<(), AmqpError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) if is_precondition_failed(&source) => Err(AmqpError::TopologyMismatch { what, source }),
        Ok(Err(source)) => Err(AmqpError::Protocol { op: "declare", source }),
        Err(_) => Err(AmqpError::Timeout { op: "declare", timeout }),
    }
}

// ---------------------------------------------------------------------------
// Deliveries and consumers
// ---------------------------------------------------------------------------

/// One message received with manual ack.
pub struct Delivery {
    /// Message body.
    pub body: Vec<u8>,
    /// Broker flag: delivered before (to this or another consumer).
    pub redelivered: bool,
    /// Channel-scoped delivery tag.
    pub delivery_tag: u64,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Exchange it was published to (`""` = default exchange).
    pub exchange: String,
    /// Quorum queues: `x-delivery-count` (previous failed deliveries), if present.
    pub delivery_count: Option<u64>,
    properties: BasicProperties,
    acker: lapin::Acker,
    // Keeps the channel open while the delivery may still be acked.
    _channel: Channel,
    rpc_timeout: Duration,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("delivery_tag", &self.delivery_tag)
            .field("redelivered", &self.redelivered)
            .field("delivery_count", &self.delivery_count)
            .field("routing_key", &self.routing_key)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

fn amqp_int(v: &AMQPValue) -> Option<u64> {
    match v {
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

impl Delivery {
    fn from_lapin(d: lapin::message::Delivery, channel: Channel, rpc_timeout: Duration) -> Self {
        let delivery_count =
            d.properties.headers().as_ref().and_then(|h| h.inner().get("x-delivery-count")).and_then(amqp_int);
        Self {
            body: d.data,
            redelivered: d.redelivered,
            delivery_tag: d.delivery_tag,
            routing_key: d.routing_key.to_string(),
            exchange: d.exchange.to_string(),
            delivery_count,
            properties: d.properties,
            acker: d.acker,
            _channel: channel,
            rpc_timeout,
        }
    }

    /// How often this request was deferred before ([`DEFERRALS_HEADER`]).
    #[must_use]
    pub fn deferrals(&self) -> u32 {
        self.properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(DEFERRALS_HEADER))
            .and_then(amqp_int)
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// A header as text (long/short string or integer), if present.
    #[must_use]
    pub fn header_str(&self, name: &str) -> Option<String> {
        let v = self.properties.headers().as_ref()?.inner().get(name)?;
        match v {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            other => amqp_int(other).map(|n| n.to_string()),
        }
    }

    /// The `user_id` property: set by the publisher, validated by the
    /// broker (it refuses a `user_id` other than the connection's user).
    #[must_use]
    pub fn user_id(&self) -> Option<&str> {
        self.properties.user_id().as_ref().map(ShortString::as_str)
    }

    /// The `correlation_id` property, if any.
    #[must_use]
    pub fn correlation_id(&self) -> Option<&str> {
        self.properties.correlation_id().as_ref().map(ShortString::as_str)
    }

    /// The `reply_to` property, if any.
    #[must_use]
    pub fn reply_to(&self) -> Option<&str> {
        self.properties.reply_to().as_ref().map(ShortString::as_str).filter(|s| !s.is_empty())
    }

    /// Whether this is a copy published by `our_user` (the worker's broker
    /// user, see [`Broker::defer_copy`]): the broker validated its
    /// `user_id`. Headers of anything else were set by some publisher and
    /// prove nothing.
    #[must_use]
    pub fn published_by(&self, our_user: &str) -> bool {
        self.user_id() == Some(our_user)
    }

    /// How often the request was deferred before: [`DEFERRALS_HEADER`] of
    /// a copy published by `our_user`, 0 for anything else.
    #[must_use]
    pub fn trusted_deferrals(&self, our_user: &str) -> u32 {
        if self.published_by(our_user) { self.deferrals() } else { 0 }
    }

    /// Who submitted the request: the broker-validated `user_id` of the
    /// original publish (carried in [`SUBMITTED_BY_HEADER`] by the
    /// worker's own deferred copies).
    #[must_use]
    pub fn submitted_by(&self, our_user: &str) -> Option<String> {
        if self.published_by(our_user)
            && let Some(original) = self.header_str(SUBMITTED_BY_HEADER)
        {
            return Some(original);
        }
        self.user_id().map(str::to_owned)
    }

    /// The message's content type, if any.
    #[must_use]
    pub fn content_type(&self) -> Option<&str> {
        self.properties.content_type().as_ref().map(ShortString::as_str)
    }

    /// The reason set by [`Broker::dead_letter`], if any.
    #[must_use]
    pub fn reason(&self) -> Option<String> {
        self.header_str(REASON_HEADER)
    }

    /// Acknowledge. `Ok(true)`: acked. `Ok(false)`: already acked/rejected, or
    /// its channel/connection was lost — the broker will redeliver it.
    pub async fn ack(&self) -> Result<bool, AmqpError> {
        bounded("basic.ack", self.rpc_timeout, self.acker.ack(BasicAckOptions::default())).await
    }

    /// Return the message to the queue (counts toward `x-delivery-limit`).
    /// Same return convention as [`Delivery::ack`].
    pub async fn reject_requeue(&self) -> Result<bool, AmqpError> {
        bounded("basic.reject", self.rpc_timeout, self.acker.reject(BasicRejectOptions { requeue: true })).await
    }

    /// True if an ack can still be sent (not used, channel not lost).
    #[must_use]
    pub fn ackable(&self) -> bool {
        self.acker.usable()
    }
}

/// A manual-ack consumer on its own channel.
///
/// Dropping it (together with every [`Delivery`] it produced) closes its
/// channel, returning all unacked messages to the queue.
pub struct Consumer {
    tag: String,
    inner: lapin::Consumer,
    channel: Channel,
    rpc_timeout: Duration,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer").field("tag", &self.tag).finish_non_exhaustive()
    }
}

impl Consumer {
    /// The consumer tag (server-generated if `""` was passed).
    #[must_use]
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Next delivery; `None` once cancelled (by us or the broker) or when the
    /// channel/connection is gone; `Some(Err)` on a channel error.
    pub async fn next(&mut self) -> Option<Result<Delivery, AmqpError>> {
        StreamExt::next(self).await
    }

    /// Stop new deliveries (`basic.cancel`). Deliveries already handed out can
    /// still be acked; the stream ends with `None`. Messages prefetched but not
    /// yet yielded stay unacked until the consumer is dropped (then requeued).
    pub async fn cancel(&self) -> Result<(), AmqpError> {
        if !self.channel.status().connected() {
            return Ok(());
        }
        bounded(
            "basic.cancel",
            self.rpc_timeout,
            self.channel.basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default()),
        )
        .await
    }
}

impl futures_core::Stream for Consumer {
    type Item = Result<Delivery, AmqpError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(AmqpError::Protocol { op: "basic.deliver", source: e }))),
            Poll::Ready(Some(Ok(d))) => {
                Poll::Ready(Some(Ok(Delivery::from_lapin(d, this.channel.clone(), this.rpc_timeout))))
            }
        }
    }
}

/// One result event received by [`ResultStream`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultEvent {
    /// Routing key, e.g. `result.deployed`.
    pub routing_key: String,
    /// The `<outcome>` part of the routing key.
    pub outcome: String,
    /// JSON body (`certdeploy.deploy-result.v1`).
    pub body: Vec<u8>,
}

/// Result events from a private auto-delete queue (see [`Broker::subscribe_results`]).
pub struct ResultStream {
    queue: String,
    inner: lapin::Consumer,
    _channel: Channel,
}

impl fmt::Debug for ResultStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResultStream").field("queue", &self.queue).finish_non_exhaustive()
    }
}

impl ResultStream {
    /// Name of the private server-named queue.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Next event; `None` when the subscription/connection ended.
    pub async fn next(&mut self) -> Option<Result<ResultEvent, AmqpError>> {
        StreamExt::next(self).await
    }
}

impl futures_core::Stream for ResultStream {
    type Item = Result<ResultEvent, AmqpError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(AmqpError::Protocol { op: "basic.deliver", source: e }))),
            Poll::Ready(Some(Ok(d))) => {
                let routing_key = d.routing_key.to_string();
                let outcome = routing_key.strip_prefix(RESULT_ROUTING_PREFIX).unwrap_or(&routing_key).to_owned();
                Poll::Ready(Some(Ok(ResultEvent { routing_key, outcome, body: d.data })))
            }
        }
    }
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

    #[test]
    fn backoff_bounds() {
        for a in 0..40 {
            let d = backoff_delay(a);
            assert!(d >= Duration::from_millis(250), "{a}: {d:?}");
            assert!(d <= BACKOFF_MAX, "{a}: {d:?}");
        }
        assert!(backoff_delay(0) <= BACKOFF_INITIAL);
        assert!(backoff_delay(20) >= BACKOFF_MAX / 2);
    }

    #[test]
    fn routing_keys() {
        assert_eq!(result_routing_key("deployed").ok().as_deref(), Some("result.deployed"));
        assert_eq!(
            result_routing_key("rolled_back_daemon_unknown").ok().as_deref(),
            Some("result.rolled_back_daemon_unknown")
        );
        assert!(result_routing_key("").is_err());
        assert!(result_routing_key("a.b").is_err());
        assert!(result_routing_key("#").is_err());
    }

    #[test]
    fn truncates_on_char_boundary() {
        let s = "é".repeat(3000);
        let t = truncate_utf8(&s, MAX_REASON_BYTES);
        assert!(t.len() <= MAX_REASON_BYTES);
        assert!(t.len() >= MAX_REASON_BYTES - 1);
    }

    fn _assert_send_sync() {
        fn f<T: Send + Sync>() {}
        f::<Broker>();
        f::<Delivery>();
        fn g<T: Send>() {}
        g::<Consumer>();
        g::<ResultStream>();
    }
}
