// @ts-check
/**
 * The client against a real broker in tokens mode (TOKENS_BROKER_URL): `?token=`, and refusals:
 * what the client says about them, and when it ends or tries again.
 */
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { Refused } from "../src/client.js";
import { BrowserWebSocket, Inbox, TOKENS_BROKER_URL, makeClient, needsTokensBroker } from "./helpers.js";

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
      onState: (state, why) => states.push(why ? `${state}: ${why.status} ${why.reason}` : state),
      onError: (error) => errors.push(error),
    });
    const seen = []; // from the first change: a client starts "connecting"
    do seen.push(await states.next());
    while (seen.at(-1) !== "connected");
    const refused = "disconnected: 401 unknown token";
    assert.deepEqual(seen, [refused, "connecting", refused, "connecting", "connected"]);
    assert.deepEqual(issued, ["wrong-token", "wrong-token", "js-token"]);
    assert.deepEqual(errors, []); // it is retried, so not an error: onState says why
    await subject.subscribe("js.after", () => {});
  });

  test("a wrong fixed token ends the client with the broker's words", async () => {
    /** @type {Inbox<string>} */
    const states = new Inbox();
    /** @type {Inbox<Error>} */
    const errors = new Inbox();
    const subject = client({
      token: "wrong-token",
      onState: (state, why) => states.push(`${state}: ${why?.status} ${why?.reason}`),
      onError: errors.push,
    });
    const waiting = subject.publish("js.never", 1); // waits for a connection
    assert.equal(await states.next(), "closed: 401 unknown token");
    const error = await errors.next();
    assert.ok(error instanceof Refused);
    assert.equal(error.message, `${url} refused the connection: HTTP 401 unknown token`);
    assert.equal(error.disconnection.status, 401);
    await assert.rejects(waiting, (thrown) => thrown === error);
    await assert.rejects(subject.subscribe("js.never", () => {}), (thrown) => thrown === error);
  });

  test("where the WebSocket hides the handshake (browsers), a refusal is retried, and says so", async () => {
    /** @type {Inbox<import("../src/client.js").Disconnection | undefined>} */
    const changes = new Inbox();
    const subject = client({
      WebSocket: BrowserWebSocket,
      token: "wrong-token",
      onState: (state, why) => state === "disconnected" && changes.push(why),
    });
    const first = /** @type {import("../src/client.js").Disconnection} */ (await changes.next());
    assert.deepEqual([first.code, first.status, first.reason], [1006, undefined, ""]);
    assert.equal(
      first.message,
      `cannot connect to ${url} (close 1006): it is unreachable, or it refused the handshake; ` +
        "a browser's WebSocket shows neither the HTTP status nor the broker's reason",
    );
    await changes.next(); // and again: it cannot know that waiting will not help
    assert.notEqual(subject.state, "closed");
  });
});
