//! The bus contract (see `src/bus/mod.rs`), as one suite every bus
//! implementation runs. Deliveries are observed through a recording sink;
//! "not delivered" is shown by a sentinel published after it on a
//! subscribed topic (the contract keeps per-publisher order).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use wshub::bus::{Bus, Deliver, Envelope, LocalBus};
use wshub::message::Frame;
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
    pub bus: Arc<dyn Bus>,
    received: mpsc::UnboundedReceiver<(Topic, String)>,
    sentinels: usize,
}

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
    /// Builds a harness around the bus `make` returns for the given sink.
    pub async fn new<F, Fut>(make: F) -> Self
    where
        F: FnOnce(Arc<dyn Deliver>) -> Fut,
        Fut: std::future::Future<Output = Arc<dyn Bus>>,
    {
        let (tx, received) = mpsc::unbounded_channel();
        let bus = make(Arc::new(Recorder(tx))).await;
        Self {
            bus,
            received,
            sentinels: 0,
        }
    }

    async fn subscribe(&self, topic: &Topic) {
        self.bus.subscribe(topic).await.expect("subscribe");
    }

    fn publish(&self, topics: Vec<Topic>, text: &str) {
        self.bus.publish(envelope(topics, text)).expect("publish");
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
    Fut: std::future::Future<Output = Arc<dyn Bus>>,
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
}

#[tokio::test]
async fn local_bus_conforms() {
    conformance(|sink| async move { Arc::new(LocalBus::new(sink, RELEASE_DELAY)) as Arc<dyn Bus> })
        .await;
}
