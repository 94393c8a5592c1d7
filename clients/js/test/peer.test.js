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

import { NotAnswered, Refused, jsonCodec } from "../src/client.js";
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
