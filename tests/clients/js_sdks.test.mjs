// The JavaScript clients our users already have, against chat-stream's
// OpenAI-compatible route (run by tests/clients.rs with `node --test`):
// the Vercel AI SDK's streamText through @ai-sdk/openai-compatible, and the
// openai SDK. Both must give the text POST /chat gives for the same request.
//
// Environment: CHAT_URL (chat-stream's root), CHAT_KEY (an API key).
import assert from "node:assert/strict";
import { test } from "node:test";

import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateText, streamText } from "ai";
import OpenAI from "openai";

const CHAT_URL = process.env.CHAT_URL.replace(/\/$/, "");
const CHAT_KEY = process.env.CHAT_KEY;
const MODEL = "sim-sdk";

// The text POST /chat streams for the same request, read by hand.
async function chatText(message, maxTokens) {
  const resp = await fetch(`${CHAT_URL}/chat`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${CHAT_KEY}` },
    body: JSON.stringify({ message, model: MODEL, max_tokens: maxTokens }),
  });
  assert.equal(resp.status, 200);
  let text = "";
  for (const block of (await resp.text()).split("\n\n")) {
    const event = /^event: (.*)$/m.exec(block)?.[1];
    const data = /^data: (.*)$/m.exec(block)?.[1];
    if (event === "delta") text += JSON.parse(data).text;
  }
  return text;
}

const provider = createOpenAICompatible({
  name: "chat-stream",
  baseURL: `${CHAT_URL}/v1`,
  apiKey: CHAT_KEY,
  includeUsage: true,
});

test("streamText from the Vercel AI SDK streams the text /chat gives", async () => {
  const expected = await chatText("stream me a story", 40);
  const result = streamText({
    model: provider(MODEL),
    prompt: "stream me a story",
    maxOutputTokens: 40,
    maxRetries: 0,
  });
  const parts = [];
  for await (const part of result.textStream) parts.push(part);
  assert.ok(parts.length > 3, `several deltas, got ${parts.length}`);
  assert.equal(parts.join(""), expected);
  assert.equal(await result.finishReason, "stop");
  const usage = await result.usage;
  assert.ok(usage.outputTokens > 0, JSON.stringify(usage));
});

test("generateText from the Vercel AI SDK gives the same text", async () => {
  const expected = await chatText("one whole answer", 24);
  const { text } = await generateText({
    model: provider(MODEL),
    prompt: "one whole answer",
    maxOutputTokens: 24,
    maxRetries: 0,
  });
  assert.equal(text, expected);
});

test("the Vercel AI SDK surfaces our 400 for an unsupported setting", async () => {
  await assert.rejects(
    generateText({
      model: provider(MODEL),
      prompt: "hi",
      topP: 0.5, // not offered here: refused, not ignored
      maxRetries: 0,
    }),
    (e) => e.statusCode === 400 && /top_p/.test(e.responseBody),
  );
});

test("the openai SDK streams the text /chat gives and raises BadRequestError", async () => {
  const expected = await chatText("the js sdk asks", 32);
  const client = new OpenAI({ baseURL: `${CHAT_URL}/v1`, apiKey: CHAT_KEY, maxRetries: 0 });
  const stream = await client.chat.completions.create({
    model: MODEL,
    messages: [{ role: "user", content: "the js sdk asks" }],
    max_tokens: 32,
    stream: true,
  });
  let text = "";
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
  assert.equal(text, expected);
  await assert.rejects(
    client.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "hi" }],
      n: 2,
    }),
    (e) => e instanceof OpenAI.BadRequestError && e.param === "n",
  );
});
