//! Integration tests against the real RabbitMQ at 127.0.0.1:5672 (guest/guest).
//! Each test runs in its own vhost, deleted at the end (Drop guard).

mod common;

use std::sync::Arc;
use std::time::Duration;

use certdeploy_amqp::{AmqpError, REASON_HEADER, Topology, connect, connect_with_backoff};
use common::{Vhost, VhostExt, within};
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_is_idempotent_and_quorum() {
    let vh = Vhost::new();
    within(60, async {
        let cfg = vh.config("topo-a");
        let a = connect(&cfg).await.expect("connect a");
        a.declare_topology().await.expect("declare twice");
        let b = connect(&vh.config("topo-b")).await.expect("connect b");
        b.declare_topology().await.expect("declare from b");
        assert!(a.is_connected() && b.is_connected());

        let queues = vh.list_queues();
        println!("list_queues:\n{queues}");
        let req = queues.lines().find(|l| l.starts_with("certdeploy.requests\t")).expect("requests queue listed");
        assert!(req.contains("\tquorum\t"), "{req}");
        assert!(req.contains("x-delivery-limit"), "{req}");
        assert!(req.contains("20"), "{req}");
        assert!(req.contains("x-dead-letter-exchange"), "{req}");
        assert!(req.contains("certdeploy.dead"), "{req}");
        let dead = queues.lines().find(|l| l.starts_with("certdeploy.dead\t")).expect("dead queue listed");
        assert!(dead.contains("\tquorum\t"), "{dead}");
        // Deferred requests: a durable quorum queue (a classic queue lives on
        // one node of a cluster and cannot be declared while that node is
        // down) whose messages dead-letter back to the requests queue
        // through the default exchange.
        let durable =
            common::rabbitmqctl(&["list_queues", "-q", "-p", &vh.name, "name", "type", "durable", "arguments"]);
        let retry = durable.lines().find(|l| l.starts_with("certdeploy.retry\t")).expect("retry queue listed");
        assert!(retry.contains("\tquorum\ttrue\t"), "{retry}");
        // The default exchange's name is empty (rabbitmqctl prints it `[]`).
        assert!(
            retry.contains("{\"x-dead-letter-exchange\",[]}") || retry.contains("{\"x-dead-letter-exchange\",\"\"}"),
            "{retry}"
        );
        assert!(retry.contains("{\"x-dead-letter-routing-key\",\"certdeploy.requests\"}"), "{retry}");
        for q in ["certdeploy.requests", "certdeploy.dead"] {
            let line = durable.lines().find(|l| l.starts_with(&format!("{q}\t"))).expect("queue listed");
            assert!(line.contains("\ttrue\t"), "{q} is not durable: {line}");
        }

        let ex = common::rabbitmqctl(&["list_exchanges", "-q", "-p", &vh.name, "name", "type", "durable"]);
        println!("list_exchanges:\n{ex}");
        assert!(ex.lines().any(|l| l == "certdeploy.events\ttopic\ttrue"), "{ex}");
        assert!(ex.lines().any(|l| l == "certdeploy.dead\tfanout\ttrue"), "{ex}");
        let bindings = common::rabbitmqctl(&["list_bindings", "-q", "-p", &vh.name]);
        assert!(
            bindings.lines().any(|l| l.starts_with("certdeploy.dead\texchange\tcertdeploy.dead\tqueue")),
            "{bindings}"
        );

        // A conflicting declaration is a typed, non-transient error.
        let mut bad = vh.config("topo-bad");
        bad.topology = Topology { delivery_limit: 7, ..Topology::default() };
        match connect(&bad).await {
            Err(e @ AmqpError::TopologyMismatch { .. }) => {
                assert!(!e.is_transient());
                println!("mismatch: {e}");
            }
            Err(e) => panic!("expected TopologyMismatch, got {e}"),
            Ok(_) => panic!("a conflicting x-delivery-limit was accepted on redeclare"),
        }
        a.close().await;
        b.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_roundtrip_ack() {
    let vh = Vhost::new();
    within(60, async {
        let broker = connect(&vh.config("roundtrip")).await.expect("connect");
        let body = br#"{"schema":"certdeploy.deploy-request.v1","deployment_id":"d1"}"#;
        broker.publish_request(body).await.expect("publish");
        let mut consumer = broker.consume("worker-1").await.expect("consume");
        assert_eq!(consumer.tag(), "worker-1");
        let d = consumer.next().await.expect("stream open").expect("delivery");
        assert_eq!(d.body, body);
        assert!(!d.redelivered);
        assert_eq!(d.content_type(), Some("application/json"));
        assert_eq!(d.routing_key, "certdeploy.requests");
        assert!(d.ackable());
        assert!(d.ack().await.expect("ack"));
        assert!(!d.ackable());
        // Second ack is a no-op returning false.
        assert!(!d.ack().await.expect("double ack"));
        consumer.cancel().await.expect("cancel");
        assert!(consumer.next().await.is_none(), "stream ends after cancel");
        drop(consumer);
        drop(d);
        assert!(broker.get("certdeploy.requests").await.expect("get").is_none());
        broker.close().await;
        assert!(!broker.is_connected());
        within(5, broker.closed()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_routed_and_confirmed_concurrently() {
    let vh = Vhost::new();
    within(90, async {
        let broker = Arc::new(connect(&vh.config("results")).await.expect("connect"));
        let mut only_deployed = broker.subscribe_results_matching("result.deployed").await.expect("subscribe deployed");
        let mut all = broker.subscribe_results().await.expect("subscribe");

        broker.publish_result("deployed", b"{\"n\":0}").await.expect("publish");
        broker.publish_result("rolled_back", b"{\"n\":1}").await.expect("publish");
        let e = all.next().await.expect("open").expect("event");
        assert_eq!((e.routing_key.as_str(), e.outcome.as_str()), ("result.deployed", "deployed"));
        assert_eq!(e.body, b"{\"n\":0}");
        let e = all.next().await.expect("open").expect("event");
        assert_eq!(e.outcome, "rolled_back");
        let e = only_deployed.next().await.expect("open").expect("event");
        assert_eq!(e.outcome, "deployed");

        assert!(matches!(broker.publish_result("bad.outcome", b"{}").await, Err(AmqpError::InvalidOutcome(_))));

        // Batch from one task: all in flight, then all confirms.
        let bodies: Vec<Vec<u8>> = (0..500).map(|i| format!("{{\"b\":{i}}}").into_bytes()).collect();
        let items: Vec<(&str, &[u8])> = bodies.iter().map(|b| ("failed", b.as_slice())).collect();
        let t = std::time::Instant::now();
        let res = broker.publish_results(&items).await;
        println!("500 batched confirmed publishes: {:?}", t.elapsed());
        assert!(res.iter().all(Result::is_ok));

        // Many tasks sharing one Broker / confirm channel.
        let t = std::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let b = Arc::clone(&broker);
            tasks.push(tokio::spawn(async move {
                b.publish_result("unchanged", format!("{{\"t\":{i}}}").as_bytes()).await
            }));
        }
        for t in tasks {
            t.await.expect("join").expect("publish");
        }
        println!("200 concurrent confirmed publishes: {:?}", t.elapsed());

        let mut n = 0;
        while n < 700 {
            let e = all.next().await.expect("open").expect("event");
            assert!(e.outcome == "failed" || e.outcome == "unchanged");
            n += 1;
        }
        broker.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_publish_is_an_error_not_a_hang() {
    let vh = Vhost::new();
    within(60, async {
        let broker = connect(&vh.config("nack")).await.expect("connect");
        // A queue that refuses every message: the broker nacks the publish.
        let conn =
            lapin::Connection::connect(&vh.url(), lapin::ConnectionProperties::default()).await.expect("raw connect");
        let ch = conn.create_channel().await.expect("channel");
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
        args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        ch.queue_declare("full".into(), QueueDeclareOptions::default(), args).await.expect("declare full");
        ch.queue_bind(
            "full".into(),
            "certdeploy.events".into(),
            "result.failed".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        let err = broker.publish_result("failed", b"{}").await.expect_err("nack");
        println!("nack error: {err}");
        assert!(matches!(err, AmqpError::Nacked { .. }), "{err:?}");
        // The confirm channel is still usable afterwards.
        broker.publish_result("deployed", b"{}").await.expect("publish after nack");
        // Unroutable mandatory publish of a request (queue deleted) is reported.
        ch.queue_delete("certdeploy.requests".into(), Default::default()).await.expect("delete requests");
        let err = broker.publish_request(b"{}").await.expect_err("unroutable");
        assert!(matches!(err, AmqpError::Unroutable { reply_code: 312, .. }), "{err:?}");
        broker.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_carries_reason() {
    let vh = Vhost::new();
    within(60, async {
        let broker = connect(&vh.config("dead")).await.expect("connect");
        broker.publish_request(b"not json").await.expect("publish");
        let mut consumer = broker.consume("").await.expect("consume");
        assert!(consumer.tag().starts_with("amq.ctag"), "{}", consumer.tag());
        let d = consumer.next().await.expect("open").expect("delivery");
        let reason = "rejected: body is not valid JSON (expected value at line 1 column 1)";
        assert!(broker.dead_letter(&d, reason).await.expect("dead_letter"));
        let dl = broker.get("certdeploy.dead").await.expect("get").expect("dead-lettered message present");
        assert_eq!(dl.body, b"not json");
        assert_eq!(dl.reason().as_deref(), Some(reason));
        assert_eq!(dl.header_str(REASON_HEADER).as_deref(), Some(reason));
        assert_eq!(dl.content_type(), Some("application/json"));
        assert!(dl.ack().await.expect("ack dead"));
        drop(consumer);
        drop(d);
        assert!(broker.get("certdeploy.requests").await.expect("get").is_none());
        broker.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_delivery_is_redelivered_after_consumer_drop() {
    let vh = Vhost::new();
    within(60, async {
        let broker = connect(&vh.config("redeliver")).await.expect("connect");
        broker.publish_request(b"{\"id\":1}").await.expect("publish");
        {
            let mut c = broker.consume("c1").await.expect("consume");
            let d = c.next().await.expect("open").expect("delivery");
            assert!(!d.redelivered);
            assert_eq!(d.delivery_count, None);
            // Neither acked nor rejected: dropped with the consumer.
        }
        let mut c = broker.consume("c2").await.expect("consume 2");
        let d = c.next().await.expect("open").expect("delivery");
        println!("redelivered={} delivery_count={:?}", d.redelivered, d.delivery_count);
        assert!(d.redelivered);
        assert_eq!(d.body, b"{\"id\":1}");
        // reject_requeue → delivered again, counted.
        assert!(d.reject_requeue().await.expect("reject"));
        let d2 = c.next().await.expect("open").expect("delivery");
        println!("after reject: redelivered={} delivery_count={:?}", d2.redelivered, d2.delivery_count);
        assert!(d2.redelivered);
        assert!(d2.ack().await.expect("ack"));
        broker.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_loss_is_detected_and_reconnect_works() {
    let vh = Vhost::new();
    within(90, async {
        let cfg = vh.config("loss");
        let broker = connect(&cfg).await.expect("connect");
        broker.publish_request(b"{\"id\":\"x\"}").await.expect("publish");
        let mut c = broker.consume("loss").await.expect("consume");
        let d = c.next().await.expect("open").expect("delivery");

        vh.close_all_connections();
        within(15, broker.closed()).await;
        assert!(!broker.is_connected());
        let ack = d.ack().await;
        println!("ack after connection loss: {ack:?}");
        assert!(matches!(ack, Ok(false)), "{ack:?}");
        let publish = within(15, broker.publish_result("deployed", b"{}")).await;
        println!("publish after connection loss: {publish:?}");
        assert!(publish.is_err());
        // The consumer stream ends (or errors) instead of hanging.
        let next = within(15, c.next()).await;
        println!("consumer.next after loss: {:?}", next.as_ref().map(|r| r.as_ref().map(|d| d.delivery_tag)));
        drop(c);

        let shutdown = std::future::pending::<()>();
        let again = within(30, connect_with_backoff(&cfg, shutdown)).await.expect("reconnect");
        assert!(again.is_connected());
        let mut c = again.consume("loss-2").await.expect("consume");
        let d = c.next().await.expect("open").expect("delivery");
        assert!(d.redelivered);
        assert_eq!(d.body, b"{\"id\":\"x\"}");
        assert!(d.ack().await.expect("ack"));
        again.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_backoff_retries_until_shutdown() {
    let vh = Vhost::new();
    within(30, async {
        // Nothing listens on port 1: every attempt fails fast.
        let mut cfg = vh.config("backoff");
        cfg.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
        let started = std::time::Instant::now();
        let r = connect_with_backoff(&cfg, tokio::time::sleep(Duration::from_secs(2))).await;
        assert!(matches!(r, Err(AmqpError::Shutdown)), "{r:?}");
        let el = started.elapsed();
        assert!(el >= Duration::from_secs(2) && el < Duration::from_secs(4), "{el:?}");

        // Vhost created while retrying: the loop picks it up.
        let late = format!("{}-late", vh.name);
        let mut cfg = vh.config("backoff-late");
        cfg.url = format!("amqp://guest:guest@127.0.0.1:5672/{late}");
        let creator = {
            let late = late.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tokio::task::spawn_blocking(move || {
                    common::rabbitmqctl(&["add_vhost", &late]);
                    common::rabbitmqctl(&["set_permissions", "-p", &late, "guest", ".*", ".*", ".*"]);
                })
                .await
            })
        };
        let guard = common::Vhost { name: late };
        let b = connect_with_backoff(&cfg, std::future::pending()).await;
        creator.await.expect("join").expect("create vhost");
        let b = b.expect("connected after vhost appeared");
        assert!(b.is_connected());
        b.close().await;
        drop(guard);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_limit_dead_letters_into_dead_queue() {
    let vh = Vhost::new();
    within(60, async {
        let mut cfg = vh.config("limit");
        cfg.topology.delivery_limit = 1;
        let broker = connect(&cfg).await.expect("connect");
        broker.publish_request(b"{\"poison\":true}").await.expect("publish");
        let mut c = broker.consume("limit").await.expect("consume");
        for _ in 0..2 {
            let d = c.next().await.expect("open").expect("delivery");
            assert!(d.reject_requeue().await.expect("reject"));
        }
        let mut found = None;
        for _ in 0..50 {
            if let Some(d) = broker.get("certdeploy.dead").await.expect("get") {
                found = Some(d);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let d = found.expect("message dead-lettered by the broker after the delivery limit");
        println!(
            "x-first-death-reason={:?} x-first-death-queue={:?}",
            d.header_str("x-first-death-reason"),
            d.header_str("x-first-death-queue")
        );
        assert_eq!(d.body, b"{\"poison\":true}");
        assert_eq!(d.header_str("x-first-death-reason").as_deref(), Some("delivery_limit"));
        assert!(d.ack().await.expect("ack"));
        broker.close().await;
    })
    .await;
}
