// @ts-check
/**
 * The chat room: one page per person, all talking through the broker.
 *
 * Messages go to `chat.<room>.messages`, presence to `chat.<room>.presence`:
 * - `join` when a person enters (and again after a reconnect); everyone else answers `here`,
 *   so the newcomer learns who is in the room;
 * - `leave` when the page goes away (`pagehide`, best effort: a crashed tab sends nothing).
 * When the room's messages topic keeps history (config/chat.toml), joining fills the view with
 * what it kept, and a reconnect gets what was missed, or says that some is missing.
 *
 * The page takes `?broker=ws://host:port/` (default: port 8765 on the page's host) and
 * `?token=...` when the broker wants one.
 */
import { Client } from "../../clients/js/src/client.js";

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
  const announce = (/** @type {string} */ type) =>
    client.publish(topics.presence, { type, id: me.id, name: me.name }, { ack: false });

  await client.subscribe(topics.messages, showMessage, {
    since: "start", // every message the room keeps, if it keeps any, then the live ones
    onResubscribe({ recovered }) {
      if (recovered === false) showEvent("⚠ Some messages sent while you were away are missing.");
    },
  });
  await client.subscribe(topics.presence, (message) => onPresence(message, announce), {
    // Back after a drop: who left meanwhile is unknown, so ask everyone again.
    onResubscribe() {
      for (const id of [...people.keys()]) if (id !== me.id) removePerson(id);
      void announce("join");
    },
  });
  addPerson(me.id, me.name);
  await announce("join");
  showEvent(`You joined #${room} as ${me.name}`);
  addEventListener("pagehide", () => void announce("leave").catch(() => {}));

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

/**
 * @param {Message} message
 * @param {(type: string) => Promise<void>} announce
 */
function onPresence(message, announce) {
  const { type, id, name } = fields(message);
  if (id === me.id || typeof id !== "string" || typeof name !== "string") return;
  const known = people.has(id);
  if (type === "leave") {
    if (known) showEvent(`${name} left`);
    removePerson(id);
    return;
  }
  addPerson(id, name);
  if (type === "join") {
    if (!known) showEvent(`${name} joined`);
    void announce("here");
  }
}

/** @type {Map<string, HTMLLIElement>} */
const people = new Map();

function addPerson(/** @type {string} */ id, /** @type {string} */ name) {
  let item = people.get(id);
  if (item === undefined) {
    item = document.createElement("li");
    item.className = id === me.id ? "me" : "";
    people.set(id, item);
    $("people").append(item);
  }
  item.textContent = name;
}

function removePerson(/** @type {string} */ id) {
  people.get(id)?.remove();
  people.delete(id);
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

/** @param {HTMLElement} item */
function append(item) {
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(item);
  if (atBottom) log.scrollTop = log.scrollHeight;
}
