// Compiled (never run) by types.test.mjs against static/webconnection-websocket.d.ts:
// every line without @ts-expect-error must type-check, every line with it must not.
import {
  WebConnectionWebSocket, BroadcastMessage, Recipient, RecipientType, reconnectPolicy, Reconnect,
  ResumeInfo, GapInfo, TopicKey, buildUrl, topicKeys,
} from "../../../static/webconnection-websocket.js";

const ws = new WebConnectionWebSocket({ minReconnectDelay: 250, policyReconnectDelay: 20_000 });
ws.onCloseHandler = (ev: CloseEvent) => console.log(ev.code, ws.state);
ws.tryConnect(true, "chat", "ann");
const msg: BroadcastMessage = ws.createBroadcastMessage("broadcastchatmessage", "hi");

// Every type the hub accepts (src/message.rs): names, the vendor's aliases,
// other letter cases, and the integers.
msg.addRecipient("chat").addRecipient("chat", "group").addRecipient("bob", "user");
msg.addRecipient("eve", "excludeUser").addRecipient("eve", "allButUser").addRecipient("eve", "allExceptUser");
msg.addRecipient("eve", "excludeuser").addRecipient("eve", "EXCLUDEUSER").addRecipient("eve", "AllExceptUser");
msg.addRecipient("chat", "GROUP").addRecipient("bob", "User").addRecipient("eve", "allbutuser");
msg.addRecipient("eve", 0).addRecipient("chat", 1).addRecipient("bob", 2);
msg.addRecipient(null, "group"); // the sockets that connected without a group
const all: RecipientType[] = ["group", "user", "excludeUser", "allButUser", "allExceptUser", 0, 1, 2];
const untyped: Recipient = { value: "chat" }; // a missing type is group
const nullType: Recipient = { type: null, value: "chat" };

// What the hub refuses is refused here too.
// @ts-expect-error not a recipient type
msg.addRecipient("x", "everyone");
// @ts-expect-error only 0, 1 and 2
msg.addRecipient("x", 3);

// Lossless resume: the option, its handlers and the positions.
const resuming = new WebConnectionWebSocket({ resume: true, storage: null });
resuming.onResumeHandler = (info: ResumeInfo) => {
  const recovered: boolean = info.recovered;
  const replayed: number = info.replayed;
  console.log(recovered, replayed, info.node);
};
resuming.onGapHandler = (info: GapInfo) => console.log(info.topics.join(","), info.positions?.["all"]);
const allAt: string | undefined = resuming.positions.all;
const groupAt: string | undefined = resuming.positions["group:chat"];
const keys: TopicKey[] = topicKeys("chat", "ann");
const resumeUrl: string = buildUrl({ protocol: "https:", host: "h" }, null, "chat", "ann", null, { all: "e1:4" });
// @ts-expect-error positions are read-only
resuming.positions = {};
// @ts-expect-error resume is a boolean
new WebConnectionWebSocket({ resume: "yes" });
// @ts-expect-error not a topic key
const badKey: TopicKey = "group";

const action: "backoff" | "later" | "never" = reconnectPolicy(4003);
const never: typeof Reconnect.NEVER = "never";
ws.send(msg);
ws.close();

// Presence (docs/presence.md).
const present = new WebConnectionWebSocket({ presence: true });
present.onPresenceHandler = (ev) => {
  const who: string[] = ev.members.map((m) => m.userId);
  const kind: "snapshot" | "join" | "leave" = ev.type;
  console.log(who, kind, ev.userId, ev.v, present.members.length);
};
present.onPresenceOffHandler = (text) => {
  const shown: string = text;
  console.log(shown);
};
// @ts-expect-error the handler takes the hub's text
present.onPresenceOffHandler = (n: number) => n;
// @ts-expect-error members is read-only
present.members = [];
// @ts-expect-error presence is a boolean
new WebConnectionWebSocket({ presence: "yes" });

// Both at once: the chat sample's configuration.
const both = new WebConnectionWebSocket({ resume: true, presence: true });
both.onResumeHandler = (info) => console.log(info.recovered, both.members.length);
both.onPresenceHandler = (ev) => console.log(ev.type, both.positions["all"]);
export { all, untyped, nullType, action, never, allAt, groupAt, keys, resumeUrl, badKey };
