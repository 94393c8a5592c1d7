// @ts-check
/** The client against a real broker in tokens mode (TOKENS_BROKER_URL): `?token=`, refusals. */
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { Inbox, TOKENS_BROKER_URL, makeClient, needsTokensBroker } from "./helpers.js";

const url = /** @type {string} */ (TOKENS_BROKER_URL);

/** @type {Array<import("../src/client.js").Client>} */
const clients = [];
/** @param {import("../src/client.js").ClientOptions} options */
function client(options) {
  const made = makeClient(url, options);
  clients.push(made);
  return made;
}
after(() => Promise.all(clients.map((each) => each.close())));

describe("a broker in tokens mode", needsTokensBroker, () => {
  test("the token goes as ?token=, and the broker applies its grants", async () => {
    const subject = client({ token: "js-token" });
    /** @type {Inbox<unknown>} */
    const inbox = new Inbox();
    await subject.subscribe("js.room", (message) => inbox.push(message.data));
    await subject.publish("js.room", "hello");
    assert.equal(await inbox.next(), "hello");
    await assert.rejects(subject.subscribe("other.room", () => {}), { code: "forbidden" });
    await assert.rejects(subject.publish("other.room", 1), { code: "forbidden" });
    assert.equal(subject.state, "connected");
  });

  test("a refused token is retried with backoff, asking the token function again each time", async () => {
    /** @type {Inbox<string>} */
    const states = new Inbox();
    /** @type {string[]} */
    const issued = [];
    /** @type {Error[]} */
    const errors = [];
    const subject = client({
      token: async () => {
        issued.push(issued.length < 2 ? "wrong-token" : "js-token");
        return /** @type {string} */ (issued.at(-1));
      },
      onState: states.push,
      onError: (error) => errors.push(error),
    });
    const seen = []; // from the first change: a client starts "connecting"
    do seen.push(await states.next());
    while (seen.at(-1) !== "connected");
    assert.deepEqual(seen, ["disconnected", "connecting", "disconnected", "connecting", "connected"]);
    assert.deepEqual(issued, ["wrong-token", "wrong-token", "js-token"]);
    assert.deepEqual(errors, []); // a page cannot tell a refusal from a broker that is down
    await subject.subscribe("js.after", () => {});
  });
});
