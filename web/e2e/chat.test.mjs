// The browser test: two users in headless Chromium (Debian's, driven by playwright-core) chat
// through the whole real system, started by scripts/dev.sh on free ports with a temporary state
// dir: nats-server, SeaweedFS, sequencer, fan-out worker, presence, gateway, media and the web
// app's server. Everything asserted is what a user sees on the page. Screenshots go to
// target/web-e2e/ (CHAT_E2E_ARTIFACTS moves them).
//
// Run: scripts/web.sh e2e (after the Rust binaries and the web app are built), or as part of
// scripts/web.sh test and scripts/test.sh.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, openSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { deflateSync } from "node:zlib";
import { chromium } from "playwright-core";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const artifacts = path.resolve(process.env.CHAT_E2E_ARTIFACTS || path.join(repo, "target", "web-e2e"));
const CHROMIUM = process.env.CHAT_E2E_CHROMIUM || "/usr/bin/chromium";
// Generous: a loaded 2-core machine. Every wait is for a condition, never a fixed sleep.
const STARTUP_MS = 300_000;
const UI_MS = 60_000;

let backend;
let browser;
let webUrl;
let shot = 0;

// ---------------------------------------------------------------------------------------------
// the backend: scripts/dev.sh on free ports
// ---------------------------------------------------------------------------------------------

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function portFree(port) {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once("error", () => resolve(false));
    s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
  });
}

/** Distinct free ports; with `grpc`, port + 10000 is free too (SeaweedFS listens there). */
async function ports(names, grpc) {
  const out = {};
  const taken = new Set();
  for (const name of names) {
    for (;;) {
      const p = await freePort();
      if (taken.has(p) || taken.has(p + 10000) || taken.has(p - 10000)) continue;
      if (grpc.includes(name) && (p + 10000 > 65535 || !(await portFree(p + 10000)))) continue;
      taken.add(p);
      if (grpc.includes(name)) taken.add(p + 10000);
      out[name] = p;
      break;
    }
  }
  return out;
}

async function startBackend() {
  const weed = ["WEED_MASTER_PORT", "WEED_VOLUME_PORT", "WEED_FILER_PORT", "WEED_ADMIN_PORT"];
  const names = [
    "NATS_PORT",
    "NATS_MONITOR_PORT",
    "GATEWAY_PORT",
    "GATEWAY_ADMIN_PORT",
    "SEQUENCER_ADMIN_PORT",
    "FANOUT_ADMIN_PORT",
    "MEDIA_PORT",
    "MEDIA_ADMIN_PORT",
    "PRESENCE_ADMIN_PORT",
    "S3_PORT",
    "WEB_PORT",
    ...weed,
  ];
  const env = { ...process.env, ...(await ports(names, weed)) };
  const state = mkdtempSync(path.join(os.tmpdir(), "chat-web-e2e-"));
  Object.assign(env, {
    CHAT_RUN_DIR: state,
    DEV_SKIP_BUILD: process.env.CHAT_E2E_BUILD === "1" ? "0" : "1",
    CHAT_DEV_SECRET: `e2e-${Math.random().toString(36).slice(2)}`,
  });
  for (const k of names) env[k] = String(env[k]);
  mkdirSync(artifacts, { recursive: true });
  // a failed run leaves no screenshots of an earlier one behind
  for (const f of readdirSync(artifacts)) if (/^\d+-.*\.png$/.test(f)) rmSync(path.join(artifacts, f));
  const logFile = path.join(artifacts, "dev.sh.log");
  const log = openSync(logFile, "w");
  const child = spawn("bash", [path.join(repo, "scripts", "dev.sh")], { cwd: repo, env, stdio: ["ignore", "pipe", log] });
  let out = "";
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`dev.sh not running after ${STARTUP_MS} ms (see ${logFile})`)), STARTUP_MS);
    child.stdout.on("data", (d) => {
      out += d;
      writeFileSync(path.join(artifacts, "dev.sh.out"), out);
      // the summary dev.sh prints once everything runs, down to the line with the app's URL
      const printed = /^Everything is running\.[\s\S]*^ {2}web {6}(\S+)/m.exec(out);
      if (printed) {
        clearTimeout(timer);
        resolve(printed[1]);
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`dev.sh exited (${code}) before everything ran (see ${logFile}, logs in ${state}/logs)`));
    });
  });
  backend = { child, state, exited: new Promise((r) => child.on("exit", r)) };
  // should this process end without the after hook, dev.sh still stops everything it started
  process.on("exit", () => child.exitCode === null && child.kill("SIGTERM"));
  const printedUrl = await ready;
  webUrl = `http://127.0.0.1:${env.WEB_PORT}/`;
  assert.equal(printedUrl, webUrl, "dev.sh prints the web app's URL");
}

async function stopBackend() {
  if (!backend) return;
  const { child, state, exited } = backend;
  backend = undefined;
  if (child.exitCode === null) {
    child.kill("SIGTERM");
    const t = setTimeout(() => child.kill("SIGKILL"), 60_000);
    await exited;
    clearTimeout(t);
  }
  // keep the services' logs beside the screenshots, then drop the state
  try {
    rmSync(path.join(artifacts, "logs"), { recursive: true, force: true });
    await import("node:fs/promises").then((fs) => fs.cp(path.join(state, "logs"), path.join(artifacts, "logs"), { recursive: true }));
  } catch {
    // no logs: nothing started
  }
  rmSync(state, { recursive: true, force: true });
}

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/** A small PNG (RGB, `w` x `h`, a diagonal gradient): real bytes for the media path. */
function png(w, h) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => {
    let c = 0xffffffff;
    for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type, "ascii"), data]);
    const c = Buffer.alloc(4);
    c.writeUInt32BE(crc(td));
    return Buffer.concat([len, td, c]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const raw = Buffer.alloc((w * 3 + 1) * h);
  for (let y = 0; y < h; y++) {
    raw[y * (w * 3 + 1)] = 0;
    for (let x = 0; x < w; x++) {
      const o = y * (w * 3 + 1) + 1 + x * 3;
      raw[o] = 255 - Math.round((x / w) * 120);
      raw[o + 1] = Math.round((y / h) * 180);
      raw[o + 2] = 90;
    }
  }
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", deflateSync(raw)),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

async function screenshot(page, name) {
  shot++;
  await page.screenshot({ path: path.join(artifacts, `${String(shot).padStart(2, "0")}-${name}.png`) });
}

async function signIn(page, user) {
  await page.goto(webUrl);
  await page.locator("#signin-user").fill(user);
  await page.getByRole("button", { name: "Sign in" }).click();
  await connected(page, user);
}

async function connected(page, user) {
  await page.locator('[data-testid="me"]', { hasText: user }).waitFor({ timeout: UI_MS });
  await page.locator(".me .dot.on").waitFor({ timeout: UI_MS });
}

/** The conversation list entry titled `title`. */
function convItem(page, title) {
  return page.locator("li.conv").filter({ has: page.locator(".conv-title", { hasText: new RegExp(`^${title}$`) }) });
}

/** The bubble showing `text` in the open conversation. */
function bubble(page, text) {
  return page.locator('.messages [data-testid="message"]').filter({ has: page.locator(".text", { hasText: text }) });
}

async function statusOf(page, text) {
  return bubble(page, text).locator('[data-testid="status"]').getAttribute("data-status");
}

/** Waits until the tick of the user's own message `text` shows one of `statuses`. */
async function waitStatus(page, text, statuses) {
  const sel = statuses.map((s) => `[data-testid="status"][data-status="${s}"]`).join(", ");
  await bubble(page, text).locator(sel).waitFor({ timeout: UI_MS });
}

async function send(page, text) {
  const input = page.locator('.composer input[name="text"]');
  await input.fill(text);
  await input.press("Enter");
}

// ---------------------------------------------------------------------------------------------
// the test
// ---------------------------------------------------------------------------------------------

before(async () => {
  await startBackend();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // As root on a closed network: no sandbox, no GPU, no calls home. Playwright gives every
    // launch a fresh, empty profile (user data dir) of its own.
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"],
  });
});

after(async () => {
  await browser?.close().catch(() => undefined);
  await stopBackend();
});

test("two users chat in the browser: messages, ticks, typing, presence, history after a reload, groups, images", { timeout: 900_000 }, async () => {
  const started = Date.now();
  // alice on a laptop-sized window, bob on a phone-sized one
  const alice = await (await browser.newContext({ viewport: { width: 1100, height: 720 } })).newPage();
  const bob = await (await browser.newContext({ viewport: { width: 390, height: 760 }, deviceScaleFactor: 2, hasTouch: true })).newPage();
  for (const p of [alice, bob]) {
    p.setDefaultTimeout(UI_MS);
    p.on("pageerror", (err) => console.error(`page error (${p === alice ? "alice" : "bob"}):`, err));
  }

  try {
    await signIn(alice, "alice");
    await signIn(bob, "bob");
    await screenshot(bob, "bob-signed-in-phone");

    // alice starts a one-to-one chat with bob and writes
    await alice.getByRole("button", { name: "New chat" }).click();
    await alice.locator(".new-chat input").fill("bob");
    await alice.locator(".new-chat").getByRole("button", { name: "Chat" }).click();
    await alice.locator(".chat-title", { hasText: "bob" }).waitFor();
    const hello = `hello bob, it is ${new Date().toISOString().slice(11, 19)}`;
    await send(alice, hello);
    await bubble(alice, hello).waitFor();

    // bob (not in the chat yet) sees it in his list, one unread
    const bobsChat = convItem(bob, "alice");
    await bobsChat.locator(".conv-preview", { hasText: hello }).waitFor();
    await bobsChat.locator('[data-testid="unread"]', { hasText: /^1$/ }).waitFor();
    // bob's device has it: alice sees two grey ticks (or already blue ones, had bob read it)
    await waitStatus(alice, hello, ["delivered", "read"]);
    assert.equal(await statusOf(alice, hello), "delivered", "bob has not opened the chat: delivered, not read");
    await screenshot(bob, "bob-list-unread");
    await screenshot(alice, "alice-delivered");

    // bob opens it: he sees the message, and alice's ticks turn to read
    await bobsChat.locator("button").click();
    await bob.locator(".chat-title", { hasText: "alice" }).waitFor();
    await bubble(bob, hello).waitFor();
    await waitStatus(alice, hello, ["read"]);
    assert.equal(await alice.locator('[data-testid="status"][data-status="read"]').first().getAttribute("aria-label"), "Read");
    await screenshot(alice, "alice-read-ticks");

    // both are online, and each sees the other so (they share a conversation now)
    await alice.locator(".chat-sub", { hasText: /^online$/ }).waitFor();
    await bob.locator(".chat-sub", { hasText: /^online$/ }).waitFor();

    // bob types: alice sees "typing…" while he does (indicators may be dropped on the way, so he
    // keeps typing, as people do, until it shows)
    const bobInput = bob.locator('.composer input[name="text"]');
    await bobInput.fill("");
    const typingShown = alice.locator(".chat-sub.typing", { hasText: "typing…" });
    const deadline = Date.now() + UI_MS;
    for (let i = 0; !(await typingShown.isVisible()); i++) {
      assert.ok(Date.now() < deadline, "alice never saw bob typing");
      await bobInput.pressSequentially("hi alice, I am typing"[i % 21] ?? " ");
      await typingShown.waitFor({ timeout: 1000 }).catch(() => undefined);
    }
    await screenshot(alice, "alice-sees-bob-typing");
    const reply = "hi alice! all good here";
    await bobInput.fill(reply);
    await bobInput.press("Enter");
    await bubble(alice, reply).waitFor();
    await alice.locator(".chat-sub", { hasText: /^online$/ }).waitFor();

    // a reload of bob's page shows the conversation again, from the server
    // (the page keeps nothing but who is signed in: what it shows came through a new connection;
    // on a phone-sized screen the open chat fills it, so the list's header is hidden)
    await bob.reload();
    await bob.locator(".chat-title", { hasText: "alice" }).waitFor();
    await bob.locator('[data-testid="me"]', { hasText: "bob" }).waitFor({ state: "attached" });
    await bob.locator(".me .dot.on").waitFor({ state: "attached" });
    await bubble(bob, hello).waitFor();
    await bubble(bob, reply).waitFor();
    await waitStatus(bob, reply, ["read"]);
    await screenshot(bob, "bob-after-reload");

    // alice sends a photo: she sees a preview first; bob gets the real bytes through the media
    // service's presigned URL
    const W = 64;
    const H = 40;
    await alice.locator('.composer input[type="file"]').setInputFiles({ name: "gradient.png", mimeType: "image/png", buffer: png(W, H) });
    await alice.locator(".preview img").waitFor();
    await alice.locator(".preview-name", { hasText: "gradient.png" }).waitFor();
    await screenshot(alice, "alice-image-preview");
    await send(alice, "a photo");
    const alicePhoto = bubble(alice, "a photo");
    await alicePhoto.locator('[data-testid="photo"]').waitFor();
    await waitStatus(alice, "a photo", ["delivered", "read"]);
    const bobPhoto = bubble(bob, "a photo").locator('[data-testid="photo"]');
    await bobPhoto.waitFor();
    await bob.waitForFunction(
      (el) => el instanceof HTMLImageElement && el.complete && el.naturalWidth > 0,
      await bobPhoto.elementHandle(),
      { timeout: UI_MS },
    );
    const size = await bobPhoto.evaluate((el) => [el.naturalWidth, el.naturalHeight, el.currentSrc.startsWith("blob:")]);
    assert.deepEqual(size, [W, H, false], "bob's photo is the uploaded image, fetched from the object store");
    await screenshot(bob, "bob-sees-photo");
    await waitStatus(alice, "a photo", ["read"]);
    await screenshot(alice, "alice-photo-read");

    // a group: alice creates it with bob, bob finds it in his list with the message unread
    await alice.getByRole("button", { name: "New group" }).click();
    await alice.locator('.new-group input[name="name"]').fill("Climbing");
    await alice.locator('.new-group input[name="members"]').fill("bob");
    await alice.locator(".new-group").getByRole("button", { name: "Create" }).click();
    await alice.locator(".chat-title", { hasText: "Climbing" }).waitFor();
    await alice.locator(".event", { hasText: "You created the group “Climbing” with bob" }).waitFor();
    await send(alice, "saturday?");
    await waitStatus(alice, "saturday?", ["sent", "delivered", "read"]);
    await bob.locator(".back").click();
    const group = convItem(bob, "Climbing");
    await group.locator(".conv-preview", { hasText: "alice: saturday?" }).waitFor();
    await group.locator('[data-testid="unread"]').waitFor();
    await screenshot(bob, "bob-list-with-group");
    await group.locator("button").click();
    await bubble(bob, "saturday?").waitFor();
    await waitStatus(alice, "saturday?", ["read"]);
    await screenshot(alice, "alice-group-read");
  } catch (err) {
    // what each user saw when it went wrong
    await screenshot(alice, "FAILED-alice").catch(() => undefined);
    await screenshot(bob, "FAILED-bob").catch(() => undefined);
    throw err;
  }

  console.log(`browser test: the chat steps took ${((Date.now() - started) / 1000).toFixed(1)} s`);
});
