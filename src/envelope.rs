//! The envelope: one message on its way from the node that published it to
//! the sockets that receive it, on this node and (through the bus) others.

use crate::message::Frame;
use crate::route::Route;

/// One message on its way: where it goes and the frame the recipients
/// receive, encoded once and shared by every recipient.
#[derive(Debug)]
pub struct Envelope {
    /// Where it goes.
    pub route: Route,
    /// What the recipients receive, encoded once.
    pub frame: Frame,
}
