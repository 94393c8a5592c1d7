// @ts-check
/**
 * A topic whose history is evicted whole while a client is subscribed, against a real broker
 * (EVICTING_BROKER_URL: 4000 bytes of history in all, `evict.` topics keep 5 messages). The
 * topic's next message starts a new epoch at offset 1, and a `msg` does not name its epoch: the
 * client sees an offset go back. It hands the messages over, tells `onError` once
 * (`HistoryLost`), learns the new epoch (refilling: a `history` read; without: at the next
 * resubscribe), and a reconnect after that recovers in the new epoch.
 */
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { HistoryLost } from "../src/client.js";
import { EVICTING_BROKER_URL, Proxy, eventually, makeClient, needsEvictingBroker } from "./helpers.js";

/** @typedef {import("../src/client.js").Client} Client */

const url = /** @type {string} */ (EVICTING_BROKER_URL);
/** Topics of this run: `evict.${RUN}.name`. */
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
 * @param {Client} publisher
 * @param {string} topic
 * @param {string[]} values
 */
async function publishAll(publisher, topic, values) {
  for (const value of values) await publisher.publish(topic, value);
}

const named = (/** @type {string} */ prefix, /** @type {number} */ from, /** @type {number} */ to) =>
  Array.from({ length: to - from + 1 }, (_, index) => `${prefix}${from + index}`);

describe("a topic evicted whole while subscribed", needsEvictingBroker, () => {
  for (const refill of [true, false]) {
    test(`its new epoch's messages are delivered, the loss told once, and a reconnect recovers (refill ${refill})`, async () => {
      const topic = `evict.${RUN}.${refill ? "refill" : "plain"}`;
      const proxy = new Proxy(url);
      proxies.push(proxy);
      /** @type {string[]} what the application got, in order: `offset:data`, gaps, losses told */
      const seen = [];
      /** @type {Error[]} */
      const errors = [];
      const subject = makeClient(await proxy.start(), {
        onError: (error) => {
          if (error instanceof HistoryLost) seen.push(`lost after ${error.after} (${error.offset} ${error.topic})`);
          else errors.push(error);
        },
      });
      const publisher = makeClient(url);
      clients.push(subject, publisher);
      /** @type {string[]} */
      const resubscribed = [];
      const subscription = await subject.subscribe(topic, (message) => seen.push(`${message.offset}:${message.data}`), {
        refill,
        onGap: ({ from, to, why }) => seen.push(`${from}..${to} ${why}`),
        onResubscribe: (each, missed) => resubscribed.push(`${each.recovered} ${missed?.why}`),
      });
      await publishAll(publisher, topic, named("old", 1, 5));
      await eventually(() => seen.length >= 5, () => `${seen.length} of 5 arrived`);
      const old = /** @type {import("../src/client.js").Position} */ (subscription.position);
      assert.equal(old.offset, 5);
      // Published later, these make ours the least recently published topic: evicted whole.
      for (let other = 0; other < 5; other++) {
        await publishAll(publisher, `${topic}.other${other}`, Array(5).fill("x".repeat(100)));
      }
      await publishAll(publisher, topic, named("new", 1, 7));
      await eventually(() => seen.length >= 13, () => `${seen.length} of 13 arrived: ${seen}`);
      const fresh = named("new", 1, 7).map((data, index) => `${index + 1}:${data}`);
      assert.deepEqual(seen, [
        ...named("old", 1, 5).map((data, index) => `${index + 1}:${data}`),
        `lost after 5 (1 ${topic})`, // told once, before the new numbering
        ...fresh,
      ]);
      if (refill) {
        // A `history` read without `since` learnt the new epoch.
        await eventually(() => subscription.position !== undefined, () => "the new epoch was never learnt");
        const learnt = /** @type {import("../src/client.js").Position} */ (subscription.position);
        assert.notEqual(learnt.epoch, old.epoch);
        assert.equal(learnt.offset, 7);
        assert.equal(subscription.refills, 1);
      } else {
        assert.equal(subscription.position, undefined); // forgotten: the resubscribe sends no since
        assert.equal(subscription.refills, 0);
      }

      // A cut, messages published meanwhile, a reconnect.
      proxy.refuse = true;
      proxy.cut();
      await eventually(() => subject.state !== "connected", () => "the cut went unnoticed");
      await publishAll(publisher, topic, named("new", 8, 9));
      proxy.refuse = false;
      await eventually(() => resubscribed.length > 0, () => "never resubscribed");
      if (refill) {
        await eventually(() => seen.length >= 15, () => `${seen.length} of 15 arrived`);
        assert.deepEqual(resubscribed, ["true undefined"]); // exact, in the new epoch
        assert.deepEqual(seen.slice(13), ["8:new8", "9:new9"]);
      } else {
        // Without since nothing is replayed: told as a lost history, and on from the new epoch.
        assert.deepEqual(resubscribed, ["false history_lost"]);
        assert.equal(subscription.position?.offset, 9);
        await publishAll(publisher, topic, ["new10"]);
        await eventually(() => seen.length >= 14, () => `${seen.length} of 14 arrived`);
        assert.deepEqual(seen.slice(13), ["10:new10"]);
        // The epoch is known again: the next reconnect is exact.
        proxy.refuse = true;
        proxy.cut();
        await eventually(() => subject.state !== "connected", () => "the cut went unnoticed");
        await publishAll(publisher, topic, ["new11"]);
        proxy.refuse = false;
        await eventually(() => seen.length >= 15, () => `${seen.length} of 15 arrived`);
        assert.deepEqual(resubscribed, ["false history_lost", "true undefined"]);
        assert.deepEqual(seen.slice(14), ["11:new11"]);
      }
      assert.equal(subscription.recovered, true);
      assert.notEqual(subscription.position?.epoch, old.epoch);
      assert.equal(seen.filter((item) => item.startsWith("lost")).length, 1);
      assert.deepEqual(errors, []);
    });
  }
});
