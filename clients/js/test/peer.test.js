// @ts-check
/**
 * The client against a scripted peer, for what a real broker shows only by chance: the `since`
 * it sends after a history was lost (a new epoch), an `ok` and messages in one batch, a batch
 * whose handler throws, and a `sub` the client gave up waiting for. (history.test.js and tokens.test.js use a real broker.)
 */
import assert from "node:assert/strict";
import { test } from "node:test";

import { WebSocketServer } from "ws";

import { NotAnswered, jsonCodec } from "../src/client.js";
import { Inbox, makeClient } from "./helpers.js";

/**
 * A WebSocket server on a free port speaking JSON frames; each connection is pushed to
 * `connections` with its request URL and an inbox of the frames it receives.
 */
async function scriptedPeer() {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: (offered) => [...offered][0] });
  await new Promise((resolve) => server.once("listening", resolve));
  /** @type {Inbox<{url: string, protocol: string, frames: Inbox<any>, send: (...frames: unknown[]) => void, drop: () => void}>} */
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
      onResubscribe: (subscription) => inbox.push(`recovered: ${subscription.recovered}`),
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
    assert.deepEqual([await inbox.next(), await inbox.next()], ["recovered: false", "two"]);
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
