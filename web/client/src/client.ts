// ChatClient: one device's connection to the chat backend (docs/protocol.md).
//
// - Connects with a token, and reconnects with jittered exponential backoff after any drop.
// - After every `hello`, catches up with `sync` (paged, from the cursors it holds), then resends
//   what was not acknowledged: messages, receipts, the presence subscription, open requests.
// - Sends carry a client id generated once and reused on every retry, until `sent`; the stamped
//   `message` (with the same id) then replaces the pending one.
// - Messages are kept per conversation, deduplicated and ordered by seq; a seq above the
//   cursor + 1 is a gap, filled with a `history` range request.
// - Delivered receipts go out as the cursor moves; read receipts when the app says the user saw
//   a conversation. Typing and presence are kept per conversation and per user, with expiry.
// - Media goes through the media service's presigned URLs (see media.ts).

import { backoffDelay, DEFAULT_BACKOFF, type BackoffOptions } from "./backoff.js";
import { Conversation, type ConversationKind, type Gap } from "./conversation.js";
import { Emitter } from "./emitter.js";
import { ChatError } from "./errors.js";
import { dmId, dmPeer, isValidId, newGroupId, randomId } from "./ids.js";
import { MediaApi, type UploadInput } from "./media.js";
import {
  CloseCode,
  type AnswerOf,
  type ClientFrame,
  type ConvInfo,
  type ConvState,
  type ErrorFrame,
  type GroupFrame,
  type GroupInfoAnswer,
  type GroupOp,
  type HelloFrame,
  type MediaRef,
  type Message,
  type PresenceState,
  type SendFrame,
  type ServerFrame,
  type SyncAnswer,
} from "./protocol.js";

/** The part of the WebSocket API the client uses (browsers' WebSocket and Node's `ws` fit). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason?: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}
export type WebSocketFactory = new (url: string) => WebSocketLike;

const OPEN = 1;
/** How often a presence subscription is made again for a peer that should be visible. */
const PRESENCE_RETRIES = 5;

export interface ChatClientOptions {
  /** The gateway's WebSocket URL, e.g. `ws://127.0.0.1:8080/ws`. */
  url: string;
  /** A JWT, or a function giving a fresh one (called before every connection and media call). */
  token: string | (() => string | Promise<string>);
  /** A stable id of this installation (1-64 of `[A-Za-z0-9_-]`); the gateway assigns one if absent. */
  device?: string;
  /** The media service's base URL, e.g. `http://127.0.0.1:8070` (needed for media only). */
  mediaUrl?: string;
  /** WebSocket constructor; defaults to the global one. */
  WebSocket?: WebSocketFactory;
  fetch?: typeof fetch;
  /** Reconnect and retry delays. */
  backoff?: Partial<BackoffOptions>;
  /** Source of jitter, [0, 1). */
  random?: () => number;
  /** Resend a message not acknowledged as sent within this long (ms, default 5000). */
  ackTimeoutMs?: number;
  /** A request (history, sync, ...) not answered within this long fails (ms, default 30000). */
  requestTimeoutMs?: number;
  /** A connection that says no `hello` within this long is dropped (ms, default 15000). */
  helloTimeoutMs?: number;
  /** On a device's first sync, how many of each conversation's newest messages to fetch (20). */
  initialMessages?: number;
}

export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

/** How far one of the user's own messages got. */
export type MessageStatus = "uploading" | "pending" | "sent" | "delivered" | "read" | "failed";

/** A message as an app shows it: stamped (with `seq`) or still on its way (without). */
export interface MessageView {
  /** Stable across the pending-to-stamped change: `conv` + client id. */
  key: string;
  conv: string;
  seq?: number;
  from: string;
  id: string;
  ts: number;
  body: string;
  media?: MediaRef;
  event?: Message["event"];
  mine: boolean;
  /** For the user's own messages. */
  status?: MessageStatus;
  error?: ChatError;
  /** The sender's own bytes of a media message sent from this device (for a preview). */
  localMedia?: Blob;
}

export interface ConversationView {
  id: string;
  kind: ConversationKind;
  /** The group's name, or the other user of a one-to-one conversation. */
  title: string;
  /** The other user (one-to-one conversations). */
  peer?: string;
  unread: number;
  latest: number;
  memberCount: number;
  members?: string[];
  last?: MessageView;
  /** Time of the newest message (or when the device first saw the conversation). */
  activity: number;
  admin: boolean;
  left?: number;
  hasOlder: boolean;
}

export interface ChatEvents {
  state: ConnectionState;
  hello: HelloFrame;
  /** A message this device did not hold before; `live` when it was pushed, not fetched. */
  message: { message: Message; live: boolean };
  /** One of the user's own messages changed status. */
  outbox: MessageView;
  receipt: { conv: string; user: string; delivered: number; read: number };
  typing: { conv: string; users: string[] };
  presence: PresenceState;
  /** A catch-up finished: everything up to the server's state at that moment is here. */
  synced: { token?: string };
  /** A server error no pending operation of the client was waiting for. */
  error: ChatError;
  /** Anything changed (coalesced): re-render. */
  change: undefined;
}

interface OutboxEntry {
  id: string;
  conv: string;
  frame: SendFrame | GroupFrame;
  status: "uploading" | "pending" | "sent" | "failed";
  error?: ChatError;
  createdAt: number;
  attempts: number;
  timer?: ReturnType<typeof setTimeout>;
  upload?: UploadInput;
  resolve: (m: Message) => void;
  reject: (e: ChatError) => void;
}

interface PendingRequest {
  frame: ClientFrame & { req: string };
  persistent: boolean;
  attempts: number;
  resolve: (answer: ServerFrame) => void;
  reject: (err: ChatError) => void;
  timer: ReturnType<typeof setTimeout>;
  retryTimer?: ReturnType<typeof setTimeout>;
}

/** A message on its way: its client id, and a promise of the stamped message. */
export interface PendingSend {
  id: string;
  conv: string;
  stamped: Promise<Message>;
}

type ReadRequest = Extract<ClientFrame, { req: string }>;
type RequestType = ReadRequest["type"];
type RequestOf<T extends RequestType> = Omit<Extract<ReadRequest, { type: T }>, "req">;

const TYPING_RESEND_MS = 3000;
const RECEIPT_FLUSH_MS = 100;

export class ChatClient extends Emitter<ChatEvents> {
  private readonly opts: Required<Pick<ChatClientOptions, "ackTimeoutMs" | "requestTimeoutMs" | "helloTimeoutMs" | "initialMessages">> &
    ChatClientOptions;
  private readonly backoffOpts: BackoffOptions;
  private readonly random: () => number;
  private readonly WS: WebSocketFactory;
  private readonly media: MediaApi | undefined;

  private ws: WebSocketLike | undefined;
  private ready = false;
  private gen = 0;
  private stopped = true;
  private attempt = 0;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private helloTimer: ReturnType<typeof setTimeout> | undefined;
  private heartbeatTimer: ReturnType<typeof setInterval> | undefined;
  private lastRx = 0;
  private _state: ConnectionState = "idle";
  private _hello: HelloFrame | undefined;
  private device: string | undefined;

  private since: string | undefined;
  private syncing = false;
  private readonly convs = new Map<string, Conversation>();
  private readonly outbox = new Map<string, OutboxEntry>();
  private readonly localMedia = new Map<string, Blob>();
  private readonly requests = new Map<string, PendingRequest>();
  private reqCounter = 0;

  private readonly receiptsWanted = new Map<string, { delivered: number; read: number }>();
  private readonly receiptsSent = new Map<string, { delivered: number; read: number }>();
  private receiptTimer: ReturnType<typeof setTimeout> | undefined;

  private readonly filling = new Set<string>();
  private readonly fillAttempts = new Map<string, number>();
  private readonly loadingOlder = new Map<string, Promise<number>>();

  private readonly typers = new Map<string, Map<string, ReturnType<typeof setTimeout>>>();
  private readonly typingSent = new Map<string, number>();
  private readonly presenceStates = new Map<string, PresenceState>();
  private watched: string[] = [];
  private presenceRetry: ReturnType<typeof setTimeout> | undefined;
  private presenceRetryCount = 0;

  private changeQueued = false;

  constructor(options: ChatClientOptions) {
    super();
    this.opts = { ackTimeoutMs: 5000, requestTimeoutMs: 30_000, helloTimeoutMs: 15_000, initialMessages: 20, ...options };
    this.backoffOpts = { ...DEFAULT_BACKOFF, ...options.backoff };
    this.random = options.random ?? Math.random;
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: unknown }).WebSocket;
    if (!WS) throw new TypeError("no WebSocket: pass options.WebSocket");
    this.WS = WS as WebSocketFactory;
    this.device = options.device;
    if (options.mediaUrl) this.media = new MediaApi(options.mediaUrl, () => this.token(), options.fetch);
  }

  // -------------------------------------------------------------------------------------------
  // connection
  // -------------------------------------------------------------------------------------------

  /** The user this client is signed in as (known after the first `hello`). */
  get user(): string | undefined {
    return this._hello?.user;
  }

  get state(): ConnectionState {
    return this._state;
  }

  get hello(): HelloFrame | undefined {
    return this._hello;
  }

  /** Starts connecting (and keeps reconnecting until `close`). */
  connect(): void {
    if (!this.stopped) return;
    this.stopped = false;
    void this.open();
  }

  /** Closes the connection for good: no reconnect, pending sends and requests fail. */
  close(): void {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    this.detach(CloseCode.NORMAL);
    const closed = new ChatError("closed", "the client was closed");
    for (const r of this.requests.values()) this.finishRequest(r, closed);
    for (const e of this.outbox.values()) {
      clearTimeout(e.timer);
      if (e.status !== "failed") e.reject(closed);
    }
    for (const timers of this.typers.values()) for (const t of timers.values()) clearTimeout(t);
    clearTimeout(this.receiptTimer);
    clearTimeout(this.presenceRetry);
    this.presenceRetry = undefined;
    this.setState("closed");
  }

  /** Reconnects now instead of waiting out the backoff (e.g. when the network comes back). */
  reconnectNow(): void {
    if (this.stopped || this.ws) return;
    clearTimeout(this.reconnectTimer);
    void this.open();
  }

  private async token(): Promise<string> {
    const t = this.opts.token;
    return typeof t === "string" ? t : await t();
  }

  private async open(): Promise<void> {
    const gen = ++this.gen;
    this.setState(this._hello ? "reconnecting" : "connecting");
    let token: string;
    try {
      token = await this.token();
    } catch (err) {
      this.emit("error", new ChatError("unauthorized", `no token: ${String(err)}`));
      this.scheduleReconnect();
      return;
    }
    if (this.stopped || gen !== this.gen) return;
    const url = new URL(this.opts.url, (globalThis as { location?: { href: string } }).location?.href);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    url.searchParams.set("token", token);
    if (this.device) url.searchParams.set("device", this.device);
    let ws: WebSocketLike;
    try {
      ws = new this.WS(url.toString());
    } catch (err) {
      this.emit("error", new ChatError("unavailable", `cannot open ${this.opts.url}: ${String(err)}`));
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    this.lastRx = Date.now();
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastRx = Date.now();
      this.onData(ev.data);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.onDrop(ev.code);
    };
    ws.onerror = () => {
      // A close event follows; that is where reconnecting starts.
    };
    this.helloTimer = setTimeout(() => {
      if (this.ws === ws && !this.ready) this.drop();
    }, this.opts.helloTimeoutMs);
  }

  /** Lets go of the current socket without waiting for its close event. */
  private detach(code: number = CloseCode.NORMAL): void {
    const ws = this.ws;
    this.ws = undefined;
    this.ready = false;
    this.syncing = false;
    clearTimeout(this.helloTimer);
    clearInterval(this.heartbeatTimer);
    if (ws) {
      ws.onmessage = ws.onclose = ws.onerror = ws.onopen = null;
      try {
        ws.close(code);
      } catch {
        // already closed
      }
    }
  }

  /** The connection is dead or useless: drop it and reconnect. */
  private drop(): void {
    this.detach(CloseCode.NORMAL);
    this.onDrop(0);
  }

  private onDrop(code: number): void {
    this.ws = undefined;
    this.ready = false;
    this.syncing = false;
    clearTimeout(this.helloTimer);
    clearInterval(this.heartbeatTimer);
    const lost = new ChatError("disconnected", `connection closed (${code})`);
    for (const r of [...this.requests.values()]) {
      if (!r.persistent) this.finishRequest(r, lost);
    }
    for (const e of this.outbox.values()) clearTimeout(e.timer);
    // Whoever was typing may have stopped while we could not hear it.
    for (const conv of [...this.typers.keys()]) this.clearTypers(conv);
    if (this.stopped) return;
    if (code === CloseCode.MESSAGE_TOO_BIG) this.emit("error", new ChatError("invalid_frame", "a frame was too large"));
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (this.stopped) return;
    const delay = backoffDelay(this.attempt++, this.backoffOpts, this.random);
    this.setState("reconnecting");
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => void this.open(), delay);
  }

  private setState(s: ConnectionState): void {
    if (this._state === s) return;
    this._state = s;
    this.emit("state", s);
    this.changed();
  }

  private transmit(frame: ClientFrame): boolean {
    const ws = this.ws;
    if (!this.ready || !ws || ws.readyState !== OPEN) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  private onData(data: unknown): void {
    if (typeof data !== "string") return;
    let frame: ServerFrame;
    try {
      frame = JSON.parse(data) as ServerFrame;
    } catch {
      return;
    }
    switch (frame.type) {
      case "hello":
        return this.onHello(frame);
      case "sent":
        return this.onSent(frame.id, frame.conv);
      case "message": {
        const { type: _t, ...m } = frame;
        return this.onMessage(m, true);
      }
      case "receipt":
        return this.onReceipt(frame.conv, frame.user, frame.delivered, frame.read);
      case "typing":
        return this.onTyping(frame.conv, frame.user, frame.active, frame.ttl_ms);
      case "presence":
        if (frame.req) this.answer(frame.req, frame);
        return this.applyPresence(frame.users);
      case "error":
        return this.onError(frame);
      case "pong":
        return;
      default:
        if ("req" in frame && typeof frame.req === "string") this.answer(frame.req, frame);
    }
  }

  private onHello(hello: HelloFrame): void {
    clearTimeout(this.helloTimer);
    this._hello = hello;
    this.device = hello.device;
    this.ready = true;
    this.attempt = 0;
    this.setState("open");
    this.emit("hello", hello);
    const beat = Math.max(1000, hello.heartbeat_ms || 15_000);
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = setInterval(() => {
      // Browsers answer the gateway's pings without telling us; our own `ping` gets a `pong`,
      // so silence for two intervals means the connection is gone.
      if (Date.now() - this.lastRx > 2 * beat + 1000) this.drop();
      else this.transmit({ type: "ping" });
    }, beat);
    // What was left unacknowledged goes out again, in the order it was first sent.
    for (const e of this.outbox.values()) if (e.status === "pending") this.transmitOutbox(e);
    for (const r of this.requests.values()) this.transmitRequest(r);
    if (this.watched.length > 0) void this.subscribePresence();
    this.flushReceipts(true);
    void this.catchUp(this.gen);
  }

  // -------------------------------------------------------------------------------------------
  // requests
  // -------------------------------------------------------------------------------------------

  /**
   * Sends a request and resolves with its answer. Reads are retried on `unavailable`; a
   * persistent request is sent again after a reconnect, others fail with `disconnected`.
   */
  request<T extends RequestType>(frame: RequestOf<T>, opts: { persistent?: boolean; timeoutMs?: number } = {}): Promise<AnswerOf[T]> {
    const req = `r${++this.reqCounter}`;
    return new Promise<AnswerOf[T]>((resolve, reject) => {
      const r: PendingRequest = {
        frame: { ...frame, req } as ClientFrame & { req: string },
        persistent: opts.persistent ?? true,
        attempts: 0,
        resolve: resolve as (a: ServerFrame) => void,
        reject,
        timer: setTimeout(() => {
          this.finishRequest(r, new ChatError("timeout", `no answer to ${frame.type} within ${opts.timeoutMs ?? this.opts.requestTimeoutMs} ms`));
        }, opts.timeoutMs ?? this.opts.requestTimeoutMs),
      };
      this.requests.set(req, r);
      if (!this.ready && !r.persistent) {
        this.finishRequest(r, new ChatError("disconnected", "not connected"));
        return;
      }
      this.transmitRequest(r);
    });
  }

  private transmitRequest(r: PendingRequest): void {
    if (this.transmit(r.frame)) r.attempts++;
  }

  private answer(req: string, frame: ServerFrame): void {
    const r = this.requests.get(req);
    if (r) this.finishRequest(r, undefined, frame);
  }

  private finishRequest(r: PendingRequest, err?: ChatError, answer?: ServerFrame): void {
    if (this.requests.get(r.frame.req) !== r) return;
    this.requests.delete(r.frame.req);
    clearTimeout(r.timer);
    clearTimeout(r.retryTimer);
    if (err) r.reject(err);
    else r.resolve(answer!);
  }

  // -------------------------------------------------------------------------------------------
  // errors
  // -------------------------------------------------------------------------------------------

  private onError(f: ErrorFrame): void {
    const err = new ChatError(f.code, f.message, f.retry_after_ms);
    if (f.req) {
      const r = this.requests.get(f.req);
      if (!r) return;
      if (err.retryable && f.code !== "rate_limited" && r.attempts < 6) {
        clearTimeout(r.retryTimer);
        r.retryTimer = setTimeout(() => this.transmitRequest(r), backoffDelay(r.attempts - 1, this.backoffOpts, this.random));
        return;
      }
      if (f.code === "rate_limited" && r.attempts < 6) {
        r.retryTimer = setTimeout(() => this.transmitRequest(r), f.retry_after_ms ?? 1000);
        return;
      }
      this.finishRequest(r, err);
      return;
    }
    if (f.id && this.outbox.has(f.id)) {
      this.onOutboxError(this.outbox.get(f.id)!, err);
      return;
    }
    if (f.conv && (f.code === "rate_limited" || f.code === "unavailable")) {
      // A receipt (or a typing indicator) was refused for now: receipts are idempotent, so the
      // highest ones go out again a little later.
      this.receiptsSent.delete(f.conv);
      this.scheduleReceipts(f.retry_after_ms ?? 1000);
      return;
    }
    if (f.conv && f.code === "not_member") {
      const c = this.convs.get(f.conv);
      if (c && c.left === undefined && c.kind === "group") c.left = c.latest;
    }
    this.emit("error", err);
    this.changed();
  }

  // -------------------------------------------------------------------------------------------
  // catching up
  // -------------------------------------------------------------------------------------------

  private cursors(): Record<string, number> {
    const out: Record<string, number> = {};
    for (const c of this.convs.values()) if (c.top > 0) out[c.id] = c.top;
    return out;
  }

  private async catchUp(gen: number): Promise<void> {
    this.syncing = true;
    try {
      if (this.since === undefined) await this.seed();
      let next: string | undefined;
      for (;;) {
        if (gen !== this.gen) return;
        const page = await this.request<"sync">(
          { type: "sync", ...(this.since ? { since: this.since } : {}), cursors: this.cursors(), ...(next ? { next } : {}) },
          { persistent: false },
        );
        if (gen !== this.gen) return;
        this.applySync(page);
        if (page.more && page.next) {
          next = page.next;
          continue;
        }
        if (page.token) this.since = page.token;
        break;
      }
      this.syncing = false;
      for (const c of this.convs.values()) this.checkGap(c);
      this.emit("synced", this.since ? { token: this.since } : {});
      this.changed();
    } catch (err) {
      if (gen !== this.gen) return;
      this.syncing = false;
      if (err instanceof ChatError && err.code === "invalid_token") {
        this.since = undefined;
        void this.catchUp(gen);
        return;
      }
      // The connection is probably going; if it is not, this one is useless without a sync.
      if (this.ready && gen === this.gen) this.drop();
    }
  }

  /** A first sync: learn the conversations, and start each a few messages before its newest. */
  private async seed(): Promise<void> {
    let after: string | undefined;
    for (;;) {
      const page = await this.request<"conversations">({ type: "conversations", limit: 500, ...(after ? { after } : {}) }, { persistent: false });
      for (const info of page.convs) this.applyConvInfo(info);
      if (!page.more || !page.next) break;
      after = page.next;
    }
  }

  private applyConvInfo(info: ConvInfo): void {
    const known = this.convs.has(info.conv);
    const c = this.conv(info.conv);
    if (info.name !== undefined) c.name = info.name;
    c.memberCount = info.member_count;
    c.joined = info.joined;
    c.left = info.left;
    c.admin = info.admin ?? false;
    if (info.latest > c.latest) c.latest = info.latest;
    const me = this.user;
    if (me) c.mark(me, 0, Math.max(0, info.latest - info.unread));
    if (!known || c.size === 0) c.startAt(Math.max(0, info.joined - 1, info.latest - this.opts.initialMessages));
  }

  private applySync(page: SyncAnswer): void {
    for (const s of page.convs) this.applyConvState(s);
    for (const m of page.messages) this.onMessage(m, false);
    this.changed();
  }

  private applyConvState(s: ConvState): void {
    const c = this.conv(s.conv);
    if (s.name !== undefined) c.name = s.name;
    if (s.member_count) c.memberCount = s.member_count;
    if (s.left !== undefined) c.left = s.left;
    if (s.latest > c.latest) c.latest = s.latest;
    for (const m of s.members) c.mark(m.user, m.delivered, m.read);
    if (c.kind === "group" && s.member_count && s.members.length === s.member_count) {
      const prev = new Map((c.members() ?? []).map((u) => [u, 1] as [string, number]));
      c.setRoster(
        s.members.map((m) => [m.user, prev.get(m.user) ?? 1]),
        s.latest,
      );
    }
  }

  /** Fills the first gap above the conversation's cursor, if there is one. */
  private checkGap(c: Conversation): void {
    if (this.syncing || !this.ready || this.filling.has(c.id)) return;
    const gap = c.missing();
    if (!gap) return;
    this.filling.add(c.id);
    void this.fill(c, gap).then((ok) => {
      this.filling.delete(c.id);
      // Done: the next gap, if any (a fill that said `more`, or seqs that arrived meanwhile).
      if (ok) this.checkGap(c);
    });
  }

  /** Asks for the messages of `gap`; false when that failed (a retry is scheduled). */
  private async fill(c: Conversation, gap: Gap): Promise<boolean> {
    const limit = this._hello?.limits.history_page_max || 200;
    try {
      const ans = await this.request<"history">({ type: "history", conv: c.id, after: gap.after, ...(gap.before ? { before: gap.before } : {}), limit });
      for (const m of ans.messages) this.onMessage(m, false);
      if (!ans.more) c.closeGap(gap);
      this.fillAttempts.delete(c.id);
      this.scheduleReceiptsFor(c);
      this.changed();
      return true;
    } catch (err) {
      if (err instanceof ChatError && err.code === "not_member") {
        c.closeGap({ after: gap.after });
        return false;
      }
      const n = this.fillAttempts.get(c.id) ?? 0;
      this.fillAttempts.set(c.id, n + 1);
      setTimeout(() => this.checkGap(c), backoffDelay(n, this.backoffOpts, this.random));
      return false;
    }
  }

  /**
   * Fetches a page of older messages of `conv` (before the oldest held). Resolves with how many
   * arrived; 0 when there are no more.
   */
  loadOlder(conv: string, limit = 50): Promise<number> {
    const c = this.conv(conv);
    const running = this.loadingOlder.get(conv);
    if (running) return running;
    if (!c.hasOlder()) return Promise.resolve(0);
    const p = this.request<"history">({ type: "history", conv, before: c.oldest(), limit })
      .then((ans) => {
        let n = 0;
        for (const m of ans.messages) if (c.add(m)) n++;
        if (!ans.more && c.hasOlder()) c.joined = Math.max(c.joined, c.oldest());
        this.changed();
        return n;
      })
      .finally(() => this.loadingOlder.delete(conv));
    this.loadingOlder.set(conv, p);
    return p;
  }

  // -------------------------------------------------------------------------------------------
  // messages
  // -------------------------------------------------------------------------------------------

  private conv(id: string): Conversation {
    let c = this.convs.get(id);
    if (!c) {
      c = new Conversation(id, Date.now());
      this.convs.set(id, c);
    }
    return c;
  }

  private onMessage(m: Message, live: boolean): void {
    const c = this.conv(m.conv);
    const me = this.user;
    if (m.from === me) {
      const e = this.outbox.get(m.id);
      if (e && e.conv === m.conv) {
        clearTimeout(e.timer);
        this.outbox.delete(m.id);
        e.resolve(m);
      }
      // Writing implies having read what came before.
      c.mark(me, m.seq, m.seq);
    }
    this.stopTyper(m.conv, m.from);
    const topBefore = c.top;
    if (!c.add(m)) return;
    if (m.event && me) {
      const ev = m.event;
      const gone = (ev.kind === "removed" && ev.members.includes(me)) || (ev.kind === "left" && m.from === me);
      if (gone) c.left = m.seq;
      else if (ev.kind === "added" && ev.members.includes(me) && c.left !== undefined && c.left < m.seq) {
        c.left = undefined;
        c.joined = m.seq;
      }
    }
    this.emit("message", { message: m, live });
    if (c.kind === "dm" && me) this.presenceMayHaveOpened(c, me);
    if (m.from === me) {
      const view = this.viewOf(c, m);
      this.emit("outbox", view);
    }
    if (c.top !== topBefore) this.scheduleReceiptsFor(c);
    if (live) this.checkGap(c);
    this.changed();
  }

  private onReceipt(conv: string, user: string, delivered: number, read: number): void {
    const c = this.conv(conv);
    if (!c.mark(user, delivered, read)) return;
    this.emit("receipt", { conv, user, ...c.marksOf(user) });
    this.checkGap(c);
    this.changed();
  }

  /**
   * Sends `body` (and optionally an already uploaded `media`) to `conv`. The client id is made
   * now and reused on every retry until the gateway says `sent`; `stamped` resolves with the
   * stamped message, or rejects when the server refuses it for good.
   */
  send(conv: string, body: string, opts: { media?: MediaRef } = {}): PendingSend {
    const id = randomId();
    const frame: SendFrame = { type: "send", conv, id, body, ...(opts.media ? { media: opts.media } : {}) };
    return this.enqueue(conv, frame);
  }

  /**
   * Uploads `input` through a presigned URL from the media service, then sends it with `caption`.
   * The message shows (status `uploading`, with the local bytes) from the first moment.
   */
  sendMedia(conv: string, input: UploadInput, caption = ""): PendingSend {
    if (!this.media) throw new TypeError("sendMedia needs options.mediaUrl");
    const id = randomId();
    const frame: SendFrame = { type: "send", conv, id, body: caption };
    this.localMedia.set(id, input.data);
    return this.enqueue(conv, frame, input);
  }

  /** Creates a group named `name` with `members` (besides the user, its first admin). */
  createGroup(name: string, members: string[]): PendingSend {
    const conv = newGroupId();
    const c = this.conv(conv);
    c.name = name;
    return this.groupOp("create", conv, { name, members });
  }

  /** Any other group operation (`add`, `remove`, `leave`, `rename`, `promote`, `demote`). */
  groupOp(op: GroupOp, conv: string, fields: { name?: string; members?: string[] } = {}): PendingSend {
    const frame: GroupFrame = { type: "group", op, conv, id: randomId(), ...fields };
    return this.enqueue(conv, frame);
  }

  private enqueue(conv: string, frame: SendFrame | GroupFrame, upload?: UploadInput): PendingSend {
    this.conv(conv);
    let resolve!: (m: Message) => void;
    let reject!: (e: ChatError) => void;
    const stamped = new Promise<Message>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    // Callers may ignore the promise: a failure is also in the message's status.
    stamped.catch(() => {});
    const e: OutboxEntry = {
      id: frame.id,
      conv,
      frame,
      status: upload ? "uploading" : "pending",
      createdAt: Date.now(),
      attempts: 0,
      resolve,
      reject,
      ...(upload ? { upload } : {}),
    };
    this.outbox.set(e.id, e);
    if (upload) void this.upload(e);
    else this.transmitOutbox(e);
    this.emitOutbox(e);
    this.changed();
    return { id: e.id, conv, stamped };
  }

  private async upload(e: OutboxEntry): Promise<void> {
    const input = e.upload!;
    for (;;) {
      try {
        const media = await this.media!.upload(e.conv, input);
        if (!this.outbox.has(e.id)) return;
        (e.frame as SendFrame).media = media;
        e.status = "pending";
        delete e.upload;
        this.transmitOutbox(e);
        this.emitOutbox(e);
        this.changed();
        return;
      } catch (err) {
        const ce = err instanceof ChatError ? err : new ChatError("unavailable", String(err));
        if (!this.outbox.has(e.id)) return;
        if (!ce.retryable || e.attempts >= 8) {
          this.failOutbox(e, ce);
          return;
        }
        await sleep(ce.retryAfterMs ?? backoffDelay(e.attempts++, this.backoffOpts, this.random));
      }
    }
  }

  private transmitOutbox(e: OutboxEntry): void {
    clearTimeout(e.timer);
    if (e.status !== "pending") return;
    if (this.transmit(e.frame)) {
      e.attempts++;
      // No `sent` in time: the frame or its answer may be lost; the same id goes out again.
      const wait = Math.max(this.opts.ackTimeoutMs, backoffDelay(e.attempts - 1, this.backoffOpts, this.random));
      e.timer = setTimeout(() => this.transmitOutbox(e), wait);
    }
    // Not connected: the next `hello` sends it.
  }

  private onSent(id: string, conv: string): void {
    const e = this.outbox.get(id);
    if (!e || e.conv !== conv) return;
    clearTimeout(e.timer);
    if (e.status === "pending") {
      e.status = "sent";
      this.emitOutbox(e);
      this.changed();
    }
  }

  private onOutboxError(e: OutboxEntry, err: ChatError): void {
    clearTimeout(e.timer);
    if (err.code === "rate_limited" || err.code === "unavailable" || err.code === "internal") {
      e.status = "pending";
      const wait = err.retryAfterMs ?? backoffDelay(e.attempts, this.backoffOpts, this.random);
      e.timer = setTimeout(() => this.transmitOutbox(e), wait);
      return;
    }
    this.failOutbox(e, err);
  }

  private failOutbox(e: OutboxEntry, err: ChatError): void {
    clearTimeout(e.timer);
    e.status = "failed";
    e.error = err;
    e.reject(err);
    this.emitOutbox(e);
    this.emit("error", err);
    this.changed();
  }

  /** Tries a failed message again, with the same client id. */
  retry(id: string): void {
    const e = this.outbox.get(id);
    if (!e || e.status !== "failed") return;
    delete e.error;
    e.attempts = 0;
    if ((e.frame as SendFrame).media || e.frame.type === "group" || !this.localMedia.has(id)) {
      e.status = "pending";
      this.transmitOutbox(e);
    } else {
      e.status = "uploading";
      e.upload = { data: this.localMedia.get(id)! };
      void this.upload(e);
    }
    this.emitOutbox(e);
    this.changed();
  }

  /** Gives up on a message that is not sent yet (or failed). */
  discard(id: string): void {
    const e = this.outbox.get(id);
    if (!e) return;
    clearTimeout(e.timer);
    this.outbox.delete(id);
    this.localMedia.delete(id);
    if (e.status !== "failed") e.reject(new ChatError("closed", "discarded"));
    this.changed();
  }

  private emitOutbox(e: OutboxEntry): void {
    this.emit("outbox", this.pendingView(e));
  }

  // -------------------------------------------------------------------------------------------
  // receipts
  // -------------------------------------------------------------------------------------------

  /** The user has seen `conv` up to its newest message held: send `read` (and count it read). */
  markRead(conv: string): void {
    const c = this.convs.get(conv);
    const me = this.user;
    if (!c || !me || c.top === 0) return;
    const seq = c.top;
    // Already read here, or on another device (the server told us), or already on its way.
    if (c.marksOf(me).read >= seq) return;
    c.mark(me, seq, seq);
    const w = this.receiptsWanted.get(conv) ?? { delivered: 0, read: 0 };
    w.read = Math.max(w.read, seq);
    w.delivered = Math.max(w.delivered, seq);
    this.receiptsWanted.set(conv, w);
    this.scheduleReceipts(RECEIPT_FLUSH_MS);
    this.changed();
  }

  private scheduleReceiptsFor(c: Conversation): void {
    if (c.top === 0) return;
    const w = this.receiptsWanted.get(c.id) ?? { delivered: 0, read: 0 };
    if (c.top <= w.delivered) return;
    w.delivered = c.top;
    this.receiptsWanted.set(c.id, w);
    this.scheduleReceipts(RECEIPT_FLUSH_MS);
  }

  private scheduleReceipts(ms: number): void {
    if (this.receiptTimer !== undefined) return;
    this.receiptTimer = setTimeout(() => {
      this.receiptTimer = undefined;
      this.flushReceipts(false);
    }, ms);
  }

  /** Sends the highest wanted receipts not sent yet; `all`: every wanted one (after a reconnect). */
  private flushReceipts(all: boolean): void {
    if (!this.ready) return;
    if (all) this.receiptsSent.clear();
    for (const [conv, w] of this.receiptsWanted) {
      const sent = this.receiptsSent.get(conv) ?? { delivered: 0, read: 0 };
      if (w.read > sent.read) {
        // `read` raises `delivered` too.
        if (!this.transmit({ type: "read", conv, seq: w.read })) return;
        sent.read = w.read;
        sent.delivered = Math.max(sent.delivered, w.read);
      }
      if (w.delivered > sent.delivered) {
        if (!this.transmit({ type: "delivered", conv, seq: w.delivered })) return;
        sent.delivered = w.delivered;
      }
      this.receiptsSent.set(conv, sent);
    }
  }

  // -------------------------------------------------------------------------------------------
  // typing
  // -------------------------------------------------------------------------------------------

  /**
   * Call on every edit of the message field: sends `typing` at most every 3 s while the user
   * goes on; `typing(conv, false)` once they send or clear it.
   */
  typing(conv: string, active = true): void {
    const last = this.typingSent.get(conv);
    if (active) {
      if (last !== undefined && Date.now() - last < TYPING_RESEND_MS) return;
      if (this.transmit({ type: "typing", conv })) this.typingSent.set(conv, Date.now());
    } else if (last !== undefined) {
      this.typingSent.delete(conv);
      this.transmit({ type: "typing", conv, active: false });
    }
  }

  /** Who is typing in `conv` now. */
  typingIn(conv: string): string[] {
    return [...(this.typers.get(conv)?.keys() ?? [])].sort();
  }

  private onTyping(conv: string, user: string, active: boolean, ttlMs: number): void {
    if (user === this.user) return;
    if (!active) {
      this.stopTyper(conv, user);
      return;
    }
    let m = this.typers.get(conv);
    if (!m) this.typers.set(conv, (m = new Map()));
    const had = m.has(user);
    clearTimeout(m.get(user));
    m.set(
      user,
      setTimeout(() => this.stopTyper(conv, user), ttlMs || this._hello?.limits.typing_ttl_ms || 6000),
    );
    if (!had) {
      this.emit("typing", { conv, users: this.typingIn(conv) });
      this.changed();
    }
  }

  private stopTyper(conv: string, user: string): void {
    const m = this.typers.get(conv);
    if (!m || !m.has(user)) return;
    clearTimeout(m.get(user));
    m.delete(user);
    if (m.size === 0) this.typers.delete(conv);
    this.emit("typing", { conv, users: this.typingIn(conv) });
    this.changed();
  }

  private clearTypers(conv: string): void {
    for (const user of [...(this.typers.get(conv)?.keys() ?? [])]) this.stopTyper(conv, user);
  }

  // -------------------------------------------------------------------------------------------
  // presence
  // -------------------------------------------------------------------------------------------

  /**
   * Shows the presence of `users` from now on (replacing the previous list; at most 256). The
   * server only reports users who share a conversation with this one; others stay unknown.
   */
  watchPresence(users: string[]): Promise<void> {
    const max = this._hello?.limits.presence_watch_max || 256;
    const list = [...new Set(users.filter((u) => isValidId(u) && u !== this.user))].sort().slice(0, max);
    if (list.length === this.watched.length && list.every((u, i) => u === this.watched[i])) return Promise.resolve();
    this.watched = list;
    return this.ready ? this.subscribePresence() : Promise.resolve();
  }

  private async subscribePresence(): Promise<void> {
    const users = this.watched;
    try {
      const ans = await this.request<"presence_subscribe">({ type: "presence_subscribe", users }, { persistent: false });
      this.presenceLeftOut(users, ans.users);
    } catch (err) {
      if (err instanceof ChatError && err.code !== "disconnected" && err.code !== "closed") {
        // unavailable after retries, or refused: try again later with the then current list
        setTimeout(() => {
          if (this.ready && this.watched === users) void this.subscribePresence();
        }, 5000);
      }
    }
  }

  /**
   * Who may be seen is checked when a subscription is made, and a one-to-one peer becomes
   * visible with the conversation's first message: subscribe again then.
   */
  private presenceMayHaveOpened(c: Conversation, me: string): void {
    const peer = dmPeer(c.id, me);
    if (!peer || this.presenceStates.has(peer) || !this.watched.includes(peer)) return;
    this.presenceRetryCount = 0;
    this.resubscribePresenceSoon();
  }

  /**
   * The server's view of who shares a conversation may trail the messages a device already
   * holds (the first message of a one-to-one conversation reaches the peer about when the
   * server's conversation index learns of it). A watched one-to-one peer with messages that the
   * answer left out is asked for again, a few times, further apart each time.
   */
  private presenceLeftOut(asked: string[], answered: PresenceState[]): void {
    const me = this.user;
    if (!me || asked !== this.watched) return;
    const seen = new Set(answered.map((p) => p.user));
    const expected = asked.some((u) => !seen.has(u) && !this.presenceStates.has(u) && (this.convs.get(dmId(me, u))?.latest ?? 0) > 0);
    if (!expected) {
      this.presenceRetryCount = 0;
      return;
    }
    if (this.presenceRetryCount >= PRESENCE_RETRIES) return;
    this.presenceRetryCount++;
    this.resubscribePresenceSoon();
  }

  private resubscribePresenceSoon(): void {
    if (this.presenceRetry) return;
    this.presenceRetry = setTimeout(() => {
      this.presenceRetry = undefined;
      if (this.ready) void this.subscribePresence();
    }, 500 * 2 ** this.presenceRetryCount);
  }

  /** Asks for the presence of `users` now (answers list only those the user may see). */
  async queryPresence(users: string[]): Promise<PresenceState[]> {
    const ans = await this.request<"presence">({ type: "presence", users });
    return ans.users;
  }

  /** The last known presence of `user` (undefined: not known, or not visible to this user). */
  presenceOf(user: string): PresenceState | undefined {
    return this.presenceStates.get(user);
  }

  private applyPresence(users: PresenceState[]): void {
    for (const p of users) {
      this.presenceStates.set(p.user, p);
      this.emit("presence", p);
    }
    if (users.length) this.changed();
  }

  // -------------------------------------------------------------------------------------------
  // groups
  // -------------------------------------------------------------------------------------------

  /** A group's name and current members (also updates what `conversation()` shows). */
  async groupInfo(conv: string): Promise<GroupInfoAnswer> {
    const ans = await this.request<"group_info">({ type: "group_info", conv });
    const c = this.conv(conv);
    c.name = ans.name;
    c.setRoster(
      ans.members.map((m) => [m.user, m.joined]),
      ans.seq,
    );
    c.admin = ans.members.some((m) => m.user === this.user && m.admin);
    this.changed();
    return ans;
  }

  // -------------------------------------------------------------------------------------------
  // media
  // -------------------------------------------------------------------------------------------

  /** Uploads without sending (e.g. a thumbnail); returns the reference to put in a message. */
  uploadMedia(conv: string, input: UploadInput): Promise<MediaRef> {
    if (!this.media) throw new TypeError("uploadMedia needs options.mediaUrl");
    return this.media.upload(conv, input);
  }

  /** A short-lived URL to fetch a message's media from (members only). */
  mediaDownloadUrl(mediaId: string): Promise<string> {
    if (!this.media) throw new TypeError("mediaDownloadUrl needs options.mediaUrl");
    return this.media.downloadUrl(mediaId);
  }

  // -------------------------------------------------------------------------------------------
  // views for apps
  // -------------------------------------------------------------------------------------------

  /** Makes sure `conv` is listed (e.g. a new one-to-one chat before its first message). */
  openConversation(conv: string): ConversationView {
    const known = this.convs.has(conv);
    const c = this.conv(conv);
    if (!known) void this.probe(c);
    this.changed();
    return this.conversationView(c);
  }

  /** A conversation this device never held: its newest messages, from where they start. */
  private async probe(c: Conversation): Promise<void> {
    try {
      const ans = await this.request<"history">({ type: "history", conv: c.id, limit: this.opts.initialMessages });
      const first = ans.messages[0];
      if (first && c.size === 0) c.startAt(first.seq - 1);
      for (const m of ans.messages) this.onMessage(m, false);
    } catch {
      // Not a member (yet), or offline: the conversation shows what arrives.
    }
  }

  /** Every conversation, the most recently active first. */
  conversations(): ConversationView[] {
    return [...this.convs.values()]
      .filter((c) => c.size > 0 || c.latest > 0 || this.hasOutbox(c.id) || c.kind === "dm")
      .map((c) => this.conversationView(c))
      .sort((a, b) => b.activity - a.activity || (a.id < b.id ? -1 : 1));
  }

  conversation(conv: string): ConversationView | undefined {
    const c = this.convs.get(conv);
    return c ? this.conversationView(c) : undefined;
  }

  /** The messages of `conv` held by this device, ascending by seq, then those on their way. */
  messages(conv: string): MessageView[] {
    const c = this.convs.get(conv);
    if (!c) return [];
    const out = c.messages().map((m) => this.viewOf(c, m));
    for (const e of this.outbox.values()) if (e.conv === conv) out.push(this.pendingView(e));
    return out;
  }

  private hasOutbox(conv: string): boolean {
    for (const e of this.outbox.values()) if (e.conv === conv) return true;
    return false;
  }

  private conversationView(c: Conversation): ConversationView {
    const me = this.user ?? "";
    const peer = c.kind === "dm" ? dmPeer(c.id, me) : undefined;
    const lastMsg = c.last();
    let last = lastMsg ? this.viewOf(c, lastMsg) : undefined;
    for (const e of this.outbox.values()) if (e.conv === c.id) last = this.pendingView(e);
    const members = c.members();
    return {
      id: c.id,
      kind: c.kind,
      title: c.kind === "dm" ? (peer ?? c.id) : (c.name ?? c.id.slice(2)),
      ...(peer ? { peer } : {}),
      unread: c.unread(me),
      latest: c.latest,
      memberCount: c.memberCount,
      ...(members ? { members } : {}),
      ...(last ? { last } : {}),
      activity: Math.max(lastMsg?.ts ?? 0, last && last.seq === undefined ? last.ts : 0, c.createdAt),
      admin: c.admin,
      ...(c.left !== undefined ? { left: c.left } : {}),
      hasOlder: c.hasOlder(),
    };
  }

  private viewOf(c: Conversation, m: Message): MessageView {
    const mine = m.from === this.user;
    const local = this.localMedia.get(m.id);
    return {
      key: `${m.conv}/${m.id}`,
      conv: m.conv,
      seq: m.seq,
      from: m.from,
      id: m.id,
      ts: m.ts,
      body: m.body,
      ...(m.media ? { media: m.media } : {}),
      ...(m.event ? { event: m.event } : {}),
      mine,
      ...(mine ? { status: c.statusOf(m.seq, this.user!) } : {}),
      ...(mine && local ? { localMedia: local } : {}),
    };
  }

  private pendingView(e: OutboxEntry): MessageView {
    const f = e.frame;
    const local = this.localMedia.get(e.id);
    return {
      key: `${e.conv}/${e.id}`,
      conv: e.conv,
      from: this.user ?? "",
      id: e.id,
      ts: e.createdAt,
      body: f.type === "send" ? f.body : "",
      ...(f.type === "send" && f.media ? { media: f.media } : {}),
      mine: true,
      status: e.status,
      ...(e.error ? { error: e.error } : {}),
      ...(local ? { localMedia: local } : {}),
    };
  }

  private changed(): void {
    if (this.changeQueued) return;
    this.changeQueued = true;
    queueMicrotask(() => {
      this.changeQueued = false;
      this.emit("change", undefined);
    });
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
