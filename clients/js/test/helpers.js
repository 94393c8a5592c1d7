// @ts-check
/**
 * Test helpers: a message inbox to await, a TCP proxy that can cut connections, a client maker,
 * and a WebSocket that shows only what a browser's does.
 */
import net from "node:net";
import WebSocket from "ws";

import { Client } from "../src/client.js";

/**
 * The broker the tests run against (tests/test_js_client.py starts it): topics under `history.`
 * keep history, those under `history.small.` only their last 3 messages; topics under
 * `presence.` have presence.
 */
export const BROKER_URL = process.env.BROKER_URL;
/** Pass as a test's options: skips it, saying why, when there is no broker. */
export const needsBroker = { skip: BROKER_URL ? false : "BROKER_URL is not set (run through pytest)" };
/** A broker in tokens mode, whose one token `js-token` may publish and subscribe to `js.>`. */
export const TOKENS_BROKER_URL = process.env.TOKENS_BROKER_URL;
export const needsTokensBroker = {
  skip: TOKENS_BROKER_URL ? false : "TOKENS_BROKER_URL is not set (run through pytest)",
};
/** A broker that takes one connection per IP address: the next handshake gets 503. */
export const CAPPED_BROKER_URL = process.env.CAPPED_BROKER_URL;
/**
 * A broker whose `refill.` topics are `drop_oldest` and keep their last 10 000 messages
 * (`refill.short.` their last 100), behind outbound queues of 16 messages: a subscriber that
 * stops reading loses messages at once, and the topic still has them.
 */
export const REFILL_BROKER_URL = process.env.REFILL_BROKER_URL;
export const needsRefillBroker = {
  skip: REFILL_BROKER_URL ? false : "REFILL_BROKER_URL is not set (run through pytest)",
};
/**
 * A broker whose history holds 4000 bytes in all (`[history] max_bytes`) and whose `evict.`
 * topics keep their last 5 messages: the topic published to least recently is evicted whole,
 * and its next message starts a new epoch, from offset 1 again.
 */
export const EVICTING_BROKER_URL = process.env.EVICTING_BROKER_URL;
export const needsEvictingBroker = {
  skip: EVICTING_BROKER_URL ? false : "EVICTING_BROKER_URL is not set (run through pytest)",
};
/** A port where nothing listens: connecting is refused at once. */
export const UNREACHABLE_URL = process.env.UNREACHABLE_URL;
export const needsFailover = {
  skip: BROKER_URL && CAPPED_BROKER_URL && UNREACHABLE_URL
    ? false
    : "BROKER_URL, CAPPED_BROKER_URL and UNREACHABLE_URL are not set (run through pytest)",
};

/**
 * A client on the `ws` package's WebSocket, with short reconnect delays.
 * @param {string | string[]} url
 * @param {import("../src/client.js").ClientOptions} [options]
 */
export function makeClient(url, options = {}) {
  return new Client(url, {
    WebSocket: /** @type {any} */ (WebSocket),
    backoff: { initial: 20, max: 200 },
    timeout: 5000,
    ...options,
  });
}

/**
 * `make()` with the client's shuffle of several URLs keeping their given order (Math.random
 * pinned just below 1 while the client picks its first round), so a test knows which comes first.
 * @template T
 * @param {() => T} make
 */
export function inGivenOrder(make) {
  const random = Math.random;
  Math.random = () => 0.999999;
  try {
    return make();
  } finally {
    Math.random = random;
  }
}

/**
 * The `ws` package's WebSocket with only what a browser's shows: no `unexpected-response`
 * event, so a refused handshake is an `error` and a close 1006, without status or body.
 */
export const BrowserWebSocket = /** @type {any} */ (
  function BrowserWebSocket(/** @type {string} */ url, /** @type {string[]} */ protocols) {
    const socket = new WebSocket(url, protocols);
    return new globalThis.Proxy(socket, {
      get(target, key) {
        if (key === "on") return undefined; // the EventEmitter side, which browsers do not have
        const value = Reflect.get(target, key);
        return typeof value === "function" ? value.bind(target) : value;
      },
    });
  }
);

/**
 * Wait until `condition()` holds, polling it; fail after 10 s, saying `what()`.
 * @param {() => boolean} condition
 * @param {() => string} what
 */
export async function eventually(condition, what) {
  const deadline = Date.now() + 10000;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`not within 10 s: ${what()}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/**
 * Collects values pushed to it; `next()` waits for the next one (failing after 5 s).
 * @template T
 */
export class Inbox {
  constructor() {
    /** @type {T[]} */
    this.items = [];
    /** @type {Array<(item: T) => void>} */
    this.waiting = [];
    this.push = this.push.bind(this);
  }

  /** @param {T} item */
  push(item) {
    const waiter = this.waiting.shift();
    if (waiter) waiter(item);
    else this.items.push(item);
  }

  /** @returns {Promise<T>} */
  next() {
    if (this.items.length > 0) return Promise.resolve(/** @type {T} */ (this.items.shift()));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("nothing arrived within 5 s")), 5000);
      this.waiting.push((item) => {
        clearTimeout(timer);
        resolve(item);
      });
    });
  }

  /**
   * Wait for the first item that satisfies `predicate`, discarding the others (failing after
   * 5 s in all, however many others keep coming).
   * @param {(item: T) => boolean} predicate
   */
  async until(predicate) {
    const deadline = Date.now() + 5000;
    for (;;) {
      const item = await this.next();
      if (predicate(item)) return item;
      if (Date.now() > deadline) throw new Error("nothing matching arrived within 5 s");
    }
  }
}

/**
 * A TCP proxy in front of the broker, so a test can cut the network under a client.
 * `cut()` destroys every connection; `refuse` makes it drop new ones at once; `hold()` stops
 * reading what the broker sends (as a client that stops reading its socket: TCP pushes back,
 * and the broker's queue for it fills) until `release()`.
 */
export class Proxy {
  /** @param {string} target a ws:// URL */
  constructor(target) {
    const { hostname, port } = new URL(target);
    this.refuse = false;
    this.accepted = 0;
    /** @type {Set<net.Socket>} */
    this.sockets = new Set();
    /** @type {Map<net.Socket, net.Socket>} each connection's socket to the broker, and to the client */
    this.upstreams = new Map();
    this.held = false;
    this.server = net.createServer((downstream) => {
      this.accepted += 1;
      if (this.refuse) {
        downstream.destroy();
        return;
      }
      const upstream = net.connect(Number(port), hostname);
      this.upstreams.set(upstream, downstream);
      for (const [from, to] of [[downstream, upstream], [upstream, downstream]]) {
        this.sockets.add(from);
        if (from === downstream || !this.held) from.pipe(to);
        from.on("error", () => to.destroy());
        from.on("close", () => {
          this.sockets.delete(from);
          this.upstreams.delete(upstream);
          to.destroy();
        });
      }
    });
  }

  hold() {
    this.held = true;
    for (const [upstream, downstream] of this.upstreams) {
      upstream.unpipe(downstream);
      upstream.pause();
    }
  }

  release() {
    this.held = false;
    for (const [upstream, downstream] of this.upstreams) upstream.pipe(downstream);
  }

  /** Listen on 127.0.0.1 and a free port; resolves to the proxy's ws:// URL. */
  async start() {
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", () => resolve(undefined)));
    const address = /** @type {net.AddressInfo} */ (this.server.address());
    return `ws://127.0.0.1:${address.port}/`;
  }

  cut() {
    for (const socket of this.sockets) socket.destroy();
  }

  async stop() {
    this.cut();
    await new Promise((resolve) => this.server.close(() => resolve(undefined)));
  }
}
