// @ts-check
/** The client against a real broker (BROKER_URL): pub/sub, wildcards, acks, errors, reconnects. */
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { NotAnswered, PubSubError, jsonCodec } from "../src/client.js";
import { msgpackCodec } from "../src/msgpack.js";
import { BROKER_URL, Inbox, Proxy, makeClient, needsBroker } from "./helpers.js";

const url = /** @type {string} */ (BROKER_URL);

/** @type {Array<import("../src/client.js").Client>} */
const clients = [];
/** @param {import("../src/client.js").ClientOptions} [options] */
function client(options, target = url) {
  const made = makeClient(target, options);
  clients.push(made);
  return made;
}
after(() => Promise.all(clients.map((each) => each.close())));

/** @type {Array<[string, import("../src/client.js").Codec]>} */
const codecs = [["json", jsonCodec], ["msgpack", msgpackCodec]];
for (const [name, codec] of codecs) {
  describe(`over ${name}`, needsBroker, () => {
    test("a subscriber receives what is published, with its pattern", async () => {
      const subscriber = client({ codec });
      const publisher = client({ codec });
      /** @type {Inbox<import("../src/client.js").Message>} */
      const inbox = new Inbox();
      await subscriber.subscribe(`${name}.room.*`, inbox.push);
      await publisher.publish(`${name}.room.1`, { text: "hi", n: [1, 2.5, null, true] });
      const message = await inbox.next();
      assert.equal(message.topic, `${name}.room.1`);
      assert.equal(message.sub, `${name}.room.*`);
      assert.deepEqual(message.data, { text: "hi", n: [1, 2.5, null, true] });
    });

    test("wildcards follow NATS semantics", async () => {
      const subscriber = client({ codec });
      /** @type {Inbox<string>} */
      const inbox = new Inbox();
      await subscriber.subscribe(`${name}.w.>`, (message) => inbox.push(`> ${message.topic}`));
      await subscriber.subscribe(`${name}.w.*`, (message) => inbox.push(`* ${message.topic}`));
      for (const topic of [`${name}.w`, `${name}.w.a`, `${name}.w.a.b`]) {
        await subscriber.publish(topic, 1);
      }
      await subscriber.publish(`${name}.w.end.end`, 1);
      const seen = [];
      for (let item = await inbox.next(); item !== `> ${name}.w.end.end`; item = await inbox.next()) {
        seen.push(item);
      }
      assert.deepEqual(seen.sort(), [`* ${name}.w.a`, `> ${name}.w.a`, `> ${name}.w.a.b`]);
    });

    test("messages from one publisher arrive in publish order", async () => {
      const subscriber = client({ codec });
      const publisher = client({ codec });
      /** @type {Inbox<unknown>} */
      const inbox = new Inbox();
      await subscriber.subscribe(`${name}.order`, (message) => inbox.push(message.data));
      const sent = Array.from({ length: 200 }, (_, index) => index);
      for (const index of sent.slice(0, -1)) void publisher.publish(`${name}.order`, index, { ack: false });
      await publisher.publish(`${name}.order`, sent.at(-1));
      const got = [];
      for (const _ of sent) got.push(await inbox.next());
      assert.deepEqual(got, sent);
    });
  });
}

describe("commands and errors", needsBroker, () => {
  test("bytes travel as bytes over msgpack", async () => {
    const subscriber = client({ codec: msgpackCodec });
    /** @type {Inbox<unknown>} */
    const inbox = new Inbox();
    await subscriber.subscribe("bin", (message) => inbox.push(message.data));
    await subscriber.publish("bin", new Uint8Array([0, 1, 255]));
    assert.deepEqual(await inbox.next(), new Uint8Array([0, 1, 255]));
  });

  test("a refused publish or subscribe rejects with the broker's code", async () => {
    const subject = client();
    await assert.rejects(subject.publish("chat.*", 1), (error) => {
      assert.ok(error instanceof PubSubError);
      assert.equal(error.code, "invalid_topic");
      return true;
    });
    await assert.rejects(subject.subscribe("a..b", () => {}), { code: "invalid_topic" });
    // The connection stays usable, and the refused pattern may be subscribed again once fixed.
    await subject.subscribe("a.b", () => {});
    assert.equal(subject.state, "connected");
  });

  test("unsubscribe stops delivery", async () => {
    const subject = client();
    /** @type {Inbox<unknown>} */
    const inbox = new Inbox();
    const subscription = await subject.subscribe("unsub.test", (message) => inbox.push(message.data));
    await subject.subscribe("unsub.marker", (message) => inbox.push(message.data));
    await subject.publish("unsub.test", "before");
    assert.equal(await inbox.next(), "before");
    await subscription.unsubscribe();
    assert.equal(subscription.active, false);
    await subject.publish("unsub.test", "after");
    await subject.publish("unsub.marker", "marker");
    assert.equal(await inbox.next(), "marker");
  });

  test("subscribing twice to one pattern is refused by the client", async () => {
    const subject = client();
    await subject.subscribe("twice", () => {});
    await assert.rejects(subject.subscribe("twice", () => {}), /already subscribed/);
  });

  test("commands given before the connection opens wait for it", async () => {
    const subject = client();
    assert.equal(subject.state, "connecting");
    /** @type {Inbox<unknown>} */
    const inbox = new Inbox();
    const subscribed = subject.subscribe("early", (message) => inbox.push(message.data));
    const published = subject.publish("early", "first");
    await Promise.all([subscribed, published]);
    assert.equal(await inbox.next(), "first");
  });

  test("close rejects what is waiting and ends for good", async () => {
    const subject = client();
    const waiting = subject.publish("closing", 1);
    await subject.close();
    assert.equal(subject.state, "closed");
    await assert.rejects(waiting, (error) => error instanceof NotAnswered && error.reason === "closed");
    await assert.rejects(subject.publish("closing", 2), NotAnswered);
  });
});

describe("reconnecting", needsBroker, () => {
  test("after the network drops, the client reconnects with backoff and resubscribes", async () => {
    const proxy = new Proxy(url);
    const proxyUrl = await proxy.start();
    try {
      /** @type {Inbox<string>} */
      const states = new Inbox();
      /** @type {Inbox<string>} */
      const resubscribed = new Inbox();
      /** @type {Inbox<unknown>} */
      const inbox = new Inbox();
      const subscriber = client({ onState: states.push }, proxyUrl);
      const publisher = client();
      for (const pattern of ["recon.a", "recon.*.b"]) {
        await subscriber.subscribe(pattern, (message) => inbox.push(message.data), {
          onResubscribe: (subscription) => resubscribed.push(subscription.pattern),
        });
      }
      await states.until((state) => state === "connected");

      proxy.refuse = true; // the next attempts fail too: backoff, not a tight loop
      proxy.cut();
      const acceptedBefore = proxy.accepted;
      while (proxy.accepted < acceptedBefore + 3) {
        await states.until((state) => state === "disconnected");
      }
      proxy.refuse = false;
      await states.until((state) => state === "connected");
      assert.deepEqual([await resubscribed.next(), await resubscribed.next()].sort(), [
        "recon.*.b",
        "recon.a",
      ]);

      await publisher.publish("recon.a", "a");
      await publisher.publish("recon.x.b", "b");
      assert.deepEqual([await inbox.next(), await inbox.next()], ["a", "b"]);
    } finally {
      await proxy.stop();
    }
  });

  test("a close by the broker is reported with its code and reason, and retried", async () => {
    /** @type {Inbox<string>} */
    const states = new Inbox();
    const subject = client({ onState: (state, why) => states.push(why ? `${state}: ${why.message}` : state) });
    await subject.publish("closing.fine", 1);
    // Ten bad frames in a row (max_bad_frames): the broker answers them, then closes with 4008.
    const refused = Array.from({ length: 10 }, () => subject.publish("closing..bad", 1));
    for (const each of refused) await assert.rejects(each, { code: "invalid_topic" });
    assert.equal(
      await states.until((state) => state.startsWith("disconnected")),
      `disconnected: ${url} closed the connection: 4008 10 bad frames in a row`,
    );
    await states.until((state) => state === "connected");
  });

  test("a publish whose answer the drop swallowed is rejected as not answered", async () => {
    const proxy = new Proxy(url);
    const subject = client({}, await proxy.start());
    try {
      await subject.publish("drop.before", 1);
      const lost = subject.publish("drop.after", 2); // sent at once: the client is connected
      proxy.cut(); // before the proxy could read it, so it never reaches the broker
      await assert.rejects(lost, (error) => {
        assert.ok(error instanceof NotAnswered);
        assert.equal(error.reason, "disconnected");
        assert.equal(error.disconnection?.code, 1006);
        assert.match(error.message, /^the connection dropped before the answer: the connection to .* dropped/);
        return true;
      });
    } finally {
      await proxy.stop();
    }
  });
});
