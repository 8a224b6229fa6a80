#!/usr/bin/env node
// The web app's development server (started by scripts/dev.sh; never part of a deployment).
//
// One origin for the browser, so that neither the gateway nor the media service needs CORS:
//   /                the built app (web/app/dist), index.html for every path without a file
//   /ws              proxied to the gateway's WebSocket (CHAT_WEB_GATEWAY_URL)
//   /v1/*, /openapi.json   proxied to the media service (CHAT_WEB_MEDIA_URL)
//   /dev/token?user=U  a development token for user U, signed with CHAT_DEV_SECRET (HS256, 24 h)
//   /config.json     what the app needs to know: where the gateway and media service are, and
//                    whether /dev/token exists
//   /healthz         200 once listening
// Uploads and downloads go straight from the browser to the object store (presigned URLs).
//
// The token endpoint exists only when CHAT_DEV_SECRET is set, and the server listens only on a
// loopback address: it signs a token for anyone who asks, which is what a developer on this
// machine wants and what no deployment may do. The built app holds no secret.
//
// Environment: CHAT_WEB_LISTEN (127.0.0.1:8081), CHAT_WEB_GATEWAY_URL (http://127.0.0.1:8080),
// CHAT_WEB_MEDIA_URL (http://127.0.0.1:8070), CHAT_WEB_DIST (web/app/dist), CHAT_DEV_SECRET.

import { createHmac } from "node:crypto";
import { createReadStream, promises as fs } from "node:fs";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const env = process.env;
const listen = env.CHAT_WEB_LISTEN || "127.0.0.1:8081";
const gateway = new URL(env.CHAT_WEB_GATEWAY_URL || "http://127.0.0.1:8080");
const media = new URL(env.CHAT_WEB_MEDIA_URL || "http://127.0.0.1:8070");
const dist = path.resolve(env.CHAT_WEB_DIST || path.join(here, "..", "app", "dist"));
const secret = env.CHAT_DEV_SECRET || "";
const TOKEN_TTL_SECS = 24 * 3600;

function fail(msg) {
  console.error(`dev-server: error: ${msg}`);
  process.exit(2);
}

const sep = listen.lastIndexOf(":");
const host = listen.slice(0, sep).replace(/^\[|\]$/g, "");
const port = Number(listen.slice(sep + 1));
if (sep < 0 || !Number.isInteger(port) || port < 0 || port > 65535) fail(`CHAT_WEB_LISTEN must be host:port, not ${listen}`);
if (!(host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host))) {
  fail(`refusing to listen on ${host}: this server hands out tokens to anyone, loopback only`);
}

// ---------------------------------------------------------------------------------------------
// development tokens: the same HS256 JWT as `chat token` (protocol/src/auth.rs)
// ---------------------------------------------------------------------------------------------

const b64url = (buf) => Buffer.from(buf).toString("base64url");

function mintToken(user) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ sub: user, iat: now, exp: now + TOKEN_TTL_SECS }));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return { token: `${head}.${body}.${sig}`, user, expires_at_ms: (now + TOKEN_TTL_SECS) * 1000 };
}

// ---------------------------------------------------------------------------------------------
// proxying
// ---------------------------------------------------------------------------------------------

function hostPort(u) {
  return { host: u.hostname, port: Number(u.port) || (u.protocol === "https:" ? 443 : 80) };
}

function proxyHttp(req, res, target) {
  const { host: h, port: p } = hostPort(target);
  const up = http.request(
    { host: h, port: p, method: req.method, path: req.url, headers: { ...req.headers, host: `${h}:${p}` } },
    (upRes) => {
      res.writeHead(upRes.statusCode || 502, upRes.headers);
      upRes.pipe(res);
    },
  );
  up.on("error", (err) => {
    if (!res.headersSent) sendJson(res, 502, { code: "unavailable", message: `upstream ${target.host}: ${err.code || err.message}` });
    else res.destroy();
  });
  req.pipe(up);
}

function proxyUpgrade(req, socket, head) {
  const { host: h, port: p } = hostPort(gateway);
  const up = net.connect(p, h, () => {
    const lines = [`${req.method} ${req.url} HTTP/1.1`];
    for (let i = 0; i < req.rawHeaders.length; i += 2) {
      const name = req.rawHeaders[i];
      lines.push(`${name}: ${name.toLowerCase() === "host" ? `${h}:${p}` : req.rawHeaders[i + 1]}`);
    }
    up.write(lines.join("\r\n") + "\r\n\r\n");
    if (head && head.length) up.write(head);
    up.pipe(socket);
    socket.pipe(up);
  });
  const end = () => {
    up.destroy();
    socket.destroy();
  };
  up.on("error", () => {
    if (socket.writable) socket.end("HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    end();
  });
  socket.on("error", end);
  up.on("close", end);
  socket.on("close", end);
}

// ---------------------------------------------------------------------------------------------
// static files
// ---------------------------------------------------------------------------------------------

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".ico": "image/x-icon",
  ".webmanifest": "application/manifest+json",
  ".map": "application/json",
  ".txt": "text/plain; charset=utf-8",
};

async function serveStatic(req, res, pathname) {
  let rel;
  try {
    rel = decodeURIComponent(pathname);
  } catch {
    return sendJson(res, 400, { code: "invalid_request", message: "bad path" });
  }
  let file = path.resolve(dist, "." + rel);
  if (file !== dist && !file.startsWith(dist + path.sep)) return sendJson(res, 404, { code: "not_found", message: "no such file" });
  let stat = await fs.stat(file).catch(() => undefined);
  if (stat?.isDirectory()) {
    file = path.join(file, "index.html");
    stat = await fs.stat(file).catch(() => undefined);
  }
  if (!stat && !path.extname(rel)) {
    // The app's own routes: the app decides what to show.
    file = path.join(dist, "index.html");
    stat = await fs.stat(file).catch(() => undefined);
  }
  if (!stat) {
    if (!(await fs.stat(path.join(dist, "index.html")).catch(() => undefined))) {
      return sendJson(res, 503, { code: "unavailable", message: `the app is not built (no ${dist}/index.html): npm run build in web/` });
    }
    return sendJson(res, 404, { code: "not_found", message: "no such file" });
  }
  const ext = path.extname(file);
  res.writeHead(200, {
    "content-type": TYPES[ext] || "application/octet-stream",
    "content-length": stat.size,
    // Vite names assets by their content hash; index.html must always be fetched anew.
    "cache-control": file.includes(`${path.sep}assets${path.sep}`) ? "public, max-age=31536000, immutable" : "no-cache",
    "x-content-type-options": "nosniff",
  });
  if (req.method === "HEAD") return res.end();
  createReadStream(file).pipe(res);
}

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text), "cache-control": "no-store" });
  res.end(text);
}

// ---------------------------------------------------------------------------------------------
// the server
// ---------------------------------------------------------------------------------------------

const server = http.createServer((req, res) => {
  const url = new URL(req.url || "/", "http://localhost");
  const p = url.pathname;
  if (p === "/healthz") return sendJson(res, 200, { ok: true });
  if (p === "/config.json") {
    return sendJson(res, 200, { gateway_url: "/ws", media_url: "", dev_tokens: Boolean(secret) });
  }
  if (p === "/dev/token") {
    if (!secret) return sendJson(res, 404, { code: "not_found", message: "development tokens are off (no CHAT_DEV_SECRET)" });
    const user = url.searchParams.get("user") || "";
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(user)) {
      return sendJson(res, 400, { code: "invalid_id", message: "a user id is 1-64 characters of A-Z a-z 0-9 _ -" });
    }
    return sendJson(res, 200, mintToken(user));
  }
  if (p.startsWith("/v1/") || p === "/openapi.json") return proxyHttp(req, res, media);
  if (p === "/ws") return sendJson(res, 426, { code: "invalid_request", message: "WebSocket upgrade required" });
  if (req.method !== "GET" && req.method !== "HEAD") return sendJson(res, 405, { code: "invalid_request", message: "method not allowed" });
  serveStatic(req, res, p).catch((err) => {
    console.error("dev-server: static file failed", err);
    if (!res.headersSent) sendJson(res, 500, { code: "internal", message: "internal error" });
  });
});

server.on("upgrade", (req, socket, head) => {
  const p = new URL(req.url || "/", "http://localhost").pathname;
  if (p !== "/ws") {
    socket.end("HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    return;
  }
  proxyUpgrade(req, socket, head);
});

server.listen(port, host, () => {
  const a = server.address();
  console.log(`dev-server: listening on http://${a.family === "IPv6" ? `[${a.address}]` : a.address}:${a.port}/ (app ${dist}, gateway ${gateway.host}, media ${media.host}, dev tokens ${secret ? "on" : "off"})`);
});

for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => {
    server.close();
    server.closeAllConnections?.();
    process.exit(0);
  });
}
