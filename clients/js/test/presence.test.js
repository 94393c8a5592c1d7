// @ts-check
/**
 * Presence against a real broker (BROKER_URL) whose `presence.` topics have presence: pages of
 * members and their info, `members()` over several pages, join and leave on a subscription that
 * asks (unsubscribe, close, a cut network), wildcards, refusals, and a reconnect that keeps
 * `joinLeave` and `info`.
 */
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { PubSubError, jsonCodec } from "../src/client.js";
import { msgpackCodec } from "../src/msgpack.js";
import { BROKER_URL, Inbox, Proxy, makeClient, needsBroker } from "./helpers.js";

/** @typedef {import("../src/client.js").Client} Client */
/** @typedef {import("../src/client.js").ClientOptions} ClientOptions */
/** @typedef {import("../src/client.js").Member} Member */

const url = /** @type {string} */ (BROKER_URL);
/** Topics of this run (one broker may serve several): `${P}.name`. */
const RUN = Math.random().toString(36).slice(2, 10);
const P = `presence.${RUN}`;

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

/**
 * A watcher's join and leave events, as `"join <name>"` and `"leave <name>"` (the `name` of the
 * member's info), with the members themselves in `members`.
 */
function watcher() {
  /** @type {Inbox<string>} */
  const events = new Inbox();
  /** @type {Map<string, Member>} by event, the member of the last one */
  const members = new Map();
  /** @type {Array<[string, Member, string]>} every event: its kind, member and topic */
  const all = [];
  const record = (/** @type {string} */ kind) => (/** @type {Member} */ member, /** @type {string} */ topic) => {
    const name = /** @type {{ name?: string }} */ (member.info ?? {}).name ?? member.user ?? "?";
    members.set(`${kind} ${name}`, member);
    all.push([kind, member, topic]);
    events.push(`${kind} ${name}`);
  };
  return { events, members, all, options: { joinLeave: true, onJoin: record("join"), onLeave: record("leave") } };
}

/** Why to skip: no broker, or one without presence for `presence.>` (as `make run`'s). */
async function whyNotPresence() {
  if (needsBroker.skip) return needsBroker.skip;
  const probe = makeClient(url);
  try {
    await probe.presence(`${P}.probe`, { limit: 0 });
    return false;
  } catch (error) {
    if (error instanceof PubSubError && error.code === "not_enabled") {
      return "the broker has no presence for presence.> (tests/test_js_client.py's has)";
    }
    throw error;
  } finally {
    await probe.close();
  }
}

describe("presence", { skip: await whyNotPresence() }, () => {
  test("presence lists the members and their info; limit 0 gives the count alone", async () => {
    const topic = `${P}.list`;
    const ada = client();
    await ada.subscribe(topic, () => {}, { info: { name: "ada" } });
    await client().subscribe(topic, () => {}); // no info: null
    const asker = client();
    assert.deepEqual(await asker.presence(topic), await asker.presence(topic, { limit: 1000 }));
    const page = await asker.presence(topic);
    assert.equal(page.count, 2);
    assert.equal(page.cursor, undefined);
    assert.deepEqual(page.members.map((member) => [member.user, member.info]).sort(), [
      [null, null],
      [null, { name: "ada" }],
    ]);
    assert.equal(new Set(page.members.map((member) => member.client)).size, 2);
    assert.deepEqual(await asker.presence(topic, { limit: 0 }), { count: 2, members: [] });
    assert.deepEqual(await asker.presence(`${P}.nobody`), { count: 0, members: [] });
  });

  test("members() reads every page, each member once, in client order", async () => {
    const topic = `${P}.pages`;
    for (let n = 0; n < 7; n++) await client().subscribe(topic, () => {}, { info: n });
    const asker = client();
    const first = await asker.presence(topic, { limit: 3 });
    assert.equal(first.count, 7);
    assert.equal(first.members.length, 3);
    assert.equal(typeof first.cursor, "string");
    const second = await asker.presence(topic, { limit: 3, cursor: first.cursor });
    assert.notDeepEqual(second.members, first.members);
    const all = [];
    for await (const member of asker.members(topic, { pageSize: 2 })) all.push(member);
    assert.deepEqual(all.map((member) => member.info).sort(), [0, 1, 2, 3, 4, 5, 6]);
    const ids = all.map((member) => member.client);
    assert.deepEqual(ids, [...ids].sort());
    assert.equal(new Set(ids).size, 7);
    assert.deepEqual([...first.members, ...second.members], all.slice(0, 6));
  });

  /** @type {Array<[string, import("../src/client.js").Codec]>} */
  const codecs = [["json", jsonCodec], ["msgpack", msgpackCodec]];
  for (const [name, codec] of codecs) {
    test(`over ${name}, joinLeave tells of its own join, then of others' joins and leaves`, async () => {
      const topic = `${P}.events.${name}`;
      const watching = watcher();
      const watch = client({ codec });
      /** @type {Inbox<unknown>} */
      const messages = new Inbox();
      await watch.subscribe(topic, (message) => messages.push(message.data), {
        info: { name: "watcher" },
        ...watching.options,
      });
      assert.equal(await watching.events.next(), "join watcher");
      const [kind, own, ownTopic] = watching.all[0];
      assert.deepEqual([kind, own.user, own.info, ownTopic], ["join", null, { name: "watcher" }, topic]);

      // unsubscribe: a leave; subscribing again on the same connection: the same client joins
      const bee = client({ codec });
      const subscription = await bee.subscribe(topic, () => {}, { info: { name: "bee" } });
      assert.equal(await watching.events.next(), "join bee");
      await subscription.unsubscribe();
      assert.equal(await watching.events.next(), "leave bee");
      await bee.subscribe(topic, () => {}, { info: { name: "bee" } });
      assert.equal(await watching.events.next(), "join bee");
      assert.equal(watching.members.get("join bee")?.client, watching.members.get("leave bee")?.client);
      // close: a leave
      await bee.close();
      assert.equal(await watching.events.next(), "leave bee");
      // a connection cut with no close frame: a leave too
      const { proxy, subject } = await cuttable({ codec, reconnect: false });
      await subject.subscribe(topic, () => {}, { info: { name: "cut" } });
      assert.equal(await watching.events.next(), "join cut");
      proxy.cut();
      assert.equal(await watching.events.next(), "leave cut");
      assert.deepEqual(watching.members.get("leave cut"), watching.members.get("join cut"));

      // messages still arrive on the same subscription, between the events
      await watch.publish(topic, "still here");
      assert.equal(await messages.next(), "still here");
      assert.equal((await watch.presence(topic)).count, 1);
    });
  }

  test("a wildcard with joinLeave watches matching topics but is not a member", async () => {
    const watching = watcher();
    const watch = client();
    await watch.subscribe(`${P}.rooms.*`, () => {}, watching.options);
    await client().subscribe(`${P}.rooms.a`, () => {}, { info: { name: "ada" } });
    assert.equal(await watching.events.next(), "join ada");
    assert.equal(watching.all[0][2], `${P}.rooms.a`);
    assert.equal((await watch.presence(`${P}.rooms.a`)).count, 1);
  });

  test("refusals: presence or joinLeave without presence, info too large, bad options", async () => {
    const subject = client();
    await assert.rejects(subject.presence("nopresence.a"), { name: "PubSubError", code: "not_enabled" });
    await assert.rejects(subject.presence(`${P}.*`), { name: "PubSubError", code: "invalid_topic" });
    await assert.rejects(subject.subscribe("nopresence.a", () => {}, { joinLeave: true }), {
      name: "PubSubError",
      code: "not_enabled",
    });
    await assert.rejects(subject.subscribe(`${P}.big`, () => {}, { info: "x".repeat(1100) }), {
      name: "PubSubError",
      code: "too_large",
    });
    for (const limit of [-1, 1001, 2.5]) {
      await assert.rejects(subject.presence(`${P}.a`, { limit }), { name: "RangeError" });
    }
    await assert.rejects(subject.members(`${P}.a`, { pageSize: 0 }).next(), { name: "RangeError" });
    await assert.rejects(subject.subscribe(`${P}.a`, () => {}, { onJoin: () => {} }), {
      name: "TypeError",
      message: /need 'joinLeave: true'/,
    });
    // a topic without presence still takes info (ignored) and plain subscriptions
    await subject.subscribe("nopresence.b", () => {}, { info: { name: "x" } });
    assert.equal((await subject.presence(`${P}.big`)).count, 0); // the refused sub made no member
  });

  test("after a reconnect joinLeave and info are kept: the old member leaves, a new one joins", async () => {
    const topic = `${P}.reconnect`;
    const watching = watcher();
    await client().subscribe(topic, () => {}, { info: { name: "watcher" }, ...watching.options });
    assert.equal(await watching.events.next(), "join watcher");

    const own = watcher();
    /** @type {Inbox<string>} */
    const resubscribed = new Inbox();
    const { proxy, states, subject } = await cuttable();
    await subject.subscribe(topic, () => {}, {
      info: { name: "roamer" },
      ...own.options,
      onResubscribe: (_subscription, missed) => resubscribed.push(`resubscribed, missed: ${missed?.why}`),
    });
    assert.equal(await own.events.next(), "join roamer");
    assert.equal(await watching.events.next(), "join roamer");
    const before = /** @type {Member} */ (own.members.get("join roamer"));

    proxy.cut();
    await states.until((state) => state === "disconnected");
    assert.equal(await resubscribed.next(), "resubscribed, missed: no_history");
    assert.equal(await own.events.next(), "join roamer"); // its own join again: joinLeave kept
    const after = /** @type {Member} */ (own.members.get("join roamer"));
    assert.notEqual(after.client, before.client); // a new connection is a new member
    assert.deepEqual(after.info, { name: "roamer" }); // info kept

    const seen = [await watching.events.next(), await watching.events.next()];
    assert.deepEqual(seen.sort(), ["join roamer", "leave roamer"]);
    assert.equal(watching.members.get("leave roamer")?.client, before.client);
    const members = [];
    for await (const member of subject.members(topic)) members.push(member.client);
    assert.deepEqual(members.sort(), [watching.all[0][1].client, after.client].sort());
  });
});
