//! The message JSON: parsing what clients and backends send, and encoding what
//! the hub sends out.
//!
//! The same shape travels in both directions (see "Messages and routing"
//! in `README.md`):
//!
//! ```json
//! {"userId":"u1","groupId":"chat","action":"broadcastchatmessage","message":"hi",
//!  "recipients":[{"type":"group","value":"chat"}]}
//! ```
//!
//! Parsing borrows from the input wherever the JSON has no escapes, and every
//! type error names the field that was wrong, because that text goes back to
//! the sender in a `wshub.error` message. Encoding happens once per message;
//! the resulting [`Frame`] is shared by every recipient.

use std::borrow::Cow;
use std::fmt;

use axum::extract::ws::Utf8Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// An encoded outbound text frame. Cloning it is a reference-count increment,
/// which is how one encoding is shared by every recipient.
pub type Frame = Utf8Bytes;

/// The reserved action a client uses to ask the hub to relay its message.
pub const ACTION_BROADCAST: &str = "broadcast";
/// The reserved action of the hub's error replies.
pub const ACTION_ERROR: &str = "wshub.error";
/// Actions starting with this (in any letter case) are the hub's own:
/// `wshub.error` replies, `wshub.connect`/`wshub.disconnect` events. A
/// client may not send them; the backend, through the broadcast endpoint,
/// may.
pub const RESERVED_PREFIX: &str = "wshub.";

/// A parsed message, borrowing from the frame it came in.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Message<'a> {
    /// `userId`: the sender (in token mode, its verified id).
    pub user_id: Option<Cow<'a, str>>,
    /// `groupId`: the sender's group (in token mode, its verified group).
    pub group_id: Option<Cow<'a, str>>,
    /// `action`: what the message is for; `broadcast` is delivered by the hub.
    pub action: Option<Cow<'a, str>>,
    /// `message`: the payload, as text.
    pub message: Option<Cow<'a, str>>,
    /// `recipients`: who receives it; none means everyone.
    pub recipients: Vec<Recipient<'a>>,
    /// A reserved action (`wshub.*`) where a backend, not the hub, may
    /// read it: under a key that is `action` in another letter case
    /// (`Action`, `actıon`: a backend may ignore case). (A second `action`
    /// key is refused outright.) In open mode
    /// a client's text goes to the backend as sent, so a client's message
    /// with it is refused like a reserved action (`Node`); the backend's
    /// own pushes may carry anything.
    pub shadow_reserved: bool,
    /// The first field given twice (`action`, `recipients[].type`, …),
    /// whose last value was kept. The hub and a backend reading the same
    /// text could act on different values (`JSON.parse` keeps the last,
    /// other parsers the first): a client's message with one is refused
    /// (`Node`); the backend's own pushes may carry anything.
    pub duplicate: Option<&'static str>,
}

/// One entry of `recipients`.
#[derive(Debug, PartialEq, Eq)]
pub struct Recipient<'a> {
    /// Which kind of target.
    pub kind: RecipientKind,
    /// `None` for JSON `null`; `""` means the same ("null") when matching.
    pub value: Option<Cow<'a, str>>,
}

/// A recipient's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientKind {
    /// `"group"`, integer `1`, or no `type` at all.
    Group,
    /// `"user"` or integer `2`.
    User,
    /// `"excludeUser"`, `"allButUser"`, `"allExceptUser"` or integer `0`.
    ExcludeUser,
    /// `"connection"`: one socket, by its connection id (wshub's own; Web
    /// Connection clients never send it).
    Connection,
}

impl RecipientKind {
    /// The canonical name written in outbound frames.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Group => "group",
            Self::User => "user",
            Self::ExcludeUser => "excludeUser",
            Self::Connection => "connection",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        const NAMES: [(&str, RecipientKind); 6] = [
            ("group", RecipientKind::Group),
            ("user", RecipientKind::User),
            ("excludeuser", RecipientKind::ExcludeUser),
            ("allbutuser", RecipientKind::ExcludeUser),
            ("allexceptuser", RecipientKind::ExcludeUser),
            ("connection", RecipientKind::Connection),
        ];
        NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, kind)| kind)
    }

    fn from_int(n: i64) -> Option<Self> {
        match n {
            0 => Some(Self::ExcludeUser),
            1 => Some(Self::Group),
            2 => Some(Self::User),
            _ => None,
        }
    }
}

/// Limits a parsed message must respect, from `[limits]` in the config.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimits {
    /// Longest `userId`, `groupId`, `action` or recipient value, in bytes.
    pub max_id_bytes: usize,
    /// Most entries in `recipients`.
    pub max_recipients: usize,
}

/// Why a message was refused. The `Display` text is what the sender reads in
/// the `wshub.error` reply (or the HTTP 400 body), so it names the field.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// The text is not JSON at all (a syntax error, or it ends too soon).
    /// Said in plain words: the people reading it in a `wshub.error` are
    /// often FoxPro developers, not readers of serde's vocabulary.
    #[error("invalid message: not JSON: {}", json_error_text(.0))]
    NotJson(serde_json::Error),
    /// JSON, but not a message object, or a field has the wrong type.
    #[error("invalid message: {}", json_error_text(.0))]
    Json(serde_json::Error),
    /// A binary frame that is not UTF-8 text.
    #[error("invalid message: binary frames must contain UTF-8 JSON text")]
    NotUtf8,
    /// The text starts with a byte-order mark, which JSON sent over a
    /// network must not (RFC 8259): said so, since serde's "expected value
    /// at line 1 column 1" points at a character nobody sees.
    #[error(
        "invalid message: not JSON: it starts with a byte-order mark (U+FEFF); send the JSON without it"
    )]
    ByteOrderMark,
    /// An id-like field is longer than `limits.max_id_bytes`.
    #[error("invalid message: `{field}` is longer than {max} bytes")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its limit in bytes.
        max: usize,
    },
    /// More recipients than `limits.max_recipients`.
    #[error("invalid message: {count} recipients, at most {max} are allowed")]
    TooManyRecipients {
        /// Recipients given.
        count: usize,
        /// `limits.max_recipients`.
        max: usize,
    },
    /// An id-like field holds a lone UTF-16 surrogate escape (only
    /// `message` may: read as U+FFFD there).
    #[error(
        "invalid message: `{field}` holds a lone UTF-16 surrogate (\\uD800 to \\uDFFF without its pair)"
    )]
    LoneSurrogate {
        /// The field.
        field: &'static str,
    },
    /// A client used an action of the hub's own (`wshub.*`): it could
    /// otherwise fake hub errors to other clients or events to the backend.
    #[error("invalid message: actions starting with `wshub.` are reserved for the hub")]
    ReservedAction,
    /// A socket asked for its group's members (`wshub.presence`) on a
    /// node with presence off: said so, rather than "reserved", so that a
    /// page can tell (review of 2026-12-03).
    #[error(
        "presence is off on this hub (presence.enabled = false): `wshub.presence` is not answered"
    )]
    PresenceOff,
    /// A socket that did not opt in to presence asked for its group's
    /// members.
    #[error("`wshub.presence` is answered only on a socket opened with presence=1")]
    PresenceNotOptedIn,
    /// A client gave a field twice (`Message::duplicate`).
    #[error(
        "invalid message: duplicate field `{field}` (the hub and a backend could read different ones)"
    )]
    DuplicateField {
        /// The field.
        field: &'static str,
    },
    /// A `connection` recipient whose value cannot be a connection id (or
    /// that has none): it would reach nobody, silently (`POST
    /// /api/disconnect` refuses the same id).
    #[error(
        "invalid message: a `connection` recipient's value is not a connection id (<node id>-<instance>-<number>, as in X-Wshub-Connection-Id)"
    )]
    NotAConnectionId,
    /// The message's only targets are `user` recipients without a user id
    /// (`""`, `null` or none): every socket has one (a page that gives none
    /// gets a generated one), so it would reach nobody, silently (review
    /// of 2026-12-03). Beside other targets such an entry adds none.
    #[error(
        "invalid message: a `user` recipient needs a user id (a socket opened without userid gets a generated one, so an empty one reaches nobody)"
    )]
    NoUserId,
}

/// The first id-like field of two parses of one text (lone surrogates
/// read as two different characters) that differs between them: the
/// field that held a lone surrogate.
fn lone_surrogate_in_ids(a: &Message<'_>, b: &Message<'_>) -> Option<&'static str> {
    let ids = [
        ("userId", a.user_id.as_deref(), b.user_id.as_deref()),
        ("groupId", a.group_id.as_deref(), b.group_id.as_deref()),
        ("action", a.action.as_deref(), b.action.as_deref()),
    ];
    if let Some((field, _, _)) = ids.into_iter().find(|(_, x, y)| x != y) {
        return Some(field);
    }
    let values = a
        .recipients
        .iter()
        .zip(&b.recipients)
        .any(|(x, y)| x.value.as_deref() != y.value.as_deref());
    values.then_some("recipients[].value")
}

/// `text` with each lone UTF-16 surrogate escape (`\uD800` to `\uDFFF`
/// without its pair) replaced by `\u<with>` (four hex digits: the same
/// length); `None` when it has none. Backslashes appear only in strings in JSON, and each
/// escape is stepped over whole, so `\\ud83d` (an escaped backslash) is
/// left alone.
fn without_lone_surrogates(text: &str, with: &str) -> Option<String> {
    let hex = |at: usize| {
        let digits = text.get(at..at + 4)?;
        u16::from_str_radix(digits, 16).ok()
    };
    let bytes = text.as_bytes();
    let mut lone = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        if bytes.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        match hex(i + 2) {
            Some(0xD800..=0xDBFF)
                if bytes.get(i + 6) == Some(&b'\\')
                    && bytes.get(i + 7) == Some(&b'u')
                    && matches!(hex(i + 8), Some(0xDC00..=0xDFFF)) =>
            {
                i += 12;
            }
            Some(0xD800..=0xDFFF) => {
                lone.push(i + 2);
                i += 6;
            }
            _ => i += 2,
        }
    }
    if lone.is_empty() {
        return None;
    }
    let mut repaired = text.to_owned();
    for at in lone {
        repaired.replace_range(at..at + 4, with);
    }
    Some(repaired)
}

/// The most characters of an error's own text echoed back ([`brief`]).
const BRIEF_CHARS: usize = 200;

/// `text` cut to about [`BRIEF_CHARS`] characters: its start and its end
/// (where serde_json says what it expected), `…` for the middle. An error
/// that quotes what it refused is echoed to the sender (a `wshub.error`, a
/// 400 body) and into a log line, so it must not grow with the input:
/// serde_json quotes a wrongly typed string whole, and escaped (`\u{7f}`
/// for one byte), so 64 KiB of text made a 458 KB reply, escaped again as
/// JSON (review of 2026-12-02).
pub fn brief(text: &str) -> Cow<'_, str> {
    const TAIL: usize = BRIEF_CHARS / 2;
    if text.chars().nth(BRIEF_CHARS).is_none() {
        return Cow::Borrowed(text);
    }
    let head_end = text
        .char_indices()
        .nth(BRIEF_CHARS - TAIL)
        .map_or(text.len(), |(i, _)| i);
    let tail_start = text
        .char_indices()
        .rev()
        .nth(TAIL - 1)
        .map_or(0, |(i, _)| i);
    Cow::Owned(format!("{}…{}", &text[..head_end], &text[tail_start..]))
}

/// A serde_json error's text: its message [`brief`], where it is in the
/// input kept.
pub fn json_error_text(e: &serde_json::Error) -> String {
    let text = e.to_string();
    // serde_json names a lone surrogate (`"\ud800"`, which a Rust string
    // cannot hold) "unexpected end of hex escape", as for `"\u12"`: both
    // said (review of 2026-12-02).
    let text = if text.contains("hex escape") {
        let at = text.find(" at line ").unwrap_or(text.len());
        format!(
            "{} (a \\u escape that is not four hex digits, or a lone UTF-16 surrogate, \\uD800 to \\uDFFF without its pair){}",
            &text[..at],
            &text[at..]
        )
    } else {
        text
    };
    if text.len() <= BRIEF_CHARS || e.line() == 0 {
        return brief(&text).into_owned();
    }
    let at = format!(" at line {} column {}", e.line(), e.column());
    let message = text.strip_suffix(&at).unwrap_or(&text);
    format!("{}{at}", brief(message))
}

impl From<serde_json::Error> for MessageError {
    fn from(e: serde_json::Error) -> Self {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof => MessageError::NotJson(e),
            Category::Data | Category::Io => MessageError::Json(e),
        }
    }
}

impl<'a> Message<'a> {
    /// Parses one message and checks it against `limits`.
    ///
    /// A lone UTF-16 surrogate escape (`"\ud83d"` not followed by its
    /// pair) is read as U+FFFD: valid JSON by RFC 8259's grammar, what a
    /// browser writes for a string cut in the middle of an emoji
    /// (`JSON.stringify("hi 😀".slice(0, 4))`), and what Web Connection's
    /// .NET hub takes; a Rust string cannot hold it, so serde_json refuses
    /// it, and the message was refused as "not JSON" (review of
    /// 2026-12-02). The text forwarded to the backend is the one received.
    pub fn parse(text: &'a str, limits: &MessageLimits) -> Result<Self, MessageError> {
        let msg: Message<'a> = match serde_json::from_str(text) {
            Ok(msg) => msg,
            Err(e) => match without_lone_surrogates(text, "fffd") {
                Some(repaired) => {
                    let msg = serde_json::from_str::<Message<'_>>(&repaired)?;
                    // Only text may hold one: lone surrogates read as one
                    // character would make different ids one. Which field
                    // held one: the one that reads otherwise when they are
                    // read as another character (U+FDD0), so an id that
                    // holds U+FFFD itself is not taken for one.
                    let marked = without_lone_surrogates(text, "fdd0").unwrap_or_default();
                    let other = serde_json::from_str::<Message<'_>>(&marked)?;
                    if let Some(field) = lone_surrogate_in_ids(&msg, &other) {
                        return Err(MessageError::LoneSurrogate { field });
                    }
                    msg.into_owned()
                }
                None if text.starts_with('\u{feff}') => return Err(MessageError::ByteOrderMark),
                None => return Err(e.into()),
            },
        };
        msg.check(limits)?;
        Ok(msg)
    }

    /// The same message, owning its text.
    fn into_owned(self) -> Message<'static> {
        let own = |v: Option<Cow<'_, str>>| v.map(|v| Cow::Owned(v.into_owned()));
        Message {
            user_id: own(self.user_id),
            group_id: own(self.group_id),
            action: own(self.action),
            message: own(self.message),
            recipients: self
                .recipients
                .into_iter()
                .map(|r| Recipient {
                    kind: r.kind,
                    value: own(r.value),
                })
                .collect(),
            shadow_reserved: self.shadow_reserved,
            duplicate: self.duplicate,
        }
    }

    fn check(&self, limits: &MessageLimits) -> Result<(), MessageError> {
        let max = limits.max_id_bytes;
        for (field, value) in [
            ("userId", &self.user_id),
            ("groupId", &self.group_id),
            ("action", &self.action),
        ] {
            if value.as_deref().is_some_and(|v| v.len() > max) {
                return Err(MessageError::TooLong { field, max });
            }
        }
        if self.recipients.len() > limits.max_recipients {
            return Err(MessageError::TooManyRecipients {
                count: self.recipients.len(),
                max: limits.max_recipients,
            });
        }
        if self
            .recipients
            .iter()
            .any(|r| r.value.as_deref().is_some_and(|v| v.len() > max))
        {
            return Err(MessageError::TooLong {
                field: "recipients[].value",
                max,
            });
        }
        Ok(())
    }

    /// True when the action is the reserved `broadcast`, in any letter case.
    pub fn is_broadcast(&self) -> bool {
        self.action
            .as_deref()
            .is_some_and(|a| a.eq_ignore_ascii_case(ACTION_BROADCAST))
    }

    /// True when the action is one of the hub's own (`wshub.*`, any case).
    pub fn is_reserved(&self) -> bool {
        self.action.as_deref().is_some_and(reserved)
    }

    /// Encodes the outbound frame: the five fields in protocol order, nulls
    /// written out, recipient types in their canonical spelling.
    pub fn encode(&self) -> Frame {
        let out = Outbound {
            user_id: self.user_id.as_deref(),
            group_id: self.group_id.as_deref(),
            action: self.action.as_deref(),
            message: self.message.as_deref(),
            recipients: &self.recipients,
        };
        // Serializing borrowed strings into a String cannot fail.
        Frame::from(serde_json::to_string(&out).unwrap_or_default())
    }
}

/// The most bytes the outbound frame of a message of at most
/// `max_message_bytes` can take. Encoding can grow a message: every field
/// is written (nulls included), each recipient gets its `type` spelled out
/// (`{}` becomes `{"type":"group","value":null}`), and in token mode the
/// connection's ids (up to `max_id_bytes`, each byte possibly escaped as
/// `\u00XX`) replace the sender's. Strings never grow: whatever the
/// encoder escapes had to be escaped in the input JSON already.
///
/// The outbound queue must hold at least this plus the per-frame overhead,
/// or one maximal message would close every recipient as a slow consumer.
pub fn max_frame_bytes(max_message_bytes: usize, limits: &MessageLimits) -> usize {
    // `{"userId":null,"groupId":null,"action":null,"message":null,"recipients":[]}`
    const SKELETON: usize = 75;
    // `{"type":"excludeUser","value":null}` (35) from an input of `{}` (2).
    const RECIPIENT_GROWTH: usize = 33;
    // A stamped id: quotes, and six bytes per escaped byte.
    let stamped_id = limits.max_id_bytes.saturating_mul(6).saturating_add(2);
    max_message_bytes
        .saturating_add(SKELETON)
        .saturating_add(limits.max_recipients.saturating_mul(RECIPIENT_GROWTH))
        .saturating_add(stamped_id.saturating_mul(2))
}

/// The `wshub.error` reply a sender receives when its message is refused.
pub fn error_frame(reason: &str) -> Frame {
    Message {
        action: Some(Cow::Borrowed(ACTION_ERROR)),
        message: Some(Cow::Borrowed(reason)),
        ..Message::default()
    }
    .encode()
}

#[derive(Serialize)]
struct Outbound<'m, 'a> {
    #[serde(rename = "userId")]
    user_id: Option<&'m str>,
    #[serde(rename = "groupId")]
    group_id: Option<&'m str>,
    action: Option<&'m str>,
    message: Option<&'m str>,
    recipients: &'m [Recipient<'a>],
}

impl Serialize for Recipient<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Recipient", 2)?;
        st.serialize_field("type", self.kind.as_str())?;
        st.serialize_field("value", &self.value.as_deref())?;
        st.end()
    }
}

// ---- Parsing -------------------------------------------------------------
//
// Hand-written visitors rather than `#[derive(Deserialize)]`: the derive's
// errors do not say which field was wrong, and the recipient `type` accepts
// strings in any case, integers, null and absence.

/// A string or null for the named field; a type error names the field, any
/// other error (truncated JSON, say) passes through as serde_json wrote it.
///
/// With `integers`, an integer too, read as its decimal text: for the ids
/// (`userId`, `groupId`, a recipient's `value`). The original hub reads
/// its messages with Json.NET, which takes a number for a string property,
/// and the browser library copies the ids a page gives `tryConnect` into
/// every message as they are: a page that passes database ids
/// (`tryConnect(true, 7, 42)`) sent `{"userId":42,"groupId":7,…}`, which
/// wshub refused (review of 2026-12-03). Other types stay errors.
struct StrField {
    name: &'static str,
    integers: bool,
}

impl StrField {
    /// A text field (`action`, `message`).
    fn text(name: &'static str) -> Self {
        Self {
            name,
            integers: false,
        }
    }

    /// An id: text, or an integer read as text.
    fn id(name: &'static str) -> Self {
        Self {
            name,
            integers: true,
        }
    }
}

impl<'de> de::DeserializeSeed<'de> for StrField {
    type Value = Option<Cow<'de, str>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrField {
    type Value = Option<Cow<'de, str>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.integers {
            write!(f, "`{}` to be a string, an integer or null", self.name)
        } else {
            write!(f, "`{}` to be a string or null", self.name)
        }
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        if !self.integers {
            return Err(E::invalid_type(de::Unexpected::Signed(v), &self));
        }
        Ok(Some(Cow::Owned(v.to_string())))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        if !self.integers {
            return Err(E::invalid_type(de::Unexpected::Unsigned(v), &self));
        }
        Ok(Some(Cow::Owned(v.to_string())))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Whether `action` is one of the hub's own (`wshub.*`) as a backend may
/// read it with the common comparisons: trimmed, in another letter case,
/// normalized (NFKC), with Java's `equalsIgnoreCase` or `Collator`, or
/// JavaScript's `localeCompare` with its default options. Its *skeleton* is
/// compared: the action in compatibility decomposition (NFKD: full-width
/// and mathematical letters are ASCII ones, `ŵ` is `w` and a mark), each
/// character in lower case (the first of its mapping, as Java's
/// `Character.toLowerCase`: `İ` is `i`), leading white space skipped, and
/// dropped wherever they are the characters collators give no weight
/// ([`weightless`]). ASCII punctuation and other scripts' letters stay:
/// `ws_hub.status` or `日本wshub.sync` are an application's own.
///
/// Reviews reached backends with `\u{feff}wshub.connect` (trim),
/// `wsh\u{ad}ub.connect`, `ws\u{1}hub.connect` and `\u{640}wshub.connect`
/// (equal to it for `localeCompare` and `Collator`) and `ｗｓｈｕｂ.connect`
/// (NFKC). Comparisons that ignore more (a collator at base or accent
/// strength, or ignoring punctuation) can still be fooled: no list covers
/// every reading, and hub events carry `X-Wshub-Event` for that.
fn reserved(action: &str) -> bool {
    const NFKD: icu_normalizer::DecomposingNormalizerBorrowed<'static> =
        icu_normalizer::DecomposingNormalizerBorrowed::new_nfkd();
    let mut skeleton = NFKD
        .normalize_iter(action.chars())
        .filter_map(|c| c.to_lowercase().next())
        .filter(|&c| !weightless(c))
        .skip_while(|c| c.is_whitespace());
    RESERVED_PREFIX
        .chars()
        .all(|want| skeleton.next() == Some(want))
}

/// Characters a collator gives no weight (Unicode's root collation):
/// controls, and outside ASCII whatever is not a letter or digit (marks,
/// format and invisible characters, spaces, signs), the Arabic tatweel and
/// the Hangul fillers (letters, but default-ignorable).
fn weightless(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_control();
    }
    !c.is_alphanumeric()
        || matches!(
            c,
            '\u{0640}' | '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}'
        )
}

/// Whether `c` is `want` to a reader that ignores letter case the ways
/// common ones do: upper case against upper case or lower against lower,
/// Unicode's mappings included (`ſ` is `s` to Java's `equalsIgnoreCase`,
/// `ı` and `İ` are `i`; `ß`, whose upper case is `SS`, is not `s`).
fn same_ignoring_case(c: char, want: char) -> bool {
    fn single(mut chars: impl Iterator<Item = char>) -> Option<char> {
        let c = chars.next()?;
        chars.next().is_none().then_some(c)
    }
    // Lower case: its first character (`İ` is `i` and a dot to Rust, `i`
    // to Java). Upper case: only a one-character mapping (`ß` is `SS`).
    c == want
        || c.to_lowercase().next() == Some(want)
        || single(c.to_uppercase()).is_some_and(|u| Some(u) == single(want.to_uppercase()))
}

/// Whether `key` is `action` to a reader that ignores letter case, in the
/// ways common ones do: character by character, upper case against upper
/// case or lower against lower, Unicode's mappings included (`actıon`,
/// `ACTİON` are `action` to Java's `equalsIgnoreCase`).
fn names_action(key: &str) -> bool {
    let mut chars = key.chars();
    "action"
        .chars()
        .all(|want| chars.next().is_some_and(|c| same_ignoring_case(c, want)))
        && chars.next().is_none()
}

/// The value of a key the hub does not read as `action` but a backend
/// might: `Action` in another letter case (a backend may read names
/// without regard to it). Any JSON value; true when it is a reserved action.
struct ShadowAction;

impl<'de> de::DeserializeSeed<'de> for ShadowAction {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ShadowAction {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(reserved(v))
    }
    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

fn field_str<'de, A: MapAccess<'de>>(
    map: &mut A,
    field: &'static str,
) -> Result<Option<Cow<'de, str>>, A::Error> {
    map.next_value_seed(StrField::text(field))
}

impl<'de> Deserialize<'de> for Message<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut msg = Message::default();
                // A reserved action where a backend, not the hub, may read
                // it (review: `{"action":"chat","Action":"wshub.disconnect"}`
                // reached a case-insensitive backend as a fake event).
                let mut shadow = false;
                let mut seen = Seen::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "userId" => {
                            seen.note(0, "userId");
                            msg.user_id = map.next_value_seed(StrField::id("userId"))?;
                        }
                        "groupId" => {
                            seen.note(1, "groupId");
                            msg.group_id = map.next_value_seed(StrField::id("groupId"))?;
                        }
                        "action" => {
                            seen.note(2, "action");
                            msg.action = field_str(&mut map, "action")?;
                        }
                        k if names_action(k) => {
                            shadow |= map.next_value_seed(ShadowAction)?;
                        }
                        "message" => {
                            seen.note(3, "message");
                            msg.message = field_str(&mut map, "message")?;
                        }
                        "recipients" => {
                            seen.note(4, "recipients");
                            let recipients = map.next_value::<Option<Recipients<'de>>>()?;
                            if let Some(Recipients(list, twice)) = recipients {
                                msg.recipients = list;
                                seen.twice = seen.twice.or(twice);
                            } else {
                                msg.recipients = Vec::new();
                            }
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                msg.shadow_reserved = shadow;
                msg.duplicate = seen.twice;
                Ok(msg)
            }
        }
        d.deserialize_map(V)
    }
}

/// The fields of an object read so far, and the first given twice: the
/// hub and a backend reading the same text could act on different values
/// (`Message::duplicate`; review of 2026-12-03:
/// `{"action":"broadcast","action":"chat"}` went to the backend as `chat`,
/// which a backend taking the first value reads as `broadcast`, an action
/// no backend is meant to see; the other order was relayed, unseen by a
/// backend that would read `chat`).
#[derive(Default)]
struct Seen {
    fields: u8,
    /// The first field given twice.
    twice: Option<&'static str>,
}

impl Seen {
    fn note(&mut self, bit: u8, name: &'static str) {
        if self.fields & (1 << bit) != 0 {
            self.twice.get_or_insert(name);
        }
        self.fields |= 1 << bit;
    }
}

/// `recipients`: an array (or null), with an error that says so; and the
/// first field given twice in one of its objects.
struct Recipients<'a>(Vec<Recipient<'a>>, Option<&'static str>);

impl<'de> Deserialize<'de> for Recipients<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Recipients<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`recipients` to be an array of {type, value} objects")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
                let mut twice = None;
                while let Some(Entry(r, dup)) = seq.next_element::<Entry<'de>>()? {
                    out.push(r);
                    twice = twice.or(dup);
                }
                Ok(Recipients(out, twice))
            }
        }
        d.deserialize_seq(V)
    }
}

/// A recipient `type`: a name in any case, 0/1/2, or null.
struct KindField(Option<RecipientKind>);

impl<'de> Deserialize<'de> for KindField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str = "recipient `type` must be group, user, excludeUser (or allButUser, allExceptUser), connection, 0, 1 or 2";
        impl Visitor<'_> for V {
            type Value = KindField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                RecipientKind::from_name(v)
                    .map(|k| KindField(Some(k)))
                    .ok_or_else(|| E::custom(EXPECTED))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                RecipientKind::from_int(v)
                    .map(|k| KindField(Some(k)))
                    .ok_or_else(|| E::custom(EXPECTED))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(KindField(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// One recipient object, and its first field given twice.
struct Entry<'a>(Recipient<'a>, Option<&'static str>);

impl<'de> Deserialize<'de> for Entry<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entry<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("each recipient to be a {type, value} object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut kind = None;
                let mut value = None;
                let mut seen = Seen::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "type" => {
                            seen.note(0, "recipients[].type");
                            kind = map.next_value::<KindField>()?.0;
                        }
                        "value" => {
                            seen.note(1, "recipients[].value");
                            value = map.next_value_seed(StrField::id("recipients[].value"))?;
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Entry(
                    Recipient {
                        kind: kind.unwrap_or(RecipientKind::Group),
                        value,
                    },
                    seen.twice,
                ))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: MessageLimits = MessageLimits {
        max_id_bytes: 16,
        max_recipients: 4,
    };

    fn parse(text: &str) -> Result<Message<'_>, MessageError> {
        Message::parse(text, &LIMITS)
    }

    /// The reason a sender reads stays short whatever it quotes: serde_json
    /// quotes a wrongly typed string whole, each control character as six
    /// (`\u{7f}`), so 64 KiB of them made a 458 KB `wshub.error`.
    #[test]
    fn a_refusal_quotes_at_most_a_brief_part_of_the_input() {
        let long = "\u{7f}".repeat(65_500);
        let text = format!(r#"{{"recipients":"{long}"}}"#);
        let reason = parse(&text).unwrap_err().to_string();
        assert!(reason.chars().count() < 300, "{} chars", reason.len());
        assert!(
            reason.starts_with("invalid message: invalid type: string"),
            "{reason}"
        );
        assert!(
            reason.ends_with(
                "\", expected `recipients` to be an array of {type, value} objects at line 1 column 65516"
            ),
            "what was expected and where are kept: {reason}"
        );
        assert!(reason.contains('…'), "{reason}");
        let short = parse(r#"{"recipients":"x"}"#).unwrap_err().to_string();
        assert!(!short.contains('…'), "{short}");
        let cut = brief(&"é".repeat(300)).into_owned();
        assert_eq!(cut.chars().count(), BRIEF_CHARS + 1, "{cut}");
        assert_eq!(brief("short"), "short");
        let lone = serde_json::from_str::<String>(r#""\ud800""#).unwrap_err();
        let said = json_error_text(&lone);
        assert!(said.contains("lone UTF-16 surrogate"), "{said}");
        assert!(said.ends_with("at line 1 column 8"), "{said}");
    }

    #[test]
    fn a_reserved_action_where_a_backend_may_read_it_is_marked() {
        for text in [
            r#"{"action":"chat","Action":"wshub.disconnect"}"#,
            r#"{"aCtIoN":"WSHUB.connect"}"#,
            // Unicode's case mappings, as Java's equalsIgnoreCase reads them.
            "{\"action\":\"chat\",\"act\u{131}on\":\"wshub.disconnect\"}",
            "{\"action\":\"chat\",\"ACT\u{130}ON\":\"wshub.disconnect\"}",
            // A backend may trim the value.
            r#"{"action":"chat","Action":" wshub.disconnect"}"#,
        ] {
            assert!(parse(text).unwrap().shadow_reserved, "{text}");
        }
        assert!(
            parse(r#"{"action":"\twshub.error"}"#)
                .unwrap()
                .is_reserved()
        );
        // Anything else under such a key is ignored, as unknown fields are.
        for (text, action) in [
            (r#"{"Action":5,"action":"chat"}"#, Some("chat")),
            (r#"{"ACTION":{"a":[1,{"b":null}]},"action":"x"}"#, Some("x")),
            (r#"{"Action":"chat"}"#, None),
            (r#"{"actions":"wshub.x","action_":"wshub.y"}"#, None),
        ] {
            let msg = parse(text).unwrap();
            assert_eq!(msg.action.as_deref(), action, "{text}");
            assert!(!msg.shadow_reserved, "{text}");
        }
    }

    /// A field given twice is marked (a client's message with one is
    /// refused): the hub and a backend could read different values
    /// (review of 2026-12-03: `{"action":"broadcast","action":"chat"}`
    /// was forwarded as `chat`, `broadcast` to a backend taking the first).
    #[test]
    fn a_field_given_twice_is_marked() {
        for (text, field) in [
            (r#"{"action":"broadcast","action":"chat"}"#, "action"),
            (r#"{"action":"chat","action":"broadcast"}"#, "action"),
            (r#"{"action":"wshub.error","action":"chat"}"#, "action"),
            (r#"{"userId":"a","userId":"b"}"#, "userId"),
            (r#"{"groupId":null,"groupId":"g"}"#, "groupId"),
            (r#"{"message":"a","message":"b"}"#, "message"),
            (r#"{"recipients":[],"recipients":null}"#, "recipients"),
            (
                r#"{"recipients":[{"type":"user","value":"a","type":"group"}]}"#,
                "recipients[].type",
            ),
            (
                r#"{"recipients":[{"value":"a","value":"b"}]}"#,
                "recipients[].value",
            ),
        ] {
            assert_eq!(parse(text).unwrap().duplicate, Some(field), "{text}");
        }
        // The last value is read (what a backend's push means: it is
        // delivered); the first duplicate is the one named.
        let msg = parse(
            r#"{"action":"a","action":"b","recipients":[{"value":"x","value":"y"}],"message":"m","message":"n"}"#,
        )
        .unwrap();
        assert_eq!(msg.action.as_deref(), Some("b"));
        assert_eq!(msg.recipients[0].value.as_deref(), Some("y"));
        assert_eq!(msg.duplicate, Some("action"));
        // Different objects may each have their own.
        let two = parse(r#"{"recipients":[{"value":"a"},{"value":"b"}]}"#).unwrap();
        assert_eq!((two.recipients.len(), two.duplicate), (2, None));
    }

    /// Ids may be integers, as the original hub (Json.NET) reads them: a
    /// page passing database ids to `tryConnect` sends them as numbers
    /// (review of 2026-12-03: every such message was refused).
    #[test]
    fn integer_ids_are_read_as_their_decimal_text() {
        let msg = parse(
            r#"{"userId":42,"groupId":-7,"action":"chat","recipients":[{"type":"user","value":9007199254740993},{"value":0}]}"#,
        )
        .unwrap();
        assert_eq!(msg.user_id.as_deref(), Some("42"));
        assert_eq!(msg.group_id.as_deref(), Some("-7"));
        let values: Vec<_> = msg.recipients.iter().map(|r| r.value.as_deref()).collect();
        assert_eq!(values, [Some("9007199254740993"), Some("0")]);
        for (text, field) in [
            (
                r#"{"userId":4.5}"#,
                "`userId` to be a string, an integer or null",
            ),
            (
                r#"{"groupId":true}"#,
                "`groupId` to be a string, an integer or null",
            ),
            (
                r#"{"recipients":[{"value":{}}]}"#,
                "`recipients[].value` to be a string, an integer or null",
            ),
            (r#"{"message":5}"#, "`message` to be a string or null"),
            (r#"{"action":5}"#, "`action` to be a string or null"),
        ] {
            let said = parse(text).unwrap_err().to_string();
            assert!(said.contains(field), "{text}: {said}");
        }
    }

    #[test]
    fn lone_surrogates_are_read_as_the_replacement_character() {
        let message = |text: &str| parse(text).map(|m| m.message.map(Cow::into_owned));
        // What a browser writes for "hi 😀".slice(0, 4), and a lone low one.
        assert_eq!(
            message(r#"{"message":"hi \ud83d"}"#).unwrap().as_deref(),
            Some("hi \u{fffd}")
        );
        assert_eq!(
            message(r#"{"message":"\uDE00x\ud83d\u0041"}"#)
                .unwrap()
                .as_deref(),
            Some("\u{fffd}x\u{fffd}A")
        );
        // Pairs and escaped backslashes are what they were.
        assert_eq!(
            message(r#"{"message":"\ud83d\ude00 \\ud83d"}"#)
                .unwrap()
                .as_deref(),
            Some("😀 \\ud83d")
        );
        // In an id it is refused, naming the field: two such ids would be
        // one.
        for (text, field) in [
            (r#"{"userId":"a\ud800","message":"x"}"#, "userId"),
            (r#"{"message":"\ud800","groupId":"\udbff"}"#, "groupId"),
            (r#"{"action":"\udfff"}"#, "action"),
            (
                r#"{"recipients":[{"type":"user","value":"\ud800"}]}"#,
                "recipients[].value",
            ),
        ] {
            match parse(text) {
                Err(e @ MessageError::LoneSurrogate { .. }) => {
                    assert!(e.to_string().contains(&format!("`{field}`")), "{e}")
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        // An id that holds U+FFFD itself is one, beside a lone surrogate
        // in the text.
        let msg = parse(
            r#"{"userId":"\ufffd","message":"\ud800","recipients":[{"type":"user","value":"�"}]}"#,
        )
        .unwrap();
        assert_eq!(msg.user_id.as_deref(), Some("\u{fffd}"));
        assert_eq!(msg.recipients[0].value.as_deref(), Some("\u{fffd}"));
        // Not JSON stays not JSON.
        assert!(matches!(
            parse(r#"{"message":"\ud83"#),
            Err(MessageError::NotJson(_))
        ));
        assert!(matches!(
            parse(r#"{"message":"\ud83d""#),
            Err(MessageError::NotJson(_))
        ));
    }

    #[test]
    fn parses_every_field_and_borrows() {
        let m = parse(
            r#"{"userId":"u1","groupId":"g","action":"broadcast","message":"hi","recipients":[{"type":"group","value":"g"}],"extra":[1,{"a":2}]}"#,
        )
        .unwrap();
        assert!(matches!(m.user_id, Some(Cow::Borrowed("u1"))));
        assert_eq!(m.group_id.as_deref(), Some("g"));
        assert!(m.is_broadcast());
        assert_eq!(m.message.as_deref(), Some("hi"));
        assert_eq!(
            m.recipients,
            vec![Recipient {
                kind: RecipientKind::Group,
                value: Some("g".into())
            }]
        );
    }

    #[test]
    fn recipient_types_in_every_spelling() {
        let m = parse(
            r#"{"recipients":[{"type":"USER","value":"a"},{"type":2,"value":"b"},{"type":1,"value":"c"},{"value":"d"}]}"#,
        )
        .unwrap();
        let kinds: Vec<_> = m.recipients.iter().map(|r| r.kind).collect();
        use RecipientKind::*;
        assert_eq!(kinds, [User, User, Group, Group]);
        let m = parse(
            r#"{"recipients":[{"type":"excludeuser","value":"a"},{"type":"allButUser"},{"type":"AllExceptUser"}]}"#,
        )
        .unwrap();
        assert!(m.recipients.iter().all(|r| r.kind == ExcludeUser));
        let m =
            parse(r#"{"recipients":[{"type":0,"value":"a"},{"type":null,"value":null}]}"#).unwrap();
        assert_eq!(m.recipients[0].kind, ExcludeUser);
        assert_eq!(m.recipients[1].kind, Group);
        assert_eq!(m.recipients[1].value, None);
    }

    #[test]
    fn null_and_absent_fields() {
        let m = parse(r#"{"userId":null,"recipients":null}"#).unwrap();
        assert_eq!(m, Message::default());
        assert!(!m.is_broadcast());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"message":5}"#,
                "expected `message` to be a string or null",
            ),
            (
                r#"{"userId":{}}"#,
                "expected `userId` to be a string, an integer or null",
            ),
            (r#"{"recipients":"g"}"#, "`recipients` to be an array"),
            (
                r#"{"recipients":["g"]}"#,
                "each recipient to be a {type, value} object",
            ),
            (
                r#"{"recipients":[{"type":"everyone"}]}"#,
                "recipient `type` must be",
            ),
            (r#"{"recipients":[{"type":7}]}"#, "recipient `type` must be"),
            (
                r#"{"recipients":[{"value":1.5}]}"#,
                "expected `recipients[].value` to be",
            ),
            (r#"[1,2]"#, "a message object"),
            (r#"{"action":"x""#, "EOF"),
            (
                r#"{"userId":"01234567890123456"}"#,
                "`userId` is longer than 16 bytes",
            ),
            (
                r#"{"recipients":[{"value":"01234567890123456"}]}"#,
                "`recipients[].value` is longer than 16 bytes",
            ),
            (
                r#"{"recipients":[{},{},{},{},{}]}"#,
                "5 recipients, at most 4",
            ),
        ];
        for (input, want) in cases {
            let err = parse(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn encodes_fields_in_protocol_order_with_nulls() {
        let m = parse(
            r#"{"recipients":[{"type":2,"value":"b"},{"value":null}],"message":"a \"q\" <b>","action":"x"}"#,
        )
        .unwrap();
        assert_eq!(
            m.encode().as_str(),
            r#"{"userId":null,"groupId":null,"action":"x","message":"a \"q\" <b>","recipients":[{"type":"user","value":"b"},{"type":"group","value":null}]}"#
        );
        assert_eq!(
            error_frame("bad").as_str(),
            r#"{"userId":null,"groupId":null,"action":"wshub.error","message":"bad","recipients":[]}"#
        );
    }

    #[test]
    fn reserved_actions_in_any_case() {
        let reserved = |action: &str| {
            let text = serde_json::json!({ "action": action }).to_string();
            parse(&text).unwrap().is_reserved()
        };
        for action in ["wshub.error", "WSHUB.connect", "Wshub.x", "wshub."] {
            assert!(reserved(action), "{action}");
        }
        // After what a backend's trim removes or nobody sees, and in the
        // letter cases a backend's comparison ignores (a review reached
        // trimming backends with the first of these).
        for lead in [
            "\u{feff}",
            "\u{1c}",
            "\u{1f}",
            "\u{0}",
            "\u{7f}",
            "\u{85}",
            "\u{a0}",
            "\u{180e}",
            "\u{200b}",
            "\u{2060}",
            "\u{3000}",
            "\t \u{feff}\u{200b}",
        ] {
            assert!(reserved(&format!("{lead}wshub.x")), "{lead:?}");
        }
        assert!(reserved("w\u{17f}hub.x"), "long s");
        // Inside, characters that show as nothing; compatibility forms
        // (full-width, mathematical, a one-dot leader); letters with
        // accents (a review reached backends with each).
        for action in [
            "wsh\u{ad}ub.x",
            "ws\u{200b}hub.x",
            "wshub\u{2060}.x",
            "\u{200e}wshub.x",
            "\u{34f}wshub.x",
            "\u{ff57}\u{ff53}\u{ff48}ub.x",
            "wshub\u{ff0e}x",
            "\u{1d430}\u{1d42c}hub.x",
            "wshub\u{2024}x",
            "\u{175}shub.x",
            "w\u{302}shub.x",
        ] {
            assert!(reserved(action), "{action:?}");
        }
        // Between the letters, what a collator gives no weight: controls,
        // tatweel, marks of other scripts, format characters.
        for action in [
            "ws\u{1}hub.x",
            "\u{640}wshub.x",
            "ws\u{591}hub.x",
            "\u{6dd}wshub.x",
            "ws\u{605}hub.x",
        ] {
            assert!(reserved(action), "{action:?}");
        }
        // Not reserved: ß (upper case SS) is no s; ASCII punctuation and
        // other scripts' letters are an application's own (a review found
        // these refused by a skeleton that dropped them).
        for action in [
            "w\u{df}hub.x",
            "wshub",
            "ws.hub.x",
            "wshubx.y",
            "chat",
            "ws_hub.status",
            "_wshub.ping",
            "@wshub.status",
            "\u{65e5}wshub.x",
            "\u{142}wshub.x",
            "ws-hub.s",
        ] {
            assert!(!reserved(action), "{action:?}");
        }
        for action in ["wshub", "wshubx", "broadcast", "my.wshub.x", "é"] {
            assert!(!reserved(action), "{action}");
        }
        assert!(!parse("{}").unwrap().is_reserved());
    }

    /// The worst case for growth: the most recipients, each `{}` or
    /// `{"type":0}`, and ids stamped in token mode that are all escapes.
    #[test]
    fn max_frame_bytes_bounds_the_worst_encoding() {
        let limits = MessageLimits {
            max_id_bytes: 16,
            max_recipients: 4,
        };
        let max_message_bytes = 1024;
        let head = r#"{"recipients":[{},{"type":0},{},{"type":0}],"message":""#;
        let text = format!(
            "{head}{}\"}}",
            "m".repeat(max_message_bytes - head.len() - 2)
        );
        assert_eq!(text.len(), max_message_bytes);
        let mut msg = Message::parse(&text, &limits).unwrap();
        let id = "\u{1}".repeat(16);
        msg.user_id = Some(Cow::Borrowed(&id));
        msg.group_id = Some(Cow::Borrowed(&id));
        let encoded = msg.encode().len();
        let bound = max_frame_bytes(max_message_bytes, &limits);
        assert!(encoded <= bound, "{encoded} > {bound}");
        assert!(encoded > max_message_bytes, "the case grows");
    }

    #[test]
    fn escaped_strings_round_trip() {
        let m = parse(r#"{"message":"line\nnext \u00e9"}"#).unwrap();
        assert_eq!(m.message.as_deref(), Some("line\nnext é"));
    }

    #[test]
    fn text_that_is_not_json_says_so_in_plain_words() {
        // A FoxPro developer reading a `wshub.error` should not have to know
        // serde's vocabulary to tell "this was not JSON at all" from "a field
        // has the wrong type".
        for (input, want) in [
            (
                "not json",
                "invalid message: not JSON: expected ident at line 1 column 2",
            ),
            (
                r#"{"action":"x""#,
                "invalid message: not JSON: EOF while parsing an object at line 1 column 13",
            ),
            (
                "{oops",
                "invalid message: not JSON: key must be a string at line 1 column 2",
            ),
            // A byte-order mark, which serde reports at a character nobody
            // sees ("expected value at line 1 column 1").
            (
                "\u{feff}{\"action\":\"x\"}",
                "invalid message: not JSON: it starts with a byte-order mark (U+FEFF); send the JSON without it",
            ),
        ] {
            assert_eq!(parse(input).unwrap_err().to_string(), want, "{input}");
        }
        let typed = parse(r#"{"message":12}"#).unwrap_err().to_string();
        assert_eq!(
            typed,
            "invalid message: invalid type: integer `12`, expected `message` to be a string or null at line 1 column 13",
            "the README's example"
        );
    }
}
