// @ts-check
/**
 * Recovery against a real broker (BROKER_URL) whose `history.` topics keep history: the `ok`
 * fields, replays, `since` after a reconnect through a proxy that cuts the network, evictions,
 * unknown epochs, wildcards and `since: "start"`.
 */
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { BROKER_URL, Inbox, Proxy, makeClient, needsBroker } from "./helpers.js";

/** @typedef {import("../src/client.js").Client} Client */
/** @typedef {import("../src/client.js").ClientOptions} ClientOptions */

const url = /** @type {string} */ (BROKER_URL);
/** Topics of this run (one broker may serve several): `${H}.name`. */
const RUN = Math.random().toString(36).slice(2, 10);
const H = `history.${RUN}`;

/** @type {Client[]} */
const clients = [];
/** @type {Proxy[]} */
const proxies = [];
after(async () => {
  await Promise.all(clients.map((each) => each.close()));
  await Promise.all(proxies.map((each) => each.stop()));
});

/** @param {ClientOptions} [options] */
function client(options, target = url) {
  const made = makeClient(target, options);
  clients.push(made);
  return made;
}

/** A client behind a proxy that can cut its network; its states go to `states`. */
async function cuttable(/** @type {ClientOptions} */ options = {}) {
  const proxy = new Proxy(url);
  proxies.push(proxy);
  /** @type {Inbox<string>} */
  const states = new Inbox();
  const subject = client({ onState: states.push, ...options }, await proxy.start());
  return { proxy, states, subject };
}

/** Publish `values` to `topic` one after the other, each acknowledged. */
async function publishAll(/** @type {Client} */ publisher, /** @type {string} */ topic, /** @type {number[]} */ values) {
  for (const value of values) await publisher.publish(topic, value);
}

const range = (/** @type {number} */ from, /** @type {number} */ to) =>
  Array.from({ length: to - from }, (_, index) => from + index);

/** Why to skip: no broker, or one that keeps no history for `history.>` (as `make run`'s). */
async function whyNotRecovery() {
  if (needsBroker.skip) return needsBroker.skip;
  const probe = makeClient(url);
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let timer;
  /** @type {Promise<never>} */
  const gaveUp = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer from the broker at ${url}`)), 5000);
  });
  try {
    const { epoch } = await Promise.race([probe.subscribe(`${H}.probe`, () => {}), gaveUp]);
    return epoch === undefined && "the broker keeps no history for history.> (tests/test_js_client.py's does)";
  } finally {
    clearTimeout(timer);
    await probe.close();
  }
}

describe("recovery", { skip: await whyNotRecovery() }, () => {
  test("a sub learns the topic's epoch and latest offset; each message moves the offset", async () => {
    const publisher = client();
    await publishAll(publisher, `${H}.position`, [10, 11]);
    /** @type {Inbox<import("../src/client.js").Message>} */
    const inbox = new Inbox();
    const subscription = await client().subscribe(`${H}.position`, inbox.push);
    assert.equal(typeof subscription.epoch, "string");
    assert.equal(subscription.offset, 2);
    assert.equal(subscription.recovered, undefined); // no `since`, nothing to recover
    await publisher.publish(`${H}.position`, 12);
    const message = await inbox.next();
    assert.deepEqual([message.data, message.offset], [12, 3]);
    assert.deepEqual(subscription.position, { epoch: subscription.epoch, offset: 3 });
  });

  test("since replays the kept messages after the position, in order, then goes live", async () => {
    const publisher = client();
    const { epoch } = await publisher.subscribe(`${H}.replay`, () => {});
    await publishAll(publisher, `${H}.replay`, range(1, 6));
    /** @type {Inbox<unknown>} */
    const inbox = new Inbox();
    const subscription = await client().subscribe(`${H}.replay`, (message) => inbox.push(message.data), {
      since: { epoch: /** @type {string} */ (epoch), offset: 2 },
    });
    assert.equal(subscription.recovered, true);
    await publisher.publish(`${H}.replay`, 6);
    assert.deepEqual([await inbox.next(), await inbox.next(), await inbox.next(), await inbox.next()], [3, 4, 5, 6]);
    assert.deepEqual(subscription.position, { epoch, offset: 6 });
  });

  test("an epoch the topic no longer has: recovered false, nothing replayed, go on from the latest", async () => {
    const publisher = client();
    await publishAll(publisher, `${H}.lost`, [1, 2]);
    /** @type {Inbox<import("../src/client.js").Message>} */
    const inbox = new Inbox();
    const subscription = await client().subscribe(`${H}.lost`, inbox.push, {
      since: { epoch: "an-epoch-from-before-a-restart", offset: 1 },
    });
    assert.equal(subscription.recovered, false);
    assert.notEqual(subscription.epoch, "an-epoch-from-before-a-restart");
    assert.equal(subscription.offset, 2);
    await publisher.publish(`${H}.lost`, 3);
    assert.equal((await inbox.next()).offset, 3);
  });

  test("across a cut, with a publisher going on, every message arrives once and in order", async () => {
    const topic = `${H}.stream`;
    const { proxy, subject } = await cuttable({ backoff: { initial: 1, max: 5 } });
    const publisher = client();
    /** @type {Inbox<unknown>} what the subscriber saw: data, and "resubscribed" */
    const seen = new Inbox();
    let published = 0;
    /** @type {number | undefined} */
    let cutAt;
    /** @type {number | undefined} */
    let resumedAt;
    const subscription = await subject.subscribe(
      topic,
      (message) => {
        seen.push(message.data);
        if (message.data === 50) {
          proxy.refuse = true; // stay away while 20 more are published
          proxy.cut();
          cutAt = published;
        }
      },
      {
        onResubscribe(resubscribed, missed) {
          seen.push(`resubscribed, recovered: ${resubscribed.recovered}, missed: ${missed?.why}`);
          resumedAt = published;
        },
      },
    );
    while (resumedAt === undefined || published < resumedAt + 50) {
      assert.ok(published < 20000, "the subscriber never came back");
      if (cutAt !== undefined && published >= cutAt + 20) proxy.refuse = false;
      await publisher.publish(topic, published++);
    }
    const got = [];
    for (let count = 0; count <= published; count++) got.push(await seen.next());
    assert.deepEqual(got.filter((item) => typeof item === "number"), range(0, published));
    assert.deepEqual(got.filter((item) => typeof item === "string"), ["resubscribed, recovered: true, missed: undefined"]);
    assert.ok(got.indexOf("resubscribed, recovered: true, missed: undefined") > 50);
    assert.equal(subscription.offset, published);
  });

  test("messages evicted while away: the resubscribe says recovered false before the kept tail", async () => {
    const topic = `history.small.${RUN}`; // keeps its last 3 messages
    const { proxy, states, subject } = await cuttable();
    const publisher = client();
    /** @type {Inbox<unknown>} */
    const seen = new Inbox();
    const subscription = await subject.subscribe(topic, (message) => seen.push(message.offset), {
      onResubscribe: (resubscribed, missed) => seen.push(`recovered: ${resubscribed.recovered}, ${missed?.why}`),
      onGap: ({ from, to, why }) => seen.push(`${from}..${to} ${why}`), // the refill names them
    });
    await publisher.publish(topic, "one");
    assert.equal(await seen.next(), 1);
    proxy.refuse = true;
    proxy.cut();
    await states.until((state) => state === "disconnected");
    await publishAll(publisher, topic, range(2, 11));
    proxy.refuse = false;
    const got = [];
    for (let count = 0; count < 5; count++) got.push(await seen.next());
    assert.deepEqual(got, ["recovered: false, evicted", "2..7 evicted", 8, 9, 10]);
    assert.equal(subscription.recovered, false);
    await publisher.publish(topic, 11);
    assert.equal(await seen.next(), 11);
  });

  test("a wildcard never carries since: refused up front, resubscribed without it", async () => {
    /** @type {Error[]} */
    const errors = [];
    const { proxy, states, subject } = await cuttable({ onError: (error) => errors.push(error) });
    const position = { epoch: "e", offset: 1 };
    for (const since of [position, /** @type {const} */ ("start")]) {
      await assert.rejects(subject.subscribe(`${H}.w.*`, () => {}, { since }), {
        name: "TypeError",
        message: /'since' needs a concrete topic/,
      });
    }
    /** @type {Inbox<string>} */
    const seen = new Inbox();
    /** @type {Inbox<import("../src/client.js").Subscription>} */
    const resubscribed = new Inbox();
    for (const pattern of [`${H}.w.*`, `${H}.w.a`]) {
      await subject.subscribe(pattern, (message) => seen.push(`${message.sub} ${message.offset}`), {
        onResubscribe: resubscribed.push,
      });
    }
    const publisher = client();
    await publisher.publish(`${H}.w.a`, 1);
    assert.deepEqual([await seen.next(), await seen.next()].sort(), [`${H}.w.* 1`, `${H}.w.a 1`]);
    proxy.cut();
    await states.until((state) => state === "disconnected");
    const [first, second] = [await resubscribed.next(), await resubscribed.next()].sort((a, b) =>
      a.pattern < b.pattern ? -1 : 1,
    );
    assert.deepEqual([first.pattern, first.position, first.recovered], [`${H}.w.*`, undefined, undefined]);
    assert.deepEqual([second.pattern, second.recovered], [`${H}.w.a`, true]);
    await publisher.publish(`${H}.w.a`, 2);
    assert.deepEqual([await seen.next(), await seen.next()].sort(), [`${H}.w.* 2`, `${H}.w.a 2`]);
    assert.deepEqual(errors, []); // the broker would have refused a wildcard with since
  });

  test('since "start" replays every kept message, then live ones, each once', async () => {
    const topic = `${H}.start`;
    const publisher = client();
    await publishAll(publisher, topic, range(0, 10));
    /** @type {Inbox<unknown>} */
    const inbox = new Inbox();
    const publishing = publishAll(publisher, topic, range(10, 60)); // while it subscribes
    const subscription = await client().subscribe(topic, (message) => inbox.push(message.data), {
      since: "start",
    });
    await publishing;
    const got = [];
    for (let count = 0; count < 60; count++) got.push(await inbox.next());
    assert.deepEqual(got, range(0, 60));
    assert.equal(subscription.recovered, true);
    assert.equal(subscription.offset, 60);
  });

  test('since "start" on a topic without history, or with none kept yet, is a plain subscribe', async () => {
    const subject = client();
    /** @type {Inbox<unknown>} */
    const inbox = new Inbox();
    const plain = await subject.subscribe("nohistory.start", (message) => inbox.push(message.data), {
      since: "start",
    });
    const empty = await subject.subscribe(`${H}.empty`, (message) => inbox.push(message.data), {
      since: "start",
    });
    assert.deepEqual([plain.position, empty.offset], [undefined, 0]);
    await subject.publish("nohistory.start", "a");
    await subject.publish(`${H}.empty`, "b");
    assert.deepEqual([await inbox.next(), await inbox.next()], ["a", "b"]);
  });
});
