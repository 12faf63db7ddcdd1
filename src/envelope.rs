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
    /// resume, otherwise the plain frame, byte for byte what every other
    /// socket gets. A message without a stamp (to a connection, which has
    /// no history, or from a node without history during a rolling
    /// enable) carries `"pos":{}` there: every message to a socket that
    /// speaks resume has `pos`, so a client tells a relayed message from
    /// the hub's own frames (`wshub.welcome`, `wshub.gap`) by it, whatever
    /// its action (a backend may send `wshub.*` actions).
    pub fn frame_for(&self, speaks_resume: bool) -> &Frame {
        if !speaks_resume {
            return &self.frame;
        }
        self.resumable.get_or_init(|| {
            let pos = self
                .stamp
                .as_ref()
                .map_or_else(|| "{}".to_owned(), pos_json);
            with_pos(&self.frame, &pos)
        })
    }
}

/// `frame` (a JSON object) with `"pos":<pos>` added as its last field.
fn with_pos(frame: &Frame, pos: &str) -> Frame {
    let text = frame.as_str().trim_end();
    let Some(body) = text.strip_suffix('}') else {
        // Every frame the hub encodes is an object; leave anything else be.
        return frame.clone();
    };
    let body = body.trim_end();
    let comma = if body.ends_with('{') { "" } else { "," };
    Frame::from(format!("{body}{comma}\"pos\":{pos}}}"))
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
        // No stamp (a message to a connection, or from a node without
        // history): an empty `pos` for resume speakers, so that a backend's
        // `wshub.*` action to a connection is not read as the hub's own
        // frame (review of 2026-12-02); nothing for the others.
        let text = r#"{"userId":null,"groupId":null,"action":"wshub.welcome","message":"x","recipients":[]}"#;
        let plain = Envelope::new(Route::everyone(), Frame::from(text));
        assert_eq!(plain.frame_for(false).as_str(), text);
        let with: serde_json::Value = serde_json::from_str(plain.frame_for(true).as_str()).unwrap();
        assert_eq!(with["pos"], serde_json::json!({}));
        assert_eq!(with["action"], "wshub.welcome");
    }
}
