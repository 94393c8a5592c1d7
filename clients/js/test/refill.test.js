// @ts-check
/**
 * Refill against a real broker (REFILL_BROKER_URL) whose `refill.` topics are `drop_oldest`
 * with history, behind outbound queues of 16 messages: a subscriber that stops reading its
 * socket (a proxy holds it) loses messages at the broker, and its client reads them back from
 * the topic's history. Every message once and in offset order; what the topic no longer keeps
 * told as gaps; a refill that ends with an unsubscribe or a dropped connection.
 */
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { Proxy, REFILL_BROKER_URL, eventually, makeClient, needsRefillBroker } from "./helpers.js";

/** @typedef {import("../src/client.js").Client} Client */
/** @typedef {import("../src/client.js").Gap} Gap */
/** @typedef {import("../src/client.js").SubscribeOptions} SubscribeOptions */

const url = /** @type {string} */ (REFILL_BROKER_URL);
/** Topics of this run: `refill.${RUN}.name`. */
const RUN = Math.random().toString(36).slice(2, 10);
/** Messages published while the subscriber reads nothing: far more than its queue of 16. */
const N = 3000;

/** @type {Client[]} */
const clients = [];
/** @type {Proxy[]} */
const proxies = [];
after(async () => {
  await Promise.all(clients.map((each) => each.close()));
  await Promise.all(proxies.map((each) => each.stop()));
});

function client() {
  const made = makeClient(url);
  clients.push(made);
  return made;
}

const range = (/** @type {number} */ from, /** @type {number} */ to) =>
  Array.from({ length: to - from }, (_, index) => from + index);

/**
 * Publish `from`..`to` (each message's data is the offset it gets, on a fresh topic), without
 * waiting for each: resolves once the broker acked the last, so all are queued for every
 * subscriber (a `block` subscriber that reads nothing would hold this for ever).
 * @param {Client} publisher
 * @param {string} topic
 * @param {number} from
 * @param {number} to
 */
async function publishRange(publisher, topic, from, to) {
  for (let value = from; value < to; value++) void publisher.publish(topic, value, { ack: false });
  await publisher.publish(topic, to);
}

/** Each offset `seen` accounts for, in order: a message's, and each offset of a gap. */
const accounted = (/** @type {Array<number | Gap>} */ seen) =>
  seen.flatMap((item) => (typeof item === "number" ? [item] : range(item.from, item.to + 1)));

/**
 * A client subscribed to `topic` through a proxy (to stop it reading, or cut it). `seen` is
 * what its application got, in order: each message's offset, and each gap.
 * @param {string} topic
 * @param {SubscribeOptions} [options]
 */
async function slowSubscriber(topic, options = {}) {
  const proxy = new Proxy(url);
  proxies.push(proxy);
  /** @type {Error[]} */
  const errors = [];
  const subject = makeClient(await proxy.start(), { onError: (error) => errors.push(error) });
  clients.push(subject);
  /** @type {Array<number | Gap>} */
  const seen = [];
  const lags = { dropped: 0 };
  const subscription = await subject.subscribe(
    topic,
    (message) => {
      assert.equal(message.data, message.offset);
      seen.push(/** @type {number} */ (message.offset));
    },
    { onLag: (dropped) => (lags.dropped += dropped), onGap: (gap) => seen.push(gap), ...options },
  );
  return { proxy, subject, subscription, seen, errors, lags };
}

describe("refill", needsRefillBroker, () => {
  for (const bufferSize of [undefined, 4]) {
    test(`a subscriber that stops reading gets every message in order; the publisher is never held (bufferSize ${bufferSize ?? "default"})`, async () => {
      const topic = `refill.${RUN}.slow${bufferSize ?? ""}`;
      const slow = await slowSubscriber(topic, { bufferSize });
      const publisher = client();
      slow.proxy.hold();
      await publishRange(publisher, topic, 1, N); // every ack came while the subscriber read nothing
      slow.proxy.release();
      await publishRange(publisher, topic, N + 1, 2 * N); // while it catches up
      await eventually(() => accounted(slow.seen).length >= 2 * N, () => `${slow.seen.length} of ${2 * N} arrived`);
      assert.deepEqual(slow.seen, range(1, 2 * N + 1));
      assert.ok(slow.lags.dropped > 1000, `the broker dropped ${slow.lags.dropped}: too few to prove anything`);
      assert.ok(slow.subscription.refills >= 3, `${slow.subscription.refills} reads of at most 1000 each`);
      assert.deepEqual(slow.errors, []);
      assert.equal(slow.subscription.refilling, false);
      assert.equal(slow.subscription.offset, 2 * N);
    });
  }

  test("a subscriber slower than the history covers is told exactly which offsets were lost", async () => {
    const topic = `refill.short.${RUN}`; // keeps its last 100 messages
    const slow = await slowSubscriber(topic);
    const publisher = client();
    slow.proxy.hold();
    await publishRange(publisher, topic, 1, N);
    slow.proxy.release();
    await eventually(() => accounted(slow.seen).length >= N, () => `${accounted(slow.seen).length} of ${N} accounted for`);
    assert.deepEqual(accounted(slow.seen), range(1, N + 1)); // each offset once, in order: a message or a gap
    const gaps = slow.seen.filter((item) => typeof item !== "number");
    assert.ok(gaps.length > 0);
    assert.ok(gaps.every((gap) => gap.why === "evicted"), JSON.stringify(gaps));
    const received = new Set(slow.seen.filter((item) => typeof item === "number"));
    assert.ok(range(N - 99, N + 1).every((offset) => received.has(offset)), "every message still kept arrived");
    assert.deepEqual(slow.errors, []);
  });

  test("an unsubscribe mid-refill ends it: nothing after, and `since` resumes exactly", async () => {
    const topic = `refill.${RUN}.unsubscribe`;
    /** @type {{ refilling: boolean, handedOver: number, done: Promise<void> } | undefined} */
    let ended;
    /** @type {Awaited<ReturnType<typeof slowSubscriber>>} */
    const slow = await slowSubscriber(topic, {
      // The lag comes in the broker's write with the next messages, whose offsets jump: once
      // that write is handled, a refill is reading.
      onLag: () =>
        queueMicrotask(() => {
          if (ended !== undefined) return;
          const { refilling } = slow.subscription;
          ended = { refilling, handedOver: slow.seen.length, done: slow.subscription.unsubscribe() };
        }),
    });
    const publisher = client();
    slow.proxy.hold();
    await publishRange(publisher, topic, 1, N);
    slow.proxy.release();
    await eventually(() => ended !== undefined, () => "no lag came");
    const { refilling, handedOver, done } = /** @type {NonNullable<typeof ended>} */ (ended);
    await done; // the broker answered the refill's read before this unsub
    assert.equal(refilling, true);
    assert.equal(slow.subscription.refilling, false);
    assert.deepEqual(slow.seen, range(1, handedOver + 1));
    assert.deepEqual(slow.errors, []);

    const position = /** @type {import("../src/client.js").Position} */ (slow.subscription.position);
    assert.equal(position.offset, handedOver);
    /** @type {number[]} */
    const rest = [];
    await slow.subject.subscribe(topic, (message) => rest.push(/** @type {number} */ (message.offset)), {
      since: position,
    });
    await eventually(() => rest.length >= N - handedOver, () => `${rest.length} of ${N - handedOver} replayed`);
    assert.deepEqual(rest, range(handedOver + 1, N + 1));
    assert.deepEqual(slow.seen, range(1, handedOver + 1));
  });

  test("a connection dropped mid-refill: the reconnect recovers exactly, without a gap or a duplicate", async () => {
    const topic = `refill.${RUN}.cut`;
    /** @type {boolean | undefined} */
    let refillingAtCut;
    /** @type {string[]} */
    const resubscribed = [];
    /** @type {Awaited<ReturnType<typeof slowSubscriber>>} */
    const slow = await slowSubscriber(topic, {
      onLag: () =>
        queueMicrotask(() => {
          if (refillingAtCut !== undefined) return;
          refillingAtCut = slow.subscription.refilling;
          slow.proxy.cut();
        }),
      onResubscribe: (subscription, missed) => resubscribed.push(`${subscription.recovered} ${missed?.why}`),
    });
    const publisher = client();
    slow.proxy.hold();
    await publishRange(publisher, topic, 1, N);
    slow.proxy.release();
    await eventually(() => resubscribed.length > 0, () => "never resubscribed");
    await publishRange(publisher, topic, N + 1, N + 100);
    await eventually(() => slow.seen.length >= N + 100, () => `${slow.seen.length} of ${N + 100} arrived`);
    assert.equal(refillingAtCut, true);
    assert.deepEqual(resubscribed, ["true undefined"]);
    assert.deepEqual(slow.seen, range(1, N + 101));
    assert.deepEqual(slow.errors, []);
  });
});
