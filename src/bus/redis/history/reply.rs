//! Reading the history scripts' answers: the entries of a stream, one
//! topic's read or catch-up, and whether entries are exactly the offsets
//! asked for. The same on one Redis and on a Cluster (where the answers
//! of the per-topic calls are concatenated, `sharded.rs`).

use std::sync::Arc;

use axum::body::Bytes;
use tracing::debug;

use super::{Caught, Head};
use crate::bus::wire;
use crate::envelope::Envelope;
use crate::history::{HistoryError, Position};
use crate::route::Topic;

/// One topic's answer to the catch-up script: `[epoch, top, from, reach,
/// entries, whole, made]` (see [`CATCH_UP_LUA`](super::CATCH_UP_LUA)).
pub(super) fn caught(
    topic: &Topic,
    part: redis::Value,
    bound: Option<u64>,
) -> Result<Caught, HistoryError> {
    let what = "catch-up";
    let mut part = array(part, what)?.into_iter();
    let mut next = || part.next().ok_or_else(|| bad(what, "too short"));
    let epoch = text(next()?, what)?;
    let top = number(next()?, what)?;
    let from = number(next()?, what)?;
    let mut reach = number(next()?, what)?;
    let entries = entries(next()?, what)?;
    let whole = number(next()?, what)? == 1;
    let made = number(next()?, what)? == 1;
    if epoch.is_empty() {
        return Ok(Caught {
            head: Head::Fresh,
            from: 0,
            reach: 0,
            messages: Some(Vec::new()),
            made: false,
        });
    }
    let epoch: Arc<str> = epoch.into();
    let after = Position {
        epoch: epoch.clone(),
        offset: from,
    };
    let wanted = reach.saturating_sub(from);
    let messages = match whole.then(|| contiguous(topic, &after, wanted, entries, None)) {
        Some(Ok(Some(mut messages))) => {
            // Entries the script could not place (written without their
            // `seq`) are placed here.
            if let Some(bound) = bound
                && let Some(at) = messages
                    .iter()
                    .position(|m| m.stamp.as_ref().is_none_or(|s| s.seq >= bound))
            {
                messages.truncate(at);
                reach = from + at as u64;
            }
            Some(messages)
        }
        Some(Err(e)) => {
            debug!(error = %e, "an entry of the catch-up cannot be read");
            None
        }
        Some(Ok(None)) | None => None,
    };
    Ok(Caught {
        head: Head::At(Position { epoch, offset: top }),
        from,
        reach,
        messages,
        made,
    })
}

/// A reply of a history script that cannot be read.
pub(super) fn bad(what: &str, why: &str) -> HistoryError {
    HistoryError::Unreadable(format!("history {what}: {why}"))
}

pub(super) fn array(value: redis::Value, what: &str) -> Result<Vec<redis::Value>, HistoryError> {
    match value {
        redis::Value::Array(items) => Ok(items),
        _ => Err(bad(what, "not an array")),
    }
}

pub(super) fn text(value: redis::Value, what: &str) -> Result<String, HistoryError> {
    redis::from_redis_value::<String>(value).map_err(|e| bad(what, &e.to_string()))
}

pub(super) fn number(value: redis::Value, what: &str) -> Result<u64, HistoryError> {
    match value {
        redis::Value::Int(n) => u64::try_from(n).map_err(|_| bad(what, "a negative number")),
        other => text(other, what)?
            .parse()
            .map_err(|_| bad(what, "not a number")),
    }
}

/// Stream entries as `XRANGE` gives them: (id, payload) each.
pub(super) fn entries(
    value: redis::Value,
    what: &str,
) -> Result<Vec<(String, Bytes)>, HistoryError> {
    let entries = array(value, what)?;
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        // [id, [field, value, ...]]
        let mut entry = array(entry, what)?.into_iter();
        let (Some(id), Some(redis::Value::Array(fields))) = (entry.next(), entry.next()) else {
            return Err(bad(what, "entry"));
        };
        let id = text(id, what)?;
        let mut data = None;
        let mut fields = fields.into_iter();
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            if text(name, what)? == "d" {
                let redis::Value::BulkString(bytes) = value else {
                    return Err(bad(what, "payload"));
                };
                data = Some(Bytes::from(bytes));
            }
        }
        out.push((id, data.ok_or_else(|| bad(what, "entry without payload"))?));
    }
    Ok(out)
}

/// One topic's answer to the read script: the top and the entries.
pub(super) fn read_reply(reply: redis::Value) -> Result<ReadReply, HistoryError> {
    let what = "read";
    let mut parts = array(reply, what)?.into_iter();
    let (Some(epoch), Some(top), Some(entries_part)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(what, "too short"));
    };
    let top = Position {
        epoch: text(epoch, what)?.into(),
        offset: number(top, what)?,
    };
    // Absent for a topic without an epoch.
    let after = parts.next().map(|a| number(a, what)).transpose()?;
    Ok(ReadReply {
        top,
        entries: entries(entries_part, what)?,
        after,
    })
}

/// One topic's answer to the resume's read (`READ_MANY_LUA`).
pub(super) struct ReadReply {
    /// The topic's top.
    pub(super) top: Position,
    /// The entries read, as ids and payloads.
    pub(super) entries: Vec<(String, Bytes)>,
    /// The offset the entries follow, when the topic has an epoch: the one
    /// asked for, or the end of the reader's excluded run.
    pub(super) after: Option<u64>,
}

/// The entries' messages, if they are exactly the `wanted` offsets after
/// `after`, in order, and (with `max_age_ms`) none is older than that.
pub(super) fn contiguous(
    topic: &Topic,
    after: &Position,
    wanted: u64,
    entries: Vec<(String, Bytes)>,
    max_age_ms: Option<u64>,
) -> Result<Option<Vec<Arc<Envelope>>>, HistoryError> {
    if entries.len() as u64 != wanted {
        return Ok(None);
    }
    let now = wire::now_ms();
    let mut messages = Vec::with_capacity(entries.len());
    for (n, (id, payload)) in entries.into_iter().enumerate() {
        let offset = after.offset + 1 + n as u64;
        if id != format!("{offset}-1") {
            return Ok(None);
        }
        let decoded = wire::decode(payload).map_err(|e| HistoryError::Unreadable(e.to_string()))?;
        let stamped_here = decoded
            .stamp
            .as_ref()
            .and_then(|s| s.position(topic))
            .is_some_and(|p| p.epoch == after.epoch && p.offset == offset);
        if !stamped_here {
            return Err(HistoryError::Unreadable(format!(
                "history entry {id} is not stamped with its own position"
            )));
        }
        if let (Some(max), Some(at)) = (max_age_ms, decoded.published_ms)
            && now.saturating_sub(at) > max
        {
            return Ok(None);
        }
        messages.push(Arc::new(Envelope::stamped(
            decoded.route,
            decoded.frame,
            decoded.stamp,
        )));
    }
    Ok(Some(messages))
}
