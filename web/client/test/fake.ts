// A fake gateway socket for unit tests: records what the client sends, pushes what a test says.
// (The real gateway is exercised by the browser test, web/e2e/.)

import { vi } from "vitest";
import { ChatClient, type ChatClientOptions, type WebSocketLike } from "../src/index.js";
import type { ClientFrame, HelloFrame, Message, ServerFrame } from "../src/protocol.js";

export class FakeSocket implements WebSocketLike {
  static all: FakeSocket[] = [];
  readyState = 0;
  sent: ClientFrame[] = [];
  closedWith: number | undefined;
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason?: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;

  constructor(readonly url: string) {
    FakeSocket.all.push(this);
  }

  static last(): FakeSocket {
    const s = FakeSocket.all[FakeSocket.all.length - 1];
    if (!s) throw new Error("no socket was opened");
    return s;
  }

  send(data: string): void {
    if (this.readyState !== 1) throw new Error("send on a socket that is not open");
    const frame = JSON.parse(data) as ClientFrame;
    this.sent.push(frame);
    // Like the gateway: a `ping` is answered, so a quiet test connection stays up.
    if (frame.type === "ping") queueMicrotask(() => this.push({ type: "pong" }));
  }

  close(code?: number): void {
    this.readyState = 3;
    this.closedWith = code;
  }

  // ---- the test's side ----

  accept(): void {
    this.readyState = 1;
    this.onopen?.({});
  }

  push(frame: ServerFrame): void {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  drop(code = 1006): void {
    this.readyState = 3;
    this.onclose?.({ code });
  }

  /** Frames of `type` sent so far. */
  frames<T extends ClientFrame["type"]>(type: T): Extract<ClientFrame, { type: T }>[] {
    return this.sent.filter((f) => f.type === type) as Extract<ClientFrame, { type: T }>[];
  }

  lastFrame<T extends ClientFrame["type"]>(type: T): Extract<ClientFrame, { type: T }> {
    const all = this.frames(type);
    const f = all[all.length - 1];
    if (!f) throw new Error(`no ${type} frame was sent; sent: ${JSON.stringify(this.sent)}`);
    return f;
  }
}

export function hello(user: string, device = "d1"): HelloFrame {
  return {
    type: "hello",
    version: 1,
    user,
    device,
    heartbeat_ms: 15_000,
    limits: {
      max_frame_bytes: 131072,
      max_body_bytes: 65536,
      sends_per_second: 20,
      send_burst: 40,
      history_page_max: 200,
      typing_ttl_ms: 6000,
    },
  };
}

export function msg(conv: string, seq: number, from: string, body = `m${seq}`, id = `${from}-${seq}`): Message {
  return { conv, seq, from, id, ts: 1_700_000_000_000 + seq, body };
}

/** Lets pending promises and zero-delay timers run. */
export async function settle(): Promise<void> {
  await vi.advanceTimersByTimeAsync(0);
}

export function newClient(opts: Partial<ChatClientOptions> = {}): ChatClient {
  return new ChatClient({
    url: "ws://gateway.test/ws",
    token: "tok",
    WebSocket: FakeSocket,
    random: () => 0.5,
    ...opts,
  });
}

/**
 * Connects `client` as `user` and answers its first catch-up: the conversation list (`convs`),
 * then one sync page with `messages` and the token `v1.1`.
 */
export async function connect(
  client: ChatClient,
  user: string,
  first: { convs?: { conv: string; latest: number; unread?: number }[]; messages?: Message[] } = {},
): Promise<FakeSocket> {
  client.connect();
  await settle();
  const sock = FakeSocket.last();
  sock.accept();
  sock.push(hello(user));
  await settle();
  const list = sock.lastFrame("conversations");
  sock.push({
    type: "conversations",
    req: list.req,
    more: false,
    convs: (first.convs ?? []).map((c) => ({ conv: c.conv, member_count: 2, latest: c.latest, unread: c.unread ?? 0, joined: 1 })),
  });
  await settle();
  const sync = sock.lastFrame("sync");
  sock.push({
    type: "sync",
    req: sync.req,
    more: false,
    token: "v1.1",
    convs: (first.convs ?? []).map((c) => ({ conv: c.conv, latest: c.latest, unread: c.unread ?? 0, members: [] })),
    messages: first.messages ?? [],
  });
  await settle();
  return sock;
}
