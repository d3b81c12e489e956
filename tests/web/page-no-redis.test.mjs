// The chat page against the template's default deployment (no Redis):
// after a cut connection the answer is reloaded from history, and a 429
// is shown with a countdown. Stack: tests/web.rs `the_chat_page_without_redis`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const WEB = process.env.WEB_URL;
const sim = async () => (await fetch(`${WEB}/control/sim`)).json();

test("without Redis: reload after a cut, and a 429 countdown", async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
  let page;
  try {
    page = await browser.newPage();
    const pageErrors = [];
    page.on("pageerror", (e) => pageErrors.push(String(e)));
    await page.goto(`${WEB}/`);
    await page.click("#signin");
    await page.fill("#username", "dana");
    await page.click("#sign-in");
    await page.waitForSelector("#chat:not([hidden])");

    // A cut answer: no live stream to resume, so the finished turn is read
    // back from history (the model went on: in Lambda it always does).
    await fetch(`${WEB}/control/arm-drop`, { method: "POST" });
    console.log("cut");
    const before = await sim();
    await page.fill("#message", "What survives a dropped connection?");
    await page.click("#send");
    await page.waitForFunction(() => /reloaded from history/.test(document.getElementById("status").textContent), null, { timeout: 20000 });
    // Locally the server saw the client leave and stopped the model, so
    // the stored turn is the part that was sent, marked interrupted.
    const answer = page.locator("#messages li.answer").last();
    assert.ok((await answer.locator(".text").textContent()).trim().length > 0);
    assert.equal(await answer.getAttribute("data-status"), "interrupted");
    assert.match(await answer.locator(".info").textContent(), /interrupted/);
    assert.equal((await sim()).calls, before.calls + 1);

    console.log("two at once");
    // Two answers at once with MAX_STREAMS_PER_USER=1: the second is a 429
    // shown as a sentence with a countdown from Retry-After.
    await page.evaluate(() => {
      document.getElementById("model").value = "claude-sim+tps=5,tokens=100";
    });
    await page.fill("#message", "A slow one");
    await page.click("#send");
    const slow = page.locator("#messages li.answer").nth(1);
    await slow.locator(".text").filter({ hasText: /\S/ }).waitFor();
    // Every line the status shows, however briefly.
    await page.evaluate(() => {
      window.__statuses = [];
      const el = document.getElementById("status");
      new MutationObserver(() => window.__statuses.push(el.textContent)).observe(el, {
        childList: true,
        characterData: true,
        subtree: true,
      });
    });
    console.log("the second");
    await page.fill("#message", "And another");
    await page.click("#send");
    await page.waitForFunction(() => window.__statuses.some((s) => /Retry in \d+ s/.test(s)), null, { timeout: 10000 });
    const shown = await page.evaluate(() => window.__statuses);
    assert.ok(
      shown.some((s) => /^Too many answers are streaming at once; wait for one to end\. Retry in \d+ s\.$/.test(s)),
      JSON.stringify(shown),
    );
    // The refused answer did not take over Stop: it stops the slow one
    // (the stop lands on the instance streaming it here).
    await page.click("#stop");
    const el = await slow.elementHandle();
    await page.waitForFunction((e) => e.dataset.stopReason === "stopped", el, { timeout: 10000 });
    assert.deepEqual(pageErrors, []);
  } catch (e) {
    if (page) {
      console.log("status:", await page.textContent("#status").catch(() => "?"));
      console.log("statuses:", JSON.stringify(await page.evaluate(() => window.__statuses).catch(() => "?")));
      console.log("messages:", await page.innerHTML("#messages").catch(() => "?"));
    }
    throw e;
  } finally {
    await browser.close();
  }
});
