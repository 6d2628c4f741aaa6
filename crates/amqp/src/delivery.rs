//! Messages received with manual acks, and the consumer stream that yields them.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, ShortString};
use lapin::{BasicProperties, Channel};

use crate::error::{AmqpError, bounded};
use crate::{DEFERRALS_HEADER, REASON_HEADER, SUBMITTED_BY_HEADER};

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
    pub(crate) properties: BasicProperties,
    pub(crate) acker: lapin::Acker,
    // Keeps the channel open while the delivery may still be acked.
    pub(crate) _channel: Channel,
    pub(crate) rpc_timeout: Duration,
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

pub(crate) fn amqp_int(v: &AMQPValue) -> Option<u64> {
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
    pub(crate) fn from_lapin(d: lapin::message::Delivery, channel: Channel, rpc_timeout: Duration) -> Self {
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
    pub(crate) tag: String,
    pub(crate) inner: lapin::Consumer,
    pub(crate) channel: Channel,
    pub(crate) rpc_timeout: Duration,
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
