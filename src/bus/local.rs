//! The in-process bus: one node, no external service.

use std::future::ready;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Bus, BusError, Deliver, Envelope, Interest, Subscribed};
use crate::route::Topic;

/// Delivers every publish straight to this node's sink, on the publisher's
/// task, for the topics this node holds.
///
/// Publishing is a synchronous call into [`Deliver::deliver`], which only
/// enqueues frames; per-publisher order is therefore trivially kept, and
/// there is no queue of its own to overflow. Released topics are expired
/// lazily on the next subscription change, so no timer task is needed.
pub struct LocalBus {
    sink: Arc<dyn Deliver>,
    interest: Interest,
}

impl LocalBus {
    pub fn new(sink: Arc<dyn Deliver>, release_delay: Duration) -> Self {
        Self {
            sink,
            interest: Interest::new(release_delay),
        }
    }
}

impl Bus for LocalBus {
    fn publish(&self, envelope: Arc<Envelope>) -> Result<(), BusError> {
        for topic in envelope.route.topics() {
            if self.interest.contains(topic) {
                self.sink.deliver(topic, &envelope);
            }
        }
        Ok(())
    }

    fn subscribe(&self, topic: &Topic) -> Subscribed {
        self.interest.expire(Instant::now());
        self.interest.add(topic);
        Box::pin(ready(Ok(())))
    }

    fn unsubscribe(&self, topic: &Topic) {
        self.interest.remove(topic);
        self.interest.expire(Instant::now());
    }

    fn health(&self) -> Result<(), BusError> {
        Ok(())
    }
}
