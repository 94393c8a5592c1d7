// @ts-check
/**
 * The chat room: one page per person, all talking through the broker.
 *
 * Messages go to `chat.<room>.messages`. Who is here comes from the broker's presence on
 * `chat.<room>.presence` (config/chat.toml says `presence = true`): each tab subscribes to it
 * exactly, which makes it a member showing `info: {name, id}`, with `joinLeave` to hear who
 * comes and goes, and reads the members once (again after a reconnect, or when the broker
 * dropped some join or leave events for it). The broker keeps the list: a tab that is closed,
 * crashes or loses its network leaves everyone's list when its connection ends, without
 * sending anything.
 * When the room's messages topic keeps history (config/chat.toml), joining fills the view with
 * what it kept, and a reconnect gets what was missed, or says that some is missing.
 *
 * The page takes `?broker=ws://host:port/` (default: port 8765 on the page's host) and
 * `?token=...` when the broker wants one.
 */
import { Client, PubSubError } from "../../clients/js/src/client.js";

/** @typedef {import("../../clients/js/src/client.js").Message} Message */

/** A room name is one topic segment; we allow a friendly subset of what topics allow. */
const ROOM_NAME = /^[\p{L}\p{N}_-]{1,64}$/u;

const params = new URLSearchParams(location.search);
const scheme = location.protocol === "https:" ? "wss" : "ws";
const brokerUrl = params.get("broker") ?? `${scheme}://${location.hostname || "127.0.0.1"}:8765/`;
const me = { id: Math.random().toString(36).slice(2, 10), name: "" };

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const field = (/** @type {string} */ id) => /** @type {HTMLInputElement} */ ($(id));

const status = $("status");
const client = new Client(brokerUrl, {
  token: params.get("token") ?? undefined,
  onState(state) {
    status.dataset.state = state;
    status.textContent = {
      connecting: "connecting…",
      connected: "connected",
      // A refused token or Origin looks the same to a page as a broker that is down.
      disconnected: `cannot reach ${brokerUrl} (down, or refusing this page's token or origin); retrying…`,
      closed: "closed",
    }[state];
  },
  onError: (error) => showEvent(`⚠ ${error.message}`),
});

field("room").value = params.get("room") ?? field("room").value;
field("name").value = sessionStorage.getItem("chat-name") ?? "";

$("join").addEventListener("submit", async (event) => {
  event.preventDefault();
  const room = field("room").value.trim();
  const name = field("name").value.trim();
  const error = $("join-error");
  error.hidden = true;
  if (!ROOM_NAME.test(room)) {
    error.textContent = "A room name is 1 to 64 letters, digits, '-' or '_'.";
    error.hidden = false;
    return;
  }
  if (name === "") return;
  me.name = name;
  sessionStorage.setItem("chat-name", name);
  try {
    await joinRoom(room);
  } catch (failure) {
    error.textContent = `Could not join: ${/** @type {Error} */ (failure).message}`;
    error.hidden = false;
  }
});

/** @param {string} room */
async function joinRoom(room) {
  const topics = { messages: `chat.${room}.messages`, presence: `chat.${room}.presence` };

  const messages = await client.subscribe(topics.messages, showMessage, {
    since: "start", // every message the room keeps, if it keeps any, then the live ones
    // A reconnect that could not recover everything says so; the refill then names the lost
    // offsets (onGap), which the room tells once, in the same words.
    onResubscribe({ recovered }) {
      if (recovered === false) showMissing();
    },
    onGap: showMissing,
  });
  try {
    await followPresence(topics.presence);
  } catch (error) {
    if (!(error instanceof PubSubError && error.code === "not_enabled")) {
      void messages.unsubscribe().catch(() => {}); // so that joining again starts afresh
      throw error;
    }
    // A broker run with another config (`make run`, or `make chat ARGS="--config other.toml"`)
    // may keep no presence here.
    addPerson({ client: "", user: null, info: { name: me.name, id: me.id } });
    showEvent(`⚠ This broker keeps no presence for #${room}: "Here now" shows only you.`);
  }
  showEvent(`You joined #${room} as ${me.name}`);

  $("room-title").textContent = `#${room}`;
  $("join").hidden = true;
  $("chat").hidden = false;
  $("send").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = field("text").value;
    if (text.trim() === "") return;
    field("text").value = "";
    client
      .publish(topics.messages, { id: me.id, name: me.name, text, at: Date.now() })
      .catch((/** @type {Error} */ error) => showEvent(`⚠ not sent (${error.message}): ${text}`));
  });
  field("text").focus();
}

/** @typedef {import("../../clients/js/src/client.js").Member} Member */

/**
 * Be a member of the room's presence `topic`, hear who joins and leaves, and read who is here.
 * @param {string} topic
 */
async function followPresence(topic) {
  const read = () => void readPresence(topic).catch((error) => showEvent(`⚠ ${error.message}`));
  await client.subscribe(topic, () => {}, {
    info: { name: me.name, id: me.id },
    joinLeave: true,
    onJoin: (member) => {
      reading?.joined.add(member.client);
      reading?.left.delete(member.client);
      if (!people.has(member.client) && !isMe(member)) showEvent(`${nameOf(member)} joined`);
      addPerson(member);
    },
    onLeave: (member) => {
      reading?.left.add(member.client);
      if (people.has(member.client) && !isMe(member)) showEvent(`${nameOf(member)} left`);
      removePerson(member.client);
    },
    // Join and leave events were lost (while away, or dropped for a slow tab): read again.
    onResubscribe: read,
    onLag: read,
  });
  await readPresence(topic);
}

/** Who is here: each member (one tab's connection) by its `client`, and its list item. */
/** @type {Map<string, HTMLLIElement>} */
const people = new Map();

/**
 * The read of the members in progress: who joined and who left while it went on. A member the
 * read lists but whose leave came meanwhile is gone (the answer may have been sent before it);
 * one that joined meanwhile is here, listed or not.
 * @type {{ joined: Set<string>, left: Set<string> } | null}
 */
let reading = null;

/**
 * Make the list what the broker says: every member of `topic` (it takes pages of 1000), with
 * the joins and leaves that came meanwhile; those no longer there leave the list silently.
 * @param {string} topic
 */
async function readPresence(topic) {
  const mine = (reading = { joined: new Set(), left: new Set() });
  /** @type {Set<string>} */
  const listed = new Set();
  try {
    for await (const member of client.members(topic)) {
      if (reading !== mine) return; // a newer read took over
      listed.add(member.client);
      if (!mine.left.has(member.client)) addPerson(member);
    }
    if (reading !== mine) return;
    for (const id of [...people.keys()]) {
      if (!listed.has(id) && !mine.joined.has(id)) removePerson(id);
    }
  } finally {
    if (reading === mine) reading = null;
  }
}

/** @param {Member} member */
function isMe(member) {
  return infoOf(member).id === me.id;
}

/** @param {Member} member */
function nameOf(member) {
  const { name } = infoOf(member);
  return typeof name === "string" && name !== "" ? name : (member.user ?? "someone");
}

/**
 * A member's info, which anyone could have sent (unless a token gave it): check before use.
 * @param {Member} member
 * @returns {Record<string, unknown>}
 */
function infoOf(member) {
  return typeof member.info === "object" && member.info !== null ? /** @type {any} */ (member.info) : {};
}

/** @param {Member} member */
function addPerson(member) {
  let item = people.get(member.client);
  if (item === undefined) {
    item = document.createElement("li");
    people.set(member.client, item);
    if (isMe(member)) {
      item.className = "me";
      $("people").prepend(item); // you first, then the others as they came
    } else {
      $("people").append(item);
    }
  }
  item.textContent = nameOf(member);
}

function removePerson(/** @type {string} */ client) {
  people.get(client)?.remove();
  people.delete(client);
}

/** @param {Message} message */
function showMessage(message) {
  const { id, name, text, at } = fields(message);
  const item = document.createElement("li");
  item.className = id === me.id ? "msg mine" : "msg";
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = String(name);
  const when = document.createElement("time");
  const date = new Date(Number.isFinite(at) ? at : Date.now());
  when.dateTime = date.toISOString();
  when.textContent = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const body = document.createElement("p");
  body.className = "text";
  body.textContent = String(text);
  item.append(who, when, body);
  append(item);
}

/**
 * The fields of a message's data, which anyone could have published: check before use.
 * @param {Message} message
 * @returns {Record<string, any>}
 */
function fields(message) {
  return typeof message.data === "object" && message.data !== null ? message.data : {};
}

/** @param {string} text */
function showEvent(text) {
  const item = document.createElement("li");
  item.className = "event";
  item.textContent = text;
  append(item);
}

/** Say that messages are missing, unless that was the last thing said. */
function showMissing() {
  const text = "⚠ Some messages sent while you were away are missing.";
  const events = $("log").querySelectorAll(".event");
  if (events[events.length - 1]?.textContent !== text) showEvent(text);
}

/** @param {HTMLElement} item */
function append(item) {
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(item);
  if (atBottom) log.scrollTop = log.scrollHeight;
}
