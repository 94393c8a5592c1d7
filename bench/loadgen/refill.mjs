// Load generator for bench/refill.py: one publisher at a fixed rate, one fast and one slow
// subscriber, all three through our JS client (clients/js/src), on one event loop.
//
//   node refill.mjs --url ws://127.0.0.1:P/ --pid PID [--metrics http://127.0.0.1:M/metrics]
//                   [--rate 20000] [--seconds 12] [--warm 1] [--slow 5] [--factor 10]
//                   [--size 64] [--window 1000] [--buffer-size 1000] [--drain 30]
//                   [--topic ticks.refill] [--prefill 0]
//
// Prints one JSON object on stdout (progress on stderr).
//
// The publisher produces --rate messages a second for --seconds, on a schedule (a tick every
// millisecond makes what is due); each is a `pub` with `id`, at most --window of them
// unanswered: past that the produced messages wait in the publisher (its backlog). So when
// the broker holds the publisher (`block`), it shows: the acknowledged rate falls, the backlog
// grows, and a message's `held` time (produced -> acknowledged) rises. Each payload is --size
// bytes whose first four carry the message's sequence number.
//
// Both subscribers subscribe before the first publish, with the client's defaults (a refill
// where the topic keeps history). From --warm s to --warm + --slow s the slow one's
// application takes messages at --rate / --factor a second: once it is ahead of that budget
// its socket is paused (ws `pause()`) until the budget catches up, so the broker's queue for
// it fills and its on_full policy acts. Then it reads at full speed again and catches up.
//
// Each subscriber checks the sequence numbers its application gets: out of order (one at or
// below the last: a duplicate or a step back), missing (skipped over), and counts what the
// client reported: `lag` (the broker's count of drops), `onGap` (offsets a refill could not
// read back), and the subscription's `refills` (history reads). The broker's CPU and RSS
// (peak sampled every 100 ms) come from /proc; its history counters from --metrics.

import { readFileSync } from "node:fs";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";
import WebSocket from "ws";
import { Client } from "../../clients/js/src/client.js";
import { msgpackCodec } from "../../clients/js/src/msgpack.js";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => {
    if (arg.startsWith("--")) pairs.push([arg.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const URL_ = args.url;
const PID = Number(args.pid);
const METRICS = args.metrics;
const TOPIC = args.topic ?? "ticks.refill";
const RATE = Number(args.rate ?? 20000);
const SECONDS = Number(args.seconds ?? 12);
const WARM = Number(args.warm ?? 1);
const SLOW = Number(args.slow ?? 5);
const FACTOR = Number(args.factor ?? 10);
const SIZE = Math.max(4, Number(args.size ?? 64));
const WINDOW = Number(args.window ?? 1000);
const BUFFER_SIZE = Number(args["buffer-size"] ?? 1000);
const DRAIN_MS = Number(args.drain ?? 30) * 1000;
const TOTAL = Math.floor(RATE * SECONDS);
const now = () => performance.now();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const log = (...parts) => console.error(`# generator ${(now() / 1000).toFixed(1)} s:`, ...parts);

// ---------------------------------------------------------------- the broker's process

function cpuSeconds(pid) {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in USER_HZ (100)
}

function rssMiB(pid) {
  const rss = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  if (!rss) throw new Error(`broker pid ${pid} has exited`);
  return Number(rss[1]) / 1024;
}

/** The broker's /metrics samples, by name with labels (`name{label="v"}`); {} without --metrics. */
async function scrape() {
  if (!METRICS) return {};
  const text = await (await fetch(METRICS)).text();
  const samples = {};
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const at = line.lastIndexOf(" ");
    samples[line.slice(0, at)] = Number(line.slice(at + 1));
  }
  return samples;
}

/** `after - before` of the first of `names` the broker exports; null if it exports none. */
function grew(before, after, ...names) {
  const name = names.find((each) => each in after);
  return name === undefined ? null : after[name] - (before[name] ?? 0);
}

// ---------------------------------------------------------------- the clients

/** A client of ours over msgpack; `sockets` gets each WebSocket it opens. */
function connect(sockets = []) {
  class Recorded extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      sockets.push(this);
    }
  }
  const client = new Client(URL_, { codec: msgpackCodec, WebSocket: Recorded, reconnect: false });
  return { client, sockets };
}

/** What one subscriber's application got, checked against the publisher's numbering. */
class Reader {
  constructor() {
    this.received = 0;
    this.last = -1; // the last sequence number handed over
    this.outOfOrder = 0;
    this.missing = 0;
    this.lagDropped = 0;
    this.gaps = 0;
    this.gapMessages = 0;
    this.subscription = null;
  }

  take(message) {
    const data = message.data;
    const seq = new DataView(data.buffer, data.byteOffset, data.byteLength).getUint32(0);
    if (seq <= this.last) this.outOfOrder++;
    else {
      this.missing += seq - this.last - 1;
      this.last = seq;
    }
    this.received++;
  }

  async subscribe(client, onMessage) {
    this.subscription = await client.subscribe(TOPIC, onMessage, {
      bufferSize: BUFFER_SIZE,
      onLag: (dropped) => (this.lagDropped += dropped),
      onGap: ({ from, to }) => {
        this.gaps++;
        this.gapMessages += to - from + 1;
      },
    });
  }

  figures() {
    return {
      received: this.received,
      out_of_order: this.outOfOrder,
      missing: this.missing,
      lag_dropped: this.lagDropped,
      gaps: this.gaps,
      gap_messages: this.gapMessages,
      refills: this.subscription.refills,
      refill_on: this.subscription.epoch !== undefined, // the topic keeps history
    };
  }
}

/**
 * The slow subscriber's pace: from `start()` to `stop()` its application takes at most `rate`
 * messages a second, counted from `start()`; ahead of that, its socket is paused until the
 * budget catches up.
 */
class Throttle {
  constructor(reader, sockets, rate) {
    this.reader = reader;
    this.sockets = sockets; // its client's WebSockets: the last is the one in use
    this.rate = rate;
    this.on = false;
    this.timer = undefined; // set while paused
  }
  start() {
    this.on = true;
    this.since = now();
    this.base = this.reader.received;
  }
  check() {
    if (!this.on || this.timer !== undefined) return;
    const due = this.since + ((this.reader.received - this.base) / this.rate) * 1000;
    if (due > now()) {
      this.sockets.at(-1).pause();
      this.timer = setTimeout(() => this.resume(), due - now());
    }
  }
  resume() {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.sockets.at(-1).resume();
  }
  stop() {
    this.on = false;
    this.resume();
  }
}

/** A publisher at RATE messages/s on a schedule, at most WINDOW unanswered. */
class Publisher {
  constructor(client) {
    this.client = client;
    this.produced = 0; // made by the schedule
    this.sent = 0;
    this.acked = 0;
    this.errors = 0;
    this.backlogMax = 0;
    this.madeAt = new Float64Array(TOTAL); // when each was produced
    this.held = new Float32Array(TOTAL); // produced -> acknowledged, ms
    this.ackTimes = new Float64Array(TOTAL);
    this.payload = new Uint8Array(SIZE);
  }

  /** Produce what the schedule says is due by now, and send what the window allows. */
  tick(t) {
    const due = Math.min(TOTAL, Math.floor((RATE * (t - this.start)) / 1000));
    for (; this.produced < due; this.produced++) this.madeAt[this.produced] = t;
    this.backlogMax = Math.max(this.backlogMax, this.produced - this.sent);
    this.pump();
  }

  pump() {
    while (this.sent < this.produced && this.sent - this.acked - this.errors < WINDOW) {
      const seq = this.sent++;
      const data = this.payload.slice();
      new DataView(data.buffer).setUint32(0, seq);
      this.client.publish(TOPIC, data).then(
        () => this.done(seq),
        (error) => {
          this.errors++;
          if (this.errors === 1) log(`publish failed: ${error.message}`);
        },
      );
    }
  }

  done(seq) {
    const t = now();
    this.acked++;
    this.held[seq] = t - this.madeAt[seq];
    this.ackTimes[seq] = t;
    this.pump();
  }

  /** Acknowledgements between two times, per second. */
  rateBetween(from, to) {
    let count = 0;
    for (let i = 0; i < this.sent; i++) count += this.ackTimes[i] >= from && this.ackTimes[i] < to;
    return Math.round((count * 1000) / (to - from));
  }

  /** The fewest acknowledgements in any whole second of the schedule, per second. */
  worstSecond() {
    let worst = Infinity;
    for (let s = 0; s + 1 <= SECONDS; s++) {
      worst = Math.min(worst, this.rateBetween(this.start + s * 1000, this.start + (s + 1) * 1000));
    }
    return worst === Infinity ? null : worst;
  }
}

function percentile(values, p) {
  const sorted = Float32Array.from(values).sort();
  return sorted.length === 0 ? 0 : sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))];
}

// ---------------------------------------------------------------- the run

/**
 * Fill the topic's history before anyone subscribes (--prefill messages, as fast as the window
 * allows), so that the broker's memory "before" already holds a full history: what grows after
 * that is what the slow subscriber costs.
 */
async function prefill(client) {
  const count = Number(args.prefill ?? 0);
  const data = new Uint8Array(SIZE);
  for (let sent = 0; sent < count; ) {
    const batch = [];
    for (; sent < count && batch.length < WINDOW; sent++) batch.push(client.publish(TOPIC, data));
    await Promise.all(batch);
  }
}

async function main() {
  const publisher = new Publisher(connect().client);
  await prefill(publisher.client);
  const fast = new Reader();
  const slow = new Reader();
  const fastConnection = connect();
  const slowConnection = connect();
  const throttle = new Throttle(slow, slowConnection.sockets, RATE / FACTOR);
  await fast.subscribe(fastConnection.client, (message) => fast.take(message));
  await slow.subscribe(slowConnection.client, (message) => {
    slow.take(message);
    throttle.check();
  });
  await publisher.client.publish("bench.warmup", new Uint8Array(1)); // connected, answered

  const before = await scrape();
  const cpuBefore = cpuSeconds(PID);
  const rssBefore = rssMiB(PID);
  let rssPeak = rssBefore;
  const loop = monitorEventLoopDelay({ resolution: 10 });
  loop.enable();
  const genBefore = process.cpuUsage();
  const start = (publisher.start = now());
  const slowFrom = start + WARM * 1000;
  const slowTo = slowFrom + SLOW * 1000;
  let slowLagMax = 0;
  let caughtUp = null;
  let throttled = false;
  const sampler = setInterval(() => (rssPeak = Math.max(rssPeak, rssMiB(PID))), 100);
  log(`publishing ${TOTAL} messages at ${RATE}/s; slow from ${WARM} s for ${SLOW} s`);

  const settled = () =>
    publisher.acked + publisher.errors === TOTAL && fast.last === TOTAL - 1 && slow.last === TOTAL - 1;
  const deadline = start + SECONDS * 1000 + DRAIN_MS;
  while (!settled() && now() < deadline) {
    const t = now();
    publisher.tick(t);
    if (!throttled && t >= slowFrom) {
      throttle.start();
      throttled = true;
    }
    if (throttle.on && t >= slowTo) throttle.stop();
    slowLagMax = Math.max(slowLagMax, publisher.produced - 1 - slow.last);
    if (caughtUp === null && t >= slowTo && slow.last >= publisher.produced - 1 - Math.max(1, RATE / 20)) {
      caughtUp = (t - slowTo) / 1000;
    }
    await sleep(1);
  }
  const end = now();
  clearInterval(sampler);
  loop.disable();
  const gen = process.cpuUsage(genBefore);
  const wall = (end - start) / 1000;
  const cpu = cpuSeconds(PID) - cpuBefore;
  const after = await scrape();
  const r1 = (x) => Math.round(x * 10) / 10;
  const ackedHeld = publisher.held.filter((_, seq) => publisher.ackTimes[seq] > 0);
  const historyBytes = after.broker_history_bytes;

  console.log(JSON.stringify({
    settled: settled(),
    rate: RATE,
    published: publisher.acked,
    pub_errors: publisher.errors,
    pub_rate: publisher.rateBetween(start, start + SECONDS * 1000),
    pub_rate_slow: publisher.rateBetween(slowFrom, slowTo),
    pub_worst_1s: publisher.worstSecond(),
    held_p99_ms: r1(percentile(ackedHeld, 0.99)),
    held_max_ms: r1(ackedHeld.reduce((a, b) => Math.max(a, b), 0)),
    backlog_max: publisher.backlogMax,
    fast: fast.figures(),
    slow: { ...slow.figures(), lag_max: slowLagMax, catch_up_s: caughtUp === null ? null : Math.round(caughtUp * 100) / 100 },
    history_reads: grew(before, after, "broker_history_reads_total"),
    history_read_messages: grew(before, after, "broker_history_read_messages_total", "broker_history_messages_total"),
    broker_dropped: grew(before, after, 'broker_messages_dropped_total{policy="drop_oldest"}'),
    history_mib: historyBytes === undefined ? null : r1(historyBytes / 2 ** 20),
    broker_cpu_s: r1(cpu),
    broker_cpu_pct: Math.round((100 * cpu) / wall),
    rss_before_mib: r1(rssBefore),
    rss_peak_mib: r1(rssPeak),
    rss_after_mib: r1(rssMiB(PID)),
    wall_s: r1(wall),
    gen_cpu_pct: Math.round(((gen.user + gen.system) / 1e6 / wall) * 100),
    gen_stall_max_ms: Math.round(loop.max / 1e6),
  }));
  await Promise.all([publisher.client, fastConnection.client, slowConnection.client].map((c) => c.close()));
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err.stack ?? String(err));
    process.exit(1);
  },
);
