//! The properties the fuzz targets check, shared with the corpus replay test
//! (`tests/it/fuzz_corpus.rs`), which runs every corpus input in CI.

use wshub::bus::wire;
use wshub::bus::wire::Bytes;
use wshub::message::{Message, MessageLimits};
use wshub::route::{Identity, Route};

const LIMITS: MessageLimits = MessageLimits {
    max_id_bytes: 64,
    max_recipients: 32,
};

/// Any bytes a client can send: parsing never panics, recipient resolution
/// never gives a socket two copies or a copy to an excluded user, and what
/// the hub encodes parses back to the same message.
pub fn message(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(msg) = Message::parse(text, &LIMITS) else {
        return;
    };
    let route = Route::from_recipients(&msg.recipients);
    for who in identities(&msg) {
        let copies = route
            .topics()
            .iter()
            .filter(|t| t.matches(&who) && route.accepts(t, &who))
            .count();
        assert!(copies <= 1, "{copies} copies for {who:?}");
        if route.excluded().iter().any(|e| **e == *who.user) {
            assert_eq!(copies, 0, "an excluded user got a copy");
        }
    }
    let encoded = msg.encode();
    let again = Message::parse(encoded.as_str(), &LIMITS).expect("the hub's own output parses");
    assert_eq!(again.user_id, msg.user_id);
    assert_eq!(again.group_id, msg.group_id);
    assert_eq!(again.action, msg.action);
    assert_eq!(again.message, msg.message);
    assert_eq!(again.recipients, msg.recipients);
}

/// Any payload on a Redis channel: decoding never panics, and what decodes
/// encodes back to the same route and frame.
pub fn wire(data: &[u8]) {
    let Ok(decoded) = wire::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let again = wire::decode(wire::encode(
        &decoded.origin,
        &decoded.route,
        &decoded.frame,
    ))
    .expect("re-encoded payload decodes");
    assert_eq!(again.route, decoded.route);
    assert_eq!(again.frame, decoded.frame);
    assert_eq!(again.origin, decoded.origin);
}

/// Identities built from the values the message mentions, so matches happen.
fn identities(msg: &Message<'_>) -> Vec<Identity> {
    let mut values: Vec<Option<&str>> = vec![None, Some(""), Some("x")];
    values.extend(msg.recipients.iter().map(|r| r.value.as_deref()));
    let mut out = Vec::new();
    for user in values.iter().flatten() {
        for group in &values {
            out.push(Identity {
                user: (*user).into(),
                group: group.map(Into::into),
            });
        }
    }
    out
}
