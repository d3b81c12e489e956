// The chat page in Debian's chromium, driven by playwright-core, against
// the stack tests/web.rs starts (WEB_URL serves the page and /control).
import { test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const WEB = process.env.WEB_URL;
const sim = async () => (await fetch(`${WEB}/control/sim`)).json();

async function signInAs(page, user) {
  await page.click("#signin");
  // The issuer's own page (oidc-sim locally, Cognito's hosted UI deployed).
  await page.waitForSelector("#username");
  await page.fill("#username", user);
  await page.click("#sign-in");
  await page.waitForSelector("#chat:not([hidden])");
  assert.equal(await page.textContent("#who"), user);
}

/** Sends a message; returns the answer's element once it has ended. */
async function ask(page, message, { model = "" } = {}) {
  await page.evaluate((m) => {
    document.getElementById("model").value = m;
  }, model);
  const before = await page.locator("#messages li.answer").count();
  await page.fill("#message", message);
  await page.click("#send");
  const answer = page.locator("#messages li.answer").nth(before);
  await answer.waitFor();
  return answer;
}

async function ended(answer) {
  const el = await answer.elementHandle();
  await answer.page().waitForFunction((e) => e.dataset.stopReason !== undefined, el, { timeout: 15000 });
  return {
    text: await answer.locator(".text").textContent(),
    cache: await answer.getAttribute("data-cache"),
    ttft: await answer.getAttribute("data-ttft"),
    stop: await answer.getAttribute("data-stop-reason"),
    info: await answer.locator(".info").textContent(),
  };
}

test("the chat page: sign-in, streaming, cache, history, resume, stop, safe text", async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu"],
  });
  let page;
  try {
    page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
    page.on("console", (m) => console.log(`page console: ${m.text()}`));
    const dialogs = [];
    page.on("dialog", (d) => {
      dialogs.push(d.message());
      d.dismiss();
    });
    const pageErrors = [];
    page.on("pageerror", (e) => pageErrors.push(String(e)));
    await page.goto(`${WEB}/`);
    await signInAs(page, "alice");

    console.log('The token lives in memory only.');
    // The token lives in memory only.
    const stored = await page.evaluate(() => JSON.stringify({ ...localStorage }) + JSON.stringify({ ...sessionStorage }));
    assert.ok(!/eyJ/.test(stored), "no token in web storage");

    // An answer grows in place, over several DOM updates, before `done`.
    await page.evaluate(() => {
      window.__updates = 0;
      new MutationObserver((ms) => {
        window.__updates += ms.length;
      }).observe(document.getElementById("messages"), { subtree: true, childList: true, characterData: true });
    });
    const first = await ended(await ask(page, "What is a cache?"));
    const updates = await page.evaluate(() => window.__updates);
    assert.ok(updates >= 5, `only ${updates} DOM updates`);
    assert.ok(first.text.length > 20, first.text);
    assert.equal(first.cache, "miss");
    assert.match(first.ttft, /^\d+$/);
    assert.match(first.info, /first token \d+ ms · cache miss/);
    const calls = (await sim()).calls;

    console.log('The same question in a new conversati');
    // The same question in a new conversation is a cache hit.
    await page.click("#new");
    const second = await ended(await ask(page, "What is a cache?"));
    assert.equal(second.cache, "hit");
    assert.equal(second.text, first.text);
    assert.equal((await sim()).calls, calls, "a hit calls no model");

    console.log('Reload: the token');
    // Reload: the token is gone with the page; sign in again and the
    // conversation on screen comes back from history.
    await page.reload();
    await signInAs(page, "alice");
    await page.locator("#messages li.answer").first().waitFor();
    assert.equal(await page.locator("#messages li.answer .text").first().textContent(), first.text);
    assert.ok((await page.locator("#conversations .conversation").count()) >= 2);

    console.log('The connection breaks mid-answer');
    // The connection breaks mid-answer (the proxy cuts it): the page
    // resumes from Last-Event-ID, with no second model call.
    await page.click("#new");
    await fetch(`${WEB}/control/arm-drop`, { method: "POST" });
    const before = await sim();
    const cutAnswer = await ask(page, "Tell me about resumable streams");
    const cut = await ended(cutAnswer);
    assert.equal(await cutAnswer.getAttribute("data-resumed"), "true", "the connection was not cut");
    assert.equal(cut.stop, "end_turn");
    assert.equal((await sim()).calls, before.calls + 1, "resumed, not asked again");
    // The resumed text is the whole answer: the same question again is a
    // hit whose text (the cached, complete answer) matches.
    await page.click("#new");
    const again = await ended(await ask(page, "Tell me about resumable streams"));
    assert.equal(again.cache, "hit");
    assert.equal(cut.text, again.text);

    console.log('Stop: the answer ends');
    // Stop: the answer ends as stopped and the model call is cancelled.
    const s0 = await sim();
    const slow = await ask(page, "A long one, please", { model: "claude-sim+tps=4,tokens=200" });
    await slow.locator(".text").filter({ hasText: /\S/ }).waitFor();
    await page.click("#stop");
    const stopped = await ended(slow);
    assert.equal(stopped.stop, "stopped");
    assert.match(stopped.info, /stopped/);
    for (let i = 0; i < 50 && (await sim()).cancelled === s0.cancelled; i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal((await sim()).cancelled, s0.cancelled + 1, "the model call was not cancelled");

    console.log('Model output that looks like HTML');
    // Model output that looks like HTML is text: nothing runs, no element.
    const markup = "<img src=x onerror=alert(1)>";
    const xss = await ended(await ask(page, markup, { model: "claude-sim+echo=1" }));
    assert.equal(xss.text, markup);
    assert.equal(await page.locator("#messages img").count(), 0);
    assert.deepEqual(dialogs, []);

    console.log('A readable error');
    // A readable error: an unknown model's 400 is shown, not thrown.
    await page.evaluate(() => {
      document.getElementById("model").value = "openai:not-configured";
    });
    await page.fill("#message", "hi");
    await page.click("#send");
    await page.locator("#status[data-kind=error]").waitFor();
    assert.match(await page.textContent("#status"), /provider_not_configured/);

    await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
    assert.deepEqual(pageErrors, []);
  } catch (e) {
    if (page) {
      console.log("status:", await page.textContent("#status").catch(() => "?"));
      console.log("messages:", await page.innerHTML("#messages").catch(() => "?"));
    }
    throw e;
  } finally {
    await browser.close();
  }
});
