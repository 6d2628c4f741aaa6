//! A stream of result events, for `submit --wait` and tests.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::StreamExt;
use lapin::Channel;

use crate::RESULT_ROUTING_PREFIX;
use crate::error::AmqpError;

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
    pub(crate) queue: String,
    pub(crate) inner: lapin::Consumer,
    pub(crate) _channel: Channel,
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
