// A browser client for chat-stream's API: a streaming `fetch` reader
// (EventSource cannot POST or send headers), resume after a dropped
// connection, stop, and errors as values. No dependencies; an ES module.

/** An error answer of the API: status, code, message, Retry-After (s). */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code || `http_${status}`;
    this.retryAfter = retryAfter;
  }
}

async function apiError(resp) {
  let body = {};
  try {
    body = await resp.json();
  } catch {
    // not JSON: keep the status
  }
  const ra = Number(resp.headers.get("retry-after"));
  return new ApiError(resp.status, body.code, body.message, Number.isFinite(ra) && ra > 0 ? ra : undefined);
}

/** Splits SSE text into complete events; returns [events, rest]. */
export function parseEvents(buffer) {
  const events = [];
  const blocks = buffer.replace(/\r\n/g, "\n").split("\n\n");
  const rest = blocks.pop();
  for (const block of blocks) {
    const ev = { event: "message", data: "", id: undefined };
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
      if (field === "event") ev.event = value;
      else if (field === "data") data.push(value);
      else if (field === "id") ev.id = value;
    }
    ev.data = data.join("\n");
    events.push(ev);
  }
  return [events, rest];
}

export class ChatClient {
  /**
   * @param {string} api the Function URL (no trailing slash)
   * @param {() => Record<string,string>} auth headers that say who calls
   */
  constructor(api, auth) {
    this.api = api.replace(/\/$/, "");
    this.auth = auth;
  }

  headers(extra = {}) {
    return { ...this.auth(), ...extra };
  }

  async json(path, init = {}) {
    const resp = await fetch(this.api + path, { ...init, headers: this.headers(init.headers) });
    if (!resp.ok) throw await apiError(resp);
    return resp.json();
  }

  conversations() {
    return this.json("/conversations");
  }

  conversation(id) {
    return this.json(`/conversations/${encodeURIComponent(id)}`);
  }

  /** Asks `DELETE /chat/streams/{id}`: the answer ends as `stopped`. */
  async stop(streamId) {
    const resp = await fetch(`${this.api}/chat/streams/${encodeURIComponent(streamId)}`, {
      method: "DELETE",
      headers: this.headers(),
    });
    if (!resp.ok && resp.status !== 404) throw await apiError(resp);
    return resp.status === 202;
  }

  /**
   * Sends one message and reads the answer as it streams.
   * `on.meta(meta)`, `on.delta(text)`, `on.done(data)`, `on.error(data)`,
   * `on.resuming()`, `on.reloaded(conversation)` are called as events come.
   * A dropped connection is resumed with `GET /chat/streams/{id}` and
   * `Last-Event-ID` where the deployment keeps live streams (meta has a
   * `stream_id`), else the finished turn is reloaded from history.
   */
  async send({ message, conversationId, model, temperature }, on) {
    const body = { message };
    if (conversationId) body.conversation_id = conversationId;
    if (model) body.model = model;
    if (temperature !== undefined) body.temperature = temperature;
    const resp = await fetch(`${this.api}/chat`, {
      method: "POST",
      headers: this.headers({ "content-type": "application/json", accept: "text/event-stream" }),
      body: JSON.stringify(body),
    });
    if (!resp.ok) throw await apiError(resp);
    const state = { lastId: 0, meta: null, ended: false };
    try {
      await this.read(resp, state, on);
    } catch (e) {
      if (state.ended) return state;
      // The connection broke mid-answer.
      on.resuming?.();
      if (state.meta?.stream_id) {
        await this.resume(state, on);
      } else if (state.meta?.conversation_id) {
        await this.reload(state, on);
      } else {
        throw e;
      }
    }
    if (!state.ended) {
      if (!state.meta) {
        throw new ApiError(0, "connection_lost", "the connection was lost before the answer started; ask again");
      }
      on.resuming?.();
      if (state.meta.stream_id) await this.resume(state, on);
      else if (state.meta.conversation_id) await this.reload(state, on);
    }
    if (!state.ended) {
      throw new ApiError(0, "stream_lost", "the answer could not be resumed; ask again");
    }
    return state;
  }

  async read(resp, state, on) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const [events, rest] = parseEvents(buffer);
      buffer = rest;
      for (const ev of events) {
        if (ev.id !== undefined) state.lastId = Number(ev.id);
        const data = ev.data ? JSON.parse(ev.data) : {};
        if (ev.event === "meta") {
          state.meta = data;
          on.meta?.(data);
        } else if (ev.event === "delta") {
          on.delta?.(data.text);
        } else if (ev.event === "done") {
          state.ended = true;
          on.done?.(data);
        } else if (ev.event === "error") {
          state.ended = true;
          on.error?.(data);
        }
      }
    }
  }

  async resume(state, on) {
    for (let attempt = 0; attempt < 3 && !state.ended; attempt++) {
      const resp = await fetch(`${this.api}/chat/streams/${state.meta.stream_id}`, {
        headers: this.headers({ "last-event-id": String(state.lastId), accept: "text/event-stream" }),
      });
      if (!resp.ok) throw await apiError(resp);
      try {
        await this.read(resp, state, on);
      } catch {
        // broke again: the next attempt resumes from the new last id
      }
    }
  }

  async reload(state, on) {
    // Without live streams the answer cannot be resumed: its turn is
    // read back once it is stored.
    for (let i = 0; i < 20 && !state.ended; i++) {
      const conv = await this.conversation(state.meta.conversation_id).catch(() => null);
      const last = conv?.messages?.at(-1);
      if (last?.turn_id === state.meta.turn_id && !last.pending_write) {
        state.ended = true;
        on.reloaded?.(conv);
        return;
      }
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}
