// The dashboard in a real browser: Debian's chromium driven by playwright-core, under node's
// test runner. `tests/it/ui.rs` starts the real server (an admin token, a rate-limited
// simulator) and runs this file with:
//   SMSBATCH_URL         the server, http://127.0.0.1:PORT
//   SMSBATCH_TOKEN       its admin token
//   SMSBATCH_SCREENSHOTS where to save a screenshot of each page
// The steps run in order and share one browser, as one operator's session would.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync, readFileSync, mkdirSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const BASE = process.env.SMSBATCH_URL;
const TOKEN = process.env.SMSBATCH_TOKEN;
const SHOTS = process.env.SMSBATCH_SCREENSHOTS;
assert.ok(BASE && TOKEN && SHOTS, "SMSBATCH_URL, SMSBATCH_TOKEN and SMSBATCH_SCREENSHOTS are set");

// Recipients: every hundredth number ends in 0001, which the simulator fails for good.
const RECIPIENTS = 1200;
const phoneOf = (i) => "+86138" + String(i).padStart(4, "0") + (i % 100 === 0 ? "0001" : "5678");
const FAILING = Array.from({ length: RECIPIENTS }, (_, k) => k + 1).filter((i) => i % 100 === 0).map(phoneOf);

const work = mkdtempSync(join(tmpdir(), "smsbatch-ui-"));
let browser; // the persistent context: one profile, fresh for this run
let page;
let batchId = "";
let resentId = "";
// What the pages said went wrong: script errors and refusals by the content security policy.
const pageErrors = [];

/** The REST API with the bearer token, as a script would call it. */
async function api(method, path, body) {
  const init = { method, headers: { Authorization: "Bearer " + TOKEN } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(BASE + path, init);
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

const batch = async (id) => (await api("GET", "/v1/batches/" + id)).body;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** The number the batch page shows for `name` (sent, failed, …). */
async function shown(name) {
  const text = await page.locator(`#batch-live [data-count="${name}"]`).textContent();
  return Number(text);
}

/** Waits until `probe()` is truthy, polling; fails with `what` after `ms`. */
async function until(what, probe, ms = 60000) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    last = await probe();
    if (last) return last;
    await sleep(250);
  }
  assert.fail(`still not ${what} after ${ms} ms`);
}

async function shot(name) {
  await page.screenshot({ path: join(SHOTS, name + ".png"), fullPage: true });
}

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  browser = await chromium.launchPersistentContext(join(work, "profile"), {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 1280, height: 860 },
    acceptDownloads: true,
  });
  page = browser.pages()[0] || (await browser.newPage());
  page.setDefaultTimeout(30000);
  page.on("pageerror", (e) => pageErrors.push(e.message));
  page.on("console", (m) => {
    // A refused fetch (401, 403) is logged as a failed load: expected in the refusal steps.
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) pageErrors.push(m.text());
  });
});

after(async () => {
  await browser?.close();
  rmSync(work, { recursive: true, force: true });
});

test("without the cookie, the dashboard sends to the login form and the API refuses", async () => {
  const res = await fetch(BASE + "/ui/", { redirect: "manual" });
  assert.equal(res.status, 303);
  assert.equal(res.headers.get("location"), "/ui/login?next=%2Fui%2F");
  assert.equal((await fetch(BASE + "/v1/batches")).status, 401);
  const fragment = await fetch(BASE + "/ui/batches/rows", { headers: { "X-Fragment": "1" } });
  assert.equal(fragment.status, 401);

  await page.goto(BASE + "/ui/");
  assert.equal(new URL(page.url()).pathname, "/ui/login");
  const fromPage = await page.evaluate(async () => (await fetch("/v1/batches")).status);
  assert.equal(fromPage, 401, "the page's own call without a session");
});

test("log in", async () => {
  await page.getByLabel("Admin token").fill("not-the-token");
  await page.getByRole("button", { name: "Log in" }).click();
  await page.getByText("That is not the admin token.").waitFor();
  assert.equal(new URL(page.url()).pathname, "/ui/login");
  await page.getByLabel("Admin token").fill("");
  await shot("login");

  await page.getByLabel("Admin token").fill(TOKEN);
  await page.getByLabel("Admin token").press("Enter");
  await page.getByRole("heading", { name: "Batches" }).waitFor();
  assert.equal(new URL(page.url()).pathname, "/ui/");
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement.textContent), "Skip to content");
  const [cookie] = await browser.cookies(BASE);
  assert.equal(cookie.name, "smsbatch_session");
  assert.equal(cookie.httpOnly, true);
  assert.equal(cookie.sameSite, "Strict");
  assert.ok(!cookie.value.includes(TOKEN), "the token itself is not the cookie");
  assert.equal(await page.evaluate(() => document.cookie), "", "no script reads the cookie");
});

test("create a batch with a CSV upload", async () => {
  const csv = ["phone,name"];
  for (let i = 1; i <= RECIPIENTS; i++) csv.push(`${phoneOf(i)},Guest ${i}`);
  const file = join(work, "recipients.csv");
  writeFileSync(file, csv.join("\n") + "\n");

  // The upload's progress is written on the page, which is left once the batch is made: the
  // test hears of it through a function that lives across navigations.
  const uploadSaid = [];
  await page.exposeFunction("uploadSaid", (text) => uploadSaid.push(text));
  await page.addInitScript(() => {
    new MutationObserver(() => {
      const status = document.getElementById("upload-status");
      if (status && status.textContent) window.uploadSaid(status.textContent);
    }).observe(document, { subtree: true, childList: true, characterData: true });
  });

  await page.getByRole("link", { name: "New batch" }).first().click();
  await page.getByLabel("Name").fill("spring-sale");
  const content = page.getByLabel("Content");
  await content.pressSequentially("Hi {{name}}, spring sale: 20% off today", { delay: 5 });
  const preview = page.locator("#preview [data-encoding]");
  await until("a GSM-7 preview", async () => (await preview.getAttribute("data-encoding")) === "GSM-7", 10000);
  assert.equal(await preview.getAttribute("data-segments"), "1");
  await content.pressSequentially(" 春季特卖", { delay: 5 });
  await until("a UCS-2 preview", async () => (await preview.getAttribute("data-encoding")) === "UCS-2", 10000);
  await content.fill("Hi {{name}}, spring sale: 20% off today. Reply STOP to opt out.");
  await until("the GSM-7 preview again", async () => (await preview.getAttribute("data-encoding")) === "GSM-7", 10000);
  await page.getByLabel("Recipients: a CSV file").setInputFiles(file);
  await shot("new-batch");

  await page.getByRole("button", { name: "Create batch" }).click();
  await page.waitForURL(/\/ui\/batches\/[0-9a-f-]{36}$/);
  batchId = page.url().split("/").pop();
  assert.ok(uploadSaid.some((t) => t.startsWith(`Uploaded: ${RECIPIENTS} rows`)), JSON.stringify(uploadSaid));
  const b = await batch(batchId);
  assert.equal(b.name, "spring-sale");
  assert.equal(b.results.recipients, RECIPIENTS);
  assert.notEqual(b.state, "initial", "started once created");
});

test("watch its bar advance", async () => {
  const seen = new Set();
  await until("three different sent counts on the page", async () => {
    seen.add(await shown("sent"));
    return [...seen].filter((n) => n > 0).length >= 3;
  });
  const width = await page.locator("#batch-live svg.bar rect.seg-sent").getAttribute("width");
  assert.ok(Number(width) > 0, "the bar's sent part has grown");
  const b = await batch(batchId);
  assert.equal(b.state, "delivering");
  assert.ok(b.results.sent < b.results.valid, "still sending: the test must see it before the end");

  // The list shows the same bar, as the batch runs.
  const list = await browser.newPage();
  await list.goto(BASE + "/ui/");
  const card = list.locator(`li.card[data-batch="${batchId}"]`);
  assert.equal(await card.getAttribute("data-state"), "delivering");
  assert.ok(Number(await card.locator('[data-count="sent"]').textContent()) > 0);
  await list.screenshot({ path: join(SHOTS, "batches.png"), fullPage: true });
  await list.close();
});

test("pause it and see the sent count stop in the page and in the API", async () => {
  // By keyboard: the button takes the focus and Enter presses it.
  await page.locator(`#pause-${batchId}`).focus();
  await page.keyboard.press("Enter");
  await until("the paused state on the page", async () =>
    (await page.locator('#batch-live [data-field="state"]').textContent()) === "paused");
  // Messages already in a provider call finish; then nothing moves.
  let stable;
  await until("a sent count that stays put", async () => {
    const before = await shown("sent");
    await sleep(2500);
    const after = await shown("sent");
    stable = after;
    return before === after;
  });
  const b = await batch(batchId);
  assert.equal(b.state, "paused");
  assert.equal(b.results.sent, stable, "the page and the API agree");
  await sleep(3000);
  assert.equal(await shown("sent"), stable, "the page's count has stopped");
  assert.equal((await batch(batchId)).results.sent, stable, "the API's count has stopped");
  assert.ok(stable < b.results.valid, "paused before the end");
});

test("resume", async () => {
  const paused = await shown("sent");
  // The refresh that replaced Pause by Resume kept the focus on the batch's actions.
  assert.equal(await page.evaluate(() => document.activeElement.id), `resume-${batchId}`);
  await page.keyboard.press("Enter");
  await until("more sent after the resume", async () => (await shown("sent")) > paused);
  await until("the batch completed on the page", async () =>
    (await page.locator('#batch-live [data-field="state"]').textContent()) === "completed", 120000);
  const b = await batch(batchId);
  assert.equal(b.results.failed, FAILING.length);
  assert.equal(b.results.sent + b.results.delivered + b.results.failed, RECIPIENTS);
  assert.equal(await shown("failed"), FAILING.length);
});

test("export the failed messages", async () => {
  await page.getByLabel("Status").selectOption("failed");
  await page.waitForURL(/status=failed/);
  const statuses = await page.locator("table.messages tbody tr").evaluateAll((rows) => rows.map((r) => r.dataset.status));
  assert.equal(statuses.length, FAILING.length);
  assert.ok(statuses.every((s) => s === "failed"));
  await shot("batch");

  const [download] = await Promise.all([page.waitForEvent("download"), page.locator("#export").click()]);
  const text = readFileSync(await download.path(), "utf8").trim().split("\n");
  assert.equal(text[0], "phone,status,segments,attempts,provider_message_id,error,updated_at,delivered_at");
  const phones = text.slice(1).map((line) => line.split(",")[0]).sort();
  assert.deepEqual(phones, [...FAILING].sort());
  assert.ok(text.slice(1).every((line) => line.split(",")[1] === "failed"));
});

test("resend them", async () => {
  await page.getByRole("link", { name: "Batches" }).first().click();
  const card = page.locator(`li.card[data-batch="${batchId}"]`);
  await card.waitFor();
  await page.setViewportSize({ width: 390, height: 844 });
  await shot("batches-phone");
  await page.setViewportSize({ width: 1280, height: 860 });

  await card.getByRole("button", { name: "Resend failed" }).click();
  await page.waitForURL((url) => /\/ui\/batches\/[0-9a-f-]{36}$/.test(url.pathname) && !url.pathname.endsWith(batchId));
  resentId = page.url().split("/").pop();
  const resent = await batch(resentId);
  assert.equal(resent.state, "initial");
  assert.equal(resent.parent_id, batchId);
  assert.equal(resent.results.recipients, FAILING.length);

  await page.locator(`#start-${resentId}`).click();
  await until("the resent batch done on the page", async () =>
    (await page.locator('#batch-live [data-field="state"]').textContent()) === "completed", 60000);
  const messages = (await api("GET", `/v1/batches/${resentId}/messages?limit=1000`)).body.items;
  assert.deepEqual(messages.map((m) => m.phone).sort(), [...FAILING].sort(), "exactly the failed numbers");
});

test("add and remove an opt-out", async () => {
  await page.getByRole("link", { name: "Opt-outs" }).first().click();
  await page.getByLabel("Numbers, one a line").fill("+8613900001111\n139 0000 2222\nnot a number");
  await page.getByRole("button", { name: "Add", exact: true }).click();
  await page.getByText("Added 2, already listed 0, not phone numbers 1.").waitFor();
  await page.locator('tr[data-phone="+8613900001111"]').waitFor();
  await page.locator('tr[data-phone="+8613900002222"]').waitFor();

  const csv = join(work, "opt-outs.csv");
  writeFileSync(csv, "phone\n+8613900003333\n");
  await page.getByLabel("CSV file with a phone column").setInputFiles(csv);
  await page.getByRole("button", { name: "Import" }).click();
  await page.getByText("Added 1, already listed 0, not phone numbers 0.").waitFor();
  await page.locator('tr[data-phone="+8613900003333"]').waitFor();
  await shot("opt-outs");

  // Search by the start of the number, then by a whole one in its national form.
  await page.getByLabel("Number", { exact: true }).fill("+86139000011");
  await page.getByRole("button", { name: "Search" }).click();
  assert.deepEqual(await page.locator("tr[data-phone]").evaluateAll((r) => r.map((x) => x.dataset.phone)), ["+8613900001111"]);
  await page.getByLabel("Number", { exact: true }).fill("139 0000 2222");
  await page.getByRole("button", { name: "Search" }).click();
  assert.deepEqual(await page.locator("tr[data-phone]").evaluateAll((r) => r.map((x) => x.dataset.phone)), ["+8613900002222"]);

  await page.getByRole("button", { name: "Remove +8613900002222" }).click();
  await page.getByText("No number on the list matches").waitFor();
  assert.equal((await api("GET", "/v1/opt-outs/%2B8613900002222")).status, 404);
  assert.equal((await api("GET", "/v1/opt-outs/%2B8613900001111")).status, 200);

  await page.getByRole("link", { name: "Show all" }).click();
  const [download] = await Promise.all([page.waitForEvent("download"), page.locator("#export-opt-outs").click()]);
  const lines = readFileSync(await download.path(), "utf8").trim().split("\n");
  assert.equal(lines[0], "phone,source,created_at");
  assert.deepEqual(lines.slice(1).map((l) => l.split(",").slice(0, 2).join(",")),
    ["+8613900001111,api", "+8613900003333,csv"]);
});

test("a request from another origin is refused", async () => {
  // A page on another port of the same host: the same site, so SameSite lets the cookie go
  // along, and only the origin check stands between it and the batch.
  const target = await api("POST", "/v1/batches", {
    name: "target", content: "Hi", recipients: [{ phone: "+8613800009999" }] });
  assert.equal(target.status, 201);
  const id = target.body.id;
  const evil = createServer((req, res) => {
    res.setHeader("Content-Type", "text/html");
    res.end(`<!doctype html><form method="post" action="${BASE}/v1/batches/${id}/cancel"></form>
      <script>
        fetch("${BASE}/v1/batches/${id}/start", { method: "POST", mode: "no-cors", credentials: "include" })
          .finally(() => document.forms[0].submit());
      </script>`);
  });
  await new Promise((r) => evil.listen(0, "127.0.0.1", r));
  try {
    const other = await browser.newPage();
    const refused = [];
    other.on("response", (res) => { if (res.url().includes("/v1/batches/")) refused.push(res.status()); });
    await other.goto(`http://127.0.0.1:${evil.address().port}/`);
    await until("both requests answered", async () => refused.length >= 2, 15000);
    assert.deepEqual(refused.sort(), [403, 403]);
    await other.close();
  } finally {
    evil.close();
  }
  assert.equal((await batch(id)).state, "initial", "neither the start nor the cancel happened");

  // The same with a plain client holding the cookie.
  const [cookie] = await browser.cookies(BASE);
  const withCookie = (headers) => fetch(`${BASE}/v1/batches/${id}/start`, {
    method: "POST", headers: { Cookie: `${cookie.name}=${cookie.value}`, ...headers } });
  assert.equal((await withCookie({ Origin: "http://evil.example" })).status, 403);
  assert.equal((await withCookie({ "Sec-Fetch-Site": "cross-site" })).status, 403);
  assert.equal((await withCookie({})).status, 403, "neither Origin nor Sec-Fetch-Site");
  assert.equal((await batch(id)).state, "initial");
  assert.equal((await withCookie({ Origin: BASE })).status, 202, "the same origin may");
});

test("no page had a script error, nor anything refused by its content security policy", () => {
  assert.deepEqual(pageErrors, []);
});
