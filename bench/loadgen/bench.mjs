// Load generator for bench/run: one Node process, one event loop, many WebSockets.
//
//   node bench.mjs --target broker|nats --url ws://127.0.0.1:P/ --scenario NAME [--pid PID]
//                  [--subscribers lean|ws]
//
// Scenarios: fanout, fanout-idle (fanout with 10 000 idle subscriptions on other topics),
// latency, topics, small-topics (issue 22: 1 000 topics, 4 publishers, one pub per WebSocket
// message, corked in batches of 64), memory. Prints one JSON object (the figures) on stdout.
//
// Both targets get the same traffic: 64-byte binary payloads, publishes batched into one
// WebSocket message when the publisher is ahead (both protocols allow that; small-topics
// instead sends each pub as its own message, as a client library does, and corks the socket
// around a batch so that the batch is one TCP write), and at most
// `window` undelivered messages per subscriber in flight, so neither server is flooded
// past what it can route. Subscribers count deliveries (and read latency stamps at the known
// data offset) without decoding every frame when every frame of a WebSocket message has the
// known fixed length (checked byte by byte at each frame start); anything else is fully
// decoded. Subscribers read through LeanWebSocket (lean.mjs), publishers through `ws`: with
// `ws` subscribers this process used 76-89 % of its core in the latency scenario and its
// stalls showed in the p99. That keeps this process off the critical path.

import { readFileSync } from "node:fs";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";
import { decodeMulti, encode } from "@msgpack/msgpack";
import WebSocket from "ws";
import { LeanWebSocket } from "./lean.mjs";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => {
    if (arg.startsWith("--")) pairs.push([arg.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const target = args.target ?? "broker";
const url = args.url;
const scenario = args.scenario;
const num = (name, dflt) => (args[name] !== undefined ? Number(args[name]) : dflt);
const PAYLOAD = 64;
const now = () => performance.now();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------- protocol adapters

/** The broker's wire protocol v1, msgpack encoding. */
class BrokerClient {
  constructor(ws) {
    this.ws = ws;
    this.nextId = 1;
    this.pendingOk = new Map();
    this.onMessage = null; // (bytes: Buffer, at) => void, a message's data at bytes[at]
    this.onCount = null; // (n) => void, fast path: n fixed-length msg frames
    this.frameLen = 0; // learned from the first decoded msg
    this.dataAt = 0; // where a msg frame's data starts in it, learned with frameLen
    ws.on("message", (buf) => this.receive(buf));
  }
  receive(buf) {
    wsMessages++;
    const len = this.frameLen;
    if (len && buf.length % len === 0) {
      let ok = true;
      for (let i = 0; i < buf.length; i += len) {
        if (buf[i] !== 0x84) { ok = false; break; } // fixmap(4): op, topic, data, sub
      }
      if (ok) { fixedFrames(this, buf, len); return; }
    }
    for (const frame of decodeMulti(buf)) {
      if (frame.op === "msg") {
        const data = Buffer.from(frame.data.buffer, frame.data.byteOffset, frame.data.length);
        if (!this.frameLen) {
          const encoded = Buffer.from(encode(frame));
          this.frameLen = encoded.length;
          this.dataAt = encoded.indexOf(data);
        }
        if (this.onMessage) this.onMessage(data, 0);
        else this.onCount(1);
      } else if (frame.op === "ok") {
        const resolve = this.pendingOk.get(frame.id);
        this.pendingOk.delete(frame.id);
        if (resolve) resolve();
      } else if (frame.op === "err") {
        throw new Error(`broker err: ${JSON.stringify(frame)}`);
      } else if (frame.op === "lag") {
        lagged += frame.dropped;
      }
    }
  }
  subscribe(topics) {
    const waits = topics.map((topic) => {
      const id = this.nextId++;
      this.ws.send(encode({ op: "sub", id, topic }));
      return new Promise((resolve) => this.pendingOk.set(id, resolve));
    });
    return Promise.all(waits);
  }
  static pubFrame(topic, data) {
    return Buffer.from(encode({ op: "pub", topic, data }));
  }
}

/** NATS text protocol over WebSocket: CONNECT, SUB, PUB, MSG, PING/PONG. */
class NatsClient {
  constructor(ws) {
    this.ws = ws;
    this.nextSid = 1;
    this.sids = new Map();
    this.rest = null;
    this.pongs = [];
    this.onMessage = null;
    this.onCount = null;
    this.frameLen = 0;
    ws.send('CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\n');
    ws.on("message", (buf) => this.receive(buf));
  }
  receive(buf) {
    wsMessages++;
    const len = this.frameLen;
    if (!this.rest && len && buf.length % len === 0) {
      let ok = true;
      for (let i = 0; i < buf.length; i += len) {
        if (buf[i] !== 0x4d || buf[i + len - 1] !== 0x0a) { ok = false; break; } // "MSG ...\n"
      }
      if (ok) { fixedFrames(this, buf, len); return; }
    }
    if (this.rest) buf = Buffer.concat([this.rest, buf]);
    this.rest = null;
    let pos = 0;
    while (pos < buf.length) {
      const eol = buf.indexOf("\r\n", pos);
      if (eol < 0) break;
      if (buf[pos] === 0x4d) { // MSG <subject> <sid> [reply] <size>
        const parts = buf.toString("latin1", pos, eol).split(" ");
        const size = Number(parts[parts.length - 1]);
        const end = eol + 2 + size + 2;
        if (end > buf.length) break;
        if (!this.frameLen) [this.frameLen, this.dataAt] = [end - pos, eol + 2 - pos];
        if (this.onMessage) this.onMessage(buf, eol + 2);
        else this.onCount(1);
        pos = end;
        continue;
      }
      const line = buf.toString("latin1", pos, eol);
      if (line === "PING") this.ws.send("PONG\r\n");
      else if (line === "PONG") this.pongs.shift()?.();
      else if (line.startsWith("-ERR")) throw new Error(`nats: ${line}`);
      pos = eol + 2;
    }
    if (pos < buf.length) this.rest = Buffer.from(buf.subarray(pos)); // buf may be reused
  }
  subscribe(topics) {
    const lines = topics.map((topic) => `SUB ${topic} ${this.nextSid++}\r\n`).join("");
    this.ws.send(lines + "PING\r\n");
    return new Promise((resolve) => this.pongs.push(resolve)); // PONG: all SUBs processed
  }
  static pubFrame(topic, data) {
    return Buffer.concat([Buffer.from(`PUB ${topic} ${data.length}\r\n`), data, Buffer.from("\r\n")]);
  }
}

/**
 * A WebSocket message of whole fixed-length msg frames (checked by the caller): count them,
 * or hand each one's data to onMessage, without decoding them.
 */
function fixedFrames(client, buf, len) {
  if (!client.onMessage) {
    client.onCount(buf.length / len);
    return;
  }
  for (let i = client.dataAt; i < buf.length; i += len) client.onMessage(buf, i);
}

const Client = target === "nats" ? NatsClient : BrokerClient;
let lagged = 0;
let wsMessages = 0; // WebSocket messages received by the counting subscribers

const PROTOCOLS = target === "nats" ? [] : ["pubsub.v1.msgpack"];
const leanSubscribers = (args.subscribers ?? "lean") === "lean";

/** A publisher: a `ws` WebSocket. */
async function connect() {
  const options = { perMessageDeflate: false, maxPayload: 64 * 1024 * 1024 };
  const ws = new WebSocket(url, PROTOCOLS, options);
  await new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("error", reject);
  });
  ws.on("error", (err) => { console.error(`socket error: ${err.message}`); });
  return new Client(ws);
}

/** A subscriber: a LeanWebSocket (see lean.mjs), or with `--subscribers ws` a `ws` one. */
async function connectSubscriber() {
  return leanSubscribers ? new Client(await LeanWebSocket.connect(url, PROTOCOLS)) : connect();
}

/** Open `n` subscribers, `parallel` handshakes at a time. */
async function connectMany(n, parallel = 100) {
  const clients = [];
  for (let i = 0; i < n; i += parallel) {
    const batch = [];
    for (let j = i; j < Math.min(n, i + parallel); j++) batch.push(connectSubscriber());
    clients.push(...(await Promise.all(batch)));
  }
  return clients;
}

/** CPU seconds (user + system) the server process has used so far. */
function cpuSeconds(pid) {
  const [user, system] = cpuSplit(pid);
  return user + system;
}

/** CPU seconds the server process has used so far: [user, system]. */
function cpuSplit(pid) {
  if (!pid) return [NaN, NaN];
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
  return [Number(fields[11]) / 100, Number(fields[12]) / 100]; // utime, stime in USER_HZ (100)
}

function rssKiB(pid) {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  return Number(/VmRSS:\s+(\d+)/.exec(status)[1]);
}

// ---------------------------------------------------------------- throughput

/**
 * Publish `frames` round-robin from one connection for `seconds`, with at most `window`
 * undelivered messages per subscriber; return deliveries/s over the whole run and losses.
 */
async function throughput({ subscribers, topicOf, seconds, window, batch }) {
  let received = 0;
  for (const c of subscribers) c.onCount = (n) => { received += n; };
  const publisher = await connect();
  const topics = [...new Set(subscribers.map((_, i) => topicOf(i)))];
  const perPub = subscribers.length / topics.length; // deliveries per publish
  const payload = Buffer.alloc(PAYLOAD, 0x61);
  const frames = topics.map((t) => Client.pubFrame(t, payload));
  // Warm-up: one message per topic, fully decoded, teaches every subscriber its frame length.
  await sendAndWait(publisher, Buffer.concat(frames), () => received >= subscribers.length);
  received = 0;
  wsMessages = 0;
  let sent = 0;
  const cpuStart = cpuSeconds(num("pid"));
  const start = now();
  const stopAt = start + seconds * 1000;
  let lastReceive = start;
  const counting = (n) => { received += n; lastReceive = now(); };
  for (const c of subscribers) c.onCount = counting;
  let next = 0;
  while (now() < stopAt) {
    if (publisher.ws.bufferedAmount > 256 * 1024 || sent * perPub - received > window * subscribers.length) {
      await sleep(0);
      continue;
    }
    const parts = [];
    for (let k = 0; k < batch; k++) {
      parts.push(frames[next]);
      next = next + 1 === frames.length ? 0 : next + 1;
    }
    publisher.ws.send(parts.length === 1 ? parts[0] : Buffer.concat(parts));
    sent += batch;
    await new Promise(setImmediate);
  }
  const expected = sent * perPub;
  await waitQuiet(() => received >= expected, () => received, 2000);
  const elapsed = (lastReceive - start) / 1000;
  const cpu = cpuSeconds(num("pid")) - cpuStart;
  return {
    msgs: sent,
    deliveries: received,
    "deliveries/s": Math.round(received / elapsed),
    lost: expected - received,
    lagged,
    "server_cpu_us/delivery": Number(((cpu * 1e6) / Math.max(1, received)).toFixed(2)),
    "frames/ws-msg": Number((received / Math.max(1, wsMessages)).toFixed(1)),
    seconds: Number(elapsed.toFixed(2)),
  };
}

async function sendAndWait(publisher, data, done) {
  publisher.ws.send(data);
  await waitQuiet(done, () => 0, 5000);
}

/** Wait until `done()`, or until `progress()` has not changed for `quietMs`. */
async function waitQuiet(done, progress, quietMs) {
  let last = progress();
  let lastChange = now();
  while (!done()) {
    await sleep(5);
    const p = progress();
    if (p !== last) { last = p; lastChange = now(); }
    else if (now() - lastChange > quietMs) return;
  }
}

async function fanout(idle) {
  const subs = num("subs", 200);
  if (idle) {
    // 10 connections x 1000 subscriptions on topics nobody publishes to.
    const holders = await connectMany(10);
    await Promise.all(holders.map((c, i) =>
      c.subscribe(Array.from({ length: idle / 10 }, (_, j) => `idle.${i}.${j}`))));
  }
  const subscribers = await connectMany(subs);
  await Promise.all(subscribers.map((c) => c.subscribe(["bench.fanout"])));
  const result = await throughput({
    subscribers, topicOf: () => "bench.fanout", seconds: num("seconds", 3), window: 1000, batch: num("batch", 4),
  });
  return { subs, idle: idle || 0, ...result };
}

async function topics() {
  const subs = num("subs", 1000);
  const subscribers = await connectMany(subs);
  await Promise.all(subscribers.map((c, i) => c.subscribe([`bench.t.${i}`])));
  const result = await throughput({
    subscribers, topicOf: (i) => `bench.t.${i}`, seconds: num("seconds", 3), window: 64, batch: num("batch", 64),
  });
  return { subs, "routed/s": result["deliveries/s"], ...result };
}

/** A seeded pseudo-random generator (mulberry32): the same topic sequence every run. */
function seeded(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Issue 22's workload: `subs` subscribers, each on its own topic; `publishers` connections,
 * each writing corked batches of `batch` pub frames (no `id` unless --id 1) to seeded-random
 * topics, `per-message` frames per WebSocket message (1: each pub its own message, as a
 * client library sends them). `warmup` messages first (untimed), then `messages` timed:
 * routed msg/s from the first timed send to the last delivery, and the server's CPU per
 * routed message. At most `window` undelivered messages per subscriber in flight in all.
 */
async function smallTopics() {
  const subs = num("subs", 1000);
  const nPublishers = num("publishers", 4);
  const batch = num("batch", 64);
  const perMessage = num("per-message", 1);
  const messages = num("messages", 200000);
  const warmup = num("warmup", 10000);
  const window = num("window", 64);
  const withId = num("id", 0) === 1 && target !== "nats";
  const subscribers = await connectMany(subs);
  const topicNames = subscribers.map((_, i) => `bench.t.${i}`);
  await Promise.all(subscribers.map((c, i) => c.subscribe([topicNames[i]])));
  let received = 0;
  let lastReceive = 0;
  for (const c of subscribers) c.onCount = (n) => { received += n; lastReceive = now(); };
  const publishers = [];
  for (let p = 0; p < nPublishers; p++) publishers.push(await connect());
  const payload = Buffer.alloc(PAYLOAD, 0x61);
  const frames = topicNames.map((t) => Client.pubFrame(t, payload));
  let nextId = 1;
  const frame = (topic) => withId
    ? Buffer.from(encode({ op: "pub", id: nextId++, topic: topicNames[topic], data: payload }))
    : frames[topic];
  let sent = 0;
  const random = publishers.map((_, p) => seeded(num("seed", 22) * 1000 + p));

  /** Publisher `p` sends `count` messages; resolves when they are all written. */
  async function publish(p, count) {
    const ws = publishers[p].ws;
    const next = random[p];
    let left = count;
    while (left > 0) {
      if (ws.bufferedAmount > 256 * 1024 || sent - received > window * subs) {
        await sleep(0);
        continue;
      }
      const n = Math.min(batch, left);
      ws._socket.cork();
      for (let k = 0; k < n; k += perMessage) {
        const m = Math.min(perMessage, n - k);
        if (m === 1) ws.send(frame(Math.floor(next() * subs)));
        else {
          const parts = [];
          for (let j = 0; j < m; j++) parts.push(frame(Math.floor(next() * subs)));
          ws.send(Buffer.concat(parts));
        }
      }
      ws._socket.uncork();
      sent += n;
      left -= n;
      await new Promise(setImmediate);
    }
  }
  /** All publishers send `total` messages between them; waits for every delivery. */
  async function phase(total) {
    const shares = publishers.map((_, p) => Math.floor(total / nPublishers) + (p < total % nPublishers ? 1 : 0));
    const target = sent + total;
    await Promise.all(shares.map((share, p) => publish(p, share)));
    await waitQuiet(() => received >= target, () => received, 2000);
  }

  // Warm-up: every subscriber first learns its frame length from a decoded frame.
  await phase(warmup);
  const lostBefore = sent - received;
  // bench/run starts its profiler or syscall counter at this line, and stops it at the next.
  console.error("bench: timed start");
  await sleep(num("hold-ms", 0));
  received = 0;
  sent = 0;
  wsMessages = 0;
  const [userStart, systemStart] = cpuSplit(num("pid"));
  const genStart = process.cpuUsage();
  const start = now();
  await phase(messages);
  const [userEnd, systemEnd] = cpuSplit(num("pid"));
  console.error("bench: timed end");
  const cpu = userEnd + systemEnd - userStart - systemStart;
  const gen = process.cpuUsage(genStart);
  const elapsed = (lastReceive - start) / 1000;
  return {
    subs, publishers: nPublishers, batch, "per-message": perMessage, id: withId ? 1 : 0,
    msgs: sent, "routed/s": Math.round(received / elapsed), lost: sent - received + lostBefore,
    "server_cpu_us/routed": Number(((cpu * 1e6) / Math.max(1, received)).toFixed(2)),
    "server_cpu_%": Math.round((cpu / elapsed) * 100),
    "server_sys_%": Math.round(((systemEnd - systemStart) / Math.max(1e-9, cpu)) * 100),
    "gen_cpu_%": Math.round((gen.user + gen.system) / 1e4 / elapsed),
    "frames/ws-msg": Number((received / Math.max(1, wsMessages)).toFixed(1)),
    seconds: Number(elapsed.toFixed(2)),
  };
}

// ---------------------------------------------------------------- latency

async function latency() {
  const subs = num("subs", 100);
  const rate = num("rate", 2000);
  const seconds = num("seconds", 4);
  const subscribers = await connectMany(subs);
  await Promise.all(subscribers.map((c) => c.subscribe(["bench.lat"])));
  const samples = new Float64Array(Math.ceil(rate * seconds * 1.1) * subs);
  let count = 0;
  let received = 0;
  let measuring = false;
  const onMessage = (bytes, at) => {
    received++;
    if (!measuring) return;
    const delay = now() - bytes.readDoubleLE(at);
    if (count < samples.length) samples[count++] = delay;
  };
  for (const c of subscribers) c.onMessage = onMessage;
  const publisher = await connect();
  const payload = Buffer.alloc(PAYLOAD, 0x61);
  const start = now();
  const warmup = start + 500;
  const stopAt = warmup + seconds * 1000;
  let sent = 0;
  let cpuStart = null; // and this process's CPU, the frames and WebSocket messages received,
  let genCpuStart = null; // at the warm-up's end
  let framesAtStart = 0;
  let wsAtStart = 0;
  const loopDelay = monitorEventLoopDelay({ resolution: 1 }); // this process's own stalls
  while (now() < stopAt) {
    if (cpuStart === null && now() >= warmup) {
      cpuStart = cpuSeconds(num("pid"));
      genCpuStart = process.cpuUsage();
      framesAtStart = received;
      wsAtStart = wsMessages;
      loopDelay.enable();
    }
    measuring = now() >= warmup;
    const due = Math.floor(((now() - start) / 1000) * rate);
    while (sent < due) {
      payload.writeDoubleLE(now(), 0);
      publisher.ws.send(Client.pubFrame("bench.lat", payload));
      sent++;
    }
    await sleep(1);
  }
  const cpu = cpuSeconds(num("pid")) - cpuStart;
  const genCpu = process.cpuUsage(genCpuStart);
  loopDelay.disable();
  const batching = (received - framesAtStart) / Math.max(1, wsMessages - wsAtStart);
  await waitQuiet(() => received >= sent * subs, () => received, 2000);
  const sorted = samples.subarray(0, count).sort();
  const pct = (p) => Number(sorted[Math.min(count - 1, Math.floor((p / 100) * count))].toFixed(2));
  return {
    subs, "msg/s": rate, samples: count, "p50_ms": pct(50), "p99_ms": pct(99),
    "max_ms": Number(sorted[count - 1].toFixed(2)), lost: sent * subs - received,
    "frames/ws-msg": Number(batching.toFixed(1)),
    "server_cpu_%": Math.round((cpu / seconds) * 100),
    "gen_cpu_%": Math.round((genCpu.user + genCpu.system) / 1e4 / seconds),
    "gen_stall_p99_ms": Number((loopDelay.percentile(99) / 1e6).toFixed(2)),
    "gen_stall_max_ms": Number((loopDelay.max / 1e6).toFixed(2)),
  };
}

// ---------------------------------------------------------------- memory

async function memory() {
  const pid = num("pid");
  const conns = num("conns", 1000);
  const before = rssKiB(pid);
  const clients = await connectMany(conns);
  await Promise.all(clients.map((c, i) => c.subscribe([`bench.idle.${i}`])));
  await sleep(1000);
  const after = rssKiB(pid);
  return { conns, rss_before_kib: before, rss_after_kib: after, "kib/conn": Number(((after - before) / conns).toFixed(1)) };
}

const scenarios = {
  fanout: () => fanout(0),
  "fanout-idle": () => fanout(num("idle", 10000)),
  latency,
  topics,
  "small-topics": smallTopics,
  memory,
};
const result = await scenarios[scenario]();
console.log(JSON.stringify({ target, scenario, ...result }));
process.exit(0);
