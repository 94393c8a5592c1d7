// @ts-check
/**
 * Refusals and several URLs, against real brokers: a 503 with Retry-After (CAPPED_BROKER_URL
 * takes one connection per IP address), a port where nothing listens (UNREACHABLE_URL), a 400,
 * and a switch between two URLs of one broker (BROKER_URL, whose `history.` topics keep
 * history) during which a history subscription recovers and the others are told what they may
 * have missed.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Refused, jsonCodec } from "../src/client.js";
import {
  BROKER_URL,
  CAPPED_BROKER_URL,
  Inbox,
  Proxy,
  UNREACHABLE_URL,
  inGivenOrder,
  makeClient,
  needsFailover,
} from "./helpers.js";

/** @typedef {import("../src/client.js").Client} Client */
/** @typedef {import("../src/client.js").ClientOptions} ClientOptions */
/** @typedef {import("../src/client.js").Disconnection} Disconnection */
/** @typedef {import("../src/client.js").Missed} Missed */
/** @typedef {{ state: import("../src/client.js").State, disconnection?: Disconnection }} Change */

const url = /** @type {string} */ (BROKER_URL);
const capped = /** @type {string} */ (CAPPED_BROKER_URL);
const unreachable = /** @type {string} */ (UNREACHABLE_URL);
const RUN = Math.random().toString(36).slice(2, 10);

/** @type {Client[]} */
const clients = [];
/** @type {Proxy[]} */
const proxies = [];
after(async () => {
  await Promise.all(clients.map((each) => each.close()));
  await Promise.all(proxies.map((each) => each.stop()));
});

/**
 * A client whose state changes go to the returned inbox.
 * @param {string | string[]} target
 * @param {ClientOptions} [options]
 */
function watched(target, options = {}) {
  /** @type {Inbox<Change>} */
  const changes = new Inbox();
  const subject = makeClient(target, {
    onState: (state, disconnection) => changes.push({ state, disconnection }),
    ...options,
  });
  clients.push(subject);
  return { subject, changes };
}

/** The next change to `state`, and why. */
async function next(/** @type {Inbox<Change>} */ changes, /** @type {string} */ state) {
  return /** @type {Disconnection} */ ((await changes.until((change) => change.state === state)).disconnection);
}

/** A proxy to the broker whose new connections are dropped until `refuse` is set false. */
async function refusingProxy() {
  const proxy = new Proxy(url);
  proxies.push(proxy);
  proxy.refuse = true;
  return { proxy, proxyUrl: await proxy.start() };
}

describe("refusals and several URLs", needsFailover, () => {
  before(async () => {
    const holder = makeClient(capped); // the capped broker's one connection from 127.0.0.1
    clients.push(holder);
    await holder.publish(`capped.${RUN}`, "hold");
  });

  test("a 503 carries its status, the broker's words and Retry-After; the next attempt waits for it", async () => {
    const { subject, changes } = watched(capped);
    const refused = await next(changes, "disconnected");
    assert.equal(refused.url, capped);
    assert.equal(refused.status, 503);
    assert.equal(refused.reason, "too many connections from 127.0.0.1 (max_connections_per_ip 1)");
    assert.equal(refused.retryAfter, 5);
    assert.equal(refused.code, 1006);
    assert.equal(refused.message, `${capped} refused the connection: HTTP 503 ${refused.reason}`);
    assert.ok(/** @type {number} */ (refused.delay) >= 5000, `retrying after ${refused.delay} ms`);
    await subject.close();
  });

  test("on a 503 it moves on at once to the next URL", async () => {
    const { subject, changes } = inGivenOrder(() => watched([capped, url]));
    const refused = await next(changes, "disconnected");
    assert.deepEqual([refused.url, refused.status, refused.delay], [capped, 503, 0]);
    await next(changes, "connected");
    assert.equal(subject.url, url);
    await subject.publish(`landed.${RUN}`, 1);
  });

  test("an unreachable URL moves on at once; when every URL failed, the backoff", async () => {
    const { proxy, proxyUrl } = await refusingProxy();
    const { subject, changes } = inGivenOrder(() => watched([unreachable, proxyUrl]));
    const first = await next(changes, "disconnected");
    assert.deepEqual([first.url, first.code, first.status, first.delay], [unreachable, 1006, undefined, 0]);
    assert.match(first.message, new RegExp(`^cannot reach ${unreachable}: connect ECONNREFUSED`));
    const second = await next(changes, "disconnected");
    assert.equal(second.url, proxyUrl);
    assert.ok(/** @type {number} */ (second.delay) > 0, "the round is over: backoff");
    proxy.refuse = false; // before the next round starts
    await next(changes, "connected");
    assert.equal(subject.url, proxyUrl);
  });

  test("a 400 ends the client with the broker's words, even with a token function", async () => {
    /** @type {Inbox<Error>} */
    const errors = new Inbox();
    const codec = { ...jsonCodec, subprotocol: "pubsub.v0.nonsense" };
    const { subject, changes } = watched(url, { codec, token: () => "any", onError: errors.push });
    const waiting = subject.publish(`never.${RUN}`, 1);
    const ended = await next(changes, "closed");
    assert.equal(ended.status, 400);
    assert.equal(ended.reason, "unsupported subprotocol; offer one of pubsub.v1.msgpack, pubsub.v1.json");
    const error = await errors.next();
    assert.ok(error instanceof Refused);
    assert.equal(error.message, `${url} refused the connection: HTTP 400 ${ended.reason}`);
    await assert.rejects(waiting, (thrown) => thrown === error);
    await assert.rejects(subject.subscribe(`never.${RUN}`, () => {}), Refused);
  });

  test("across a switch of URLs a history subscription recovers; the others hear what they may have missed", async () => {
    const [one, two] = [await refusingProxy(), await refusingProxy()];
    one.proxy.refuse = two.proxy.refuse = false;
    const { subject, changes } = watched([one.proxyUrl, two.proxyUrl]);
    /** @type {Inbox<unknown>} */
    const seen = new Inbox();
    /** @type {Inbox<{ pattern: string, recovered?: boolean, missed?: Missed }>} */
    const resubscribed = new Inbox();
    const topics = [`history.${RUN}.switch`, `nohistory.${RUN}`, `wild.${RUN}.*`];
    for (const topic of topics) {
      await subject.subscribe(topic, (message) => seen.push(message.data), {
        onResubscribe: ({ pattern, recovered }, missed) => resubscribed.push({ pattern, recovered, missed }),
      });
    }
    const publisher = makeClient(url);
    clients.push(publisher);
    await publisher.publish(topics[0], 1);
    assert.equal(await seen.next(), 1);

    const [used, other] = subject.url === one.proxyUrl ? [one, two] : [two, one];
    used.proxy.refuse = other.proxy.refuse = true;
    used.proxy.cut();
    const dropped = await next(changes, "disconnected");
    await publisher.publish(topics[0], 2); // while it is away
    await publisher.publish(topics[0], 3);
    other.proxy.refuse = false;
    await next(changes, "connected");
    assert.equal(subject.url, other.proxyUrl);

    const got = [];
    for (const _ of topics) {
      const { pattern, recovered, missed } = await resubscribed.next();
      got.push([pattern, recovered, missed?.why, missed?.disconnection.message]);
    }
    got.sort((a, b) => topics.indexOf(String(a[0])) - topics.indexOf(String(b[0])));
    const why = `the connection to ${used.proxyUrl} dropped (1006, no close frame)`;
    assert.equal(dropped.message, why);
    assert.deepEqual(got, [
      [topics[0], true, undefined, undefined], // exact: the history replayed what it missed
      [topics[1], undefined, "no_history", why],
      [topics[2], undefined, "wildcard", why],
    ]);
    assert.deepEqual([await seen.next(), await seen.next()], [2, 3]);
  });
});
