// @ts-check
/** The pure parts: backoff delays, token URLs, the URL shuffle, what a close says, the two codecs. */
import assert from "node:assert/strict";
import { test } from "node:test";

import { encode } from "@msgpack/msgpack";

import { backoffDelay, describeClose, jsonCodec, shuffled, withToken } from "../src/client.js";
import { msgpackCodec } from "../src/msgpack.js";

test("backoff doubles from the initial delay up to the cap, jittered to half..all", () => {
  const low = () => 0;
  const high = () => 0.999999;
  const options = { initial: 100, max: 1000, factor: 2 };
  assert.deepEqual([0, 1, 2, 3, 4, 10].map((n) => backoffDelay(n, options, low)), [50, 100, 200, 400, 500, 500]);
  for (const attempt of [0, 3, 10]) {
    const ceiling = Math.min(1000, 100 * 2 ** attempt);
    assert.ok(backoffDelay(attempt, options, high) < ceiling);
    assert.ok(backoffDelay(attempt, options, high) > ceiling * 0.99);
  }
  assert.equal(backoffDelay(0, {}, low), 125); // defaults: 250 ms initial
  assert.equal(backoffDelay(100, {}, low), 5000); // 10 s cap
});

test("the token goes in the query, escaped, keeping what the URL had", () => {
  assert.equal(withToken("ws://h:1/", undefined), "ws://h:1/");
  assert.equal(withToken("ws://h:1/", "a b&c"), "ws://h:1/?token=a+b%26c");
  assert.equal(withToken("wss://h/ws?x=1&token=old", "new"), "wss://h/ws?x=1&token=new");
});

test("shuffled: every URL once, in an order the random source picks", () => {
  const urls = ["ws://a/", "ws://b/", "ws://c/"];
  assert.deepEqual(shuffled(urls, () => 0.999999), urls); // what inGivenOrder() relies on
  assert.deepEqual(shuffled(urls, () => 0), ["ws://b/", "ws://c/", "ws://a/"]);
  assert.deepEqual(shuffled(urls).sort(), urls);
});

test("a close says what is known: the broker's words, or what a browser cannot tell", () => {
  const url = "ws://h/";
  const abnormal = { code: 1006, reason: "" };
  assert.deepEqual(describeClose(url, false, abnormal, { status: 503, retryAfter: 5, reason: "full" }, ""), {
    url, code: 1006, reason: "full", status: 503, retryAfter: 5,
    message: "ws://h/ refused the connection: HTTP 503 full",
  });
  const said = (/** @type {boolean} */ opened, /** @type {{code: number, reason: string}} */ close,
    /** @type {string | undefined} */ failure) => describeClose(url, opened, close, undefined, failure).message;
  assert.equal(said(true, { code: 1001, reason: "server shutting down" }, ""),
    "ws://h/ closed the connection: 1001 server shutting down");
  assert.equal(said(true, abnormal, ""), "the connection to ws://h/ dropped (1006, no close frame)");
  assert.equal(said(false, abnormal, "connect ECONNREFUSED"), "cannot reach ws://h/: connect ECONNREFUSED");
  assert.match(said(false, abnormal, undefined), /shows neither the HTTP status nor the broker's reason$/);
});

test("json: one frame per line out, every line of a batch in", () => {
  assert.equal(jsonCodec.subprotocol, "pubsub.v1.json");
  assert.equal(jsonCodec.encode([{ op: "sub", id: 1, topic: "a" }, { op: "pub", topic: "a", data: "x\ny" }]),
    '{"op":"sub","id":1,"topic":"a"}\n{"op":"pub","topic":"a","data":"x\\ny"}');
  assert.deepEqual(jsonCodec.decode('{"op":"ok","id":1}\n{"op":"msg","topic":"a","sub":"a","data":[1]}\n'), [
    { op: "ok", id: 1 },
    { op: "msg", topic: "a", sub: "a", data: [1] },
  ]);
  assert.throws(() => jsonCodec.decode(new Uint8Array([1])), /binary message/);
});

test("msgpack: a batch is consecutive values, both ways", () => {
  assert.equal(msgpackCodec.subprotocol, "pubsub.v1.msgpack");
  const frames = [{ op: "ok", id: 1 }, { op: "msg", topic: "t", sub: "t", data: new Uint8Array([7]) }];
  const batch = msgpackCodec.encode(frames);
  assert.ok(batch instanceof Uint8Array);
  assert.deepEqual(batch, new Uint8Array([...encode(frames[0]), ...encode(frames[1])]));
  assert.deepEqual(msgpackCodec.decode(batch), frames);
  assert.deepEqual(msgpackCodec.decode(batch.buffer), frames); // what a WebSocket hands over
  assert.throws(() => msgpackCodec.decode("text"), /text message/);
});
