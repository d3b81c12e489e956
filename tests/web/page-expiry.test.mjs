// The page's token expires (3 s tokens, no leeway): its next request gets
// 401 token_expired, the page signs in again through the issuer, and the
// conversation on screen comes back. Stack: tests/web.rs
// `the_chat_page_signs_in_again_when_its_token_expires`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const WEB = process.env.WEB_URL;

async function signIn(page, user) {
  await page.waitForSelector("#username");
  await page.fill("#username", user);
  await page.click("#sign-in");
  await page.waitForSelector("#chat:not([hidden])");
}

test("an expired sign-in is renewed without losing the conversation", async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
  let page;
  try {
    page = await browser.newPage();
    await page.goto(`${WEB}/`);
    await page.click("#signin");
    await signIn(page, "erin");
    await page.fill("#message", "Remember this conversation");
    await page.click("#send");
    const first = page.locator("#messages li.answer").first();
    const el = await first.elementHandle();
    await page.waitForFunction((e) => e.dataset.stopReason !== undefined, el, { timeout: 15000 });
    const text = await first.locator(".text").textContent();
    // The turn is stored and the token runs out.
    await new Promise((r) => setTimeout(r, 4000));
    await page.fill("#message", "And now?");
    await page.click("#send");
    // The page goes to the issuer by itself; signing in brings it back.
    await signIn(page, "erin");
    await page.locator("#messages li.answer").first().waitFor();
    assert.equal(await page.locator("#messages li.user .text").first().textContent(), "Remember this conversation");
    assert.equal(await page.locator("#messages li.answer .text").first().textContent(), text);
  } catch (e) {
    if (page) {
      console.log("url:", page.url());
      console.log("status:", await page.textContent("#status").catch(() => "?"));
      console.log("messages:", await page.innerHTML("#messages").catch(() => "?"));
    }
    throw e;
  } finally {
    await browser.close();
  }
});
