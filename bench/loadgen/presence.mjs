// Load generator for bench/presence.py: N members of one presence topic, on one event loop.
//
//   node presence.mjs --urls ws://127.0.0.1:P/[,ws://127.0.0.1:Q/] --pids PID[,PID]
//                     --mode watch|cheap [--members 10000] [--phases join,reconnect,pages]
//                     [--timeout 120] [--concurrency 500] [--topic room.bench] [--check 1]
//                     [--walks 1] [--info-bytes 16]
//
// Prints one JSON object per phase on stdout (progress on stderr).
//
// --mode watch: every member subscribes with join_leave (it also watches); --mode cheap:
// members subscribe without it and one extra connection (the watcher) watches, through the
// pattern `room.*` (so it is not a member itself). Phases:
//
//   join       all members are connected first (not timed); then every member sends its
//              `sub` at once and the clock runs until the topic has settled;
//   reconnect  every member's socket is destroyed at once, and each reconnects and
//              subscribes again (at most --concurrency handshakes in flight): a deploy;
//   pages      a `presence` page walk over the whole topic, with limit 1000 and 100.
//
// Settled means: every `sub` has its `ok`; a `presence` count (limit 0), asked on every node
// by a connection that is not a member, is the number of members still connected (every old
// member left, every new one joined; in a cluster each node is asked, for at most
// --count-timeout s); then every member (and the watcher) sends a `presence` limit 0 and has
// its answer. The broker answers in order on a connection, so that answer comes after every
// join/leave queued for it before: once all are back, every member has seen all it will see.
// The figures are taken then; a phase that has not settled within --timeout s is reported as
// such, and the phases after it are skipped.
//
// A bystander connection, on a topic without presence, publishes to itself every 50 ms: its
// worst round trip in a phase is how long the broker kept unrelated clients waiting.
// Connections the broker closes are counted (closed_by_broker, with the close codes).
// --check 1 decodes every join and leave and counts duplicates (see Client.check).
//
// Join and leave frames are counted without decoding them (a msgpack skipper finds each
// frame's end; the op is read from its first bytes); other frames (ok, lag, err) are decoded.
// Every socket reads into one shared buffer (net's `onread`): LeanWebSocket's 256 KiB per
// socket would be 2.5 GiB for 10 000.

import { readFileSync } from "node:fs";
import net from "node:net";
import { createHash, randomBytes } from "node:crypto";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";
import { decode, encode } from "@msgpack/msgpack";
import { LeanWebSocket } from "./lean.mjs";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => {
    if (arg.startsWith("--")) pairs.push([arg.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const URLS = args.urls.split(",");
const PIDS = (args.pids ?? "").split(",").filter(Boolean).map(Number);
const MODE = args.mode ?? "watch";
const MEMBERS = Number(args.members ?? 10000);
const PHASES = (args.phases ?? "join,reconnect,pages").split(",");
const TIMEOUT_MS = Number(args.timeout ?? 120) * 1000;
const COUNT_TIMEOUT_MS = Number(args["count-timeout"] ?? args.timeout ?? 120) * 1000;
const CONCURRENCY = Number(args.concurrency ?? 500);
const TOPIC = args.topic ?? "room.bench";
const INFO_BYTES = Number(args["info-bytes"] ?? 16);
const WALKS = Number(args.walks ?? 1); // page walks per page size (the best is shown)
const PROTOCOLS = ["pubsub.v1.msgpack"];
const now = () => performance.now();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const log = (...parts) => console.error(`# generator ${(now() / 1000).toFixed(1)} s:`, ...parts);

class Timeout extends Error {}

// ---------------------------------------------------------------- connections

const SHARED_READ = Buffer.allocUnsafe(256 * 1024); // every socket's reads, one at a time
const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

let socketErrors = 0; // on open sockets (resets): counted, not printed one by one

const closeCodes = {}; // close frames from the broker, by code (e.g. 1001: ping timeout)

class QuietLean extends LeanWebSocket {
  _message(first, payload) {
    if ((first & 0x0f) === 0x8) {
      const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
      closeCodes[code] = (closeCodes[code] ?? 0) + 1;
    }
    super._message(first, payload);
  }

  _fail(err) {
    if (!this._open) this._failed(err);
    else if (err.message !== "connection closed") socketErrors++;
    else this.onclose?.();
  }
}

/** LeanWebSocket.connect with the shared read buffer (and a local address to spread ports). */
function openLean(url, localAddress) {
  const { hostname, port, pathname } = new URL(url);
  const key = randomBytes(16).toString("base64");
  const ws = new QuietLean();
  ws._accept = createHash("sha1").update(key + GUID).digest("base64");
  return new Promise((resolve, reject) => {
    ws._opened = resolve;
    ws._failed = reject;
    ws.socket = net.connect({
      host: hostname, port: Number(port), localAddress, noDelay: true,
      onread: { buffer: SHARED_READ, callback: (n, buf) => ws._read(buf, n) },
    });
    ws.socket.on("error", (err) => ws._fail(err));
    ws.socket.on("close", () => ws._fail(new Error("connection closed")));
    ws.socket.write(
      `GET ${pathname} HTTP/1.1\r\nHost: ${hostname}:${port}\r\nUpgrade: websocket\r\n` +
        `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n` +
        `Sec-WebSocket-Protocol: ${PROTOCOLS.join(", ")}\r\n\r\n`,
    );
  });
}

/** The length of the msgpack value at b[p] (its end offset). */
function skip(b, p) {
  const t = b[p];
  if (t <= 0x7f || t >= 0xe0) return p + 1;
  if (t <= 0x8f) return skipValues(b, p + 1, (t & 0xf) * 2); // fixmap
  if (t <= 0x9f) return skipValues(b, p + 1, t & 0xf); // fixarray
  if (t <= 0xbf) return p + 1 + (t & 0x1f);
  switch (t) {
    case 0xc0: case 0xc2: case 0xc3: return p + 1;
    case 0xc4: case 0xd9: return p + 2 + b[p + 1];
    case 0xc5: case 0xda: return p + 3 + b.readUInt16BE(p + 1);
    case 0xc6: case 0xdb: return p + 5 + b.readUInt32BE(p + 1);
    case 0xc7: return p + 3 + b[p + 1];
    case 0xc8: return p + 4 + b.readUInt16BE(p + 1);
    case 0xc9: return p + 6 + b.readUInt32BE(p + 1);
    case 0xcc: case 0xd0: case 0xd4: return p + 2 + (t === 0xd4 ? 1 : 0);
    case 0xcd: case 0xd1: case 0xd5: return p + 3 + (t === 0xd5 ? 1 : 0);
    case 0xca: case 0xce: case 0xd2: return p + 5;
    case 0xd6: return p + 6;
    case 0xcb: case 0xcf: case 0xd3: return p + 9;
    case 0xd7: return p + 10;
    case 0xd8: return p + 18;
    case 0xdc: return skipValues(b, p + 3, b.readUInt16BE(p + 1)); // array 16
    case 0xdd: return skipValues(b, p + 5, b.readUInt32BE(p + 1)); // array 32
    case 0xde: return skipValues(b, p + 3, 2 * b.readUInt16BE(p + 1)); // map 16
    case 0xdf: return skipValues(b, p + 5, 2 * b.readUInt32BE(p + 1)); // map 32
    default: throw new Error(`msgpack type 0x${t.toString(16)} at ${p}`);
  }
}

/** The end of `n` msgpack values starting at b[q]. */
function skipValues(b, q, n) {
  while (n-- > 0) q = skip(b, q);
  return q;
}

const CHECK = args.check === "1";
let dupJoins = 0; // --check: duplicates seen by some subscription (see Client.check)
let dupLeaves = 0;

/** One connection speaking the broker's protocol (msgpack): counts join/leave, answers ids. */
class Client {
  constructor(ws) {
    this.ws = ws;
    this.nextId = 1;
    this.pending = new Map(); // id -> resolve(frame)
    this.joins = 0;
    this.leaves = 0;
    this.lagDropped = 0;
    this.wsMessages = 0;
    this.bytes = 0;
    this.errors = 0;
    this.onMsg = null;
    this.closing = false; // we closed it
    this.closed = false; // it is closed, by either side
    ws.on("message", (buf) => this.receive(buf));
    ws.onclose = () => this.gone();
  }

  /** The socket closed: answer every request still waiting with a pseudo-frame. */
  gone() {
    if (this.closed) return;
    this.closed = true;
    if (!this.closing) closedByBroker++;
    for (const resolve of this.pending.values()) resolve({ op: "closed" });
    this.pending.clear();
  }

  receive(b) {
    this.wsMessages++;
    this.bytes += b.length;
    let p = 0;
    while (p < b.length) {
      const end = skip(b, p);
      // {"op": "join"|"leave", ...}: fixmap, fixstr "op", fixstr op
      if (b[p] === 0x84 && b[p + 1] === 0xa2 && b[p + 2] === 0x6f && b[p + 3] === 0x70) {
        const join = b[p + 4] === 0xa4 && b[p + 5] === 0x6a;
        if (join || (b[p + 4] === 0xa5 && b[p + 5] === 0x6c)) {
          if (join) this.joins++;
          else this.leaves++;
          if (CHECK) this.check(join, decode(b.subarray(p, end)));
          p = end;
          continue;
        }
      }
      this.control(decode(b.subarray(p, end)));
      p = end;
    }
  }

  /** --check: a join of a member this subscription holds already, or a leave of one it
   * saw leave last, is a duplicate (unless a lag frame came: drops make such gaps). */
  check(join, frame) {
    const client = frame.member.client;
    this.seen ??= new Map();
    const last = this.seen.get(client);
    if (last === join && !this.lagDropped) {
      if (join) dupJoins++;
      else dupLeaves++;
    }
    this.seen.set(client, join);
  }

  control(frame) {
    if (frame.op === "ok" || frame.op === "err") {
      if (frame.op === "err") this.errors++;
      const resolve = this.pending.get(frame.id);
      this.pending.delete(frame.id);
      if (resolve) resolve(frame);
      else if (frame.op === "err") log("err", JSON.stringify(frame));
    } else if (frame.op === "lag") {
      this.lagDropped += frame.dropped;
    } else if (frame.op === "msg") {
      this.onMsg?.(frame);
    } else {
      log("unexpected frame", JSON.stringify(frame));
    }
  }

  request(frame) {
    if (this.closed) return Promise.resolve({ op: "closed" });
    const id = this.nextId++;
    this.ws.send(Buffer.from(encode({ ...frame, id })));
    return new Promise((resolve) => this.pending.set(id, resolve));
  }

  close() {
    this.closing = true;
    this.ws.socket.destroy();
    this.gone();
  }
}

// Local addresses: one port range each, so 20 000+ connections in a minute never run out.
const LOCAL = Array.from({ length: 8 }, (_, i) => `127.0.0.${i + 2}`);
let opened = 0;
let retries = 0; // failed connection attempts (retried)
let closedByBroker = 0; // connections the broker closed (a ping timeout, a slow consumer)

async function connect(url) {
  for (let attempt = 0; ; attempt++) {
    try {
      const ws = await openLean(url, LOCAL[opened++ % LOCAL.length]);
      return new Client(ws);
    } catch (err) {
      if (attempt >= 20) throw err;
      retries++;
      await sleep(50 * (attempt + 1));
    }
  }
}
/** Run `task(i)` for i in [0, n) with at most `limit` running at once; the results in order. */
async function pool(n, limit, task) {
  const results = new Array(n);
  let next = 0;
  async function worker() {
    while (next < n) {
      const i = next++;
      results[i] = await task(i);
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, n) }, worker));
  return results;
}

/** `promise`, or a Timeout once `deadline` (a now() value) has passed. */
function until(promise, deadline, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Timeout(what)), Math.max(0, deadline - now()));
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------- the broker's process

function cpuSeconds(pid) {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in USER_HZ (100)
}

function rssMiB(pid) {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const rss = /VmRSS:\s+(\d+)/.exec(status); // none once the process has exited (a zombie)
  if (!rss) {
    console.error(`# generator: broker pid ${pid} has exited; stopping`);
    process.exit(3);
  }
  return Number(rss[1]) / 1024;
}

/**
 * A bystander: one more connection, on a topic without presence, that publishes to itself
 * every 50 ms and times the round trip. Its worst round trip in a phase (or the age of its
 * oldest unanswered message) is how long the broker kept everyone else waiting.
 */
class Bystander {
  constructor(client) {
    this.client = client;
    this.sent = []; // send times not answered yet, oldest first
    this.worst = 0;
    client.onMsg = () => {
      const sent = this.sent.shift();
      if (sent !== undefined) this.worst = Math.max(this.worst, now() - sent);
    };
  }
  async start() {
    await this.client.request({ op: "sub", topic: "bystander.echo" });
    this.timer = setInterval(() => {
      this.sent.push(now());
      this.client.ws.send(Buffer.from(encode({ op: "pub", topic: "bystander.echo", data: 0 })));
    }, 50);
    this.timer.unref();
  }
  /** The worst wait since the last call. */
  take() {
    const waiting = this.sent.length ? now() - this.sent[0] : 0;
    const worst = Math.max(this.worst, waiting);
    this.worst = 0;
    return Math.round(worst);
  }
}
let bystander = null;

/** Broker CPU, RSS (and its peak, sampled every 100 ms) and this process's CPU over a phase. */
class Meter {
  constructor() {
    this.start = now();
    this.cpu = PIDS.map(cpuSeconds);
    this.rss = PIDS.map(rssMiB);
    this.peak = [...this.rss];
    this.gen = process.cpuUsage();
    bystander?.take();
    this.loop = monitorEventLoopDelay({ resolution: 10 });
    this.loop.enable();
    this.timer = setInterval(() => this.sample(), 100);
  }
  sample() {
    PIDS.forEach((pid, i) => { this.peak[i] = Math.max(this.peak[i], rssMiB(pid)); });
  }
  stop() {
    clearInterval(this.timer);
    this.sample();
    this.loop.disable();
    const wall = (now() - this.start) / 1000;
    const gen = process.cpuUsage(this.gen);
    const cpu = PIDS.map((pid, i) => cpuSeconds(pid) - this.cpu[i]);
    const rssAfter = PIDS.map(rssMiB);
    const r1 = (x) => Math.round(x * 10) / 10;
    return {
      broker_cpu_s: r1(cpu.reduce((a, b) => a + b, 0)),
      broker_cpu_pct: Math.round((100 * cpu.reduce((a, b) => a + b, 0)) / wall), // of core 0
      rss_before_mib: this.rss.map(r1).join("+"),
      rss_after_mib: rssAfter.map(r1).join("+"),
      rss_peak_mib: this.peak.map(r1).join("+"),
      gen_cpu_pct: Math.round(((gen.user + gen.system) / 1e6 / wall) * 100),
      gen_stall_max_ms: Math.round(this.loop.max / 1e6),
      bystander_max_ms: bystander ? bystander.take() : null,
    };
  }
}

// ---------------------------------------------------------------- phases

const probes = []; // one non-member connection per node: counts and page walks
let watcher = null; // --mode cheap: the one connection that asks for join/leave
let members = [];
let retired = []; // members closed in this phase (their counts still belong to it)

function subFrame(i) {
  const frame = { op: "sub", topic: TOPIC };
  if (MODE === "watch") frame.join_leave = true;
  if (INFO_BYTES) frame.info = `member-${String(i).padStart(Math.max(0, INFO_BYTES - 7), "0")}`;
  return frame;
}

async function subscribe(client, i) {
  const answer = await client.request(subFrame(i));
  if (answer.op === "err") throw new Error(`sub refused: ${JSON.stringify(answer)}`);
}

function counters(clients) {
  const total = { joins: 0, leaves: 0, lag_dropped: 0, ws_msgs: 0, bytes: 0, errs: 0 };
  for (const c of clients) {
    total.joins += c.joins;
    total.leaves += c.leaves;
    total.lag_dropped += c.lagDropped;
    total.ws_msgs += c.wsMessages;
    total.bytes += c.bytes;
    total.errs += c.errors;
  }
  return total;
}

function everyone() {
  return [...members, ...retired, ...(watcher ? [watcher] : [])];
}

/** Wait until every node counts `expected` members; the counts seen last, per node. */
async function waitCount(expected, deadline) {
  let counts = [];
  for (;;) {
    const asked = Promise.all(probes.map((p) => p.request({ op: "presence", topic: TOPIC, limit: 0 })));
    counts = (await until(asked, deadline + 1000, "a presence count")).map((answer) => answer.count);
    if (counts.every((c) => c === expected)) return { counts, reached: true };
    if (now() > deadline) return { counts, reached: false };
    await sleep(20);
  }
}

/** Each member (and the watcher) asks for the count: all its join/leave frames are in. */
function drained() {
  const clients = [...members, ...(watcher ? [watcher] : [])];
  return Promise.all(clients.map((c) => c.request({ op: "presence", topic: TOPIC, limit: 0 })));
}

/** The clock from `start` until settled (see the head of this file), with the figures. */
async function settle(name, start, meter, subscribed, before) {
  const deadline = start + TIMEOUT_MS;
  const closedBefore = closedByBroker;
  const result = { phase: name, mode: MODE, members: MEMBERS, nodes: URLS.length };
  const r2 = (ms) => Math.round(ms / 10) / 100;
  let stage = "subscribe";
  try {
    await until(subscribed, deadline, "every sub's ok");
    result.subscribed_s = r2(now() - start);
    stage = "count";
    const { counts, reached } = await waitCount(
      members.filter((c) => !c.closed).length, Math.min(deadline, now() + COUNT_TIMEOUT_MS));
    result.count_s = r2(now() - start);
    result.counts = counts.join("+");
    result.count_reached = reached;
    stage = "drain";
    await until(drained(), deadline, "every member's own presence answer");
    result.settle_s = r2(now() - start);
    result.settled = true;
  } catch (err) {
    if (!(err instanceof Timeout)) throw err;
    result.settled = false;
    result.timed_out_in = stage;
    result.settle_s = `>${r2(now() - start)}`;
  }
  result.closed_by_broker = closedByBroker - closedBefore;
  if (Object.keys(closeCodes).length) result.close_codes = JSON.stringify(closeCodes); // so far
  const after = counters(everyone());
  for (const key of Object.keys(after)) result[key] = after[key] - (before[key] ?? 0);
  result.frames = result.joins + result.leaves + result.lag_dropped;
  if (CHECK) Object.assign(result, { dup_joins: dupJoins, dup_leaves: dupLeaves });
  Object.assign(result, meter.stop(), { connect_retries: retries, socket_errors: socketErrors });
  return result;
}

async function connectAll() {
  const start = now();
  const meter = new Meter();
  members = await pool(MEMBERS, CONCURRENCY, (i) => connect(URLS[i % URLS.length]));
  return { phase: "connect", members: MEMBERS, connect_s: Math.round(now() - start) / 1000, ...meter.stop() };
}

async function join() {
  const before = counters(everyone());
  const meter = new Meter();
  const start = now();
  const subscribed = Promise.all(members.map((c, i) => subscribe(c, i)));
  const result = await settle("join", start, meter, subscribed, before);
  // Every member's join reaches every member that joined before it, its own included.
  // (On one node. In a cluster a member may also see, later, joins made before its own.)
  result.frames_if_none_dropped = MODE === "cheap" ? MEMBERS : URLS.length > 1 ? "-" : (MEMBERS * (MEMBERS + 1)) / 2;
  return result;
}

async function reconnect() {
  const before = counters(everyone());
  const meter = new Meter();
  const start = now();
  retired = members;
  for (const c of retired) c.close();
  members = []; // filled as they connect
  const subscribed = pool(MEMBERS, CONCURRENCY, async (i) => {
    const client = await connect(URLS[i % URLS.length]);
    members.push(client);
    await subscribe(client, i);
  });
  const result = await settle("reconnect", start, meter, subscribed, before);
  result.frames_if_none_dropped = MODE === "watch" ? "-" : 2 * MEMBERS;
  retired = [];
  return result;
}

async function pages() {
  const result = { phase: "pages", members: MEMBERS, nodes: URLS.length };
  const meter = new Meter();
  for (const limit of [1000, 100]) {
    let best = Infinity;
    for (let walk = 0; walk < WALKS; walk++) {
      const start = now();
      let cursor;
      let pageCount = 0;
      const seen = new Set();
      do {
        const frame = { op: "presence", topic: TOPIC, limit };
        if (cursor) frame.cursor = cursor;
        const answer = await probes[0].request(frame);
        if (answer.op !== "ok") throw new Error(`presence refused: ${JSON.stringify(answer)}`);
        pageCount++;
        result.count = answer.count;
        for (const m of answer.members) seen.add(m.client);
        cursor = answer.cursor;
      } while (cursor);
      best = Math.min(best, now() - start);
      result[`walk${limit}_pages`] = pageCount;
      result[`walk${limit}_members`] = seen.size;
    }
    result[`walk${limit}_ms`] = Math.round(best * 10) / 10; // the best of --walks
  }
  Object.assign(result, meter.stop());
  return result;
}

/** In a cluster: wait until a message published on the last node reaches the first. */
async function clusterReady() {
  const heard = new Promise((resolve) => { probes[0].onMsg = resolve; });
  await probes[0].request({ op: "sub", topic: "bench.ready" });
  const deadline = now() + 20000;
  let got = false;
  heard.then(() => { got = true; });
  while (!got) {
    if (now() > deadline) throw new Error("the cluster nodes do not hear each other (20 s)");
    probes[probes.length - 1].ws.send(Buffer.from(encode({ op: "pub", topic: "bench.ready", data: 1 })));
    await sleep(100);
  }
  probes[0].onMsg = null;
}

async function main() {
  for (const url of URLS) probes.push(await connect(url));
  if (URLS.length > 1) await clusterReady();
  bystander = new Bystander(await connect(URLS[0]));
  await bystander.start();
  if (MODE === "cheap") {
    watcher = await connect(URLS[0]);
    const pattern = `${TOPIC.split(".")[0]}.*`; // not a member itself: the count stays --members
    const answer = await watcher.request({ op: "sub", topic: pattern, join_leave: true });
    if (answer.op !== "ok") throw new Error(`watcher sub refused: ${JSON.stringify(answer)}`);
  }
  console.log(JSON.stringify(await connectAll()));
  for (const phase of PHASES) {
    const result = await { join, reconnect, pages }[phase]();
    console.log(JSON.stringify(result));
    if (result.settled === false) break; // the broker is behind: later phases mean nothing
  }
  process.exit(0);
}

main().catch((err) => {
  console.error(err.stack ?? String(err));
  process.exit(1);
});
