//! The envelope: one message on its way from the node that published it to
//! the sockets that receive it, on this node and (through the bus) others.

use std::sync::OnceLock;

use crate::message::Frame;
use crate::position::{Stamp, pos_json};
use crate::route::Route;

/// One message on its way: where it goes and the frame the recipients
/// receive, encoded once and shared by every recipient.
#[derive(Debug)]
pub struct Envelope {
    /// Where it goes.
    pub route: Route,
    /// What the recipients receive, encoded once.
    pub frame: Frame,
    /// Its place in history, when history is on and the bus stamped it.
    pub stamp: Option<Stamp>,
    /// `frame` with the `pos` field, for sockets that speak resume: made
    /// the first time one of them is offered the message, then shared.
    resumable: OnceLock<Frame>,
}

impl Envelope {
    /// An envelope without a stamp (history off, or not published yet).
    pub fn new(route: Route, frame: Frame) -> Self {
        Self::stamped(route, frame, None)
    }

    /// An envelope with the stamp the bus gave it.
    pub fn stamped(route: Route, frame: Frame, stamp: Option<Stamp>) -> Self {
        Self {
            route,
            frame,
            stamp,
            resumable: OnceLock::new(),
        }
    }

    /// The frame a socket receives: with `pos` for a socket that speaks
    /// resume (when the message has a stamp), otherwise the plain frame,
    /// byte for byte what every other socket gets.
    pub fn frame_for(&self, speaks_resume: bool) -> &Frame {
        match (&self.stamp, speaks_resume) {
            (Some(stamp), true) => self.resumable.get_or_init(|| with_pos(&self.frame, stamp)),
            _ => &self.frame,
        }
    }
}

/// `frame` (a JSON object) with `"pos":{…}` added as its last field.
fn with_pos(frame: &Frame, stamp: &Stamp) -> Frame {
    let text = frame.as_str().trim_end();
    let Some(body) = text.strip_suffix('}') else {
        // Every frame the hub encodes is an object; leave anything else be.
        return frame.clone();
    };
    let body = body.trim_end();
    let comma = if body.ends_with('{') { "" } else { "," };
    Frame::from(format!("{body}{comma}\"pos\":{}}}", pos_json(stamp)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::Position;
    use crate::route::Topic;

    #[test]
    fn pos_is_a_sixth_field_and_only_for_resume_speakers() {
        let frame = Frame::from(
            r#"{"userId":"ann","groupId":"chat","action":"say","message":"hi","recipients":[]}"#,
        );
        let stamp = Stamp {
            seq: 1,
            positions: vec![(Topic::All, Position::parse("k3:41").unwrap())],
        };
        let e = Envelope::stamped(Route::everyone(), frame.clone(), Some(stamp));
        assert_eq!(e.frame_for(false), &frame);
        let with: serde_json::Value = serde_json::from_str(e.frame_for(true).as_str()).unwrap();
        assert_eq!(with["pos"]["all"], "k3:41");
        assert_eq!(with["message"], "hi");
        let plain = Envelope::new(Route::everyone(), frame.clone());
        assert_eq!(plain.frame_for(true), &frame, "no stamp, no pos");
    }
}
