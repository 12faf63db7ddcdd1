//! History on a Redis Cluster with sharded pub/sub
//! (`src/bus/redis/history/sharded.rs`): the resume guarantees, per topic,
//! against a real cluster of `redis-server`s (missing: the tests fail).
//!
//! On a cluster the scripts of one publish batch run concurrently, one per
//! topic, each on its topic's shard: a sentinel seen through one topic
//! proves only that topic's earlier messages ran. So "everything before
//! has run" is shown by two sentinels in a row ([`settle`]): the second is
//! published once the first came back, so it goes in a later batch, which
//! the publisher sends only once every script of the first one answered.

use std::sync::Arc;
use std::time::Duration;

use wshub::config::HistoryConfig;
use wshub::history::Read;
use wshub::route::Topic;

use crate::common::history_settings as settings;
use crate::common::redis::{RedisCluster, cli};
use crate::common::{TestServer, eventually};
use crate::history_bus::{
    Event, Member, group, kill_pubsub, killed_while_publishing_and_repaired, position,
};
use crate::resume::{
    Watcher, ann_away_while_the_route_mix_is_sent, excluded_then_away, messages, sentinel,
};

/// A node on the cluster `urls`, sharded pub/sub, history on.
async fn cluster_node(urls: &str) -> TestServer {
    TestServer::on_redis(urls, |c| {
        c.redis.as_mut().unwrap().sharded = true;
        c.history = Some(settings());
    })
    .await
}

/// Everything `server` published before has run on every shard (module
/// docs).
async fn settle(watcher: &mut Watcher, server: &TestServer) {
    watcher.settle(server).await;
    watcher.settle(server).await;
}

/// The channel of a group (where its keys live too).
fn group_channel(name: &str) -> String {
    format!("wshub:g:{name}")
}

/// A group name whose channel is on shard `owner` (`want`) or not on it.
fn group_on(cluster: &RedisCluster, shard: usize, on: bool) -> String {
    (0..200)
        .map(|i| format!("g{i}"))
        .find(|g| (cluster.owner_of(&group_channel(g)).0 == shard) == on)
        .expect("a group name for the shard")
}

#[tokio::test]
async fn on_a_cluster_a_socket_is_replayed_what_it_missed_once_in_order_per_topic() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let (one, two) = (cluster_node(&urls).await, cluster_node(&urls).await);
    let (mut ann, mut watcher) = ann_away_while_the_route_mix_is_sent(&one, &two).await;
    settle(&mut watcher, &two).await;

    let (mut client, welcome) = ann.resume(&two).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    // The watcher's two sentinels went to everyone too.
    assert_eq!(welcome["replayed"], 6 + 2, "{welcome}");
    let tag = sentinel(&one).await;
    let (got, _) = ann.until(&mut client, &tag).await;
    assert_eq!(got.len(), 8, "{:?}", messages(&got));
    // Each message once, through the first topic of its route that is
    // ann's, in the order sent within that topic (no order is promised
    // across topics on a cluster), with that topic's position only.
    for (key, want) in [
        ("all", &["m1 all", "m6 all"][..]),
        ("group:chat", &["m2 chat", "m4 chat+ann"][..]),
        ("user:ann", &["m3 ann", "m5 ann+chat"][..]),
    ] {
        let through: Vec<&str> = got
            .iter()
            .filter(|f| f["pos"].as_object().unwrap().contains_key(key))
            .map(|f| f["message"].as_str().unwrap())
            .filter(|m| !m.starts_with("resume-sentinel"))
            .collect();
        assert_eq!(through, want, "through {key}");
    }
    for frame in &got {
        assert_eq!(frame["pos"].as_object().unwrap().len(), 1, "{frame}");
    }
    client.close().await;

    // Straight back: nothing missed, recovered with nothing to replay.
    let (mut client, welcome) = ann.resume(&one).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(welcome["replayed"], 0);
    let tag = sentinel(&two).await;
    assert!(ann.until(&mut client, &tag).await.0.is_empty());
}

/// The excluded runs on a cluster: kept per topic by the topic's script
/// in its slot, read by the resume's read of that topic.
#[tokio::test]
async fn on_a_cluster_messages_that_exclude_a_client_do_not_leave_its_position_behind() {
    let cluster = RedisCluster::start(3);
    for node in &cluster.nodes {
        // Small stream nodes, so that `MAXLEN ~` trims close to the size.
        cli(
            node.port,
            &["CONFIG", "SET", "stream-node-max-entries", "2"],
        );
    }
    let server = TestServer::on_redis(&cluster.urls(), |c| {
        c.redis.as_mut().unwrap().sharded = true;
        c.history = Some(HistoryConfig {
            size_group: 3,
            ..settings()
        });
    })
    .await;
    // Two sentinels in a row: everything before ran on every shard.
    excluded_then_away(&server, 2).await;
}

/// A sharded subscriber connection killed on its shard (`CLIENT KILL TYPE
/// pubsub`) while publishing goes on: every message once, in order, every
/// gap repaired from history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_killed_subscriber_is_repaired_from_history() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let publisher = Arc::new(Member::start_sharded(&urls, "pub", Some(settings()), 2000).await);
    let receiver = Member::start_sharded(&urls, "rcv", Some(settings()), 2000).await;
    let shard = cluster.nodes[cluster.owner_of(&group_channel("a")).0].port;
    // No proxy can stand before a Cluster node (its redirects name the
    // real ports): the kills go on until the receiver counts a repair.
    killed_while_publishing_and_repaired(publisher, receiver, async || kill_pubsub(shard)).await;
}

/// Everything `member` receives until a sentinel from `from` came back
/// through each of `topics`.
async fn until_sentinels(member: &mut Member, from: &Member, topics: &[Topic]) -> Vec<Event> {
    let tags: Vec<String> = topics
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let tag = format!("sentinel-{i}");
            from.publish(std::slice::from_ref(t), &tag);
            tag
        })
        .collect();
    let mut seen = Vec::new();
    let mut left = tags.len();
    while left > 0 {
        match member.next().await {
            Event::Copy(_, text, _) if tags.contains(&text) => left -= 1,
            event => seen.push(event),
        }
    }
    seen
}

/// A batch for two topics on two shards, one of them frozen: the other
/// topic's script runs, the frozen one's times out, and the publisher
/// sends the batch again. When the shard thaws it runs the first call and
/// then the resend: each topic publishes the message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_batch_resent_after_a_timeout_is_published_once_per_topic() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let frozen = cluster.owner_of(&group_channel("a")).0;
    let other = group(&group_on(&cluster, frozen, false));
    let a = group("a");
    let publisher = Member::start_sharded(&urls, "pub", Some(settings()), 300).await;
    let mut receiver = Member::start_sharded(&urls, "rcv", Some(settings()), 2000).await;
    receiver.subscribe(&[a.clone(), other.clone()]).await;
    // The publisher's connection and scripts are ready before the freeze.
    let warm = until_sentinels(&mut receiver, &publisher, &[a.clone(), other.clone()]).await;
    assert_eq!(warm, vec![]);
    cluster.nodes[frozen].pause();
    publisher.publish(&[a.clone(), other.clone()], "once");
    eventually("the publisher gives the batch up and resends it", || {
        publisher.metric("wshub_bus_publish_failures_total") >= 1.0
    })
    .await;
    // Shorter than the cluster's node timeout (2 s): no failover.
    cluster.nodes[frozen].resume();
    let got = until_sentinels(&mut receiver, &publisher, &[a.clone(), other.clone()]).await;
    let copies = |t: &Topic| {
        got.iter()
            .filter(|e| matches!(e, Event::Copy(via, text, _) if via == t && text == "once"))
            .count()
    };
    assert_eq!((copies(&a), copies(&other)), (1, 1), "{got:?}");
    assert_eq!(got.len(), 2, "nothing else: {got:?}");
}

/// One shard restarts without persistence: the topics it holds start
/// afresh (a read from before is incomplete: `recovered: false`, and a
/// subscribed node reports a gap, never a replay), the others keep their
/// history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_restarted_shard_starts_its_topics_afresh_and_only_them() {
    let mut cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let restarted = cluster.owner_of(&group_channel("a")).0;
    let (a, kept) = (group("a"), group(&group_on(&cluster, restarted, false)));
    let publisher = Member::start_sharded(&urls, "pub", Some(settings()), 2000).await;
    let mut receiver = Member::start_sharded(&urls, "rcv", Some(settings()), 2000).await;
    receiver.subscribe(&[a.clone(), kept.clone()]).await;
    let history = receiver.history();
    let mut before = Vec::new();
    for topic in [&a, &kept] {
        publisher.publish(std::slice::from_ref(topic), "first");
        let (via, _, stamp) = receiver.next_copy().await;
        assert_eq!(&via, topic);
        before.push(position(&stamp, topic));
    }
    for topic in [&a, &kept] {
        publisher.publish(std::slice::from_ref(topic), "second");
    }
    let got = until_sentinels(&mut receiver, &publisher, &[a.clone(), kept.clone()]).await;
    assert_eq!(got.len(), 2, "{got:?}");

    cluster.nodes[restarted].restart();
    let port = cluster.nodes[restarted].port;
    eventually("the cluster is whole again", || {
        cli(port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
    })
    .await;
    // The receiver's subscriber lost the shard: after it resubscribed,
    // topic `a` shows as a gap (its history is gone), and nothing is
    // replayed.
    let deadline = tokio::time::Instant::now() + crate::common::PATIENCE;
    let from = [
        (a.clone(), before[0].clone()),
        (kept.clone(), before[1].clone()),
    ];
    let reads = loop {
        match history.read_many(&from, 100, usize::MAX, None).await {
            Ok(reads) => break reads,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(
        matches!(&reads[0], Read::Incomplete { top } if top.epoch != before[0].epoch),
        "the restarted shard's topic started afresh: {reads:?}"
    );
    match &reads[1] {
        Read::Complete { messages, .. } => assert_eq!(
            messages
                .iter()
                .map(|m| m.frame.to_string())
                .collect::<Vec<_>>(),
            ["second", "sentinel-1"],
            "the other shard's topic kept its history"
        ),
        other => panic!("the other shard's topic is readable: {other:?}"),
    }
    // A sentinel on each topic after it: if the copy of "after" was lost
    // while the receiver resubscribed, the sentinel's jump repairs it.
    publisher.publish(std::slice::from_ref(&a), "after");
    let events = until_sentinels(&mut receiver, &publisher, &[a.clone(), kept.clone()]).await;
    let copies: Vec<(&Topic, &str, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Copy(via, text, stamp) => {
                Some((via, text.as_str(), position(stamp, via).offset))
            }
            Event::Gap(..) => None,
        })
        .collect();
    assert_eq!(
        copies,
        [(&a, "after", 1)],
        "once, in a new epoch: {events:?}"
    );
    assert!(
        events
            .iter()
            .all(|e| matches!(e, Event::Copy(..) | Event::Gap(..))
                && !matches!(e, Event::Gap(t, _) if *t != a)),
        "at most a gap of the restarted topic, no replay: {events:?}"
    );
    let after = until_sentinels(&mut receiver, &publisher, &[a.clone(), kept.clone()]).await;
    assert_eq!(after, vec![], "nothing twice");
}

/// A slot held half-migrated (MIGRATING on its owner, IMPORTING on the
/// next shard, its keys already moved, as `redis-cli --cluster reshard`
/// leaves a slow slot) for longer than `redis.publish_retry_ms` while
/// messages go to it and to two topics of other shards: the scripts follow
/// the `ASK` redirections, nothing is dropped, and each message arrives
/// once. The migrated topic's copies published during the migration reach
/// the receiver once (or, its history restarted on the new shard, as a
/// reported gap), never silently lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_long_slot_migration_loses_nothing() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let (from, slot, ids) = cluster.owner_of(&group_channel("a"));
    let to = (from + 1) % cluster.nodes.len();
    let others: Vec<String> = (0..400)
        .map(|i| format!("g{i}"))
        .filter(|g| cluster.owner_of(&group_channel(g)).0 != from)
        .take(2)
        .collect();
    let (a, b, c) = (group("a"), group(&others[0]), group(&others[1]));
    let all = [a.clone(), b.clone(), c.clone()];
    let publisher = Member::start_sharded_retry(&urls, "pub", Some(settings()), 2000, 500).await;
    let mut receiver = Member::start_sharded(&urls, "rcv", Some(settings()), 2000).await;
    receiver.subscribe(&all).await;
    let warm = until_sentinels(&mut receiver, &publisher, &all).await;
    assert_eq!(warm, vec![]);

    let port = |i: usize| cluster.nodes[i].port;
    let slot = slot.to_string();
    for (node, args) in [
        (to, ["CLUSTER", "SETSLOT", &slot, "IMPORTING", &ids[from]]),
        (from, ["CLUSTER", "SETSLOT", &slot, "MIGRATING", &ids[to]]),
    ] {
        assert_eq!(cli(port(node), &args), "OK", "{args:?}");
    }
    let keys = cli(port(from), &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
    let keys: Vec<&str> = keys.split_whitespace().collect();
    assert!(!keys.is_empty(), "the topic has keys to move");
    let to_port = port(to).to_string();
    let mut migrate = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
    migrate.extend(&keys);
    assert_eq!(cli(port(from), &migrate), "OK");

    // 2 s half-migrated, four times `publish_retry_ms`.
    let mut sent = Vec::new();
    for i in 0..20 {
        let text = format!("m{i}");
        let to: &[Topic] = match i % 4 {
            0 => std::slice::from_ref(&a),
            1 => std::slice::from_ref(&b),
            2 => std::slice::from_ref(&c),
            _ => &all,
        };
        publisher.publish(to, &text);
        sent.push((text, to.to_vec()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut order = vec![to, from];
    order.extend((0..cluster.nodes.len()).filter(|i| *i != to && *i != from));
    for node in order {
        let args = ["CLUSTER", "SETSLOT", &slot, "NODE", &ids[to]];
        assert_eq!(cli(port(node), &args), "OK", "{args:?} on node {node}");
    }

    let mut got = until_sentinels(&mut receiver, &publisher, &all).await;
    // The migrated topic's copies may come after its sentinel (a
    // resubscription's catch-up): a second round settles.
    got.extend(until_sentinels(&mut receiver, &publisher, &all).await);
    let dropped = publisher.metric("wshub_messages_dropped_total{reason=\"bus_unavailable\"}");
    assert_eq!(dropped, 0.0, "nothing dropped: {got:?}");
    let gap_a = got.iter().any(|e| matches!(e, Event::Gap(t, _) if *t == a));
    for topic in &all {
        for (text, to) in &sent {
            if !to.contains(topic) {
                continue;
            }
            let copies = got
                .iter()
                .filter(|e| matches!(e, Event::Copy(via, t, _) if via == topic && t == text))
                .count();
            if *topic == a && gap_a {
                assert!(copies <= 1, "{text} via {topic:?} at most once: {got:?}");
            } else {
                assert_eq!(copies, 1, "{text} via {topic:?} once: {got:?}");
            }
        }
        assert!(
            *topic == a
                || !got
                    .iter()
                    .any(|e| matches!(e, Event::Gap(t, _) if t == topic)),
            "no gap on the other shards' topics: {got:?}"
        );
    }
}

/// Every node (re)start is a new bus instance with its own high-water mark
/// per topic it publishes to: those marks are keys of their own that
/// expire (like the topic's meta hash), not fields of the meta hash, which
/// a busy topic keeps forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_each_instances_mark_expires_on_its_own() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let (owner, slot, _) = cluster.owner_of(&group_channel("a"));
    let a = group("a");
    let mut receiver = Member::start_sharded(&urls, "rcv", Some(settings()), 2000).await;
    receiver.subscribe(std::slice::from_ref(&a)).await;
    // Three instances in turn, as three restarts of one node make.
    for i in 0..3 {
        let publisher = Member::start_sharded(&urls, "pub", Some(settings()), 2000).await;
        let got = receiver.until_sentinel(&publisher, &a).await;
        assert_eq!(got, vec![], "instance {i}");
    }
    let port = cluster.nodes[owner].port;
    let keys = cli(
        port,
        &["CLUSTER", "GETKEYSINSLOT", &slot.to_string(), "100"],
    );
    let keys: Vec<&str> = keys.split_whitespace().collect();
    let meta = keys
        .iter()
        .find(|k| k.ends_with(":m"))
        .unwrap_or_else(|| panic!("a meta hash among {keys:?}"));
    let fields = cli(port, &["HKEYS", meta]);
    assert!(
        !fields.split_whitespace().any(|f| f.starts_with("pub:")),
        "no instance marks in the meta hash: {fields}"
    );
    let marks: Vec<&&str> = keys.iter().filter(|k| k.contains(":pub:")).collect();
    assert_eq!(marks.len(), 3, "one mark per instance: {keys:?}");
    for mark in marks {
        let ttl: i64 = cli(port, &["PTTL", mark]).trim().parse().unwrap();
        assert!(ttl > 0, "{mark} expires: {ttl}");
    }
}

/// As on one Redis (`history_bus.rs`): on a cluster too, a topic's meta
/// is kept a day only once a subscriber made it adopted; one nobody
/// listens to is kept as long as its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_only_adopted_topics_keep_their_meta_for_a_day() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let mut node = Member::start_sharded(&urls, "n", Some(settings()), 2000).await;
    let (nobody, listened) = (group("nobody"), group("listened"));
    node.subscribe(std::slice::from_ref(&listened)).await;
    node.publish(&[nobody, listened], "m1");
    assert_eq!(node.next_copy().await.1, "m1");
    // Both scripts ran: a second message through the listened group came
    // after them in the same publisher's order.
    node.publish(&[group("listened")], "m2");
    assert_eq!(node.next_copy().await.1, "m2");
    let pttl = |name: &str| -> i64 {
        let (owner, _, _) = cluster.owner_of(&format!("wshub:g:{name}"));
        let port = cluster.nodes[owner].port;
        let pattern = format!("wshub:h:*:g:{name}:m");
        let key = cli(port, &["--scan", "--pattern", &pattern]);
        assert!(!key.is_empty(), "no meta for {name}");
        cli(port, &["PTTL", key.trim()]).parse().unwrap()
    };
    let ttl = settings().ttl.as_millis() as i64;
    assert!((1..=ttl).contains(&pttl("nobody")), "{}", pttl("nobody"));
    assert!(pttl("listened") > ttl, "{}", pttl("listened"));
}

/// On a cluster too, a batch whose `SPUBLISH`es the shard refuses (an ACL
/// rule) is recorded whole, and the receiver reads what it did not hear
/// from history at the next copy (`history_bus::a_refused_publish_records_
/// the_whole_batch`).
#[tokio::test]
async fn on_a_cluster_a_refused_publish_records_the_whole_batch() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let publisher = Member::start_sharded(&urls, "pub", Some(settings()), 2000).await;
    let mut receiver = Member::start_sharded(&urls, "rcv", Some(settings()), 2000).await;
    let t = group("t");
    receiver.subscribe(std::slice::from_ref(&t)).await;
    publisher.publish(std::slice::from_ref(&t), "t1");
    assert_eq!(receiver.next_copy().await.1, "t1");
    let port = cluster.nodes[cluster.owner_of(&group_channel("t")).0].port;
    let acl = |rule: &str| cli(port, &["ACL", "SETUSER", "default", rule]);
    let offset = || {
        let key = cli(port, &["--scan", "--pattern", "wshub:h:*:g:t:m"]);
        cli(port, &["HGET", key.trim(), "o"])
    };
    assert_eq!(acl("-spublish"), "OK");
    // Queued before the publisher's task runs (this runtime has one
    // thread): one batch, one script for the topic.
    for i in 2..=6 {
        publisher.publish(std::slice::from_ref(&t), &format!("t{i}"));
    }
    eventually("the batch refused", || {
        publisher.metric("wshub_bus_publish_failures_total") >= 1.0
    })
    .await;
    assert_eq!(offset(), "6", "every message of the batch recorded");
    assert_eq!(acl("+spublish"), "OK");
    publisher.publish(std::slice::from_ref(&t), "t7");
    let mut got = Vec::new();
    for _ in 2..=7 {
        got.push(receiver.next_copy().await.1);
    }
    assert_eq!(got, ["t2", "t3", "t4", "t5", "t6", "t7"]);
}

/// On a cluster too, a key of another type where a topic's meta belongs
/// loses that topic's messages only, counted once each: the other topics'
/// scripts ran, and their messages arrive (`history_bus::a_stray_key_
/// loses_only_the_copies_of_its_topic`). (The topic's script failed, and
/// the whole batch was counted as dropped, the messages that arrived too.)
#[tokio::test]
async fn on_a_cluster_a_stray_key_loses_only_the_copies_of_its_topic() {
    let (captured, _guard) = crate::common::Captured::at(tracing::Level::INFO);
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let publisher = Member::start_sharded(&urls, "pub", Some(settings()), 2000).await;
    let mut receiver = Member::start_sharded(&urls, "rcv", Some(settings()), 2000).await;
    let (ok, bad) = (group("ok"), group("bad"));
    receiver.subscribe(std::slice::from_ref(&ok)).await;
    publisher.publish(std::slice::from_ref(&ok), "m0");
    assert_eq!(receiver.next_copy().await.1, "m0");
    let (bad2, mut strays) = (group("bad2"), Vec::new());
    for name in ["bad", "bad2"] {
        let channel = group_channel(name);
        let port = cluster.nodes[cluster.owner_of(&channel).0].port;
        let stray = format!("wshub:h:{{{channel}}}:g:{name}:m");
        assert_eq!(cli(port, &["SET", &stray, "not a hash"]), "OK");
        strays.push((port, stray));
    }
    // Queued before the publisher's task runs (one thread): one batch.
    for i in 1..=10 {
        publisher.publish(std::slice::from_ref(&bad), &format!("b{i}"));
        publisher.publish(std::slice::from_ref(&ok), &format!("m{i}"));
    }
    // Lost on both its topics, each a script of its own: one message.
    publisher.publish(&[bad.clone(), bad2], "lost twice");
    // Lost on one of its topics: it reaches the other.
    publisher.publish(&[bad, ok], "half");
    let mut got = Vec::new();
    for _ in 1..=11 {
        got.push(receiver.next_copy().await.1);
    }
    let mut want: Vec<String> = (1..=10).map(|i| format!("m{i}")).collect();
    want.push("half".into());
    assert_eq!(got, want);
    eventually("the stray topics' messages counted as dropped", || {
        publisher.metric("wshub_messages_dropped_total{reason=\"bus_unavailable\"}") == 12.0
    })
    .await;
    let lost = captured.lines("Redis could not stamp some messages");
    assert_eq!(lost.len(), 1, "{lost:#?}");
    assert!(
        captured
            .lines("the publish script failed part-way")
            .is_empty()
    );
    for (port, stray) in strays {
        assert_eq!(cli(port, &["GET", &stray]), "not a hash");
    }
}
