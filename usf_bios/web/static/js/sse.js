// Server-Sent Events read with fetch, so the API key travels in the Authorization header (EventSource
// cannot send one). Reconnects after a dropped connection or a server restart with Last-Event-ID, so
// nothing is lost and nothing is repeated; ends when the server closes the stream after a final status.

import { askForKey, authHeaders, authRequired, forgetKey, sleep, statusIn } from "./app.js";

function parseBlock(block) {
  const message = { id: null, event: "message", data: "" };
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") message.id = value;
    else if (field === "event") message.event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  try {
    message.data = JSON.parse(data.join("\n"));
  } catch {
    return null;
  }
  return message;
}

/**
 * Follow /api{path}: onEvent({id, event, data}) for each message, onConnection(true|false) as the
 * connection comes and goes. Resolves when the job is final or `signal` aborts.
 */
export async function followEvents(path, { onEvent, onConnection = () => {}, signal, since = -1 }) {
  let lastId = since;
  let delay = 1000;
  let final = false;
  while (!signal?.aborted && !final) {
    try {
      const headers = { Accept: "text/event-stream", ...authHeaders() };
      if (lastId >= 0) headers["Last-Event-ID"] = String(lastId);
      const response = await fetch(`/api${path}`, { headers, signal, cache: "no-store" });
      if (response.status === 401 && authRequired) {
        forgetKey();
        await askForKey("The server refused the key; enter another.");
        continue;
      }
      if (response.status >= 400 && response.status < 500) return;  // no such job (or not this key's)
      if (!response.ok || !response.body) throw new Error(`events: ${response.status}`);
      onConnection(true);
      delay = 1000;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end).replace(/^(\r?\n){2}/, "");
          const message = parseBlock(block);
          if (!message) continue;
          if (message.id !== null && /^\d+$/.test(message.id)) lastId = Number(message.id);
          if (message.event === "status" && statusIn("final", message.data.status)) final = true;
          onEvent(message);
        }
      }
      onConnection(false);
      // The server ends the stream once the job is final; any other end is a dropped connection.
    } catch (error) {
      if (signal?.aborted) return;
      onConnection(false);
    }
    if (!final && !signal?.aborted) {
      await sleep(delay);
      delay = Math.min(delay * 2, 5000);
    }
  }
}
