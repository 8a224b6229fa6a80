import { defaultClientConditions, defineConfig } from "vite";

// `npm run build` writes dist/, which web/server/dev-server.mjs serves (scripts/dev.sh starts it).
// `npm run dev` (hot reload while working on the app) proxies to a running dev-server.mjs, whose
// address CHAT_WEB_URL gives (default http://127.0.0.1:8081).
const backend = process.env.CHAT_WEB_URL || "http://127.0.0.1:8081";

export default defineConfig({
  resolve: {
    // @chat/client is used from its TypeScript sources (its package.json "source" condition).
    conditions: ["source", ...defaultClientConditions],
  },
  build: {
    target: "es2022",
    sourcemap: true,
  },
  server: {
    host: "127.0.0.1",
    proxy: {
      "/ws": { target: backend, ws: true },
      "/v1": backend,
      "/dev": backend,
      "/config.json": backend,
    },
  },
});
