// @ts-check
/**
 * A client for the Trio pub/sub broker (wire protocol v1), for browsers and Node.
 *
 * One {@link Client} holds one WebSocket, to one of the broker URLs it was given. It subscribes
 * with NATS-style patterns, publishes with acknowledgements, and when the connection drops it
 * reconnects with exponential backoff and subscribes again, asking for what it missed (`since`)
 * on topics that keep history, and saying what may be missing elsewhere. A refusal that waiting
 * will not change ends it, with the broker's words. On topics with presence it reads who is
 * there ({@link Client#presence}, {@link Client#members}) and tells a subscription that asks
 * (`joinLeave`) who comes and goes.
 *
 * This file has no imports, so a page can load it as it is. JSON is built in
 * ({@link jsonCodec}); msgpack lives in `./msgpack.js`, which needs `@msgpack/msgpack`.
 */

/**
 * How frames travel: the WebSocket subprotocol, and a batch of frames to and from one message.
 * @typedef {object} Codec
 * @property {string} subprotocol offered in the handshake; it picks the broker's encoding
 * @property {(frames: Frame[]) => string | Uint8Array<ArrayBuffer>} encode one WebSocket message of frames
 * @property {(message: string | ArrayBuffer | Uint8Array) => Frame[]} decode every frame of one
 *   WebSocket message, in order
 */

/** @typedef {Record<string, any>} Frame */

/**
 * A published message, as the broker delivers it.
 * @typedef {object} Message
 * @property {string} topic the concrete topic it was published to
 * @property {string} sub the pattern of the subscription that matched
 * @property {unknown} data whatever the publisher sent
 * @property {number} [offset] its place in the topic's history, where the topic keeps one
 */

/**
 * A place in a topic's history: `offset` is the last message seen in the numbering `epoch` names.
 * @typedef {{ epoch: string, offset: number }} Position
 */

/**
 * A connection present on a topic whose config rule says `presence = true`: one that holds a
 * subscription to exactly that topic (a wildcard watches, it is not a member).
 * @typedef {object} Member
 * @property {string} client unique per connection, on every node and across restarts (one
 *   person with two tabs is two members; a reconnect is a new member)
 * @property {string | null} user the subject of its token; null when anonymous
 * @property {unknown} info from its token when the token has one (trusted), else the `info` it
 *   subscribed with (anyone could have sent it: check before use), else null
 */

/**
 * One answer of {@link Client#presence}: `count` members now, up to the `limit` asked for of
 * them in `client` order, and the `cursor` to ask for the next page with (absent when no more
 * remain).
 * @typedef {{ count: number, members: Member[], cursor?: string }} Presence
 */

/**
 * @typedef {"connecting" | "connected" | "disconnected" | "closed"} State
 * `disconnected` means waiting to reconnect; `closed` is final (after {@link Client#close}, or a
 * refusal that waiting will not change).
 */

/**
 * Why a connection ended, or an attempt to open one failed. Given with the `disconnected` and
 * `closed` states, and carried by {@link NotAnswered} and {@link Refused}.
 * @typedef {object} Disconnection
 * @property {string} url the broker URL it was about (without the token)
 * @property {number} code the WebSocket close code; 1006 when no close frame came: the network
 *   failed, the handshake was refused, or the broker could not be reached
 * @property {string} reason the broker's words: the close reason, or the body of a refused
 *   handshake; `""` when it said nothing (or the WebSocket does not show it)
 * @property {number} [status] the HTTP status of a refused handshake, where the WebSocket shows
 *   it: Node's `ws` package does, a browser never does (it shows only a close 1006)
 * @property {number} [retryAfter] seconds, from the `Retry-After` of a refused handshake (503)
 * @property {string} message all of the above in a sentence, for a person
 * @property {number} [delay] ms until the next attempt (absent when the client ends)
 */

/**
 * What a subscription may have missed while the client was disconnected, and why; given to
 * `onResubscribe` after a reconnect unless the topic's history replayed everything.
 * - `"evicted"`: messages were missed and the oldest of them are gone (more were published than
 *   the topic keeps, or they outlived its `history_ttl`); the kept ones follow.
 * - `"history_lost"`: the topic's history was lost (a new epoch: a broker restart, say); nothing
 *   is replayed, and whatever was published before it is gone. Also when the client had
 *   forgotten the epoch (its offsets started again while subscribed, see {@link HistoryLost},
 *   and it could not learn the new one), so the resubscribe could not ask with `since`.
 * - `"no_history"`: the topic keeps no history: whatever was published meanwhile is gone.
 * - `"wildcard"`: a pattern cannot recover: whatever was published meanwhile is gone.
 * @typedef {object} Missed
 * @property {"evicted" | "history_lost" | "no_history" | "wildcard"} why
 * @property {Disconnection} disconnection how the connection that had the subscription ended
 */

/**
 * Messages of a subscription that will never reach `onMessage`: offsets `from` to `to` (both
 * included) of its topic, in its epoch. Given to `onGap` by a refill (see `refill` in
 * {@link SubscribeOptions}), in offset order with the messages around it.
 * - `"evicted"`: the topic no longer keeps them (more were published than `history_size`, or
 *   they outlived `history_ttl`).
 * - `"history_lost"`: the topic's history was lost meanwhile (a new epoch).
 * - `"read_failed"`: the broker did not answer the `history` read (`unavailable` in a cluster
 *   whose Redis is down, or no answer within `timeout`); the error goes to `onError`.
 * @typedef {{ from: number, to: number, why: "evicted" | "history_lost" | "read_failed" }} Gap
 */

/**
 * @typedef {object} Backoff
 * @property {number} [initial] first delay in ms (default 250)
 * @property {number} [max] longest delay in ms (default 10000)
 * @property {number} [factor] growth per failed attempt (default 2)
 */

/**
 * @typedef {object} ClientOptions
 * @property {Codec} [codec] default {@link jsonCodec}; pass `msgpackCodec` from `./msgpack.js`
 * @property {string | (() => string | Promise<string>)} [token] sent as `?token=`; a function
 *   is asked again before every (re)connect, so it can hand out a fresh token, and a refused
 *   token (401, 403, 4003, 4010) is then retried rather than ending the client
 * @property {new (url: string, protocols: string[]) => WebSocket} [WebSocket] the constructor
 *   to use; default `globalThis.WebSocket` (Node 20 needs one, such as the `ws` package's)
 * @property {boolean} [reconnect] reconnect after the connection drops (default true)
 * @property {Backoff} [backoff] reconnect delays
 * @property {number} [timeout] ms to wait for the broker's answer to a command (default 10000)
 * @property {(state: State, disconnection?: Disconnection) => void} [onState] called on every
 *   state change; `disconnected`, and `closed` unless by {@link Client#close}, say why
 * @property {(error: Error) => void} [onError] errors no promise reports: the {@link Refused}
 *   that ended the client, an `err` without `id`, a subscription the broker refused again after
 *   a reconnect, an undecodable message, a refill's failed read and (without `onGap`) its gaps,
 *   and a {@link HistoryLost}: a topic's history lost while subscribed
 */

/**
 * @typedef {object} SubscribeOptions
 * @property {Position | "start"} [since] on a concrete topic that keeps history: replay the
 *   kept messages after this position (`"start"`: every kept message), then go live
 * @property {(dropped: number) => void} [onLag] the broker dropped this many messages for
 *   this subscription (a drop policy: the subscriber was too slow); a refill reads them back
 * @property {boolean} [refill] on a concrete topic that keeps history (default true): when the
 *   offsets jump (the broker dropped messages), read the missing ones with `history` and hand
 *   every message to `onMessage` in offset order, as if none had been dropped; what the topic
 *   no longer keeps goes to `onGap`. One read in flight at a time, of at most 1000 messages
 * @property {number} [bufferSize] the most live messages held while a refill reads (default
 *   1000); the ones beyond it are not held, and the refill reads them from history too
 * @property {(gap: Gap) => void} [onGap] a refill found offsets that will never come (without
 *   `onGap`, each such gap goes to the client's `onError`)
 * @property {(subscription: Subscription, missed?: Missed) => void} [onResubscribe] called when
 *   the broker has accepted the subscription again after a reconnect, before the messages it
 *   replays; `missed` says what may be missing and why, and is absent when the topic's history
 *   replayed everything (`subscription.recovered` is then true). Join and leave events of the
 *   time away are always lost: with `joinLeave`, read {@link Client#members} again here
 * @property {unknown} [info] on a topic with presence, what this client shows as a member
 *   (its `info`), unless its token gives one; at most 1 KiB encoded (else `too_large`)
 * @property {boolean} [joinLeave] also tell `onJoin` and `onLeave` of every member that joins
 *   or leaves a matching topic with presence, this client included (`not_enabled` if no topic
 *   matching the pattern has presence). They are queued like messages: ones the broker dropped
 *   for a slow subscriber count in `onLag`, after which a member list kept from them may be
 *   wrong: read {@link Client#members} again
 * @property {(member: Member, topic: string) => void} [onJoin] with `joinLeave`: `member`
 *   subscribed to `topic`
 * @property {(member: Member, topic: string) => void} [onLeave] with `joinLeave`: `member`
 *   left `topic` (unsubscribed, or its connection ended, however it ended)
 */

/** The broker answered a command with `err`; `code` is the protocol's error code. */
export class PubSubError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   */
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = "PubSubError";
    this.code = code;
  }
}

/**
 * A command got no answer: `reason` is `"disconnected"` (the connection dropped first; the
 * command may or may not have taken effect), `"closed"` (the client was closed) or `"timeout"`.
 * `disconnection` says how the connection ended, when one did.
 */
export class NotAnswered extends Error {
  /**
   * @param {"disconnected" | "closed" | "timeout"} reason
   * @param {string} message
   * @param {Disconnection} [disconnection]
   */
  constructor(reason, message, disconnection) {
    super(message);
    this.name = "NotAnswered";
    this.reason = reason;
    this.disconnection = disconnection;
  }
}

/**
 * A subscribed topic's history was lost while the client was subscribed (evicted whole by the
 * broker's `[history] max_bytes`, or, in a cluster, its Redis keys expired), and its offsets
 * started again at 1 in a new epoch. A `msg` does not name its epoch: an offset not above the
 * last one seen is the only sign. What was published after offset `after` of the old epoch may
 * be missing (how much, if any, cannot be known). Given to `onError`, once per restart; the
 * messages go on in the new numbering: with refill (the default) its earlier offsets first,
 * read with `history` (the ones no longer kept go to `onGap` as `"evicted"`), which also learns
 * the new epoch, so that a reconnect recovers exactly again.
 */
export class HistoryLost extends Error {
  /**
   * @param {string} topic the subscription's topic
   * @param {number} after the last offset seen of the old epoch
   * @param {number} offset the offset, of the new numbering, that showed it
   */
  constructor(topic, after, offset) {
    super(
      `the history of ${topic} was lost while subscribed (its offsets started ` +
        `again: ${offset} came after ${after}): what was published after offset ${after} of its ` +
        "old epoch may be missing",
    );
    this.name = "HistoryLost";
    this.topic = topic;
    this.after = after;
    this.offset = offset;
  }
}

/**
 * The broker refused this client in a way that waiting will not change (HTTP 400, 401 or 403,
 * close 4003 or 4010), and the client has no token function to ask for a fresh token: it has
 * ended. `disconnection` has the status or close code and the broker's words.
 */
export class Refused extends Error {
  /** @param {Disconnection} disconnection */
  constructor(disconnection) {
    super(disconnection.message);
    this.name = "Refused";
    this.disconnection = disconnection;
  }
}

/** JSON frames in text messages, one object per line: the `pubsub.v1.json` subprotocol. */
export const jsonCodec = Object.freeze({
  subprotocol: "pubsub.v1.json",
  /** @param {Frame[]} frames */
  encode: (frames) => frames.map((frame) => JSON.stringify(frame)).join("\n"),
  /** @param {string | ArrayBuffer | Uint8Array} message */
  decode(message) {
    if (typeof message !== "string") throw new TypeError("binary message on the json subprotocol");
    return message
      .split("\n")
      .filter((line) => line.trim() !== "")
      .map((line) => JSON.parse(line));
  },
});

/**
 * The delay before reconnect attempt `attempt` (0 for the first): exponential, capped, and
 * jittered to between half and all of it so that many clients do not come back in step.
 * @param {number} attempt
 * @param {Backoff} [backoff]
 * @param {() => number} [random] a number in [0, 1)
 */
export function backoffDelay(attempt, backoff = {}, random = Math.random) {
  const { initial = 250, max = 10000, factor = 2 } = backoff;
  const ceiling = Math.min(max, initial * factor ** attempt);
  return ceiling / 2 + (random() * ceiling) / 2;
}

/**
 * `url` with `?token=` set (and any query it had kept).
 * @param {string} url
 * @param {string | undefined} token
 */
export function withToken(url, token) {
  if (token === undefined) return url;
  const parsed = new URL(url);
  parsed.searchParams.set("token", token);
  return parsed.toString();
}

/**
 * A copy of `items` in a random order (Fisher-Yates).
 * @template T
 * @param {T[]} items
 * @param {() => number} [random] a number in [0, 1)
 */
export function shuffled(items, random = Math.random) {
  const copy = [...items];
  for (let index = copy.length - 1; index > 0; index--) {
    const other = Math.floor(random() * (index + 1));
    [copy[index], copy[other]] = [copy[other], copy[index]];
  }
  return copy;
}

/**
 * What a refused handshake showed: its HTTP status, `Retry-After` and body.
 * @typedef {{ status: number, retryAfter?: number, reason: string }} Refusal
 */

/**
 * Describe how a connection or an attempt ended (without `delay`: the caller decides that).
 * @param {string} url
 * @param {boolean} opened whether the handshake had succeeded
 * @param {{ code: number, reason: string }} close the socket's close event
 * @param {Refusal | undefined} refusal the refused handshake's response, where it is shown
 * @param {string | undefined} failure what the socket's `error` event said, where refusals are
 *   shown (Node's `ws`: "connect ECONNREFUSED ..."); undefined where they are hidden (browsers)
 * @returns {Disconnection}
 */
export function describeClose(url, opened, { code, reason }, refusal, failure) {
  if (refusal !== undefined) {
    const { status, retryAfter } = refusal;
    const message = `${url} refused the connection: HTTP ${status} ${refusal.reason}`.trim();
    return { url, code, reason: refusal.reason, status, retryAfter, message };
  }
  let message;
  if (opened) {
    message = code === 1006 ? `the connection to ${url} dropped (1006, no close frame)`
      : `${url} closed the connection: ${code} ${reason}`.trim();
  } else if (failure !== undefined) {
    message = `cannot reach ${url}: ${failure || `close ${code}`}`;
  } else {
    message = `cannot connect to ${url} (close ${code}): it is unreachable, or it refused the ` +
      "handshake; a browser's WebSocket shows neither the HTTP status nor the broker's reason";
  }
  return { url, code, reason, message };
}

/** True if a fresh token could change `disconnection`: HTTP 401 or 403, close 4003 or 4010. */
const wantsToken = (/** @type {Disconnection} */ { status, code }) =>
  status === 401 || status === 403 || code === 4003 || code === 4010;

/**
 * Node's `http.IncomingMessage`, as the `ws` package hands it to `unexpected-response`.
 * @typedef {{ statusCode?: number, headers: Record<string, string | string[] | undefined>,
 *   setEncoding(encoding: string): void, on(event: string, listener: (chunk: string) => void): void
 * }} HttpResponse
 */

/**
 * Where the WebSocket is the `ws` package's (Node), read a refused handshake's status,
 * `Retry-After` and body from its `unexpected-response` event, then end the attempt (which
 * closes with 1006). A browser's WebSocket shows none of this.
 * @param {WebSocket} socket
 * @param {(refusal: Refusal) => void} onRefusal
 * @returns {boolean} whether this socket shows refusals
 */
function watchRefusals(socket, onRefusal) {
  const emitter = /** @type {any} */ (socket);
  if (typeof emitter.on !== "function") return false;
  /** @param {unknown} _request @param {HttpResponse} response */
  const read = (_request, response) => {
    let body = "";
    response.setEncoding("utf8");
    response.on("data", (chunk) => {
      if (body.length < 1000) body += chunk;
    });
    response.on("error", () => emitter.terminate());
    response.on("end", () => {
      const retryAfter = Number(response.headers["retry-after"] ?? NaN);
      onRefusal({
        status: response.statusCode ?? 0,
        retryAfter: Number.isFinite(retryAfter) && retryAfter >= 0 ? retryAfter : undefined,
        reason: body.trim().slice(0, 500),
      });
      emitter.terminate();
    });
  };
  emitter.on("unexpected-response", read);
  return true;
}

/** True if `pattern` names one concrete topic (no `*` or `>` segment). */
const isConcrete = (/** @type {string} */ pattern) =>
  !pattern.split(".").some((segment) => segment === "*" || segment === ">");

/** The most members one `presence` answer carries (and its default `limit`), and the most
 * messages one `history` answer carries. */
export const MAX_PAGE = 1000;

/**
 * The {@link Member} of a wire map `{client, user, info}` (sent by the broker, but checked).
 * @param {unknown} value
 * @returns {Member}
 */
function toMember(value) {
  const { client, user, info } = /** @type {Record<string, unknown>} */ (
    typeof value === "object" && value !== null ? value : {}
  );
  return {
    client: String(client ?? ""),
    user: user === null || user === undefined ? null : String(user),
    info: info === undefined ? null : info,
  };
}

/**
 * One subscription of a {@link Client}; it lasts across reconnects until `unsubscribe()`.
 *
 * For a concrete topic that keeps history it tracks the topic's `epoch` (from the broker's
 * `ok`) and the `offset` of the last message received, and resubscribes with them as `since`.
 * There, unless `refill: false`, it also fills what the broker dropped for it: when a message's
 * offset jumps, it holds that message and the live ones after it (up to `bufferSize`), reads
 * the missing offsets with `history` (one read in flight, up to {@link MAX_PAGE} messages
 * each), and hands them over in offset order, then the held ones; live messages it could not
 * hold are read from history in turn. Offsets the topic no longer keeps go to `onGap`. A
 * refill ends with the subscription or the connection: the resubscribe's `since` (the last
 * offset handed over) then replays the rest.
 *
 * A live offset not above the last one seen (nor above the highest a refill holds) means the
 * topic's numbering started again: its history was lost, and a new epoch began, which `msg`
 * does not name. The subscription tells {@link HistoryLost} to `onError`, forgets the epoch,
 * and (refilling) learns the new one with a `history` read without `since`, which also brings
 * the new numbering's earlier messages; without refill the next resubscribe sends no `since`.
 */
export class Subscription {
  /**
   * @param {Client} client
   * @param {string} pattern
   * @param {(message: Message) => void} onMessage
   * @param {SubscribeOptions} options
   */
  constructor(client, pattern, onMessage, options) {
    this.client = client;
    this.pattern = pattern;
    this.onMessage = onMessage;
    this.options = options;
    const since = typeof options.since === "object" ? options.since : undefined;
    /** @type {string | undefined} the topic's history epoch, once the broker named it */
    this.epoch = since?.epoch;
    /** @type {number | undefined} the offset of the last message received */
    this.offset = since?.offset;
    /** @type {boolean | undefined} from the last `ok` that answered a `since`: false if
     * messages were missed */
    this.recovered = undefined;
    /** `since: "start"`, until the first `ok` tells whether there is anything to replay. */
    this._fromStart = options.since === "start";
    /** Drop messages until the next `ok`: they belong to a subscription being replaced. */
    this._skipping = false;
    /** The number of `history` reads its refills made. */
    this.refills = 0;
    /** @type {Message[] | null} live messages held while refilling (in offset order); null
     * when not refilling */
    this._held = null;
    /** The highest offset seen live while refilling, held or not. */
    this._highest = 0;
    /** The id of the refill's `history` read in flight; 0 when none. */
    this._reading = 0;
    /** The topic's offsets started again (a new epoch), and `epoch` is not known yet. */
    this._renumbered = false;
    /** From an `ok` saying messages after `offset` were evicted (same epoch), until the next
     * message: the topic's latest offset then. Up to it, a jump is what the broker no longer
     * keeps (the replay starts at the oldest kept): a gap to name, not to read. */
    this._toldUntil = 0;
    /** True until `unsubscribe()`, a refusal by the broker, or `close()`. */
    this.active = true;
    /** True once the broker has accepted it (on some connection). */
    this.accepted = false;
    /** @type {(value: Subscription) => void} */
    this._resolve = () => {};
    /** @type {(error: Error) => void} */
    this._reject = () => {};
    /** @type {Promise<Subscription>} settles with the first answer to its `sub` */
    this._firstAnswer = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this._firstAnswer.catch(() => {}); // subscribe() returns it: a caller that ignores it chose to
  }

  /** @returns {Position | undefined} where to resume from, if the topic keeps history (and
   * its epoch is known: not while learning the new one after its offsets started again) */
  get position() {
    if (this.epoch === undefined || this.offset === undefined) return undefined;
    return { epoch: this.epoch, offset: this.offset };
  }

  /** True while a refill is reading what the broker dropped (live messages wait meanwhile). */
  get refilling() {
    return this._held !== null;
  }

  /** Stop receiving; resolves once the broker confirmed (at once when disconnected). */
  unsubscribe() {
    return this.client._unsubscribe(this);
  }

  /** The `sub` frame that (re)creates this subscription. */
  _frame(/** @type {number} */ id) {
    /** @type {Frame} */
    const frame = { op: "sub", id, topic: this.pattern };
    const position = this.position;
    if (position !== undefined) frame.since = position;
    if (this.options.joinLeave) frame.join_leave = true;
    if (this.options.info !== undefined) frame.info = this.options.info;
    return frame;
  }

  /**
   * A `join` or `leave` frame for this subscription: to `onJoin` or `onLeave`. Not dropped
   * while `_skipping` (a `since: "start"` swap, an `unsub` and a `sub`): the others' events of
   * that moment are real, and this client's own join, leave and join again keep a list right.
   * @param {Frame} frame
   */
  _announce(frame) {
    if (!this.active) return;
    const listener = frame.op === "join" ? this.options.onJoin : this.options.onLeave;
    listener?.(toMember(frame.member), String(frame.topic));
  }

  /**
   * A live message for this subscription: to `onMessage`, unless a refill holds it.
   * @param {Message} message
   */
  _deliver(message) {
    if (this._skipping) return;
    const offset = message.offset;
    if (typeof offset !== "number" || !isConcrete(this.pattern)) {
      this.onMessage(message);
      return;
    }
    const last = Math.max(this.offset ?? 0, this._highest);
    if ((this.epoch !== undefined || this._held !== null) && offset <= last) {
      this._restarted(message, offset, last);
      return;
    }
    const told = Math.min(offset - 1, this._toldUntil);
    this._toldUntil = 0;
    if (this._held === null && told > (this.offset ?? told) && this._refills()) {
      this._lost(told, "evicted"); // the resubscribe's ok said so, and the replay starts after
      if (!this.active) return;
    }
    if (this._held !== null) {
      this._hold(message, offset);
    } else if (this.offset !== undefined && offset > this.offset + 1 && this._refills()) {
      this._refill(message, offset);
    } else {
      this.offset = offset;
      this.onMessage(message);
    }
  }

  /**
   * Refill from the last offset handed over up to `message`, which is held meanwhile.
   * @param {Message} message
   * @param {number} offset
   */
  _refill(message, offset) {
    this._held = [message];
    this._highest = offset;
    this._read();
  }

  /**
   * A live `offset` not above `last` (the last seen, or the highest a refill holds): the
   * topic's numbering started again, in a new epoch that `msg` does not name. What the refill
   * did not read of the old numbering is lost (`history_lost`); the user is told what may be
   * missing after it ({@link HistoryLost}); the epoch is forgotten, then learned with a
   * `history` read without `since` that also brings the new numbering's earlier messages
   * (refilling), or by the next resubscribe, which sends no `since` (without refill).
   * @param {Message} message
   * @param {number} offset
   * @param {number} last
   */
  _restarted(message, offset, last) {
    if (this._held !== null) this._giveUp("history_lost");
    if (!this.active) return;
    this.epoch = undefined;
    this.offset = 0;
    this._renumbered = true;
    this._toldUntil = 0;
    this.client._report(new HistoryLost(this.pattern, last, offset));
    if (!this.active) return;
    if (this.options.refill !== false) {
      this._refill(message, offset);
    } else {
      this.offset = offset;
      this.onMessage(message);
    }
  }

  /** Whether this subscription refills: on by default where the topic keeps history. */
  _refills() {
    return this.options.refill !== false && this.epoch !== undefined;
  }

  /**
   * While refilling: hold `message`, or leave it to the refill's reads when the buffer is full.
   * (An offset that goes back is a new numbering: {@link Subscription#_restarted}.)
   * @param {Message} message
   * @param {number} offset
   */
  _hold(message, offset) {
    const held = /** @type {Message[]} */ (this._held);
    this._highest = offset;
    if (held.length < (this.options.bufferSize ?? 1000)) held.push(message);
  }

  /** The offset of the last message handed over (or lost): a refill runs only after one. */
  get _last() {
    return /** @type {number} */ (this.offset);
  }

  /**
   * Read the next missing offsets: up to the first held message, or the highest seen. While
   * the epoch is not known (the numbering started again), without `since`: from the oldest
   * kept, which names the epoch.
   */
  _read() {
    const held = /** @type {Message[]} */ (this._held);
    const after = this._last;
    const end = held.length > 0 ? /** @type {number} */ (held[0].offset) - 1 : this._highest;
    const epoch = this.epoch;
    const id = (this._reading = this.client._nextId++);
    this.refills += 1;
    this.client._expect(
      id,
      (reply) => this._reading === id && this._filled(reply, end, epoch),
      (error) => this._reading === id && this._readFailed(error),
    );
    /** @type {Frame} */
    const frame = { op: "history", id, topic: this.pattern, limit: Math.max(1, Math.min(MAX_PAGE, end - after)) };
    if (epoch !== undefined) frame.since = { epoch, offset: after };
    this.client._send([frame]);
  }

  /**
   * A refill's `history` answer for the offsets up to `end`: hand over what it has (what it
   * skipped is gone), then the held messages that follow on; read again if anything is missing.
   * @param {Frame} reply
   * @param {number} end
   * @param {string | undefined} asked the epoch the read named; undefined: it read to learn it
   */
  _filled(reply, end, asked) {
    this._reading = 0;
    if (asked === undefined && typeof reply.epoch === "string") {
      this.epoch = reply.epoch; // the new numbering's
      this._renumbered = false;
    } else if (asked === undefined || reply.epoch !== asked) {
      this._giveUp("history_lost");
      return;
    }
    const before = this._last;
    for (const { offset, data } of Array.isArray(reply.messages) ? reply.messages : []) {
      if (offset > end || !this.refilling) break;
      if (offset > this._last) this._pass({ topic: this.pattern, sub: this.pattern, data, offset });
    }
    // An answer without one of the missing messages: none of them is kept any more. (A read
    // that learnt the epoch read from the oldest kept, so it may have brought none of them:
    // the next one asks after our offset.)
    if (this.refilling && this._last === before && before < end && asked !== undefined) {
      this._lost(end, "evicted");
    }
    const held = this._held ?? [];
    let taken = 0;
    while (this.refilling && taken < held.length && held[taken].offset === this._last + 1) {
      this._pass(held[taken++]);
    }
    if (!this.refilling) return; // ended by a callback: unsubscribed, or the client closed
    held.splice(0, taken);
    if (held.length > 0 || this._highest > this._last) this._read();
    else this._stopRefill();
  }

  /**
   * The refill's read failed. A dropped connection or a closed client ends the refill quietly
   * (a resubscribe's `since` replays the rest); any other failure gives up on what is missing.
   * @param {Error} error
   */
  _readFailed(error) {
    if (error instanceof NotAnswered && error.reason !== "timeout") {
      this._stopRefill();
      return;
    }
    this.client._report(new Error(`reading the history of ${this.pattern} failed: ${error.message}`));
    this._giveUp("read_failed");
  }

  /**
   * End the refill, handing over the held messages; what it did not read is lost for `why`.
   * @param {Gap["why"]} why
   */
  _giveUp(why) {
    const held = /** @type {Message[]} */ (this._held);
    const highest = this._highest;
    this._stopRefill();
    for (const message of held) {
      this._pass(message, why);
      if (!this.active) return;
    }
    if (highest > this._last) this._lost(highest, why);
  }

  _stopRefill() {
    this._held = null;
    this._highest = 0;
    this._reading = 0;
  }

  /**
   * Hand `message` to `onMessage`, after telling of the offsets it skips (lost for `why`).
   * @param {Message} message
   * @param {Gap["why"]} [why]
   */
  _pass(message, why = "evicted") {
    const offset = /** @type {number} */ (message.offset);
    if (offset > this._last + 1) this._lost(offset - 1, why);
    if (!this.active) return;
    this.offset = offset;
    this.client._safely(() => this.onMessage(message));
  }

  /**
   * The offsets after the last one handed over, up to `to`, will never come: tell `onGap`
   * (else `onError`), and go on after them.
   * @param {number} to
   * @param {Gap["why"]} why
   */
  _lost(to, why) {
    /** @type {Gap} */
    const gap = { from: this._last + 1, to, why };
    this.offset = to;
    const { onGap } = this.options;
    if (onGap) this.client._safely(() => onGap(gap));
    else this.client._report(new Error(`messages ${gap.from}..${to} of ${this.pattern} are lost (${why})`));
  }

  /**
   * Take the broker's `ok` to a `sub`. It is handled as soon as it is read, before the frames
   * after it (the replay, then live messages), which move `offset` on from here.
   * @param {Frame} reply
   */
  _accept(reply) {
    const askedEpoch = this.epoch;
    // The offsets started again and the epoch was not learnt: the sub had no `since`.
    const renumbered = this._renumbered;
    this._renumbered = false;
    this._skipping = false;
    if (typeof reply.recovered === "boolean") this.recovered = reply.recovered;
    else if (renumbered && typeof reply.epoch === "string") this.recovered = false;
    this._toldUntil = 0;
    if (typeof reply.epoch === "string" && typeof reply.offset === "number") {
      // A new epoch voids the old offsets: go on from its latest, as does an offset beyond the
      // latest. Otherwise keep the offset of what was received: the replay follows from there.
      const newEpoch = renumbered || (this.epoch !== undefined && this.epoch !== reply.epoch);
      if (newEpoch || this.offset === undefined || this.offset > reply.offset) {
        this.offset = reply.offset;
      } else if (reply.recovered === false) {
        this._toldUntil = reply.offset; // evicted: the replay starts at the oldest kept
      }
      this.epoch = reply.epoch;
    } else {
      this.epoch = this.offset = undefined; // a wildcard, or a topic that keeps no history (now)
    }
    const again = this.accepted;
    this.accepted = true;
    if (!again) {
      this._resolve(this);
      return;
    }
    const missed = this._missed(reply, askedEpoch, renumbered);
    this.client._safely(() => this.options.onResubscribe?.(this, missed));
  }

  /**
   * What a resubscribe's `ok` says may be missing: nothing if the history replayed it all.
   * @param {Frame} reply
   * @param {string | undefined} askedEpoch the epoch its `since` named
   * @param {boolean} renumbered it had no `since`: the epoch was forgotten (a new numbering)
   * @returns {Missed | undefined}
   */
  _missed(reply, askedEpoch, renumbered) {
    if (reply.recovered === true) return undefined;
    /** @type {Missed["why"]} */
    let why = "no_history";
    if (!isConcrete(this.pattern)) why = "wildcard";
    else if (renumbered && typeof reply.epoch === "string") why = "history_lost";
    else if (reply.recovered === false && typeof reply.epoch === "string") {
      why = reply.epoch === askedEpoch ? "evicted" : "history_lost";
    }
    return { why, disconnection: /** @type {Disconnection} */ (this.client._dropped) };
  }

  /** @param {Error} error why it ended without being unsubscribed */
  _end(error) {
    this.active = false;
    this._stopRefill();
    this._reject(error);
  }
}

/**
 * A connection to the broker that reconnects by itself. It starts connecting at once.
 *
 * Commands given while disconnected wait for the next connection. Subscriptions survive
 * reconnects. A command whose answer a dropped connection swallowed is rejected with
 * {@link NotAnswered} (reason `"disconnected"`): it may or may not have taken effect.
 *
 * Given several URLs (nodes of one cluster), it tries them in a shuffled order: an attempt
 * that fails moves on at once to a URL not yet tried in this round; when all have failed, or a
 * connection that was up drops, the next round comes after the backoff. A URL whose broker
 * sent `Retry-After` is not tried again before that.
 */
export class Client {
  /**
   * @param {string | string[]} urls the broker's `ws://` or `wss://` URL, or several
   * @param {ClientOptions} [options]
   */
  constructor(urls, options = {}) {
    /** Every URL it may connect to. */
    this.urls = typeof urls === "string" ? [urls] : [...urls];
    if (this.urls.length === 0) throw new TypeError("no broker URL given");
    for (const url of this.urls) {
      const protocol = new URL(url).protocol;
      if (protocol !== "ws:" && protocol !== "wss:") {
        throw new TypeError(`the broker URL must be ws:// or wss://, not ${url}`);
      }
    }
    const Socket = options.WebSocket ?? globalThis.WebSocket;
    if (Socket === undefined) {
      throw new TypeError("no WebSocket here: pass options.WebSocket (in Node, the ws package's)");
    }
    /** The URL in use, or being tried. */
    this.url = this.urls[0];
    /** @type {string[]} the URLs this round has yet to try, in a shuffled order */
    this._round = [];
    /** @type {Map<string, number>} when a URL whose broker sent Retry-After may be tried again */
    this._notBefore = new Map();
    /** @type {Disconnection | undefined} how the last connection that was up ended */
    this._dropped = undefined;
    /** @type {Error | undefined} what commands get once the client has ended */
    this._ended = undefined;
    this.codec = options.codec ?? jsonCodec;
    this.options = options;
    this._Socket = Socket;
    /** @type {State} */
    this.state = "connecting";
    /** @type {WebSocket | null} */
    this._socket = null;
    this._nextId = 1;
    this._attempt = 0;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this._retryTimer = undefined;
    /** @type {Map<number, {resolve: (frame: Frame) => void, reject: (error: Error) => void}>} */
    this._pending = new Map();
    /** @type {Map<string, Subscription>} by pattern */
    this._subscriptions = new Map();
    /** @type {Array<{resolve: () => void, reject: (error: Error) => void}>} */
    this._waiters = [];
    /** @type {Promise<void>} resolves once the socket of a closed client has closed */
    this._closed = Promise.resolve();
    void this._open();
  }

  /**
   * Subscribe to a pattern (`*` is one segment, `>` the rest). Resolves once the broker
   * accepted it (waiting for a connection if need be), after the messages it replays for
   * `since`; rejects with {@link PubSubError} if it refused (`invalid_topic`, `forbidden`,
   * `not_enabled` for `joinLeave` where no matching topic has presence, `too_large` for an
   * `info` over 1 KiB, ...), with a `TypeError` for `since` on a wildcard or `onJoin` and
   * `onLeave` without `joinLeave`, and with a `RangeError` for a `bufferSize` that is not an
   * integer >= 1. A subscription to exactly a topic with presence makes this
   * client one of its members (showing `options.info`) until `unsubscribe()` or the end of the
   * connection; after a reconnect it is a member again, as a new `client`.
   * @param {string} pattern
   * @param {(message: Message) => void} onMessage
   * @param {SubscribeOptions} [options]
   * @returns {Promise<Subscription>}
   */
  subscribe(pattern, onMessage, options = {}) {
    if (this.state === "closed") return Promise.reject(this._closedError());
    if (this._subscriptions.has(pattern)) {
      return Promise.reject(
        new Error(`already subscribed to ${JSON.stringify(pattern)}; unsubscribe first`),
      );
    }
    if (options.since !== undefined && !isConcrete(pattern)) {
      return Promise.reject(
        new TypeError(`'since' needs a concrete topic, not ${JSON.stringify(pattern)}: a position belongs to one topic`),
      );
    }
    const { bufferSize } = options;
    if (bufferSize !== undefined && !(Number.isInteger(bufferSize) && bufferSize >= 1)) {
      return Promise.reject(new RangeError(`bufferSize must be an integer >= 1, not ${bufferSize}`));
    }
    if ((options.onJoin || options.onLeave) && !options.joinLeave) {
      return Promise.reject(
        new TypeError("'onJoin' and 'onLeave' need 'joinLeave: true': the broker sends join and leave only to a subscription that asks"),
      );
    }
    const subscription = new Subscription(this, pattern, onMessage, options);
    this._subscriptions.set(pattern, subscription);
    if (this.state === "connected") this._send(this._subscribeFrames([subscription]));
    // Otherwise the next connection sends it, with every other subscription.
    return subscription._firstAnswer;
  }

  /**
   * Publish `data` to a concrete topic. With `ack` (the default) resolves once the broker has
   * queued it for every subscriber, and rejects with {@link PubSubError} if it refused; without,
   * resolves once sent. When connected, the frame is sent before this returns, so it works in a
   * page's `pagehide` handler.
   * @param {string} topic
   * @param {unknown} data
   * @param {{ ack?: boolean }} [options]
   * @returns {Promise<void>}
   */
  async publish(topic, data, { ack = true } = {}) {
    if (this.state !== "connected") await this._whenConnected();
    if (!ack) {
      this._send([{ op: "pub", topic, data }]);
      return;
    }
    const id = this._nextId++;
    const reply = this._request(id);
    this._send([{ op: "pub", id, topic, data }]);
    await reply;
  }

  /**
   * One page of the members of `topic`, a concrete topic whose config rule says
   * `presence = true`: the `count` of members now, up to `limit` (0..1000, default 1000; 0
   * for the count alone) of them in `client` order, and the `cursor` to pass for the next page
   * (absent when no more remain; {@link Client#members} follows them for you). Rejects with
   * {@link PubSubError}: `not_enabled` for a topic without presence, `forbidden` without the
   * permission to subscribe to it, `invalid_topic` for a wildcard; with a `RangeError` for a
   * `limit` out of range.
   * @param {string} topic
   * @param {{ limit?: number, cursor?: string }} [options]
   * @returns {Promise<Presence>}
   */
  async presence(topic, { limit, cursor } = {}) {
    if (limit !== undefined && !(Number.isInteger(limit) && limit >= 0 && limit <= MAX_PAGE)) {
      throw new RangeError(`limit must be an integer 0..${MAX_PAGE}, not ${limit}`);
    }
    if (this.state !== "connected") await this._whenConnected();
    const id = this._nextId++;
    const reply = this._request(id);
    /** @type {Frame} */
    const frame = { op: "presence", id, topic };
    if (limit !== undefined) frame.limit = limit;
    if (cursor !== undefined) frame.cursor = cursor;
    this._send([frame]);
    const { count, members, cursor: next } = await reply;
    /** @type {Presence} */
    const page = {
      count: typeof count === "number" ? count : 0,
      members: Array.isArray(members) ? members.map(toMember) : [],
    };
    if (typeof next === "string") page.cursor = next;
    return page;
  }

  /**
   * Every member of `topic`, reading one page of `pageSize` (1..1000) at a time:
   * `for await (const member of client.members(topic))`. A member present through the whole
   * walk comes exactly once; one that joins or leaves meanwhile may or may not come. Rejects as
   * {@link Client#presence}.
   *
   * To keep a list, subscribe with `joinLeave` first, then read this, applying both to a map by
   * `client`; but a member this lists whose leave came meanwhile is gone: the answer and that
   * leave may come in one WebSocket message, and `onLeave` then runs before the code after
   * your `await` (docs/browser.md, "Keeping a list").
   * @param {string} topic
   * @param {{ pageSize?: number }} [options]
   * @returns {AsyncGenerator<Member, void, undefined>}
   */
  async *members(topic, { pageSize = MAX_PAGE } = {}) {
    if (!(Number.isInteger(pageSize) && pageSize >= 1 && pageSize <= MAX_PAGE)) {
      throw new RangeError(`pageSize must be an integer 1..${MAX_PAGE}, not ${pageSize}`);
    }
    /** @type {string | undefined} */
    let cursor;
    do {
      const page = await this.presence(topic, { limit: pageSize, cursor });
      yield* page.members;
      cursor = page.cursor;
    } while (cursor !== undefined);
  }

  /**
   * Close for good: no more reconnects; unanswered commands are rejected.
   * @returns {Promise<void>} resolves once the WebSocket has closed
   */
  close() {
    if (this.state === "closed") return this._closed;
    clearTimeout(this._retryTimer);
    const socket = this._socket;
    this._socket = null;
    if (socket !== null && socket.readyState !== socket.CLOSED) {
      this._closed = new Promise((resolve) => socket.addEventListener("close", () => resolve()));
      socket.close(1000, "client closed");
    }
    this._finish();
    return this._closed;
  }

  /** @param {Subscription} subscription */
  async _unsubscribe(subscription) {
    if (this._subscriptions.get(subscription.pattern) !== subscription) return;
    this._subscriptions.delete(subscription.pattern);
    subscription._end(new NotAnswered("closed", "unsubscribed before the broker answered"));
    if (this.state !== "connected") return;
    const id = this._nextId++;
    const reply = this._request(id);
    this._send([{ op: "unsub", id, topic: subscription.pattern }]);
    await reply;
  }

  /**
   * The `sub` frames for `subscriptions`, each with its answer wired to the subscription.
   * @param {Iterable<Subscription>} subscriptions
   */
  _subscribeFrames(subscriptions) {
    const frames = [];
    for (const subscription of subscriptions) {
      const id = this._nextId++;
      this._expect(
        id,
        (reply) => subscription.active && this._subscribed(subscription, reply),
        (error) => {
          // A dropped connection is not an answer: the next connection sends it again.
          if (error instanceof NotAnswered && error.reason === "disconnected") return;
          // The broker may still take the sub: an unsub behind it undoes it (same connection,
          // so in order), as the Python client does when a subscribe fails.
          if (error instanceof NotAnswered && error.reason === "timeout" && this._socket !== null) {
            this._send([this._unsubFrame(subscription.pattern)]);
          }
          if (this._subscriptions.get(subscription.pattern) === subscription) {
            this._subscriptions.delete(subscription.pattern);
          }
          if (subscription.accepted && this.state !== "closed") {
            this._report(new Error(`resubscribing to ${subscription.pattern} failed: ${error.message}`));
          }
          subscription._end(error);
        },
      );
      frames.push(subscription._frame(id));
    }
    return frames;
  }

  /**
   * The broker accepted `subscription`. For `since: "start"` on a topic with history this is
   * the first step: it learnt the epoch, so it drops the subscription's messages until the
   * answer to a `sub` with `since: {epoch, offset: 0}` (sent right after an `unsub`), which
   * replays them all. (The broker replays only from a known epoch, and a newcomer knows none.)
   * @param {Subscription} subscription
   * @param {Frame} reply
   */
  _subscribed(subscription, reply) {
    const fromStart = subscription._fromStart;
    subscription._fromStart = false;
    if (!fromStart || typeof reply.epoch !== "string" || !(reply.offset > 0)) {
      subscription._accept(reply);
      return;
    }
    subscription.epoch = reply.epoch;
    subscription.offset = 0;
    subscription._skipping = true;
    this._send([this._unsubFrame(subscription.pattern), ...this._subscribeFrames([subscription])]);
  }

  /**
   * An `unsub` frame for `pattern` whose answer nothing waits for (one lost with the
   * connection changes nothing either).
   * @param {string} pattern
   * @returns {Frame}
   */
  _unsubFrame(pattern) {
    const id = this._nextId++;
    this._expect(id, () => {}, () => {});
    return { op: "unsub", id, topic: pattern };
  }

  /**
   * Wait for the broker's answer to command `id`: `onOk` gets the `ok` frame; `onError` an
   * `err` as {@link PubSubError}, or {@link NotAnswered}. Both are called as the answer is
   * read, before the frames that follow it in the same message are handled.
   * @param {number} id
   * @param {(frame: Frame) => void} onOk
   * @param {(error: Error) => void} onError
   */
  _expect(id, onOk, onError) {
    const timeout = this.options.timeout ?? 10000;
    const timer = setTimeout(() => {
      this._pending.delete(id);
      onError(new NotAnswered("timeout", `no answer from the broker within ${timeout} ms`));
    }, timeout);
    const settle = () => {
      clearTimeout(timer);
      this._pending.delete(id);
    };
    this._pending.set(id, {
      resolve: (frame) => (settle(), onOk(frame)),
      reject: (error) => (settle(), onError(error)),
    });
  }

  /**
   * A promise for the broker's answer to command `id`: the `ok` frame, or a rejection.
   * @param {number} id
   * @returns {Promise<Frame>}
   */
  _request(id) {
    return new Promise((resolve, reject) => this._expect(id, resolve, reject));
  }

  /** @param {Frame[]} frames sent as one WebSocket message */
  _send(frames) {
    if (this._socket === null) throw new NotAnswered("disconnected", "not connected");
    this._socket.send(this.codec.encode(frames));
  }

  /** @returns {Promise<void>} */
  _whenConnected() {
    if (this.state === "closed") return Promise.reject(this._closedError());
    if (this.state === "connected") return Promise.resolve();
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  _closedError() {
    return this._ended ?? new NotAnswered("closed", "the client is closed");
  }

  /**
   * @param {State} state
   * @param {Disconnection} [disconnection] why, for `disconnected` and `closed`
   */
  _setState(state, disconnection) {
    if (this.state === state) return;
    this.state = state;
    this._safely(() => this.options.onState?.(state, disconnection));
  }

  /**
   * Run an application callback; what it throws is reported, not let loose in the client.
   * @param {() => void} callback
   */
  _safely(callback) {
    try {
      callback();
    } catch (error) {
      this._report(/** @type {Error} */ (error));
    }
  }

  /** @param {Error} error */
  _report(error) {
    try {
      if (!this.options.onError) throw error;
      this.options.onError(error);
    } catch (unhandled) {
      console.error(unhandled);
    }
  }

  /**
   * Become `closed`: reject everything still waiting, and every command after, with `error`.
   * @param {Error} [error]
   * @param {Disconnection} [disconnection] why, unless {@link Client#close} was called
   */
  _finish(error = this._closedError(), disconnection) {
    this._ended = error;
    this._setState("closed", disconnection);
    for (const pending of [...this._pending.values()]) pending.reject(error);
    for (const waiter of this._waiters.splice(0)) waiter.reject(error);
    for (const subscription of this._subscriptions.values()) subscription._end(error);
  }

  async _open() {
    if (this._round.length === 0) {
      const now = Date.now();
      const ready = this.urls.filter((url) => (this._notBefore.get(url) ?? 0) <= now);
      this._round = shuffled(ready.length > 0 ? ready : this.urls);
    }
    const url = (this.url = /** @type {string} */ (this._round.shift()));
    this._setState("connecting");
    /** Stand-in for a close event, when no socket could be made. */
    const failed = (/** @type {unknown} */ error, /** @type {boolean} */ startOver) => {
      this._report(/** @type {Error} */ (error));
      this._retry({ url, code: 1006, reason: "", message: `cannot connect to ${url}: ${error}` }, startOver);
    };
    let target;
    try {
      const source = this.options.token;
      const token = typeof source === "function" ? await source() : source;
      if (/** @type {State} */ (this.state) === "closed") return;
      target = withToken(url, token);
    } catch (error) {
      failed(error, true); // the token function failed: asking it again at once would not help
      return;
    }
    let socket;
    try {
      socket = new this._Socket(target, [this.codec.subprotocol]);
    } catch (error) {
      failed(error, false);
      return;
    }
    socket.binaryType = "arraybuffer";
    this._socket = socket;
    let opened = false;
    /** @type {Refusal | undefined} */
    let refusal;
    const showsRefusals = watchRefusals(socket, (refused) => (refusal = refused));
    let failure = "";
    socket.addEventListener("open", () => {
      opened = true;
      this._onOpen(socket);
    });
    socket.addEventListener("message", (event) => socket === this._socket && this._onMessage(event.data));
    socket.addEventListener("error", (event) => {
      failure = String(/** @type {any} */ (event).message ?? ""); // Node's ws says what; browsers do not
    });
    socket.addEventListener("close", (event) => {
      const disconnection = describeClose(url, opened, event, refusal, showsRefusals ? failure : undefined);
      this._onClose(socket, opened, disconnection);
    });
  }

  /** @param {WebSocket} socket */
  _onOpen(socket) {
    if (socket !== this._socket) return;
    this._attempt = 0;
    this._round = [];
    // Every subscription again, as one batch; `since` where the topic keeps history.
    const frames = this._subscribeFrames(this._subscriptions.values());
    if (frames.length > 0) this._send(frames);
    this._setState("connected");
    for (const waiter of this._waiters.splice(0)) waiter.resolve();
  }

  /** @param {string | ArrayBuffer} data */
  _onMessage(data) {
    let frames;
    try {
      frames = this.codec.decode(data);
    } catch (error) {
      this._report(new PubSubError("bad_request", `undecodable message from the broker: ${error}`));
      return;
    }
    for (const frame of frames) {
      if (typeof frame === "object" && frame !== null) this._safely(() => this._dispatch(frame));
    }
  }

  /** @param {Frame} frame */
  _dispatch(frame) {
    switch (frame.op) {
      case "msg":
        this._subscriptions.get(frame.sub)?._deliver(/** @type {Message} */ (frame));
        break;
      case "ok":
        this._pending.get(frame.id)?.resolve(frame);
        break;
      case "err": {
        const error = new PubSubError(String(frame.code), String(frame.msg));
        const pending = frame.id === undefined ? undefined : this._pending.get(frame.id);
        if (pending) pending.reject(error);
        else this._report(error);
        break;
      }
      case "join":
      case "leave":
        this._subscriptions.get(frame.sub)?._announce(frame);
        break;
      case "lag":
        this._subscriptions.get(frame.sub)?.options.onLag?.(frame.dropped);
        break;
      default:
        break; // unknown frames are ignored, as the protocol asks of both sides
    }
  }

  /**
   * The socket closed: reject what waited for an answer on it, then try again, or end if the
   * broker refused in a way that waiting will not change (and no token function can help).
   * @param {WebSocket} socket
   * @param {boolean} opened whether it had been connected
   * @param {Disconnection} disconnection
   */
  _onClose(socket, opened, disconnection) {
    if (socket !== this._socket) return;
    this._socket = null;
    if (opened) this._dropped = disconnection;
    const message = `the connection dropped before the answer: ${disconnection.message}`;
    const dropped = new NotAnswered("disconnected", message, disconnection);
    for (const pending of [...this._pending.values()]) pending.reject(dropped);
    const tokenCanHelp = typeof this.options.token === "function" && wantsToken(disconnection);
    if (disconnection.status === 400 || (wantsToken(disconnection) && !tokenCanHelp)) {
      const refused = new Refused(disconnection);
      this._finish(refused, disconnection);
      this._report(refused);
    } else if (this.options.reconnect === false) {
      this._finish(new NotAnswered("closed", `the client is closed: ${disconnection.message}`), disconnection);
    } else {
      this._retry(disconnection, opened);
    }
  }

  /**
   * Try again: at once with the next URL of this round; after the backoff when none is left or
   * `startOver` (a connection that was up dropped), and not before a URL's `Retry-After`.
   * @param {Disconnection} disconnection
   * @param {boolean} startOver
   */
  _retry(disconnection, startOver) {
    const now = Date.now();
    const { url, retryAfter } = disconnection;
    if (retryAfter !== undefined) this._notBefore.set(url, now + retryAfter * 1000);
    const ready = (/** @type {string} */ each) => (this._notBefore.get(each) ?? 0) <= now;
    this._round = startOver ? [] : this._round.filter(ready);
    let delay = 0;
    if (this._round.length === 0) {
      const soonest = Math.min(...this.urls.map((each) => (this._notBefore.get(each) ?? 0) - now));
      delay = Math.max(backoffDelay(this._attempt++, this.options.backoff), soonest);
    }
    this._setState("disconnected", { ...disconnection, delay });
    this._retryTimer = setTimeout(() => void this._open(), delay);
  }
}
