//! The bus contract (see `src/bus/mod.rs`), as one suite every bus
//! implementation runs. Deliveries are observed through a recording sink;
//! "not delivered" is shown by a sentinel published after it on a
//! subscribed topic (the contract keeps per-publisher order).
//!
//! Each check publishes on one bus and subscribes on another: for the
//! in-process bus they are the same instance, for Redis two nodes on one
//! server, so the messages really cross Redis.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::{GateProxy, RedisServer, numsub};
use tokio::sync::mpsc;
use wshub::bus::{Bus, Deliver, Envelope, LocalBus, RedisBus};
use wshub::config::Config;
use wshub::message::Frame;
use wshub::metrics::Metrics;
use wshub::route::{Route, Topic};

/// The unsubscribe delay the suite configures on every bus.
pub const RELEASE_DELAY: Duration = Duration::from_millis(100);
const PATIENCE: Duration = Duration::from_secs(10);

/// A sink that records every copy it is handed.
pub struct Recorder(mpsc::UnboundedSender<(Topic, String)>);

impl Deliver for Recorder {
    fn deliver(&self, via: &Topic, envelope: &Arc<Envelope>) {
        let _ = self.0.send((via.clone(), envelope.frame.to_string()));
    }
}

pub struct Harness {
    /// Where the checks publish.
    pub publisher: Arc<dyn Bus>,
    /// Where the checks subscribe; its sink records.
    pub bus: Arc<dyn Bus>,
    received: mpsc::UnboundedReceiver<(Topic, String)>,
    sentinels: usize,
}

/// Makes the two buses of a harness from the subscriber's sink.
pub type Pair = (Arc<dyn Bus>, Arc<dyn Bus>);

fn group(name: &str) -> Topic {
    Topic::Group(Some(name.into()))
}

fn user(name: &str) -> Topic {
    Topic::User(name.into())
}

fn envelope(topics: Vec<Topic>, text: &str) -> Arc<Envelope> {
    Arc::new(Envelope {
        route: Route::from_parts(topics, Vec::new()),
        frame: Frame::from(text.to_owned()),
    })
}

impl Harness {
    /// Builds a harness around the (publisher, subscriber) buses `make`
    /// returns for the subscriber's sink.
    pub async fn new<F, Fut>(make: F) -> Self
    where
        F: FnOnce(Arc<dyn Deliver>) -> Fut,
        Fut: std::future::Future<Output = Pair>,
    {
        let (tx, received) = mpsc::unbounded_channel();
        let (publisher, bus) = make(Arc::new(Recorder(tx))).await;
        Self {
            publisher,
            bus,
            received,
            sentinels: 0,
        }
    }

    async fn subscribe(&self, topic: &Topic) {
        self.bus.subscribe(topic).await.expect("subscribe");
    }

    fn publish(&self, topics: Vec<Topic>, text: &str) {
        self.publisher
            .publish(envelope(topics, text))
            .expect("publish");
    }

    async fn next(&mut self) -> (Topic, String) {
        tokio::time::timeout(PATIENCE, self.received.recv())
            .await
            .expect("timed out waiting for a delivery")
            .expect("sink dropped")
    }

    /// Everything delivered before a sentinel published now on `on`
    /// (which must be subscribed).
    async fn drain_until_sentinel(&mut self, on: &Topic) -> Vec<(Topic, String)> {
        self.sentinels += 1;
        let tag = format!("sentinel-{}", self.sentinels);
        self.publish(vec![on.clone()], &tag);
        let mut seen = Vec::new();
        loop {
            let got = self.next().await;
            if got.1 == tag {
                return seen;
            }
            seen.push(got);
        }
    }
}

/// Runs the whole contract against a fresh bus from `make`.
pub async fn conformance<F, Fut>(make: F)
where
    F: Fn(Arc<dyn Deliver>) -> Fut,
    Fut: std::future::Future<Output = Pair>,
{
    delivers_subscribed_topics_with_their_topic(Harness::new(&make).await).await;
    skips_topics_nobody_subscribed(Harness::new(&make).await).await;
    one_copy_per_subscribed_topic_of_a_route(Harness::new(&make).await).await;
    subscriptions_are_reference_counted_and_released_late(Harness::new(&make).await).await;
    keeps_publish_order(Harness::new(&make).await).await;
    is_healthy(Harness::new(&make).await).await;
}

async fn delivers_subscribed_topics_with_their_topic(mut h: Harness) {
    h.subscribe(&group("a")).await;
    h.subscribe(&Topic::All).await;
    h.publish(vec![group("a")], "to-a");
    assert_eq!(h.next().await, (group("a"), "to-a".into()));
    h.publish(vec![Topic::All], "to-all");
    assert_eq!(h.next().await, (Topic::All, "to-all".into()));
    h.subscribe(&Topic::Group(None)).await;
    h.publish(vec![Topic::Group(None)], "to-null-group");
    assert_eq!(h.next().await, (Topic::Group(None), "to-null-group".into()));
}

async fn skips_topics_nobody_subscribed(mut h: Harness) {
    h.subscribe(&group("a")).await;
    h.publish(vec![group("b")], "to-b");
    h.publish(vec![user("a")], "to-user-a");
    h.publish(vec![Topic::All], "to-all");
    assert_eq!(h.drain_until_sentinel(&group("a")).await, vec![]);
}

async fn one_copy_per_subscribed_topic_of_a_route(mut h: Harness) {
    h.subscribe(&group("a")).await;
    h.subscribe(&user("u")).await;
    h.publish(vec![group("a"), group("zz"), user("u")], "multi");
    let mut got = h.drain_until_sentinel(&group("a")).await;
    got.sort();
    assert_eq!(
        got,
        vec![(group("a"), "multi".into()), (user("u"), "multi".into())]
    );
}

async fn subscriptions_are_reference_counted_and_released_late(mut h: Harness) {
    let anchor = group("anchor");
    h.subscribe(&anchor).await;
    let c = group("c");
    h.subscribe(&c).await;
    h.subscribe(&c).await;
    h.bus.unsubscribe(&c);
    h.publish(vec![c.clone()], "one-ref-left");
    assert_eq!(
        h.drain_until_sentinel(&anchor).await,
        vec![(c.clone(), "one-ref-left".into())]
    );
    // The last reference goes: still delivered within the release delay.
    h.bus.unsubscribe(&c);
    h.publish(vec![c.clone()], "within-delay");
    assert_eq!(
        h.drain_until_sentinel(&anchor).await,
        vec![(c.clone(), "within-delay".into())]
    );
    // After the delay (and another subscription change, which lets a bus
    // that releases lazily do so) it is released.
    tokio::time::sleep(RELEASE_DELAY * 3).await;
    h.subscribe(&group("other")).await;
    h.bus.unsubscribe(&group("other"));
    h.publish(vec![c.clone()], "after-delay");
    assert_eq!(h.drain_until_sentinel(&anchor).await, vec![]);
    // And taken again on the next subscribe.
    h.subscribe(&c).await;
    h.publish(vec![c.clone()], "again");
    assert_eq!(h.next().await, (c, "again".into()));
}

async fn keeps_publish_order(mut h: Harness) {
    h.subscribe(&group("a")).await;
    h.subscribe(&user("u")).await;
    for i in 0..1000 {
        let topic = if i % 3 == 0 { user("u") } else { group("a") };
        h.publish(vec![topic], &i.to_string());
    }
    for i in 0..1000 {
        assert_eq!(h.next().await.1, i.to_string(), "order across topics");
    }
}

async fn is_healthy(h: Harness) {
    h.bus.health().expect("a fresh bus is healthy");
    h.publisher.health().expect("a fresh bus is healthy");
}

#[tokio::test]
async fn local_bus_conforms() {
    conformance(|sink| async move {
        let bus = Arc::new(LocalBus::new(sink, RELEASE_DELAY)) as Arc<dyn Bus>;
        (bus.clone(), bus)
    })
    .await;
}

/// Sinks nothing: the publishing node of the Redis pair has no sockets.
struct Nowhere;

impl Deliver for Nowhere {
    fn deliver(&self, _: &Topic, _: &Arc<Envelope>) {}
}

/// A Redis bus, not yet known to be healthy.
fn start_redis_bus(url: &str, node: &str, sink: Arc<dyn Deliver>) -> Arc<dyn Bus> {
    let config = Config::load_from(None, [("WSHUB_REDIS__URL".to_owned(), url.to_owned())])
        .unwrap()
        .redis
        .unwrap();
    Arc::new(
        RedisBus::start(
            node.into(),
            config,
            sink,
            Arc::new(Metrics::new()),
            RELEASE_DELAY,
        )
        .unwrap(),
    )
}

async fn wait_healthy(bus: &Arc<dyn Bus>) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while let Err(e) = bus.health() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bus never became healthy: {e}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn redis_bus(url: &str, node: &str, sink: Arc<dyn Deliver>) -> Arc<dyn Bus> {
    let bus = start_redis_bus(url, node, sink);
    wait_healthy(&bus).await;
    bus
}

#[tokio::test]
async fn redis_bus_conforms() {
    let redis = RedisServer::start();
    let url = redis.url();
    let round = std::sync::atomic::AtomicUsize::new(0);
    conformance(|sink| {
        let n = round.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let url = url.clone();
        async move {
            let publisher = redis_bus(&url, &format!("pub-{n}"), Arc::new(Nowhere)).await;
            let subscriber = redis_bus(&url, &format!("sub-{n}"), sink).await;
            (publisher, subscriber)
        }
    })
    .await;
}

/// Issue 11, item 1: a topic taken while the subscriber is (re)subscribing
/// is subscribed for real before it is acknowledged, at start-up and after
/// a reconnect. The proxy holds Redis's reply to the SUBSCRIBE of the
/// connect attempt while the test takes a topic new to the node.
#[tokio::test]
async fn redis_subscriptions_taken_while_subscribing_take_effect() {
    let redis = RedisServer::start();
    let proxy = GateProxy::start(redis.port).await;
    let publisher = redis_bus(&redis.url(), "pub", Arc::new(Nowhere)).await;
    let (tx, mut received) = mpsc::unbounded_channel();

    // At start-up.
    proxy.arm();
    let bus = start_redis_bus(&proxy.url(), "sub", Arc::new(Recorder(tx)));
    proxy.held().await;
    let early = bus.subscribe(&group("early"));
    proxy.release();
    early.await.expect("subscribe during start-up");
    assert_eq!(
        numsub(redis.port, "wshub:g:early", false),
        1,
        "acked at start-up but not subscribed"
    );
    wait_healthy(&bus).await;
    publisher
        .publish(envelope(vec![group("early")], "to-early"))
        .unwrap();
    assert_eq!(
        next_of(&mut received).await,
        (group("early"), "to-early".into())
    );

    // After a reconnect.
    proxy.arm();
    proxy.sever();
    proxy.held().await;
    let late = bus.subscribe(&group("late"));
    proxy.release();
    late.await.expect("subscribe during a resubscribe");
    assert_eq!(
        numsub(redis.port, "wshub:g:late", false),
        1,
        "acked during a resubscribe but not subscribed"
    );
    publisher
        .publish(envelope(vec![group("late")], "to-late"))
        .unwrap();
    assert_eq!(
        next_of(&mut received).await,
        (group("late"), "to-late".into())
    );
    // The topics held before the reconnect came back too.
    publisher
        .publish(envelope(vec![group("early")], "early-again"))
        .unwrap();
    assert_eq!(
        next_of(&mut received).await,
        (group("early"), "early-again".into())
    );
}

async fn next_of(received: &mut mpsc::UnboundedReceiver<(Topic, String)>) -> (Topic, String) {
    tokio::time::timeout(PATIENCE, received.recv())
        .await
        .expect("timed out waiting for a delivery")
        .expect("sink dropped")
}
