//! The single-node bus: one node, no external service, nobody else to tell.

use std::future::ready;

use super::{Bus, BusError, Receipt, Subscribed};
use crate::envelope::Envelope;
use crate::route::Topic;
use std::sync::Arc;

/// The bus of a node that is alone: there are no other nodes, so
/// [`publish`](Bus::publish) has nothing to carry and does nothing. The node
/// delivers to its own sockets itself (`Node::publish`),
/// exactly as it does on a cluster, so one node and many run the same code.
///
/// Subscriptions resolve at once: nothing remote can arrive, so nothing can
/// be missed. It needs no delivery sink, as it never receives anything.
#[derive(Debug, Default)]
pub struct SingleNodeBus;

impl SingleNodeBus {
    /// The bus of a node with no others.
    pub fn new() -> Self {
        Self
    }
}

impl Bus for SingleNodeBus {
    fn publish(&self, envelope: Arc<Envelope>) -> Result<(), BusError> {
        // No other node to carry it to; this node delivered it already.
        drop(envelope);
        Ok(())
    }

    fn publish_all(&self, _envelopes: &[Arc<Envelope>]) -> Result<Receipt, BusError> {
        Ok(Receipt::carried())
    }

    fn subscribe(&self, _topic: &Topic) -> Subscribed {
        Box::pin(ready(Ok(())))
    }

    fn unsubscribe(&self, _topic: &Topic) {}

    fn health(&self) -> Result<(), BusError> {
        Ok(())
    }
}
