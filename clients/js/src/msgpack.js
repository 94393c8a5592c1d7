// @ts-check
/**
 * The msgpack codec (`pubsub.v1.msgpack`): binary messages of consecutive msgpack maps.
 * Pass it as `new Client(url, { codec: msgpackCodec })`. `data` may then carry bytes
 * (`Uint8Array`), which JSON cannot.
 */
import { decodeMulti, encode } from "@msgpack/msgpack";

/** @typedef {import("./client.js").Codec} Codec */

/** @type {Codec} */
export const msgpackCodec = Object.freeze({
  subprotocol: "pubsub.v1.msgpack",
  encode(frames) {
    const parts = frames.map((frame) => encode(frame));
    if (parts.length === 1) return parts[0];
    const batch = new Uint8Array(parts.reduce((size, part) => size + part.length, 0));
    let at = 0;
    for (const part of parts) {
      batch.set(part, at);
      at += part.length;
    }
    return batch;
  },
  decode(message) {
    if (typeof message === "string") throw new TypeError("text message on the msgpack subprotocol");
    return /** @type {import("./client.js").Frame[]} */ ([...decodeMulti(message)]);
  },
});
