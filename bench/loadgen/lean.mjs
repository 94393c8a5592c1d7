// A receive-only-fast WebSocket client for the load generator's subscribers.
//
// The subscribers of the latency scenario take ~83 000 WebSocket messages a second on one core.
// Through `ws` (a Readable socket, its Receiver stream, two events per message) that kept the
// load generator's core 99 % busy, so its own event loop, not the server, set the tail.
// This client reads with net's `onread` into one reused buffer and parses the server's frames
// in place (RFC 6455: a server's frames are never masked): no stream, no copy and one call per
// message. It sends little (sub, CONNECT, PING, pong), masked as the RFC requires.
//
//   const ws = await LeanWebSocket.connect("ws://127.0.0.1:8765/", ["pubsub.v1.msgpack"]);
//   ws.on("message", (buf) => ...);  // buf: a view valid only during the call
//   ws.send(bytesOrString);

import { createHash, randomBytes } from "node:crypto";
import net from "node:net";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const READ_BUFFER = 256 * 1024;

export class LeanWebSocket {
  /** Open a WebSocket to `url` (ws:// only) offering `protocols`; resolves once accepted. */
  static connect(url, protocols = []) {
    const { hostname, port, pathname, search } = new URL(url);
    const key = randomBytes(16).toString("base64");
    const ws = new LeanWebSocket();
    ws._accept = createHash("sha1").update(key + GUID).digest("base64");
    return new Promise((resolve, reject) => {
      ws._opened = resolve;
      ws._failed = reject;
      ws.socket = net.connect({
        host: hostname,
        port: Number(port),
        noDelay: true,
        onread: { buffer: Buffer.allocUnsafe(READ_BUFFER), callback: (n, buf) => ws._read(buf, n) },
      });
      ws.socket.on("error", (err) => ws._fail(err));
      ws.socket.on("close", () => ws._fail(new Error("connection closed")));
      const offer = protocols.length ? `Sec-WebSocket-Protocol: ${protocols.join(", ")}\r\n` : "";
      ws.socket.write(
        `GET ${pathname}${search} HTTP/1.1\r\nHost: ${hostname}:${port}\r\nUpgrade: websocket\r\n` +
          `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n${offer}\r\n`,
      );
    });
  }

  constructor() {
    this.socket = null;
    this.onmessage = () => {};
    this._open = false;
    this._held = null; // bytes of an unfinished frame (or handshake), copied out of the buffer
    this._fragments = null; // the frames so far of a fragmented message
  }

  on(event, listener) {
    if (event !== "message") throw new Error(`LeanWebSocket has no ${event} event`);
    this.onmessage = listener;
  }

  get bufferedAmount() {
    return this.socket.writableLength;
  }

  /** Send a text (string) or binary (Buffer) message, masked. */
  send(data) {
    this._frame(typeof data === "string" ? 0x1 : 0x2, Buffer.from(data));
  }

  _frame(opcode, payload) {
    const n = payload.length;
    const header = Buffer.allocUnsafe(n < 126 ? 6 : n < 65536 ? 8 : 14);
    header[0] = 0x80 | opcode;
    if (n < 126) header[1] = 0x80 | n;
    else if (n < 65536) { header[1] = 0x80 | 126; header.writeUInt16BE(n, 2); }
    else { header[1] = 0x80 | 127; header.writeBigUInt64BE(BigInt(n), 2); }
    const mask = randomBytes(4);
    mask.copy(header, header.length - 4);
    const masked = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) masked[i] = payload[i] ^ mask[i & 3];
    this.socket.write(Buffer.concat([header, masked]));
  }

  _fail(err) {
    if (!this._open) this._failed(err);
    else if (err.message !== "connection closed") console.error(`socket error: ${err.message}`);
  }

  _read(buf, n) {
    let data = buf.subarray(0, n);
    if (this._held) data = this._held = Buffer.concat([this._held, data]);
    const used = this._open ? this._frames(data) : this._handshake(data);
    // What is left is an unfinished frame: keep a copy, since the buffer is reused.
    this._held = used < data.length ? Buffer.from(data.subarray(used)) : null;
  }

  /** Parse the handshake answer; returns the bytes used. */
  _handshake(data) {
    const end = data.indexOf("\r\n\r\n");
    if (end < 0) return 0;
    const head = data.toString("latin1", 0, end);
    const accept = /\r\nsec-websocket-accept:\s*(\S+)/i.exec(head);
    if (!head.startsWith("HTTP/1.1 101") || accept?.[1] !== this._accept) {
      this._failed(new Error(`handshake refused: ${head.split("\r\n")[0]}`));
      this.socket.destroy();
      return data.length;
    }
    this._open = true;
    this._opened(this);
    return end + 4 + this._frames(data.subarray(end + 4));
  }

  /** Hand every whole frame of `data` on; returns the bytes used. */
  _frames(data) {
    let pos = 0;
    while (data.length - pos >= 2) {
      let length = data[pos + 1];
      let start = pos + 2;
      if (length & 0x80) throw new Error("masked frame from the server");
      if (length === 126) {
        if (data.length - pos < 4) break;
        length = data.readUInt16BE(pos + 2);
        start = pos + 4;
      } else if (length === 127) {
        if (data.length - pos < 10) break;
        length = Number(data.readBigUInt64BE(pos + 2));
        start = pos + 10;
      }
      if (start + length > data.length) break;
      this._message(data[pos], data.subarray(start, start + length));
      pos = start + length;
    }
    return pos;
  }

  _message(first, payload) {
    const fin = first & 0x80;
    const opcode = first & 0x0f;
    if (opcode === 0x1 || opcode === 0x2) {
      if (fin) this.onmessage(payload);
      else this._fragments = [Buffer.from(payload)];
    } else if (opcode === 0x0 && this._fragments) {
      this._fragments.push(Buffer.from(payload));
      if (fin) {
        const whole = Buffer.concat(this._fragments);
        this._fragments = null;
        this.onmessage(whole);
      }
    } else if (opcode === 0x9) {
      this._frame(0xa, payload); // pong
    } else if (opcode === 0x8) {
      this._frame(0x8, payload.subarray(0, 2)); // close: echo the code, then wait for the end
    }
  }
}
