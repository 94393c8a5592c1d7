// Opens N WebSockets to a URL and discards everything received; exits when all are closed.
//   node sink.mjs ws://127.0.0.1:P/ N
import WebSocket from "ws";

const [url, n] = [process.argv[2], Number(process.argv[3])];
let open = n;
for (let i = 0; i < n; i++) {
  const ws = new WebSocket(url, { perMessageDeflate: false, maxPayload: 64 * 1024 * 1024 });
  ws.on("message", () => {});
  ws.on("error", () => {});
  ws.on("close", () => { if (--open === 0) process.exit(0); });
}
