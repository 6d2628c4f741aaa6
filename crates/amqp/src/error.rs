//! Every failure of this crate, and the bounds put on each broker operation.

use std::future::Future;
use std::time::Duration;

use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};

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

pub(crate) fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

pub(crate) async fn bounded<T>(
    op: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, AmqpError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(proto(op)),
        Err(_) => Err(AmqpError::Timeout { op, timeout }),
    }
}
