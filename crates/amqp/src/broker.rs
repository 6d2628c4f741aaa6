//! The connection with its confirm channel: topology, publishing, dead-lettering, consuming.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{RequestOptions, Topology};
use crate::delivery::{Consumer, Delivery};
use crate::error::{AmqpError, bounded, is_precondition_failed};
use crate::results::ResultStream;
use crate::{
    CONTENT_TYPE_JSON, DEFERRALS_HEADER, DELIVERY_COUNT_HEADER, DELIVERY_MODE_PERSISTENT, GROUP_BINDING_ALL,
    MAX_REASON_BYTES, REASON_HEADER, REPLY_SUCCESS, RESULT_BINDING_ALL, RESULT_ROUTING_PREFIX, SUBMITTED_BY_HEADER,
};

/// One connection to RabbitMQ with the certdeploy topology declared.
pub struct Broker {
    pub(crate) conn: Connection,
    pub(crate) publish: Channel,
    pub(crate) topology: Topology,
    pub(crate) prefetch: u16,
    pub(crate) rpc_timeout: Duration,
    pub(crate) dead_tx: Arc<watch::Sender<bool>>,
    pub(crate) watcher: JoinHandle<()>,
    /// The user this connection authenticated as (what the broker puts
    /// in, and checks against, a published `user_id`).
    pub(crate) user: String,
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

pub(crate) fn quorum_args() -> FieldTable {
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

    /// Publish a target group's result (`group.<outcome>`, `mandatory`,
    /// confirmed, with `correlation_id`), like [`Broker::publish_event`].
    pub async fn publish_group_event(&self, outcome: &str, body: &[u8], correlation_id: &str) -> Result<(), AmqpError> {
        let rk = result_routing_key(outcome)?.replacen(RESULT_ROUTING_PREFIX, crate::GROUP_ROUTING_PREFIX, 1);
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

pub(crate) fn json_props() -> BasicProperties {
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

pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(crate) async fn check_decl(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
