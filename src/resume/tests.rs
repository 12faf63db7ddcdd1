//! The resume decision against an in-memory [`History`]: what is replayed,
//! in which order, and when the answer is "not recovered".

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::envelope::Envelope;
use crate::history::{History, HistoryError, HistoryFuture, Position, Read, Stamp};
use crate::metrics::Metrics;
use crate::route::Route;

fn who(user: &str, group: Option<&str>) -> Identity {
    Identity {
        user: user.into(),
        group: group.map(Into::into),
    }
}

fn group(g: &str) -> Topic {
    Topic::Group(Some(g.into()))
}

fn user(u: &str) -> Topic {
    Topic::User(u.into())
}

fn pos(text: &str) -> Position {
    Position::parse(text).unwrap()
}

/// The `message` of a replayed frame (its name in these tests).
fn name_of(frame: &Frame) -> String {
    let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
    v["message"].as_str().unwrap().to_owned()
}

fn names(messages: &[Arc<Envelope>]) -> Vec<String> {
    messages.iter().map(|m| name_of(&m.frame)).collect()
}

/// One topic's history in the double.
struct Log {
    epoch: Arc<str>,
    top: u64,
    /// The last `size` messages, the newest last.
    kept: VecDeque<Arc<Envelope>>,
}

/// A drain handoff's key: the identity.
type HandoffKey = (Arc<str>, Option<Arc<str>>);

/// Runs after every snapshot the double answers (to publish right after).
type Hook = Box<dyn FnMut(&mut State) + Send>;

#[derive(Default)]
struct State {
    logs: HashMap<Topic, Log>,
    seq: u64,
    epochs: u64,
    size: usize,
    handoffs: HashMap<HandoffKey, Vec<Positions>>,
    failing: bool,
    hanging: bool,
    after_read: Option<Hook>,
    reads: usize,
}

impl State {
    fn log(&mut self, topic: &Topic) -> &mut Log {
        if !self.logs.contains_key(topic) {
            self.epochs += 1;
            let epoch: Arc<str> = format!("e{}", self.epochs).into();
            self.logs.insert(
                topic.clone(),
                Log {
                    epoch,
                    top: 0,
                    kept: VecDeque::new(),
                },
            );
        }
        self.logs.get_mut(topic).unwrap()
    }

    /// Publishes `name` to `route`, stamped as the Redis bus would.
    fn publish(&mut self, route: Route, name: &str) -> Arc<Envelope> {
        self.seq += 1;
        let mut positions = Vec::new();
        for topic in route.topics() {
            let log = self.log(topic);
            log.top += 1;
            positions.push((
                topic.clone(),
                Position {
                    epoch: log.epoch.clone(),
                    offset: log.top,
                },
            ));
        }
        let frame = Frame::from(format!(r#"{{"action":"say","message":"{name}"}}"#));
        let stamp = Stamp {
            seq: self.seq,
            positions,
        };
        let envelope = Arc::new(Envelope::stamped(route, frame, Some(stamp)));
        let size = if self.size == 0 { 1000 } else { self.size };
        for topic in envelope.route.topics().to_vec() {
            let log = self.log(&topic);
            log.kept.push_back(envelope.clone());
            while log.kept.len() > size {
                log.kept.pop_front();
            }
        }
        envelope
    }

    fn top(&mut self, topic: &Topic) -> Position {
        let log = self.log(topic);
        Position {
            epoch: log.epoch.clone(),
            offset: log.top,
        }
    }

    fn read(&mut self, topic: &Topic, after: &Position, max: usize) -> Read {
        if after.is_unborn() {
            // As Redis does: the current epoch from its start, and none
            // made.
            let Some(log) = self.logs.get(topic) else {
                return Read::Complete {
                    messages: Vec::new(),
                    top: Position::unborn(),
                    passed: None,
                };
            };
            let start = Position {
                epoch: log.epoch.clone(),
                offset: 0,
            };
            return self.read(topic, &start, max);
        }
        let top = self.top(topic);
        let log = self.log(topic);
        if after.epoch != log.epoch {
            return Read::Incomplete { top };
        }
        if after.offset >= log.top {
            // Nothing after it (or a position ahead of the top, which the
            // decision must refuse itself).
            return Read::Complete {
                messages: Vec::new(),
                top,
                passed: None,
            };
        }
        let missed = (log.top - after.offset) as usize;
        if missed > max || missed > log.kept.len() {
            return Read::Incomplete { top };
        }
        let messages = log.kept.iter().skip(log.kept.len() - missed).cloned();
        Read::Complete {
            messages: messages.collect(),
            top,
            passed: None,
        }
    }
}

/// History in memory, with switches for failing and hanging.
#[derive(Default)]
struct Mem(Mutex<State>);

impl Mem {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn publish(&self, route: Route, name: &str) -> Arc<Envelope> {
        self.state().publish(route, name)
    }

    fn tops_of(&self, who: &Identity) -> [Position; 3] {
        let mut state = self.state();
        topics_of(who).map(|t| state.top(&t))
    }

    /// Ok(value) unless failing; hangs forever when hanging.
    fn answer<'a, T: Send + 'a>(
        &'a self,
        value: impl FnOnce(&mut State) -> T + Send + 'a,
    ) -> HistoryFuture<'a, T> {
        Box::pin(async move {
            let (failing, hanging) = {
                let state = self.state();
                (state.failing, state.hanging)
            };
            if hanging {
                std::future::pending::<()>().await;
            }
            if failing {
                return Err(HistoryError::Unavailable("switched off".into()));
            }
            Ok(value(&mut self.state()))
        })
    }
}

impl History for Mem {
    fn tops<'a>(&'a self, topics: &'a [Topic]) -> HistoryFuture<'a, Vec<Position>> {
        self.answer(move |state| topics.iter().map(|t| state.top(t)).collect())
    }

    fn peek<'a>(&'a self, topics: &'a [Topic]) -> HistoryFuture<'a, Vec<Position>> {
        self.answer(move |state| {
            topics
                .iter()
                .map(|t| match state.logs.get(t) {
                    Some(_) => state.top(t),
                    None => Position::unborn(),
                })
                .collect()
        })
    }

    fn read_many<'a>(
        &'a self,
        from: &'a [(Topic, Position)],
        max: usize,
        max_bytes: usize,
        _reader: Option<&'a str>,
    ) -> HistoryFuture<'a, Vec<Read>> {
        // Under one lock: a snapshot.
        self.answer(move |state| {
            state.reads += 1;
            // As Redis does: the bytes read in all, the frames here.
            let mut bytes = 0usize;
            let reads = from
                .iter()
                .map(|(topic, after)| match state.read(topic, after, max) {
                    Read::Complete {
                        messages,
                        top,
                        passed,
                    } => {
                        bytes += messages.iter().map(|m| m.frame.len()).sum::<usize>();
                        if bytes > max_bytes {
                            Read::TooLarge { top }
                        } else {
                            Read::Complete {
                                messages,
                                top,
                                passed,
                            }
                        }
                    }
                    other => other,
                })
                .collect();
            if let Some(mut hook) = state.after_read.take() {
                hook(state);
                state.after_read = Some(hook);
            }
            reads
        })
    }

    fn handoff_put<'a>(
        &'a self,
        who: &'a Identity,
        positions: &'a Positions,
    ) -> HistoryFuture<'a, ()> {
        self.answer(move |state| {
            let key = (who.user.clone(), who.group.clone());
            state
                .handoffs
                .entry(key)
                .or_default()
                .push(positions.clone());
        })
    }

    fn handoff_take<'a>(&'a self, who: &'a Identity) -> HistoryFuture<'a, Option<Positions>> {
        self.answer(move |state| {
            let key = (who.user.clone(), who.group.clone());
            // As Redis does: the newest is taken, from the earliest stored.
            let list = state.handoffs.get_mut(&key)?;
            let taken = list.pop()?;
            Some(crate::history::earliest(taken, list))
        })
    }
}

fn resumer(mem: &Arc<Mem>, max_replay: usize) -> (Resumer, Arc<Metrics>) {
    resumer_bytes(mem, max_replay, usize::MAX)
}

fn resumer_bytes(
    mem: &Arc<Mem>,
    max_replay: usize,
    max_replay_bytes: usize,
) -> (Resumer, Arc<Metrics>) {
    resumer_bounds(
        mem,
        Bounds {
            max_replay,
            max_replay_bytes,
            replay_budget_bytes: 0,
        },
    )
}

fn resumer_bounds(mem: &Arc<Mem>, bounds: Bounds) -> (Resumer, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let resumer = Resumer::new(
        mem.clone(),
        bounds,
        true,
        Duration::from_secs(2),
        "n2".into(),
        metrics.clone(),
    );
    (resumer, metrics)
}

/// Reads every topic of `who` after `from` in one round, as the decision
/// does, from the double.
fn decide_now(
    mem: &Mem,
    from: &[Position; 3],
    who: &Identity,
    max_replay: usize,
) -> Result<(Vec<Arc<Envelope>>, [Position; 3]), NotRecovered> {
    let topics = topics_of(who);
    let mut state = mem.state();
    let reads = [0, 1, 2].map(|i| state.read(&topics[i], &from[i], max_replay));
    drop(state);
    decide(from, reads, who, max_replay)
}

fn to(topics: &[Topic]) -> Route {
    Route::from_parts(topics.to_vec(), Vec::new())
}

// ---- The pure decision ----------------------------------------------------

#[test]
fn a_group_and_user_message_is_replayed_once_through_its_first_topic() {
    let mem = Mem::default();
    let (ann, bob) = (who("ann", Some("chat")), who("bob", Some("chat")));
    let (ann_from, bob_from) = (mem.tops_of(&ann), mem.tops_of(&bob));
    mem.publish(to(&[group("chat"), user("ann")]), "both");
    mem.publish(to(&[user("ann"), group("chat")]), "user-first");
    let (replay, reached) = decide_now(&mem, &ann_from, &ann, 100).unwrap();
    assert_eq!(names(&replay), ["both", "user-first"], "each once");
    assert_eq!(reached, mem.tops_of(&ann));
    let (replay, _) = decide_now(&mem, &bob_from, &bob, 100).unwrap();
    assert_eq!(names(&replay), ["both", "user-first"]);
    // Ann received "both" (its `pos` moved her group and user positions
    // on) but not "user-first": read again from there, it is in both
    // topics, and she accepts it through her user topic only.
    let mut from = mem.tops_of(&ann);
    from[1].offset -= 1;
    from[2].offset -= 1;
    let (replay, _) = decide_now(&mem, &from, &ann, 100).unwrap();
    assert_eq!(names(&replay), ["user-first"]);
}

#[test]
fn the_replay_is_in_publish_order_across_topics_and_exclusions_hold() {
    let mem = Mem::default();
    let ann = who("ann", Some("chat"));
    let from = mem.tops_of(&ann);
    mem.publish(Route::everyone(), "1-all");
    mem.publish(to(&[user("ann")]), "2-user");
    mem.publish(to(&[group("chat")]), "3-group");
    mem.publish(
        Route::from_parts(vec![Topic::All], vec!["ann".into()]),
        "4-not-ann",
    );
    mem.publish(to(&[group("other")]), "5-other");
    mem.publish(Route::everyone(), "6-all");
    mem.publish(to(&[user("ann")]), "7-user");
    let (replay, reached) = decide_now(&mem, &from, &ann, 100).unwrap();
    assert_eq!(
        names(&replay),
        ["1-all", "2-user", "3-group", "6-all", "7-user"]
    );
    assert_eq!(
        reached,
        mem.tops_of(&ann),
        "floors cover the excluded one too"
    );
}

#[test]
fn more_than_max_replay_is_not_recovered_and_exactly_max_is() {
    let mem = Mem::default();
    let ann = who("ann", None);
    let from = mem.tops_of(&ann);
    for i in 0..3 {
        mem.publish(Route::everyone(), &format!("m{i}"));
    }
    assert_eq!(decide_now(&mem, &from, &ann, 3).unwrap().0.len(), 3);
    // Spread over two topics, each under the limit, together over it.
    mem.publish(to(&[user("ann")]), "u");
    let topics = topics_of(&ann);
    let mut state = mem.state();
    let reads = [0, 1, 2].map(|i| state.read(&topics[i], &from[i], 3));
    drop(state);
    assert!(matches!(
        decide(&from, reads, &ann, 3),
        Err(NotRecovered::TooMany { count: 4, max: 3 })
    ));
}

/// Review of issue 14, item 6: `max_replay` counts the messages the socket
/// accepts, not the entries of its topics. Four to replay and three to the
/// group that exclude ann: recovered with `max_replay` 5 (and 4).
#[tokio::test]
async fn max_replay_counts_only_what_the_socket_accepts() {
    let mem = Arc::new(Mem::default());
    let ann = who("ann", Some("chat"));
    let from = mem.tops_of(&ann);
    for i in 0..4 {
        mem.publish(to(&[group("chat")]), &format!("g{i}"));
    }
    for i in 0..3 {
        let not_ann = Route::from_parts(vec![group("chat")], vec!["ann".into()]);
        mem.publish(not_ann, &format!("x{i}"));
    }
    for max_replay in [5, 4] {
        let (resumer, _) = resumer(&mem, max_replay);
        let outcome = resumer.start(&ann, &request(&ann, &from)).await;
        assert_eq!(
            welcome_of(&outcome.frames[0])["recovered"],
            true,
            "max_replay {max_replay}"
        );
        assert_eq!(
            names_of_frames(&outcome.frames[1..]),
            ["g0", "g1", "g2", "g3"]
        );
    }
    let (resumer, _) = resumer(&mem, 3);
    let outcome = resumer.start(&ann, &request(&ann, &from)).await;
    assert_eq!(welcome_of(&outcome.frames[0])["recovered"], false, "4 > 3");
}

#[test]
fn trimmed_or_renewed_history_is_not_recovered() {
    let mem = Mem::default();
    mem.state().size = 2;
    let ann = who("ann", None);
    let from = mem.tops_of(&ann);
    for i in 0..3 {
        mem.publish(Route::everyone(), &format!("m{i}"));
    }
    assert!(matches!(
        decide_now(&mem, &from, &ann, 100),
        Err(NotRecovered::Incomplete(key)) if key == "all"
    ));
    let mut renewed = mem.tops_of(&ann);
    renewed[0].epoch = "old".into();
    assert!(matches!(
        decide_now(&mem, &renewed, &ann, 100),
        Err(NotRecovered::Incomplete(_))
    ));
}

#[test]
fn a_read_that_does_not_follow_the_position_is_never_replayed() {
    let mem = Mem::default();
    let ann = who("ann", None);
    let from = mem.tops_of(&ann);
    let first = mem.publish(Route::everyone(), "m1");
    let second = mem.publish(Route::everyone(), "m2");
    let tops = mem.tops_of(&ann);
    let empty = |i: usize| Read::Complete {
        messages: Vec::new(),
        top: tops[i].clone(),
        passed: None,
    };
    let with = |messages: Vec<Arc<Envelope>>, top: Position| {
        [
            Read::Complete {
                messages,
                top,
                passed: None,
            },
            empty(1),
            empty(2),
        ]
    };
    // The last message missing.
    let short = with(vec![first.clone()], tops[0].clone());
    assert!(matches!(
        decide(&from, short, &ann, 100),
        Err(NotRecovered::Inconsistent(_))
    ));
    // A missing offset.
    let gap = with(vec![second.clone()], tops[0].clone());
    assert!(matches!(
        decide(&from, gap, &ann, 100),
        Err(NotRecovered::Inconsistent(_))
    ));
    // Out of order.
    let swapped = with(vec![second.clone(), first.clone()], tops[0].clone());
    assert!(matches!(
        decide(&from, swapped, &ann, 100),
        Err(NotRecovered::Inconsistent(_))
    ));
    // A top of another epoch.
    let other = with(vec![first.clone(), second.clone()], pos("zz:2"));
    assert!(matches!(
        decide(&from, other, &ann, 100),
        Err(NotRecovered::Inconsistent(_))
    ));
    // A message without its stamp.
    let bare = Arc::new(Envelope::new(Route::everyone(), first.frame.clone()));
    let unstamped = with(vec![bare, second.clone()], tops[0].clone());
    assert!(matches!(
        decide(&from, unstamped, &ann, 100),
        Err(NotRecovered::Inconsistent(_))
    ));
    // A position ahead of the topic (forged, or history restarted under
    // the same epoch): nothing to replay would be a lie.
    let mut ahead = tops.clone();
    ahead[0].offset += 5;
    assert!(matches!(
        decide_now(&mem, &ahead, &ann, 100),
        Err(NotRecovered::Inconsistent(_))
    ));
    // And the honest read is recovered.
    let honest = with(vec![first, second], tops[0].clone());
    assert_eq!(
        names(&decide(&from, honest, &ann, 100).unwrap().0),
        ["m1", "m2"]
    );
}

/// A read that history started past the position given, over a run of
/// messages that all excluded the socket's user (`Read::Complete::passed`),
/// follows the run's end; a run that would go back, past the top or into
/// another epoch is never taken.
#[test]
fn a_read_past_an_excluded_run_follows_the_runs_end() {
    let mem = Mem::default();
    let ann = who("ann", None);
    mem.publish(Route::everyone(), "m0");
    let from = mem.tops_of(&ann);
    assert_eq!(from[0].offset, 1);
    let not_ann = || Route::from_parts(vec![Topic::All], vec!["ann".into()]);
    mem.publish(not_ann(), "x1");
    let x2 = mem.publish(not_ann(), "x2");
    let m3 = mem.publish(Route::everyone(), "m3");
    let tops = mem.tops_of(&ann);
    let run_end = x2.stamp.as_ref().unwrap().position(&Topic::All).unwrap();
    let read = |passed: Option<Position>, messages: Vec<Arc<Envelope>>| {
        let empty = |i: usize| Read::Complete {
            messages: Vec::new(),
            top: tops[i].clone(),
            passed: None,
        };
        [
            Read::Complete {
                messages,
                top: tops[0].clone(),
                passed,
            },
            empty(1),
            empty(2),
        ]
    };
    let (replay, reached) = decide(
        &from,
        read(Some(run_end.clone()), vec![m3.clone()]),
        &ann,
        100,
    )
    .expect("recovered past the run");
    assert_eq!(names(&replay), ["m3"]);
    assert_eq!(reached, tops);
    // Without the run, the same messages do not follow the position.
    assert!(matches!(
        decide(&from, read(None, vec![m3.clone()]), &ann, 100),
        Err(NotRecovered::Inconsistent(_))
    ));
    let refused = [
        // Behind the position given.
        Position {
            epoch: from[0].epoch.clone(),
            offset: from[0].offset - 1,
        },
        // Another epoch.
        Position {
            epoch: "zz".into(),
            offset: run_end.offset,
        },
        // Past the top.
        Position {
            epoch: run_end.epoch.clone(),
            offset: tops[0].offset + 1,
        },
        // Short of the message before the one read.
        Position {
            epoch: run_end.epoch.clone(),
            offset: run_end.offset - 1,
        },
    ];
    for passed in refused {
        assert!(
            matches!(
                decide(
                    &from,
                    read(Some(passed.clone()), vec![m3.clone()]),
                    &ann,
                    100
                ),
                Err(NotRecovered::Inconsistent(_))
            ),
            "{passed}"
        );
    }
}

// ---- Floors -----------------------------------------------------------------

fn mark(slot: usize, text: &str) -> Mark {
    Mark::new(slot, pos(text))
}

#[test]
fn floors_drop_what_was_written_and_rise_with_what_is() {
    let mut floors = Floors::new([Some(pos("a:5")), Some(pos("g:2")), None], true);
    assert!(!floors.admit(Some(&mark(0, "a:4"))), "below the floor");
    assert!(!floors.admit(Some(&mark(0, "a:5"))), "at the floor");
    assert!(floors.admit(Some(&mark(0, "a:6"))));
    assert!(!floors.admit(Some(&mark(0, "a:6"))), "the floor rose");
    assert!(
        floors.admit(Some(&mark(1, "h:1"))),
        "a new epoch starts again"
    );
    assert!(floors.admit(Some(&mark(1, "h:2"))));
    assert!(floors.admit(Some(&mark(2, "u:1"))), "no floor yet");
    assert!(floors.admit(None), "unmarked frames always pass");
    assert_eq!(
        floors.positions(),
        &[Some(pos("a:6")), Some(pos("h:2")), Some(pos("u:1"))]
    );
}

#[test]
fn floors_adopt_the_epoch_allocation_of_what_they_admit() {
    // Issue 19: the subscriber gives one topic's copies one epoch
    // allocation; a floor read elsewhere (the welcome's tops) takes it
    // over, so later copies compare by address.
    let mut floors = Floors::new([Some(pos("a:5")), None, None], true);
    let shared = mark(0, "a:6");
    assert!(floors.admit(Some(&shared)));
    let floor = floors.positions()[0].clone().unwrap();
    assert!(std::sync::Arc::ptr_eq(
        &floor.epoch,
        &shared.position().epoch
    ));
    let next = Mark::new(
        0,
        Position {
            epoch: shared.position().epoch.clone(),
            offset: 7,
        },
    );
    assert!(floors.admit(Some(&next)));
    assert!(!floors.admit(Some(&next)), "the floor rose");
    assert_eq!(floors.positions()[0], Some(pos("a:7")));
}

#[test]
fn a_legacy_sockets_floors_never_drop_and_never_go_down() {
    let mut floors = Floors::new([Some(pos("a:5")), None, None], false);
    assert!(
        floors.admit(Some(&mark(0, "a:4"))),
        "today's behaviour: written"
    );
    assert_eq!(
        floors.positions()[0],
        Some(pos("a:5")),
        "but the floor stays"
    );
    assert!(floors.admit(Some(&mark(0, "a:7"))));
    assert_eq!(floors.positions()[0], Some(pos("a:7")));
}

// ---- The decision with history ---------------------------------------------

fn parse(frame: &Frame) -> serde_json::Value {
    serde_json::from_str(frame.as_str()).unwrap()
}

fn welcome_of(frame: &Frame) -> serde_json::Value {
    let v = parse(frame);
    assert_eq!(v["action"], ACTION_WELCOME);
    serde_json::from_str(v["message"].as_str().unwrap()).unwrap()
}

fn positions_json(who: &Identity, positions: &[Position; 3]) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (topic, p) in topics_of(who).iter().zip(positions) {
        map.insert(client_key(topic), p.to_string().into());
    }
    map.into()
}

fn request(who: &Identity, positions: &[Position; 3]) -> Request {
    Request::from_parameter(Some(&positions_json(who, positions).to_string()), who)
}

#[test]
fn the_welcome_has_the_contracts_shape() {
    let ann = who("ann", Some("chat"));
    let positions = [Some(pos("k3:41")), Some(pos("p7:17")), Some(pos("q2:5"))];
    assert_eq!(
        welcome_frame(&ann, true, 12, &positions, "n2").as_str(),
        r#"{"userId":"ann","groupId":"chat","action":"wshub.welcome","message":"{\"recovered\":true,\"replayed\":12,\"positions\":{\"all\":\"k3:41\",\"group:chat\":\"p7:17\",\"user:ann\":\"q2:5\"},\"node\":\"n2\"}","recipients":[]}"#
    );
    assert_eq!(
        gap_frame(&group("chat"), None).as_str(),
        r#"{"userId":null,"groupId":null,"action":"wshub.gap","message":"{\"topics\":[\"group:chat\"]}","recipients":[]}"#
    );
    // With where the topic goes on from, under the same client key.
    assert_eq!(
        gap_frame(&group("chat"), Some(&pos("p8:0"))).as_str(),
        r#"{"userId":null,"groupId":null,"action":"wshub.gap","message":"{\"topics\":[\"group:chat\"],\"positions\":{\"group:chat\":\"p8:0\"}}","recipients":[]}"#
    );
}

/// `history.max_replay_bytes`: a read that goes beyond it is not
/// recovered (and counted so), one within it is; 0 is no bound.
#[tokio::test]
async fn a_read_beyond_max_replay_bytes_is_not_recovered() {
    let mem = Arc::new(Mem::default());
    let ann = who("ann", None);
    let from = mem.tops_of(&ann);
    for name in ["one", "two"] {
        mem.publish(Route::everyone(), name);
    }
    // Each frame is `{"action":"say","message":"<name>"}`.
    let frame = mem.state().logs[&Topic::All].kept[0].frame.len();
    let (resumer, metrics) = resumer_bytes(&mem, 100, 2 * frame - 1);
    let outcome = resumer.start(&ann, &request(&ann, &from)).await;
    assert_eq!(welcome_of(&outcome.frames[0])["recovered"], false);
    assert_eq!(outcome.frames.len(), 1, "nothing replayed");
    assert!(
        metrics
            .render()
            .contains(r#"wshub_resume_total{result="not_recovered"} 1"#)
    );
    // Exactly the bytes read, and 0 (the default: no bound).
    for max_replay_bytes in [2 * frame, 0] {
        let (resumer, _) = resumer_bytes(&mem, 100, max_replay_bytes);
        let outcome = resumer.start(&ann, &request(&ann, &from)).await;
        assert_eq!(welcome_of(&outcome.frames[0])["recovered"], true);
        assert_eq!(names_of_frames(&outcome.frames[1..]), ["one", "two"]);
    }
}

/// `history.replay_budget_bytes`: a recovered replay holds its share of
/// the node's budget until its outcome (the session's backlog) is dropped;
/// a resume that finds no room within the call limit is not recovered, one
/// bigger than the whole budget at once; once a share is given back the
/// next one fits.
#[tokio::test(start_paused = true)]
async fn replays_share_the_nodes_replay_budget() {
    let mem = Arc::new(Mem::default());
    let ann = who("ann", None);
    let from = mem.tops_of(&ann);
    let big = "x".repeat(3000);
    for _ in 0..2 {
        mem.publish(Route::everyone(), &big);
    }
    // Two frames of about 3 KiB: 6 KiB of replay; room for one and a half.
    let budget = |replay_budget_bytes| {
        resumer_bounds(
            &mem,
            Bounds {
                max_replay: 100,
                max_replay_bytes: 0,
                replay_budget_bytes,
            },
        )
        .0
    };
    let resumer = budget(9 * 1024);
    let first = resumer.start(&ann, &request(&ann, &from)).await;
    assert_eq!(welcome_of(&first.frames[0])["recovered"], true);
    assert!(first.budget.is_some(), "the replay holds its share");
    let waited = tokio::time::Instant::now();
    let second = resumer.start(&ann, &request(&ann, &from)).await;
    assert_eq!(welcome_of(&second.frames[0])["recovered"], false);
    assert_eq!(second.frames.len(), 1, "nothing replayed");
    assert_eq!(
        waited.elapsed(),
        Duration::from_secs(2),
        "waited the call limit"
    );
    drop(first);
    let third = resumer.start(&ann, &request(&ann, &from)).await;
    assert_eq!(welcome_of(&third.frames[0])["recovered"], true);
    assert_eq!(third.frames.len(), 3);
    // Bigger than the whole budget: not recovered, without waiting.
    let small = budget(4 * 1024);
    let waited = tokio::time::Instant::now();
    let outcome = small.start(&ann, &request(&ann, &from)).await;
    assert_eq!(welcome_of(&outcome.frames[0])["recovered"], false);
    assert_eq!(waited.elapsed(), Duration::ZERO);
    // No replay (nothing missed) takes no share; 0 is no budget.
    let tops = mem.tops_of(&ann);
    let quiet = resumer.start(&ann, &request(&ann, &tops)).await;
    assert!(quiet.budget.is_none());
    let unbounded = budget(0).start(&ann, &request(&ann, &from)).await;
    assert!(unbounded.budget.is_none());
    assert_eq!(welcome_of(&unbounded.frames[0])["recovered"], true);
}

/// A replay that fits the budget's room is not held up behind a waiting
/// one that does not fit (the semaphore queues fairly).
#[tokio::test(start_paused = true)]
async fn a_replay_that_fits_does_not_wait_behind_one_that_does_not() {
    let mem = Arc::new(Mem::default());
    let (ann, bob) = (who("ann", None), who("bob", None));
    let (ann_from, bob_from) = (mem.tops_of(&ann), mem.tops_of(&bob));
    let big = "x".repeat(3000);
    for _ in 0..2 {
        mem.publish(to(&[Topic::User("ann".into())]), &big);
    }
    mem.publish(to(&[Topic::User("bob".into())]), "small");
    let resumer = Arc::new(
        resumer_bounds(
            &mem,
            Bounds {
                max_replay: 100,
                max_replay_bytes: 0,
                replay_budget_bytes: 9 * 1024,
            },
        )
        .0,
    );
    // Ann's replay (about 6 KiB) holds its share; a second one waits.
    let first = resumer.start(&ann, &request(&ann, &ann_from)).await;
    assert!(first.budget.is_some());
    let waiting = tokio::spawn({
        let (resumer, ann) = (resumer.clone(), ann.clone());
        async move { resumer.start(&ann, &request(&ann, &ann_from)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "no room for a second 6 KiB");
    // Bob's 1 KiB fits the room left: recovered at once.
    let asked = tokio::time::Instant::now();
    let small = resumer.start(&bob, &request(&bob, &bob_from)).await;
    assert_eq!(asked.elapsed(), Duration::ZERO, "did not wait");
    assert_eq!(welcome_of(&small.frames[0])["recovered"], true);
    assert_eq!(names_of_frames(&small.frames[1..]), ["small"]);
    // The waiting one still gets its share once Ann's first is given back.
    drop(first);
    let second = waiting.await.unwrap();
    assert_eq!(welcome_of(&second.frames[0])["recovered"], true);
}

#[tokio::test]
async fn a_fresh_socket_is_welcomed_at_the_tops() {
    let mem = Arc::new(Mem::default());
    mem.publish(Route::everyone(), "old");
    let (resumer, metrics) = resumer(&mem, 100);
    let ann = who("ann", None);
    let outcome = resumer
        .start(&ann, &Request::from_parameter(Some(""), &ann))
        .await;
    assert_eq!(outcome.frames.len(), 1, "the welcome only");
    let welcome = welcome_of(&outcome.frames[0]);
    let tops = mem.tops_of(&ann);
    assert_eq!(welcome["recovered"], false);
    assert_eq!(welcome["replayed"], 0);
    assert_eq!(welcome["positions"], positions_json(&ann, &tops));
    assert_eq!(welcome["node"], "n2");
    assert_eq!(outcome.floors, Floors::new(tops.map(Some), true));
    assert_eq!(outcome.report.result, Some(ResumeResult::Fresh));
    assert_eq!(outcome.report.header(), "not_recovered");
    assert!(
        metrics
            .render()
            .contains(r#"wshub_resume_total{result="fresh"} 1"#)
    );
}

#[tokio::test]
async fn a_socket_that_missed_messages_is_replayed_them_with_pos() {
    let mem = Arc::new(Mem::default());
    let (resumer, metrics) = resumer(&mem, 100);
    let ann = who("ann", Some("chat"));
    let from = mem.tops_of(&ann);
    mem.publish(Route::everyone(), "m1");
    mem.publish(to(&[group("chat"), user("ann")]), "m2");
    let outcome = resumer.start(&ann, &request(&ann, &from)).await;
    let welcome = welcome_of(&outcome.frames[0]);
    assert_eq!(welcome["recovered"], true);
    assert_eq!(welcome["replayed"], 2);
    assert_eq!(
        welcome["positions"],
        positions_json(&ann, &from),
        "the positions the client sent"
    );
    let replayed: Vec<_> = outcome.frames[1..].iter().map(parse).collect();
    assert_eq!(replayed.len(), 2);
    assert_eq!(replayed[0]["message"], "m1");
    assert_eq!(replayed[1]["message"], "m2");
    assert!(
        replayed[1]["pos"]["group:chat"].is_string() && replayed[1]["pos"]["user:ann"].is_string(),
        "pos names every topic of the route: {}",
        replayed[1]
    );
    assert_eq!(
        outcome.floors,
        Floors::new(mem.tops_of(&ann).map(Some), true)
    );
    assert_eq!(outcome.report.header(), "recovered");
    assert_eq!(
        outcome.report.message(),
        r#"{"recovered":true,"replayed":2}"#
    );
    let text = metrics.render();
    assert!(text.contains(r#"wshub_resume_total{result="recovered"} 1"#));
    assert!(text.contains("wshub_resume_replayed_sum 2"), "{text}");
}

#[tokio::test]
async fn unreadable_missing_or_forged_positions_are_not_recovered() {
    let mem = Arc::new(Mem::default());
    let (resumer, metrics) = resumer(&mem, 100);
    let ann = who("ann", None);
    let tops = mem.tops_of(&ann);
    mem.publish(Route::everyone(), "m1");
    let now = mem.tops_of(&ann);
    let only_all = serde_json::json!({ "all": tops[0].to_string() }).to_string();
    let forged = serde_json::json!({
        "all": tops[0].to_string(), "nullgroup": tops[1].to_string(), "user:ann": tops[2].to_string(),
        "user:bob": "x:1", "group:secret": "y:0"
    })
    .to_string();
    for (value, recovered) in [
        ("not json", false),
        (r#"{"all":"garbage"}"#, false),
        (only_all.as_str(), false),
        (forged.as_str(), true),
    ] {
        let outcome = resumer
            .start(&ann, &Request::from_parameter(Some(value), &ann))
            .await;
        let welcome = welcome_of(&outcome.frames[0]);
        assert_eq!(welcome["recovered"], recovered, "{value}");
        if recovered {
            assert_eq!(
                names_of_frames(&outcome.frames[1..]),
                ["m1"],
                "other keys ignored"
            );
        } else {
            assert_eq!(outcome.frames.len(), 1, "nothing replayed for {value}");
            assert_eq!(welcome["replayed"], 0);
            assert_eq!(welcome["positions"], positions_json(&ann, &now));
        }
    }
    assert!(
        metrics
            .render()
            .contains(r#"wshub_resume_total{result="not_recovered"} 3"#)
    );
}

fn names_of_frames(frames: &[Frame]) -> Vec<String> {
    frames.iter().map(name_of).collect()
}

/// History unreadable: no welcome without positions (the contract's
/// not-recovered welcome names the tops); the socket is to be closed.
#[tokio::test(start_paused = true)]
async fn failing_history_closes_the_socket_without_a_welcome() {
    let mem = Arc::new(Mem::default());
    let (resumer, _) = resumer(&mem, 100);
    let ann = who("ann", None);
    let from = mem.tops_of(&ann);
    mem.publish(Route::everyone(), "m1");
    mem.state().failing = true;
    for request in [request(&ann, &from), Request::Fresh] {
        let outcome = resumer.start(&ann, &request).await;
        assert!(outcome.unreadable, "{outcome:?}");
        assert!(outcome.frames.is_empty(), "no welcome: {outcome:?}");
        assert_eq!(outcome.report.header(), "not_recovered");
    }
    // A legacy socket has no welcome: it starts as today.
    let outcome = resumer.start(&ann, &Request::Legacy).await;
    assert!(!outcome.unreadable);
}

/// History failing for a moment (a shard failing over): the read is
/// tried again, and the welcome names the tops.
#[tokio::test(start_paused = true)]
async fn history_failing_for_a_moment_is_read_again_for_the_welcome() {
    let mem = Arc::new(Mem::default());
    let (resumer, _) = resumer(&mem, 100);
    let ann = who("ann", None);
    let from = mem.tops_of(&ann);
    mem.publish(Route::everyone(), "m1");
    mem.state().failing = true;
    let heal = {
        let mem = mem.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            mem.state().failing = false;
        })
    };
    let outcome = resumer.start(&ann, &request(&ann, &from)).await;
    heal.await.unwrap();
    assert!(!outcome.unreadable);
    let welcome = welcome_of(&outcome.frames[0]);
    assert_eq!(welcome["recovered"], false);
    assert_eq!(
        welcome["positions"].as_object().map(|p| p.len()),
        Some(3),
        "{welcome}"
    );
}

#[tokio::test(start_paused = true)]
async fn hanging_history_is_not_recovered_within_its_limits() {
    let mem = Arc::new(Mem::default());
    let (resumer, _) = resumer(&mem, 100);
    let ann = who("ann", None);
    let from = mem.tops_of(&ann);
    mem.state().hanging = true;
    let started = tokio::time::Instant::now();
    let outcome = resumer.start(&ann, &request(&ann, &from)).await;
    assert!(
        outcome.unreadable && outcome.frames.is_empty(),
        "{outcome:?}"
    );
    // Each call is bounded (2 s here): the reads, then the tops (tried
    // again within the one limit).
    assert!(
        started.elapsed() <= Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let outcome = resumer.start(&ann, &Request::Legacy).await;
    assert!(outcome.frames.is_empty());
    assert_eq!(outcome.report.header(), "none");
}

/// Topics that grow after every read (a steady stream) are recovered from
/// one snapshot, read once: the replay is everything up to it, in publish
/// order, and the floors are its tops, so that every later message (above
/// them) is let through live and none of the replayed ones twice.
#[tokio::test]
async fn topics_that_keep_growing_are_recovered_from_one_snapshot() {
    let mem = Arc::new(Mem::default());
    let (resumer, _) = resumer(&mem, 1000);
    let ann = who("ann", Some("chat"));
    let from = mem.tops_of(&ann);
    mem.publish(Route::everyone(), "1-all");
    mem.publish(to(&[group("chat")]), "2-group");
    mem.publish(Route::everyone(), "3-all");
    mem.state().after_read = Some(Box::new(|state| {
        state.publish(Route::everyone(), "later-all");
        state.publish(to(&[group("chat")]), "later-group");
    }));
    let snapshot = mem.tops_of(&ann);
    let outcome = resumer.start(&ann, &request(&ann, &from)).await;
    let welcome = welcome_of(&outcome.frames[0]);
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(
        names_of_frames(&outcome.frames[1..]),
        ["1-all", "2-group", "3-all"]
    );
    assert_eq!(outcome.floors, Floors::new(snapshot.map(Some), true));
    assert_eq!(mem.state().reads, 1, "read once");
    // What was published after the snapshot (to `all` and the group) is
    // above the floors.
    let mut floors = outcome.floors;
    let [all, chat, _] = mem.tops_of(&ann);
    assert!(floors.admit(Some(&Mark::new(0, all))));
    assert!(floors.admit(Some(&Mark::new(1, chat))));
}

#[tokio::test]
async fn a_legacy_socket_takes_over_its_handoff_without_welcome_or_pos() {
    let mem = Arc::new(Mem::default());
    let (resumer, metrics) = resumer(&mem, 100);
    let ann = who("ann", Some("chat"));
    mem.publish(to(&[group("chat")]), "before");
    // No handoff: today's socket, floors from the tops, nothing dropped;
    // topics without history yet are unborn, and none is made.
    let outcome = resumer.start(&ann, &Request::Legacy).await;
    assert!(outcome.frames.is_empty());
    let unborn = Some(Position::unborn());
    let chat_top = Some(mem.state().top(&group("chat")));
    assert_eq!(
        outcome.floors,
        Floors::new([unborn.clone(), chat_top, unborn.clone()], false)
    );
    assert_eq!(mem.state().logs.len(), 1, "no epoch made");
    assert_eq!(
        outcome.report,
        Report {
            result: None,
            replayed: 0
        }
    );
    assert_eq!(outcome.report.header(), "none");
    assert_eq!(
        outcome.report.message(),
        r#"{"recovered":false,"replayed":0}"#
    );
    // A drained socket stores its floors; the next one is replayed, the
    // topics that had no epoch from the start of the one they have now.
    resumer.hand_off(&ann, outcome.floors.positions()).await;
    mem.publish(to(&[group("chat")]), "missed");
    mem.publish(to(&[user("ann")]), "to ann");
    let outcome = resumer.start(&ann, &Request::Legacy).await;
    assert_eq!(
        names_of_frames(&outcome.frames),
        ["missed", "to ann"],
        "no welcome"
    );
    assert_eq!(
        outcome.frames[0].as_str(),
        r#"{"action":"say","message":"missed"}"#,
        "no pos"
    );
    let [_, chat, ann_top] = mem.tops_of(&ann);
    assert_eq!(
        outcome.floors,
        Floors::new([unborn, Some(chat), Some(ann_top)], true),
        "everyone still has no epoch"
    );
    assert_eq!(outcome.report.header(), "recovered");
    // Taken once.
    assert_eq!(
        resumer.start(&ann, &Request::Legacy).await.report.header(),
        "none"
    );
    let text = metrics.render();
    assert!(
        text.contains(r#"wshub_drain_handoffs_total{result="stored"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"wshub_resume_total{result="recovered"} 1"#));
}

/// A socket whose user id the hub made up never reads history, takes a
/// handoff or stores one (review of issue 14, item 5).
#[tokio::test]
async fn an_anonymous_socket_touches_no_history() {
    let mem = Arc::new(Mem::default());
    let (resumer, metrics) = resumer(&mem, 100);
    let anon = who("0123456789ab", Some("chat"));
    resumer.hand_off(&anon, &mem.tops_of(&anon).map(Some)).await;
    mem.state().logs.clear();
    let outcome = resumer.start(&anon, &Request::Anonymous).await;
    assert!(outcome.frames.is_empty());
    assert_eq!(outcome.floors, Floors::default(), "nothing to hand off");
    assert_eq!(outcome.report.header(), "none");
    assert!(mem.state().logs.is_empty(), "nothing read");
    assert_eq!(
        mem.state().handoffs.values().map(Vec::len).sum::<usize>(),
        1,
        "nothing taken"
    );
    resumer.hand_off(&anon, outcome.floors.positions()).await;
    assert!(
        metrics
            .render()
            .contains(r#"wshub_drain_handoffs_total{result="stored"} 1"#),
        "nothing stored"
    );
}

#[tokio::test]
async fn a_failed_handoff_is_counted() {
    let mem = Arc::new(Mem::default());
    let (resumer, metrics) = resumer(&mem, 100);
    let ann = who("ann", None);
    mem.state().failing = true;
    let floors = mem.tops_of(&ann).map(Some);
    resumer.hand_off(&ann, &floors).await;
    // Without a position in every topic there is nothing to store.
    resumer.hand_off(&ann, &Default::default()).await;
    assert!(
        metrics
            .render()
            .contains(r#"wshub_drain_handoffs_total{result="failed"} 1"#)
    );
}

#[test]
fn requests_from_the_parameter() {
    let ann = who("ann", None);
    assert_eq!(Request::from_parameter(None, &ann), Request::Legacy);
    assert!(!Request::Legacy.speaks_resume());
    assert!(!Request::Anonymous.speaks_resume());
    assert_eq!(Request::Legacy.with_generated_user_id(), Request::Anonymous);
    assert_eq!(Request::Fresh.with_generated_user_id(), Request::Fresh);
    assert_eq!(Request::from_parameter(Some(""), &ann), Request::Fresh);
    assert_eq!(
        Request::from_parameter(Some("{"), &ann),
        Request::Unreadable
    );
    assert!(Request::Unreadable.speaks_resume());
    assert_eq!(
        Request::from_parameter(Some(r#"{"all":"e:1"}"#), &ann),
        Request::Positions([Some(pos("e:1")), None, None])
    );
}
