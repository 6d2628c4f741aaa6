//! `failover_urls`: the nodes of one cluster are tried in turn, so a dead
//! first node does not keep the client from a live one.

mod common;

use certdeploy_amqp::connect_with_backoff;
use common::{Vhost, VhostExt, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_skipped_for_the_next_one() {
    let vh = Vhost::new();
    let mut cfg = vh.config("failover");
    let live = std::mem::replace(&mut cfg.url, "amqp://guest:guest@127.0.0.1:1/%2f".into());
    cfg.failover_urls = vec!["amqp://guest:guest@127.0.0.1:2/%2f".into(), live];
    let b = within(30, connect_with_backoff(&cfg, std::future::pending())).await.expect("the third node answers");
    assert!(b.is_connected());
    b.publish_request(b"{}").await.expect("a usable connection");
    b.close().await;
    // With every node dead it keeps trying until told to stop.
    cfg.failover_urls = vec!["amqp://guest:guest@127.0.0.1:2/%2f".into()];
    let r = within(30, connect_with_backoff(&cfg, tokio::time::sleep(std::time::Duration::from_secs(2)))).await;
    assert!(matches!(r, Err(certdeploy_amqp::AmqpError::Shutdown)), "{r:?}");
}
