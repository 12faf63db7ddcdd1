//! Property tests of recipient resolution against a reference model written
//! straight from the routing table in `README.md`: for any sockets and
//! any recipients, delivery through the bus (one copy per topic, accepted by
//! the first-matching-topic rule) gives every socket exactly the copies the
//! model says (0 or 1), never two, never one to an excluded user, and never
//! panics. Sockets have connection ids (`n-a-<i>`), so `connection`
//! recipients are part of the walk.

use std::borrow::Cow;

use proptest::prelude::*;
use wshub::message::{Recipient, RecipientKind};
use wshub::route::{Addressee, Identity, Route};

const USERS: &[&str] = &["a", "b", "c", "g1"];
const GROUPS: &[Option<&str>] = &[None, Some(""), Some("g1"), Some("g2"), Some("a")];
const VALUES: &[Option<&str>] = &[
    None,
    Some(""),
    Some("a"),
    Some("b"),
    Some("g1"),
    Some("g2"),
    Some("zz"),
    Some("n-a-0"),
    Some("n-a-1"),
    Some("n-a-5"),
];

/// A socket: its identity and its connection id.
#[derive(Debug)]
struct Socket {
    who: Identity,
    cid: String,
}

impl Addressee for Socket {
    fn identity(&self) -> &Identity {
        &self.who
    }
    fn connection(&self) -> Option<&str> {
        Some(&self.cid)
    }
}

fn identity() -> impl Strategy<Value = Identity> {
    (prop::sample::select(USERS), prop::sample::select(GROUPS)).prop_map(|(u, g)| Identity {
        user: u.into(),
        group: g.map(Into::into),
    })
}

fn recipient() -> impl Strategy<Value = (RecipientKind, Option<&'static str>)> {
    (
        prop::sample::select(
            &[
                RecipientKind::Group,
                RecipientKind::User,
                RecipientKind::ExcludeUser,
                RecipientKind::Connection,
            ][..],
        ),
        prop::sample::select(VALUES),
    )
}

/// The routing table, read literally.
fn value<'a>(v: &Option<&'a str>) -> Option<&'a str> {
    v.filter(|s| !s.is_empty())
}

fn model(recipients: &[(RecipientKind, Option<&str>)], socket: &Socket) -> bool {
    let who = &socket.who;
    let excluded = recipients
        .iter()
        .any(|(k, v)| *k == RecipientKind::ExcludeUser && value(v) == Some(&*who.user));
    if excluded {
        return false;
    }
    let targets: Vec<_> = recipients
        .iter()
        .filter(|(k, _)| *k != RecipientKind::ExcludeUser)
        .collect();
    if targets.is_empty() {
        // No recipients, or only exclusions: everyone (but them).
        return true;
    }
    targets.iter().any(|(kind, v)| match kind {
        // "" and null are the null group (no groupid), not the group "".
        RecipientKind::Group => match value(v) {
            None => who.group.is_none(),
            Some(g) => who.group.as_deref() == Some(g),
        },
        RecipientKind::User => value(v) == Some(&*who.user),
        RecipientKind::Connection => value(v) == Some(socket.cid.as_str()),
        RecipientKind::ExcludeUser => false,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn delivery_matches_the_routing_table(
        sockets in prop::collection::vec(identity(), 1..12),
        recipients in prop::collection::vec(recipient(), 0..8),
    ) {
        let parsed: Vec<Recipient<'_>> = recipients
            .iter()
            .map(|(kind, v)| Recipient { kind: *kind, value: v.map(Cow::Borrowed) })
            .collect();
        let route = Route::from_recipients(&parsed);
        let sockets: Vec<Socket> = sockets
            .into_iter()
            .enumerate()
            .map(|(i, who)| Socket { who, cid: format!("n-a-{i}") })
            .collect();
        for socket in &sockets {
            let who = &socket.who;
            // What the bus and hub do: a copy per topic, each socket takes
            // the ones `accepts` allows.
            let copies = route
                .topics()
                .iter()
                .filter(|t| t.matches(socket) && route.accepts(t, socket))
                .count();
            prop_assert!(copies <= 1, "{} copies for {:?}", copies, socket);
            prop_assert_eq!(copies == 1, model(&recipients, socket), "socket {:?}, recipients {:?}", socket, recipients);
            if route.excluded().iter().any(|e| **e == *who.user) {
                prop_assert_eq!(copies, 0);
            }
        }
    }
}
