//! Who receives a message: topics, routes, and the exactly-once rule.
//!
//! A message's `recipients` become a [`Route`]: an ordered, de-duplicated list
//! of [`Topic`]s (the targets) plus a set of excluded users. The bus carries
//! one copy of a message per topic of its route; a node receives a copy
//! through each topic it is subscribed to.
//!
//! **Exactly once.** A socket may match several topics of one route (its
//! group and its user, say), so it may see several copies. It accepts a copy
//! only when the topic the copy came through is the *first* topic of the
//! route that the socket matches, and never when its user is excluded
//! ([`Route::accepts`]). Every node subscribes to every topic its sockets
//! match, so the first matching topic's copy always arrives, and it is the
//! only one accepted. The rule needs no memory of past messages and works
//! the same for one node and for many.
//!
//! **Connections.** A `connection` recipient names one socket by its
//! connection id ([`Topic::Connection`]), `<node id>-<instance>-<n>`: the
//! node instance that holds it (its *address*, [`node_address`]) and a
//! number. The bus carries such a copy on that node instance's own channel
//! only, and the socket with that id matches it, by the same first-match
//! rule as every other topic, except that connection topics come after
//! the others ([`Route::accepts`]).

use std::sync::Arc;

use crate::message::{Recipient, RecipientKind};

/// A bus channel: what a message is published to and a node subscribes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// Every socket.
    All,
    /// Sockets that connected with this `groupid`; `None` is the null group
    /// (connected without `groupid`).
    Group(Option<Arc<str>>),
    /// Sockets that connected with this `userid`.
    User(Arc<str>),
    /// The one socket with this connection id (a `connection` recipient).
    Connection(Arc<str>),
}

/// What a topic is matched against: a socket's identity and, when known,
/// its connection id. An [`Identity`] alone has no connection id, so it
/// matches no [`Topic::Connection`].
pub trait Addressee {
    /// The identity the socket connected with.
    fn identity(&self) -> &Identity;
    /// Its connection id, unique in the cluster.
    fn connection(&self) -> Option<&str> {
        None
    }
}

impl Addressee for Identity {
    fn identity(&self) -> &Identity {
        self
    }
}

/// The node instance a connection id names (`<node id>-<instance>`, the
/// id without its last `-<n>`), or `None` when it is not a connection id.
pub fn node_address(connection: &str) -> Option<&str> {
    let (address, number) = connection.rsplit_once('-')?;
    let valid = !address.is_empty()
        && !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
        && address.contains('-');
    valid.then_some(address)
}

/// The longest connection id a node gives: a `node_id` of at most 64
/// bytes, 8 hex digits of instance, a `u64`.
pub(crate) const MAX_CONNECTION_ID_LEN: usize = 64 + 1 + 8 + 1 + 20;

/// The local number of a connection id (what follows the last `-`).
pub fn connection_number(connection: &str) -> Option<u64> {
    node_address(connection)?;
    connection.rsplit_once('-')?.1.parse().ok()
}

/// The length of the user id made up for a socket that gives none (hex
/// digits, `http::identity_from_query`); `limits.max_id_bytes` may not be
/// less.
pub(crate) const GENERATED_ID_LEN: usize = 12;

/// The identity a socket connected with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id (from the query or the token).
    pub user: Arc<str>,
    /// `None` for the null group (no `groupid` at connect).
    pub group: Option<Arc<str>>,
}

impl Identity {
    /// The topics this socket must be subscribed to, besides [`Topic::All`].
    pub fn topics(&self) -> [Topic; 2] {
        [
            Topic::Group(self.group.clone()),
            Topic::User(self.user.clone()),
        ]
    }
}

impl Topic {
    /// Whether a socket with this identity (and connection id) is reached
    /// through this topic.
    pub fn matches(&self, socket: &(impl Addressee + ?Sized)) -> bool {
        let who = socket.identity();
        match self {
            Topic::All => true,
            Topic::Group(g) => g.as_deref() == who.group.as_deref(),
            Topic::User(u) => **u == *who.user,
            Topic::Connection(c) => socket.connection() == Some(&**c),
        }
    }
}

/// The resolved recipients of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Never empty. Either exactly `[Topic::All]`, or group/user topics in
    /// the order they first appear in `recipients`, without duplicates.
    topics: Vec<Topic>,
    /// Users who must not receive the message, whatever else matches them.
    excluded: Vec<Arc<str>>,
}

impl Route {
    /// Everyone, no exclusions.
    pub fn everyone() -> Self {
        Self {
            topics: vec![Topic::All],
            excluded: Vec::new(),
        }
    }

    /// Builds a route from parts, as a peer node sent them. A route that
    /// contains [`Topic::All`] is exactly `[Topic::All]`.
    pub fn from_parts(mut topics: Vec<Topic>, excluded: Vec<Arc<str>>) -> Self {
        if topics.contains(&Topic::All) {
            topics = vec![Topic::All];
        }
        Self { topics, excluded }
    }

    /// Resolves a message's `recipients` (wshub's rules, see "Messages and
    /// routing" in `README.md`): no targets (none at all, or only
    /// exclusions) means everyone; a value of `""` or `null` in a `group`
    /// entry is the null group; an exclusion applies whatever its position
    /// in the list.
    pub fn from_recipients(recipients: &[Recipient<'_>]) -> Self {
        let mut topics: Vec<Topic> = Vec::new();
        let mut excluded: Vec<Arc<str>> = Vec::new();
        for r in recipients {
            let value = r.value.as_deref().filter(|v| !v.is_empty());
            let topic = match (r.kind, value) {
                (RecipientKind::Group, v) => Topic::Group(v.map(Arc::from)),
                // A user recipient `""`/null names nobody: every socket has a user id.
                (RecipientKind::User, None) => continue,
                (RecipientKind::User, Some(v)) => Topic::User(Arc::from(v)),
                (RecipientKind::ExcludeUser, None) => continue,
                // A connection id `""`/null names nobody either.
                (RecipientKind::Connection, None) => continue,
                (RecipientKind::Connection, Some(v)) => Topic::Connection(Arc::from(v)),
                (RecipientKind::ExcludeUser, Some(v)) => {
                    if !excluded.iter().any(|e| **e == *v) {
                        excluded.push(Arc::from(v));
                    }
                    continue;
                }
            };
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
        let names_nobody = recipients
            .iter()
            .any(|r| r.kind != RecipientKind::ExcludeUser);
        if topics.is_empty() && !names_nobody {
            // No targets at all, or only exclusions: everyone (but them).
            topics.push(Topic::All);
        }
        // Otherwise `topics` may be empty: only `user` entries naming nobody.
        Self { topics, excluded }
    }

    /// The topics to publish this message to, in order. Empty only when the
    /// recipients name nobody (a `user` entry with an empty value).
    pub fn topics(&self) -> &[Topic] {
        &self.topics
    }

    /// The excluded users.
    pub fn excluded(&self) -> &[Arc<str>] {
        &self.excluded
    }

    /// The exactly-once rule: a socket with identity `who` accepts the copy
    /// that came through `via` when `via` is the first topic of this route
    /// that it matches, and its user is not excluded.
    ///
    /// A connection topic comes after every other: a socket named by its
    /// connection and by its user or group takes the user's or group's
    /// copy. With history on that is the copy with a position (the
    /// connection's has none, having no history), so the socket's floors
    /// and its client's positions move past the message, and a resume or
    /// a drain handoff does not replay it (a review saw it delivered
    /// twice); and it travels the way the sender's other messages to that
    /// user or group do, in their order.
    pub fn accepts(&self, via: &Topic, socket: &(impl Addressee + ?Sized)) -> bool {
        let who = socket.identity();
        if self.excluded.iter().any(|e| **e == *who.user) {
            return false;
        }
        let is_connection = |t: &&Topic| matches!(t, Topic::Connection(_));
        let first = self
            .topics
            .iter()
            .filter(|t| !is_connection(t))
            .find(|t| t.matches(socket))
            .or_else(|| {
                self.topics
                    .iter()
                    .filter(is_connection)
                    .find(|t| t.matches(socket))
            });
        first == Some(via)
    }

    /// Whether a topic of the route names a connection.
    pub fn names_connections(&self) -> bool {
        self.topics
            .iter()
            .any(|t| matches!(t, Topic::Connection(_)))
    }
}

/// What a client may address when its message is relayed by the hub
/// (`ws.client_relay`, or a token's `relay` claim): the backend and the
/// server API are never limited by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Relay {
    /// Anyone (Web Connection's behaviour, the default).
    #[default]
    All,
    /// Only the sender's own group, optionally with `excludeUser` entries.
    Group,
    /// Nobody: clients cannot relay at all.
    None,
}

impl Relay {
    /// Reads `all`, `group` or `none` (any letter case).
    pub fn parse(text: &str) -> Option<Self> {
        [
            ("all", Self::All),
            ("group", Self::Group),
            ("none", Self::None),
        ]
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(text))
        .map(|(_, relay)| relay)
    }

    /// The policy's name, as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Group => "group",
            Self::None => "none",
        }
    }

    /// Why a client `who` may not relay a message with `route`, if it may
    /// not (the sentence its `wshub.error` carries).
    pub fn refuses(self, route: &Route, who: &Identity) -> Option<&'static str> {
        match self {
            Self::All => None,
            Self::None => Some(
                "message not sent: clients may not relay messages here (client relay policy `none`); \
                 send it through the application",
            ),
            Self::Group => {
                let own = [Topic::Group(who.group.clone())];
                (route.topics() != own).then_some(
                    "message not sent: clients may only address their own group here \
                     (a `group` recipient with their group id, optionally with `excludeUser` \
                     entries; client relay policy `group`)",
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn rcpt(kind: RecipientKind, value: &str) -> Recipient<'_> {
        Recipient {
            kind,
            value: Some(Cow::Borrowed(value)),
        }
    }

    fn who(user: &str, group: Option<&str>) -> Identity {
        Identity {
            user: user.into(),
            group: group.map(Into::into),
        }
    }

    /// Which topic (if any) delivers to `who`, trying every topic of the route
    /// as the bus would.
    fn accepted_via(route: &Route, who: &Identity) -> Vec<Topic> {
        route
            .topics()
            .iter()
            .filter(|t| t.matches(who) && route.accepts(t, who))
            .cloned()
            .collect()
    }

    use RecipientKind::*;

    #[test]
    fn no_recipients_is_everyone() {
        assert_eq!(Route::from_recipients(&[]), Route::everyone());
        let r = Route::from_recipients(&[rcpt(ExcludeUser, "x")]);
        assert_eq!(r.topics(), &[Topic::All]);
        assert!(r.accepts(&Topic::All, &who("a", None)));
        assert!(!r.accepts(&Topic::All, &who("x", None)));
    }

    #[test]
    fn empty_group_value_is_the_null_group() {
        let r = Route::from_recipients(&[rcpt(Group, "")]);
        assert_eq!(r.topics(), &[Topic::Group(None)]);
        assert!(Topic::Group(None).matches(&who("a", None)));
        assert!(!Topic::Group(None).matches(&who("a", Some(""))));
    }

    #[test]
    fn types_are_respected() {
        let r = Route::from_recipients(&[rcpt(User, "chat")]);
        assert!(accepted_via(&r, &who("u", Some("chat"))).is_empty());
        assert_eq!(
            accepted_via(&r, &who("chat", Some("g"))),
            [Topic::User("chat".into())]
        );
    }

    #[test]
    fn exclusion_applies_in_any_order() {
        for recipients in [
            [rcpt(Group, "g"), rcpt(ExcludeUser, "x")],
            [rcpt(ExcludeUser, "x"), rcpt(Group, "g")],
        ] {
            let r = Route::from_recipients(&recipients);
            assert!(accepted_via(&r, &who("x", Some("g"))).is_empty());
            assert_eq!(accepted_via(&r, &who("y", Some("g"))).len(), 1);
        }
    }

    #[test]
    fn one_copy_per_socket_however_many_topics_match() {
        let r = Route::from_recipients(&[
            rcpt(User, "u"),
            rcpt(Group, "g"),
            rcpt(Group, "g"),
            rcpt(User, "u"),
        ]);
        assert_eq!(r.topics().len(), 2, "duplicates removed");
        assert_eq!(
            accepted_via(&r, &who("u", Some("g"))),
            [Topic::User("u".into())]
        );
        assert_eq!(
            accepted_via(&r, &who("v", Some("g"))),
            [Topic::Group(Some("g".into()))]
        );
        assert_eq!(
            accepted_via(&r, &who("u", Some("h"))),
            [Topic::User("u".into())]
        );
        assert!(accepted_via(&r, &who("v", Some("h"))).is_empty());
    }

    #[test]
    fn user_entry_naming_nobody_reaches_nobody() {
        let r = Route::from_recipients(&[Recipient {
            kind: User,
            value: None,
        }]);
        assert!(r.topics().is_empty());
        assert!(accepted_via(&r, &who("a", None)).is_empty());
    }

    #[test]
    fn comparisons_are_case_sensitive() {
        let r = Route::from_recipients(&[rcpt(Group, "Chat")]);
        assert!(accepted_via(&r, &who("u", Some("chat"))).is_empty());
    }
}
