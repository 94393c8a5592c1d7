// @ts-check
/**
 * The client against a scripted peer, for what a real broker shows only by chance: the `since`
 * it sends after a history was lost (a new epoch), an `ok` and messages in one batch, a batch
 * whose handler throws, a `sub` the client gave up waiting for, and closes the broker sends only
 * after a while (4003, token expired) or not yet (4010). (The other files use real brokers.)
 */
import assert from "node:assert/strict";
import { test } from "node:test";

import { WebSocketServer } from "ws";

import { HistoryLost, NotAnswered, Refused, jsonCodec } from "../src/client.js";
import { Inbox, eventually, makeClient } from "./helpers.js";

const range = (/** @type {number} */ from, /** @type {number} */ to) =>
  Array.from({ length: to - from }, (_, index) => from + index);

/**
 * A WebSocket server on a free port speaking JSON frames; each connection is pushed to
 * `connections` with its request URL and an inbox of the frames it receives.
 */
async function scriptedPeer() {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: (offered) => [...offered][0] });
  await new Promise((resolve) => server.once("listening", resolve));
  /** @type {Inbox<{url: string, protocol: string, frames: Inbox<any>, send: (...frames: unknown[]) => void, drop: () => void, close: (code: number, reason: string) => void}>} */
  const connections = new Inbox();
  server.on("connection", (socket, request) => {
    /** @type {Inbox<any>} */
    const frames = new Inbox();
    socket.on("message", (data) => {
      for (const frame of jsonCodec.decode(data.toString())) frames.push(frame);
    });
    connections.push({
      url: request.url ?? "",
      protocol: socket.protocol,
      frames,
      send: (...sent) => socket.send(sent.map((frame) => JSON.stringify(frame)).join("\n")),
      drop: () => socket.terminate(),
      close: (code, reason) => socket.close(code, reason),
    });
  });
  const { port } = /** @type {import("node:net").AddressInfo} */ (server.address());
  return { url: `ws://127.0.0.1:${port}/`, connections, close: () => server.close() };
}

test("a resubscribe asks for what was missed: since = epoch of the ok, offset of the last msg", async () => {
  const peer = await scriptedPeer();
  const client = makeClient(peer.url);
  try {
    const first = await peer.connections.next();
    /** @type {Inbox<unknown>} the messages' data, and what onResubscribe saw */
    const inbox = new Inbox();
    const subscribing = client.subscribe("room.1", (message) => inbox.push(message.data), {
      onResubscribe: (subscription, missed) => inbox.push(`recovered: ${subscription.recovered}, ${missed?.why}`),
    });
    const wildcard = client.subscribe("room.*", () => {}); // no position: never `since`
    const sub = await first.frames.next();
    assert.deepEqual(sub, { op: "sub", id: sub.id, topic: "room.1" });
    first.send({ op: "ok", id: sub.id, epoch: "e1", offset: 4 });
    first.send({ op: "ok", id: (await first.frames.next()).id });
    await wildcard;
    const subscription = await subscribing;
    assert.deepEqual(subscription.position, { epoch: "e1", offset: 4 });
    first.send(
      { op: "msg", topic: "room.1", sub: "room.1", data: "five", offset: 5 },
      { op: "msg", topic: "room.1", sub: "room.1", data: "six", offset: 6 },
    );
    assert.deepEqual([await inbox.next(), await inbox.next()], ["five", "six"]);

    first.drop();
    const second = await peer.connections.next();
    const resubs = [await second.frames.next(), await second.frames.next()];
    const again = resubs.find((frame) => frame.topic === "room.1");
    assert.deepEqual(again.since, { epoch: "e1", offset: 6 });
    assert.equal(resubs.find((frame) => frame.topic === "room.*").since, undefined);
    // The history was lost meanwhile: a new epoch, recovered false, go on from its latest.
    // The ok is taken before the live message after it in the same batch, whose offset counts.
    second.send(
      { op: "ok", id: again.id, epoch: "e2", offset: 1, recovered: false },
      { op: "msg", topic: "room.1", sub: "room.1", data: "two", offset: 2 },
    );
    assert.deepEqual([await inbox.next(), await inbox.next()], ["recovered: false, history_lost", "two"]);
    assert.deepEqual(subscription.position, { epoch: "e2", offset: 2 });

    second.drop();
    const third = await peer.connections.next();
    const [resub] = [await third.frames.next(), await third.frames.next()].filter((f) => f.topic === "room.1");
    assert.deepEqual(resub.since, { epoch: "e2", offset: 2 });
  } finally {
    await client.close();
    peer.close();
  }
});

test("a refill reads pages of at most 1000, holds bufferSize, and tells what it could not read", async () => {
  const peer = await scriptedPeer();
  /** @type {Inbox<Error>} */
  const errors = new Inbox();
  const client = makeClient(peer.url, { onError: errors.push });
  /** @param {number} offset */
  const msg = (offset) => ({ op: "msg", topic: "room.r", sub: "room.r", data: offset, offset });
  /** @param {number} from @param {number} to */
  const kept = (from, to) => Array.from({ length: to - from + 1 }, (_, index) => ({ offset: from + index, data: from + index }));
  try {
    const connection = await peer.connections.next();
    /** @type {Array<number | string>} what the application got: data, and gaps */
    const seen = [];
    const subscribing = client.subscribe("room.r", (message) => seen.push(/** @type {number} */ (message.data)), {
      bufferSize: 2,
      onGap: ({ from, to, why }) => seen.push(`${from}..${to} ${why}`),
    });
    const sub = await connection.frames.next();
    connection.send({ op: "ok", id: sub.id, epoch: "e", offset: 0 }, msg(1));
    const subscription = await subscribing;
    // 2..2502 dropped; 2503 and 2504 are held, 2505 is not.
    connection.send({ op: "lag", sub: "room.r", dropped: 2501 }, msg(2503), msg(2504), msg(2505));
    /** Expect a `history` read after `offset` for `limit`, and answer it with `fields`. */
    const read = async (/** @type {number} */ offset, /** @type {number} */ limit, /** @type {object} */ fields) => {
      const frame = await connection.frames.next();
      assert.deepEqual(frame, { op: "history", id: frame.id, topic: "room.r", since: { epoch: "e", offset }, limit });
      assert.equal(subscription.refilling, true);
      connection.send({ op: "ok", id: frame.id, epoch: "e", offset: 2505, ...fields });
      return frame;
    };
    await read(1, 1000, { messages: kept(2, 1001), recovered: true });
    await read(1001, 1000, { messages: kept(1002, 2001), recovered: true });
    // 2002..2099 are no longer kept, and the answer goes past what was asked for.
    await read(2001, 501, { messages: kept(2100, 2600), recovered: false });
    const failed = await connection.frames.next(); // for 2505, which was not held
    assert.deepEqual([failed.since.offset, failed.limit], [2504, 1]);
    connection.send({ op: "err", id: failed.id, code: "unavailable", msg: "the cluster backplane is unreachable" });
    assert.match((await errors.next()).message, /^reading the history of room\.r failed: unavailable/);
    connection.send(msg(2506), msg(2508)); // no refill for 2506; one for 2507, in another epoch
    const lost = await connection.frames.next();
    assert.deepEqual([lost.since.offset, lost.limit], [2506, 1]);
    connection.send({ op: "ok", id: lost.id, epoch: "e2", offset: 3, messages: [] }, msg(2509));
    await eventually(() => seen.at(-1) === 2509, () => `the last seen is ${seen.at(-1)}`);
    assert.deepEqual(seen, [
      ...range(1, 2002), "2002..2099 evicted", ...range(2100, 2505), "2505..2505 read_failed",
      2506, "2507..2507 history_lost", 2508, 2509,
    ]);
    assert.deepEqual([subscription.refills, subscription.refilling, subscription.offset], [5, false, 2509]);
  } finally {
    await client.close();
    peer.close();
  }
});

/**
 * A `msg` frame of `topic`, and `history` answer entries.
 * @param {string} topic
 */
const frames = (topic) => ({
  msg: (/** @type {number} */ offset, /** @type {unknown} */ data) => ({ op: "msg", topic, sub: topic, data, offset }),
  /** @param {number} from @param {number} to @param {string} prefix */
  kept: (from, to, prefix) => range(from, to + 1).map((offset) => ({ offset, data: `${prefix}${offset}` })),
});

/**
 * What an application got, in order: messages' data, gaps, and the losses told to `onError`.
 * @param {Array<unknown>} seen
 */
const recorder = (seen) => ({
  onMessage: (/** @type {import("../src/client.js").Message} */ message) => seen.push(message.data),
  onGap: (/** @type {import("../src/client.js").Gap} */ { from, to, why }) => seen.push(`${from}..${to} ${why}`),
  onError: (/** @type {Error} */ error) =>
    seen.push(error instanceof HistoryLost ? `${error.topic} lost after ${error.after} (${error.offset})` : error.message),
});

test("an offset that goes back is a new numbering: told once, its earlier offsets read from the oldest kept, its epoch learnt", async () => {
  const peer = await scriptedPeer();
  /** @type {unknown[]} */
  const seen = [];
  const { onMessage, onGap, onError } = recorder(seen);
  const client = makeClient(peer.url, { onError });
  const { msg, kept } = frames("room.n");
  try {
    const connection = await peer.connections.next();
    const subscribing = client.subscribe("room.n", onMessage, { onGap });
    const sub = await connection.frames.next();
    connection.send({ op: "ok", id: sub.id, epoch: "e1", offset: 0 }, msg(1, "a1"), msg(2, "a2"), msg(3, "a3"));
    const subscription = await subscribing;
    // Its history was evicted whole, then published to again (b1, b2 dropped for this client).
    connection.send(msg(3, "b3"), msg(4, "b4"));
    const learn = await connection.frames.next(); // without since: from the oldest kept
    assert.deepEqual(learn, { op: "history", id: learn.id, topic: "room.n", limit: 2 });
    assert.equal(subscription.position, undefined);
    connection.send({ op: "ok", id: learn.id, epoch: "e2", offset: 4, messages: kept(2, 4, "b") });
    await eventually(() => seen.at(-1) === "b4", () => `the last seen is ${seen.at(-1)}`);
    assert.deepEqual(subscription.position, { epoch: "e2", offset: 4 });

    // Again (a third epoch), and this time the oldest kept is past what is missing: the read
    // that learns the epoch brings none of it, and says nothing of it; the next one, with
    // since, finds it gone.
    connection.send(msg(2, "c2"));
    const learnAgain = await connection.frames.next();
    assert.deepEqual(learnAgain, { op: "history", id: learnAgain.id, topic: "room.n", limit: 1 });
    connection.send({ op: "ok", id: learnAgain.id, epoch: "e3", offset: 2, messages: kept(2, 2, "c") });
    const since = await connection.frames.next();
    assert.deepEqual(since, { op: "history", id: since.id, topic: "room.n", since: { epoch: "e3", offset: 0 }, limit: 1 });
    connection.send({ op: "ok", id: since.id, epoch: "e3", offset: 2, messages: kept(2, 2, "c"), recovered: false });
    connection.send(msg(3, "c3"));
    await eventually(() => seen.at(-1) === "c3", () => `the last seen is ${seen.at(-1)}`);
    assert.deepEqual(seen, [
      "a1", "a2", "a3",
      "room.n lost after 3 (3)", "1..1 evicted", "b2", "b3", "b4",
      "room.n lost after 4 (2)", "1..1 evicted", "c2", "c3",
    ]);
    assert.deepEqual([subscription.refills, subscription.refilling], [3, false]);

    connection.drop(); // the reconnect asks in the epoch learnt
    const second = await peer.connections.next();
    assert.deepEqual((await second.frames.next()).since, { epoch: "e3", offset: 3 });
  } finally {
    await client.close();
    peer.close();
  }
});

test("a failed read for a new numbering's epoch is not read again, nor is one without refill: the resubscribe has no since", async () => {
  const peer = await scriptedPeer();
  /** @type {unknown[]} */
  const seen = [];
  const { onMessage, onGap, onError } = recorder(seen);
  const client = makeClient(peer.url, { onError });
  /** @param {import("../src/client.js").Subscription} subscription @param {import("../src/client.js").Missed} [missed] */
  const onResubscribe = (subscription, missed) => seen.push(`${subscription.pattern}: ${subscription.recovered} ${missed?.why}`);
  const f = frames("room.f");
  const o = frames("room.o");
  try {
    const connection = await peer.connections.next();
    const subscribing = Promise.all([
      client.subscribe("room.f", onMessage, { onGap, onResubscribe }),
      client.subscribe("room.o", onMessage, { onGap, onResubscribe, refill: false }),
    ]);
    const subs = [await connection.frames.next(), await connection.frames.next()];
    connection.send(...subs.map((sub) => ({ op: "ok", id: sub.id, epoch: "e1", offset: 5 })));
    const [refilled, plain] = await subscribing;
    connection.send(f.msg(1, "f1"));
    const learn = await connection.frames.next();
    assert.deepEqual(learn, { op: "history", id: learn.id, topic: "room.f", limit: 1 });
    connection.send({ op: "err", id: learn.id, code: "unavailable", msg: "the cluster backplane is unreachable" });
    connection.send(f.msg(2, "f2"), f.msg(4, "f4"), o.msg(2, "o2"), o.msg(4, "o4"));
    const published = client.publish("room.x", 0);
    const next = await connection.frames.next(); // no other read: the publish comes next
    assert.deepEqual([next.op, next.topic], ["pub", "room.x"]);
    connection.send({ op: "ok", id: next.id });
    await published;
    assert.deepEqual(seen, [
      "room.f lost after 5 (1)",
      "reading the history of room.f failed: unavailable: the cluster backplane is unreachable",
      "f1", "f2", "f4",
      "room.o lost after 5 (2)", "o2", "o4",
    ]);
    assert.deepEqual([refilled.position, plain.position, refilled.refills, plain.refills], [undefined, undefined, 1, 0]);

    connection.drop();
    const second = await peer.connections.next();
    const resubs = [await second.frames.next(), await second.frames.next()];
    assert.deepEqual(resubs.map((frame) => [frame.topic, frame.since]), [["room.f", undefined], ["room.o", undefined]]);
    second.send(...resubs.map((sub) => ({ op: "ok", id: sub.id, epoch: "e2", offset: 7 })));
    await eventually(() => seen.length === 10, () => `${seen.length} of 10 seen`);
    assert.deepEqual(seen.slice(8), ["room.f: false history_lost", "room.o: false history_lost"]);
    assert.deepEqual([refilled.position, plain.position], [{ epoch: "e2", offset: 7 }, { epoch: "e2", offset: 7 }]);
  } finally {
    await client.close();
    peer.close();
  }
});

test("after a resubscribe that says the oldest were evicted, the jump to the kept tail is a gap named without a read", async () => {
  const peer = await scriptedPeer();
  /** @type {unknown[]} */
  const seen = [];
  const { onMessage, onGap, onError } = recorder(seen);
  const client = makeClient(peer.url, { onError });
  const { msg, kept } = frames("room.e");
  try {
    const first = await peer.connections.next();
    const subscribing = client.subscribe("room.e", onMessage, {
      onGap,
      onResubscribe: (subscription, missed) => seen.push(`${subscription.recovered} ${missed?.why}`),
    });
    const sub = await first.frames.next();
    first.send({ op: "ok", id: sub.id, epoch: "e", offset: 0 }, msg(1, 1), msg(2, 2));
    const subscription = await subscribing;
    await eventually(() => seen.length === 2, () => `${seen.length} of 2 seen`);

    first.drop();
    const second = await peer.connections.next();
    const again = await second.frames.next();
    assert.deepEqual(again.since, { epoch: "e", offset: 2 });
    // 3..45 are gone: the replay starts at the oldest kept, 46; then 51 and 52 are dropped live.
    second.send({ op: "ok", id: again.id, epoch: "e", offset: 50, recovered: false }, ...range(46, 51).map((n) => msg(n, n)));
    second.send(msg(53, 53));
    const read = await second.frames.next(); // the first read is for the live drop
    assert.deepEqual([read.op, read.since, read.limit], ["history", { epoch: "e", offset: 50 }, 2]);
    second.send({ op: "ok", id: read.id, epoch: "e", offset: 53, messages: kept(51, 53, "") });
    await eventually(() => seen.at(-1) === 53, () => `the last seen is ${seen.at(-1)}`);

    second.drop();
    const third = await peer.connections.next();
    const resub = await third.frames.next();
    assert.deepEqual(resub.since, { epoch: "e", offset: 53 });
    // Nothing kept after 53 (outlived history_ttl, say): no replay; 61 and 62 dropped live.
    third.send({ op: "ok", id: resub.id, epoch: "e", offset: 60, recovered: false }, msg(63, 63));
    const read2 = await third.frames.next();
    assert.deepEqual([read2.op, read2.since, read2.limit], ["history", { epoch: "e", offset: 60 }, 2]);
    third.send({ op: "ok", id: read2.id, epoch: "e", offset: 63, messages: kept(61, 63, "") });
    await eventually(() => seen.at(-1) === 63, () => `the last seen is ${seen.at(-1)}`);
    assert.deepEqual(seen, [
      1, 2,
      "false evicted", "3..45 evicted", ...range(46, 51), "51", "52", 53,
      "false evicted", "54..60 evicted", "61", "62", 63,
    ]);
    assert.equal(subscription.refills, 2);
  } finally {
    await client.close();
    peer.close();
  }
});

test("a refill ended by its own callback stops at once; a bad bufferSize is refused", async () => {
  const peer = await scriptedPeer();
  /** @type {Error[]} */
  const errors = [];
  const client = makeClient(peer.url, { onError: (error) => errors.push(error) });
  try {
    const connection = await peer.connections.next();
    await assert.rejects(client.subscribe("room.s", () => {}, { bufferSize: 0 }), RangeError);
    /** @type {Array<number | string>} */
    const seen = [];
    /** @type {Promise<void> | undefined} */
    let unsubscribed;
    const subscribing = client.subscribe("room.s", (message) => seen.push(/** @type {number} */ (message.offset)), {
      onGap: ({ from, to }) => {
        seen.push(`${from}..${to}`);
        unsubscribed = subscription.unsubscribe();
      },
    });
    const sub = await connection.frames.next();
    connection.send({ op: "ok", id: sub.id, epoch: "e", offset: 0 });
    const subscription = await subscribing;
    connection.send(...[1, 5, 6].map((offset) => ({ op: "msg", topic: "room.s", sub: "room.s", data: offset, offset })));
    const read = await connection.frames.next();
    connection.send({ op: "ok", id: read.id, epoch: "e", offset: 6, messages: [{ offset: 4, data: 4 }], recovered: false });
    const unsub = await connection.frames.next();
    assert.deepEqual([unsub.op, unsub.topic], ["unsub", "room.s"]);
    connection.send({ op: "ok", id: unsub.id });
    await unsubscribed;
    assert.deepEqual(seen, [1, "2..3"]);
    assert.deepEqual([subscription.refilling, errors], [false, []]);
  } finally {
    await client.close();
    peer.close();
  }
});

test("subscribe with since sends it on the first sub too", async () => {
  const peer = await scriptedPeer();
  const client = makeClient(peer.url);
  try {
    const connection = await peer.connections.next();
    void client.subscribe("news", () => {}, { since: { epoch: "e9", offset: 12 } });
    const sub = await connection.frames.next();
    assert.deepEqual(sub.since, { epoch: "e9", offset: 12 });
  } finally {
    await client.close();
    peer.close();
  }
});

test("a throwing handler is reported and the rest of the batch still arrives", async () => {
  const peer = await scriptedPeer();
  /** @type {Inbox<Error>} */
  const errors = new Inbox();
  const client = makeClient(peer.url, { onError: errors.push });
  try {
    const connection = await peer.connections.next();
    /** @type {Inbox<unknown>} */
    const inbox = new Inbox();
    const subscribed = Promise.all([
      client.subscribe("bad", () => {
        throw new Error("handler bug");
      }),
      client.subscribe("good", (message) => inbox.push(message.data)),
    ]);
    const subs = [await connection.frames.next(), await connection.frames.next()];
    connection.send(...subs.map((sub) => ({ op: "ok", id: sub.id })));
    await subscribed;
    const published = client.publish("good", 0);
    const pub = await connection.frames.next();
    connection.send(
      { op: "msg", topic: "bad", sub: "bad", data: 1 },
      null,
      { op: "msg", topic: "good", sub: "good", data: 2 },
      { op: "ok", id: pub.id },
    );
    await published;
    assert.equal(await inbox.next(), 2);
    assert.equal((await errors.next()).message, "handler bug");
  } finally {
    await client.close();
    peer.close();
  }
});

test("a sub that timed out is undone with an unsub behind it", async () => {
  const peer = await scriptedPeer();
  const client = makeClient(peer.url, { timeout: 100 });
  try {
    const connection = await peer.connections.next();
    const late = client.subscribe("late", () => {});
    const sub = await connection.frames.next();
    await assert.rejects(late, (error) => error instanceof NotAnswered && error.reason === "timeout");
    const unsub = await connection.frames.next();
    assert.deepEqual(unsub, { op: "unsub", id: unsub.id, topic: "late" });
    connection.send({ op: "ok", id: sub.id }, { op: "ok", id: unsub.id }); // answers do not matter now
    const again = client.subscribe("late", () => {}); // a new subscription, after the unsub
    const resub = await connection.frames.next();
    assert.deepEqual(resub, { op: "sub", id: resub.id, topic: "late" });
    connection.send({ op: "ok", id: resub.id });
    await again;
  } finally {
    await client.close();
    peer.close();
  }
});

test("a close 4003 without a token function ends the client; what waited carries the close", async () => {
  const peer = await scriptedPeer();
  /** @type {Inbox<Error>} */
  const errors = new Inbox();
  /** @type {Inbox<string>} */
  const states = new Inbox();
  const client = makeClient(peer.url, {
    token: "fixed",
    onError: errors.push,
    onState: (state, why) => states.push(`${state}: ${why?.code} ${why?.reason}`),
  });
  try {
    const connection = await peer.connections.next();
    const pending = client.publish("news", 1);
    await connection.frames.next(); // sent, never answered
    connection.close(4003, "token expired");
    await assert.rejects(pending, (error) => {
      assert.ok(error instanceof NotAnswered);
      assert.deepEqual([error.reason, error.disconnection?.code, error.disconnection?.reason], [
        "disconnected",
        4003,
        "token expired",
      ]);
      return true;
    });
    assert.equal(await states.until((state) => !state.startsWith("connect")), "closed: 4003 token expired");
    const error = await errors.next();
    assert.ok(error instanceof Refused);
    assert.equal(error.message, `${peer.url} closed the connection: 4003 token expired`);
    await assert.rejects(client.publish("news", 2), Refused);
  } finally {
    await client.close();
    peer.close();
  }
});

test("a close 4010 with a token function asks it for a fresh token and connects again", async () => {
  const peer = await scriptedPeer();
  let issued = 0;
  /** @type {Inbox<string>} */
  const states = new Inbox();
  const client = makeClient(peer.url, {
    token: () => `t${++issued}`,
    onState: (state, why) => states.push(why ? `${state}: ${why.code} ${why.reason}` : state),
  });
  try {
    const first = await peer.connections.next();
    assert.equal(first.url, "/?token=t1");
    await states.until((state) => state === "connected");
    first.close(4010, "disconnected by the server API");
    assert.equal(await states.next(), "disconnected: 4010 disconnected by the server API");
    assert.equal((await peer.connections.next()).url, "/?token=t2");
    await states.until((state) => state === "connected");
  } finally {
    await client.close();
    peer.close();
  }
});
