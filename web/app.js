// The chat page: sign-in, the conversation list, streaming answers with
// their time to first token, cache status and model, Stop, resume after a
// dropped connection, and a readable line for every error. Model output
// is only ever inserted as text (never as HTML).

import { ApiError, ChatClient } from "./chat.js";
import { SignIn } from "./auth.js";

const cfg = window.CHAT_CONFIG || {};
const $ = (id) => document.getElementById(id);
const signIn = new SignIn({
  issuer: cfg.issuer || "",
  clientId: cfg.clientId || "chat-web",
  redirectUri: location.origin + location.pathname,
});
let devUser = sessionStorage.getItem("chat.devUser") || "";

const client = new ChatClient(cfg.api || "", () => {
  if (cfg.auth === "dev") return devUser ? { "x-dev-user": devUser } : {};
  return signIn.token ? { authorization: `Bearer ${signIn.token}` } : {};
});

let conversationId = null;
let current = null; // the answer streaming now: { turnId, stopped }
let countdown = null;

function status(text, kind = "info") {
  const el = $("status");
  el.textContent = text;
  el.dataset.kind = kind;
}

/** A readable sentence for an error answer or `error` event. */
function explain(e) {
  const code = e.code || "error";
  const known = {
    missing_credentials: "Please sign in.",
    invalid_credentials: "Your sign-in was not accepted; sign in again.",
    token_expired: "Your sign-in expired; signing in again…",
    rate_limited: "Too many requests.",
    too_many_streams: "Too many answers are streaming at once; wait for one to end.",
    budget_exceeded: "Today's token budget is used up.",
    auth_rate_limited: "Too many failed sign-ins from this address.",
    conversation_not_found: "That conversation no longer exists.",
    upstream_timeout: "The model took too long to start answering. Try again.",
    upstream_overloaded: "The model is overloaded. Try again shortly.",
    upstream_rate_limited: "The model is rate limited. Try again shortly.",
    upstream_circuit_open: "The model is unavailable right now. Try again shortly.",
    stream_lost: "The answer was lost before it was complete. Ask again.",
  };
  return known[code] || `${e.message || code} (${code})`;
}

function showError(e) {
  clearInterval(countdown);
  const text = explain(e);
  if (e.status === 429 && e.retryAfter) {
    let left = Math.ceil(e.retryAfter);
    status(`${text} Retry in ${left} s.`, "error");
    countdown = setInterval(() => {
      left -= 1;
      if (left <= 0) {
        clearInterval(countdown);
        status("You can send again.", "info");
      } else {
        status(`${text} Retry in ${left} s.`, "error");
      }
    }, 1000);
  } else {
    status(text, "error");
  }
}

function bubble(role, text) {
  const li = document.createElement("li");
  li.className = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text; // text, never HTML
  li.append(body);
  const info = document.createElement("div");
  info.className = "info";
  li.append(info);
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function describe(li, { ttft, cache, model, stopReason, stored }) {
  const parts = [];
  if (ttft !== undefined) {
    li.dataset.ttft = String(Math.round(ttft));
    parts.push(`first token ${Math.round(ttft)} ms`);
  }
  if (cache) {
    li.dataset.cache = cache;
    parts.push(`cache ${cache}`);
  }
  if (model) parts.push(model);
  if (stopReason) {
    li.dataset.stopReason = stopReason;
    if (stopReason === "stopped") parts.push("stopped");
  }
  if (stored && stored !== "completed") {
    // A turn read back from history that did not complete: say so.
    li.dataset.status = stored;
    if (stored !== "stopped") parts.push(stored);
  }
  li.querySelector(".info").textContent = parts.join(" · ");
}

function renderConversation(conv) {
  $("messages").replaceChildren();
  for (const m of conv.messages || []) {
    const li = bubble(m.role === "user" ? "user" : "answer", m.content);
    if (m.role !== "user") describe(li, { model: m.model, stopReason: m.stop_reason, stored: m.status });
  }
}

async function loadList() {
  try {
    const { conversations } = await client.conversations();
    const ul = $("conversations");
    ul.replaceChildren();
    for (const c of conversations) {
      const li = document.createElement("li");
      const a = document.createElement("button");
      a.type = "button";
      a.className = "conversation";
      a.dataset.id = c.id;
      a.textContent = c.title || c.id;
      a.onclick = () => open(c.id);
      li.append(a);
      ul.append(li);
    }
  } catch (e) {
    if (e instanceof ApiError && e.code === "token_expired") return again();
    if (!(e instanceof ApiError && e.status === 503)) showError(e);
  }
}

async function open(id) {
  try {
    const conv = await client.conversation(id);
    conversationId = id;
    sessionStorage.setItem("chat.conversation", id);
    renderConversation(conv);
    status("");
  } catch (e) {
    showError(e);
  }
}

/** Signs in again without losing the conversation on screen. */
async function again() {
  status("Your sign-in expired; signing in again…");
  await signIn.begin(conversationId);
}

async function send(message) {
  bubble("user", message);
  const li = bubble("answer", "");
  const text = li.querySelector(".text");
  const t0 = performance.now();
  let ttft;
  let meta = {};
  // This answer's own state: a second answer (or a refused one) must not
  // take over the Stop button of one still streaming.
  const mine = { turnId: null };
  status("");
  try {
    await client.send(
      { message, conversationId, model: $("model").value.trim() || undefined, temperature: 0 },
      {
        meta(m) {
          meta = m;
          mine.turnId = m.turn_id;
          current = mine;
          $("stop").disabled = false;
          conversationId = m.conversation_id || conversationId;
          sessionStorage.setItem("chat.conversation", conversationId);
          describe(li, { cache: m.cache, model: m.model });
        },
        delta(t) {
          if (ttft === undefined) ttft = performance.now() - t0;
          text.append(t); // a text node: never parsed as HTML
        },
        done(d) {
          describe(li, { ttft, cache: meta.cache, model: meta.model, stopReason: d.stop_reason || "end" });
        },
        error(err) {
          describe(li, { ttft, cache: meta.cache, model: meta.model });
          showError({ code: err.code, message: err.message });
        },
        resuming() {
          status("Connection lost; resuming the answer…");
          li.dataset.resumed = "true";
        },
        reloaded(conv) {
          renderConversation(conv);
          status("The answer was reloaded from history.");
        },
      },
    );
    // (Reloaded from history, the answer's element was replaced.)
    if (li.dataset.resumed && li.isConnected) status("Resumed.");
  } catch (e) {
    li.remove();
    if (e instanceof ApiError && e.code === "token_expired") return again();
    showError(e);
  } finally {
    if (current === mine) {
      current = null;
      $("stop").disabled = true;
    }
    loadList();
  }
}

async function start() {
  $("stop").disabled = true;
  $("form").onsubmit = (ev) => {
    ev.preventDefault();
    const m = $("message").value.trim();
    if (!m) return;
    $("message").value = "";
    send(m);
  };
  $("stop").onclick = async () => {
    if (!current?.turnId) return;
    try {
      await client.stop(current.turnId);
      status("Stopping…");
    } catch (e) {
      showError(e);
    }
  };
  $("new").onclick = () => {
    conversationId = null;
    sessionStorage.removeItem("chat.conversation");
    $("messages").replaceChildren();
  };
  if (cfg.auth === "dev") {
    $("signin").hidden = true;
    $("devuser").hidden = false;
    $("devname").value = devUser;
    $("devuser").onsubmit = (ev) => {
      ev.preventDefault();
      devUser = $("devname").value.trim();
      sessionStorage.setItem("chat.devUser", devUser);
      ready(devUser);
    };
    if (devUser) ready(devUser);
    return;
  }
  $("signin").onclick = () => signIn.begin(null);
  try {
    const r = await signIn.complete();
    if (r.signedIn) {
      await ready(signIn.user);
      const keep = r.keep || sessionStorage.getItem("chat.conversation");
      if (keep) await open(keep);
    }
  } catch (e) {
    status(String(e.message || e), "error");
  }
}

async function ready(user) {
  $("who").textContent = user;
  $("signin").hidden = true;
  $("chat").hidden = false;
  await loadList();
}

start();
