//! The routing table of `README.md` ("Messages and routing"), as a suite
//! that runs against one node or a cluster: clients are spread over the
//! given node addresses.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::{Value, json};

use super::Client;

/// (name, userid, groupid) of each client; `None` = no groupid parameter.
const CLIENTS: &[(&str, &str, Option<&str>)] = &[
    ("a1", "a", Some("g1")),
    ("a2", "a", Some("g2")),
    ("b", "b", Some("g1")),
    ("c", "c", None),
    ("d", "d", Some("")),
    ("e", "g1", Some("g2")),
    ("f", "F", Some("G1")),
];

const EVERYONE: &[&str] = &["a1", "a2", "b", "c", "d", "e", "f"];

/// (recipients JSON, or None for no `recipients` field; who receives it).
fn cases() -> Vec<(Option<Value>, &'static [&'static str])> {
    vec![
        (None, EVERYONE),
        (Some(json!(null)), EVERYONE),
        (Some(json!([])), EVERYONE),
        (
            Some(json!([{"type": "group", "value": "g1"}])),
            &["a1", "b"],
        ),
        (
            Some(json!([{"type": "GROUP", "value": "g1"}])),
            &["a1", "b"],
        ),
        (Some(json!([{"type": 1, "value": "g1"}])), &["a1", "b"]),
        (Some(json!([{"value": "g1"}])), &["a1", "b"]),
        (Some(json!([{"type": "user", "value": "a"}])), &["a1", "a2"]),
        (Some(json!([{"type": 2, "value": "a"}])), &["a1", "a2"]),
        // Several recipients: one copy per socket.
        (
            Some(json!([{"type": "group", "value": "g1"}, {"type": "user", "value": "a"}])),
            &["a1", "a2", "b"],
        ),
        (
            Some(
                json!([{"type": "user", "value": "a"}, {"type": "group", "value": "g1"}, {"type": "group", "value": "g2"}, {"type": "group", "value": "g1"}]),
            ),
            &["a1", "a2", "b", "e"],
        ),
        // Exclusion wins whatever its position.
        (
            Some(json!([{"type": "excludeUser", "value": "b"}, {"type": "group", "value": "g1"}])),
            &["a1"],
        ),
        (
            Some(json!([{"type": "group", "value": "g1"}, {"type": "excludeUser", "value": "b"}])),
            &["a1"],
        ),
        (
            Some(json!([{"type": 0, "value": "b"}, {"type": "group", "value": "g1"}])),
            &["a1"],
        ),
        (
            Some(json!([{"type": "group", "value": "g2"}, {"type": "excludeuser", "value": "a"}])),
            &["e"],
        ),
        // Only exclusions: everyone but them.
        (
            Some(json!([{"type": "allButUser", "value": "a"}])),
            &["b", "c", "d", "e", "f"],
        ),
        (
            Some(
                json!([{"type": "allExceptUser", "value": "a"}, {"type": "excludeUser", "value": "c"}]),
            ),
            &["b", "d", "e", "f"],
        ),
        // "" and null are the null group, not the empty group.
        (Some(json!([{"type": "group", "value": ""}])), &["c"]),
        (Some(json!([{"type": "group", "value": null}])), &["c"]),
        // Types are respected: a user named like a group is not the group.
        (Some(json!([{"type": "user", "value": "g1"}])), &["e"]),
        // Comparisons are case-sensitive.
        (Some(json!([{"type": "group", "value": "G1"}])), &["f"]),
        (Some(json!([{"type": "user", "value": "f"}])), &[]),
        // A user recipient "" reaches nobody (every socket has a user id):
        // beside a group, the group's sockets get it, as in Web Connection
        // (the union); alone it is refused with wshub.error
        // (`api::publish_and_disconnect_refuse_bad_requests_clearly`).
        (
            Some(json!([{"type": "group", "value": "g1"}, {"type": "user", "value": ""}])),
            &["a1", "b"],
        ),
    ]
}

/// Runs every case: client `a1` sends, everyone checks what arrived.
pub async fn routing_table(nodes: &[SocketAddr]) {
    let mut clients: BTreeMap<&str, Client> = BTreeMap::new();
    for (i, (name, user, group)) in CLIENTS.iter().enumerate() {
        let query = match group {
            Some(g) => format!("userid={user}&groupid={g}"),
            None => format!("userid={user}"),
        };
        let node = nodes[i % nodes.len()];
        clients.insert(
            name,
            Client::connect(node, &format!("/__initializeWebSocket.wc?{query}")).await,
        );
    }
    for (i, (recipients, expected)) in cases().into_iter().enumerate() {
        let action = format!("case-{i}");
        let mut msg =
            json!({"userId": "a", "groupId": "g1", "action": action, "message": format!("m{i}")});
        if let Some(r) = &recipients {
            msg["recipients"] = r.clone();
        }
        let sender = clients.get_mut("a1").unwrap();
        sender.send_json(msg).await;
        let tag = sender.send_sentinel().await;
        for (name, client) in clients.iter_mut() {
            let got = client.until_sentinel(&tag).await;
            let want = usize::from(expected.contains(name));
            assert_eq!(
                got.len(),
                want,
                "case {i} (recipients {recipients:?}): client {name} got {got:?}, expected {want} copies"
            );
            for m in got {
                assert_eq!(m["action"], action.as_str(), "case {i}: client {name}");
            }
        }
    }
    for (_, client) in clients {
        client.close().await;
    }
}
