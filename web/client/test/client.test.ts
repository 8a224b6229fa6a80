import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { backoffDelay, ChatError, dmId } from "../src/index.js";
import { connect, FakeSocket, hello, msg, newClient, settle } from "./fake.js";

const AB = dmId("alice", "bob");

beforeEach(() => {
  vi.useFakeTimers();
  FakeSocket.all = [];
});
afterEach(() => {
  vi.useRealTimers();
});

describe("backoff", () => {
  it("doubles up to the cap, with jitter between half the ceiling and the ceiling", () => {
    const opts = { baseMs: 100, maxMs: 1000 };
    expect(backoffDelay(0, opts, () => 0)).toBe(50);
    expect(backoffDelay(0, opts, () => 0.999999)).toBe(100);
    expect(backoffDelay(2, opts, () => 0)).toBe(200);
    expect(backoffDelay(3, opts, () => 0.5)).toBe(600);
    expect(backoffDelay(10, opts, () => 0.999999)).toBe(1000);
    expect(backoffDelay(10, opts, () => 0)).toBe(500);
    const seen = new Set(Array.from({ length: 50 }, () => backoffDelay(4, opts)));
    expect(seen.size).toBeGreaterThan(1);
  });
});

describe("connecting", () => {
  it("connects with the token and device, and starts a first sync from the newest messages", async () => {
    const client = newClient({ device: "phone-1", initialMessages: 5 });
    const states: string[] = [];
    client.on("state", (s) => states.push(s));
    client.connect();
    await settle();
    const sock = FakeSocket.last();
    const url = new URL(sock.url);
    expect(url.searchParams.get("token")).toBe("tok");
    expect(url.searchParams.get("device")).toBe("phone-1");
    sock.accept();
    sock.push(hello("alice", "phone-1"));
    await settle();
    expect(states).toEqual(["connecting", "open"]);
    expect(client.user).toBe("alice");
    const list = sock.lastFrame("conversations");
    sock.push({
      type: "conversations",
      req: list.req,
      more: false,
      convs: [
        { conv: AB, member_count: 2, latest: 40, unread: 2, joined: 1 },
        { conv: "g~climb", name: "Climbing", member_count: 3, latest: 3, unread: 3, joined: 2 },
      ],
    });
    await settle();
    const sync = sock.lastFrame("sync");
    expect(sync.since).toBeUndefined();
    // five before the newest; never before the user joined
    expect(sync.cursors).toEqual({ [AB]: 35, "g~climb": 1 });
    const convs = client.conversations();
    expect(convs.map((c) => [c.title, c.unread])).toEqual(
      expect.arrayContaining([
        ["bob", 2],
        ["Climbing", 2],
      ]),
    );
  });

  it("fetches a token from the function before every connection", async () => {
    let n = 0;
    const client = newClient({ token: async () => `t${++n}` });
    const sock = await connect(client, "alice");
    expect(new URL(sock.url).searchParams.get("token")).toBe("t1");
    sock.drop(4002);
    await vi.advanceTimersByTimeAsync(1000);
    expect(FakeSocket.all).toHaveLength(2);
    expect(new URL(FakeSocket.last().url).searchParams.get("token")).toBe("t2");
  });

  it("reconnects with growing jittered delays, and resumes with the sync token and cursors", async () => {
    const client = newClient({ backoff: { baseMs: 1000, maxMs: 8000 }, random: () => 0 });
    const sock = await connect(client, "alice", { convs: [{ conv: AB, latest: 2 }], messages: [msg(AB, 1, "bob"), msg(AB, 2, "bob")] });
    sock.push({ type: "message", ...msg(AB, 3, "bob") });
    sock.drop(1001);
    expect(client.state).toBe("reconnecting");
    // first retry after 500 ms (half of the 1 s ceiling, random = 0)
    await vi.advanceTimersByTimeAsync(499);
    expect(FakeSocket.all).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(FakeSocket.all).toHaveLength(2);
    // that one fails too: the next waits 1000 ms
    FakeSocket.last().drop(1006);
    await vi.advanceTimersByTimeAsync(999);
    expect(FakeSocket.all).toHaveLength(2);
    await vi.advanceTimersByTimeAsync(1);
    const again = FakeSocket.last();
    expect(FakeSocket.all).toHaveLength(3);
    again.accept();
    again.push(hello("alice"));
    await settle();
    expect(again.frames("conversations")).toHaveLength(0);
    const sync = again.lastFrame("sync");
    expect(sync.since).toBe("v1.1");
    expect(sync.cursors).toEqual({ [AB]: 3 });
  });

  it("pages a sync with the updated cursors and keeps the last page's token", async () => {
    const client = newClient();
    client.connect();
    await settle();
    const sock = FakeSocket.last();
    sock.accept();
    sock.push(hello("alice"));
    await settle();
    sock.push({ type: "conversations", req: sock.lastFrame("conversations").req, more: false, convs: [] });
    await settle();
    const s1 = sock.lastFrame("sync");
    sock.push({
      type: "sync",
      req: s1.req,
      more: true,
      next: "n1",
      convs: [{ conv: AB, latest: 3, unread: 3, members: [] }],
      messages: [msg(AB, 1, "bob"), msg(AB, 2, "bob")],
    });
    await settle();
    const s2 = sock.lastFrame("sync");
    expect(s2.req).not.toBe(s1.req);
    expect(s2.next).toBe("n1");
    expect(s2.cursors).toEqual({ [AB]: 2 });
    let synced = false;
    client.on("synced", () => (synced = true));
    sock.push({ type: "sync", req: s2.req, more: false, token: "v1.9", convs: [], messages: [msg(AB, 3, "bob")] });
    await settle();
    expect(synced).toBe(true);
    expect(client.messages(AB).map((m) => m.seq)).toEqual([1, 2, 3]);
    sock.drop();
    await vi.advanceTimersByTimeAsync(60_000);
    const next = FakeSocket.last();
    next.accept();
    next.push(hello("alice"));
    await settle();
    expect(next.lastFrame("sync").since).toBe("v1.9");
  });

  it("starts over without `since` when the server cannot use the token", async () => {
    const client = newClient();
    const sock = await connect(client, "alice");
    sock.drop();
    await vi.advanceTimersByTimeAsync(60_000);
    const next = FakeSocket.last();
    next.accept();
    next.push(hello("alice"));
    await settle();
    const s = next.lastFrame("sync");
    expect(s.since).toBe("v1.1");
    next.push({ type: "error", code: "invalid_token", message: "bad token", req: s.req });
    await settle();
    // a first sync again: the conversation list, then sync without since
    next.push({ type: "conversations", req: next.lastFrame("conversations").req, more: false, convs: [] });
    await settle();
    const retry = next.lastFrame("sync");
    expect(retry.req).not.toBe(s.req);
    expect(retry.since).toBeUndefined();
  });

  it("drops a connection that goes silent and reconnects", async () => {
    const client = newClient();
    const sock = await connect(client, "alice");
    sock.send = (data: string) => void sock.sent.push(JSON.parse(data)); // a dead peer: no pong
    expect(FakeSocket.all).toHaveLength(1);
    // heartbeat 15 s: pings go out, nothing comes back
    await vi.advanceTimersByTimeAsync(15_000);
    expect(FakeSocket.last().frames("ping").length).toBeGreaterThan(0);
    await vi.advanceTimersByTimeAsync(30_000);
    expect(client.state).toBe("reconnecting");
    await vi.advanceTimersByTimeAsync(60_000);
    expect(FakeSocket.all.length).toBeGreaterThan(1);
  });

  it("stops for good on close", async () => {
    const client = newClient();
    const sock = await connect(client, "alice");
    const p = client.send(AB, "never acked");
    client.close();
    expect(sock.closedWith).toBe(1000);
    await expect(p.stamped).rejects.toMatchObject({ code: "closed" });
    await vi.advanceTimersByTimeAsync(120_000);
    expect(FakeSocket.all).toHaveLength(1);
    expect(client.state).toBe("closed");
  });
});

describe("sending", () => {
  it("retries with the same client id until `sent`, then waits for the stamped message", async () => {
    const client = newClient({ ackTimeoutMs: 5000 });
    const sock = await connect(client, "alice");
    const p = client.send(AB, "hello");
    expect(sock.lastFrame("send")).toEqual({ type: "send", conv: AB, id: p.id, body: "hello" });
    expect(client.messages(AB).map((m) => [m.body, m.status])).toEqual([["hello", "pending"]]);
    await vi.advanceTimersByTimeAsync(5000);
    await vi.advanceTimersByTimeAsync(5000);
    const sends = sock.frames("send");
    expect(sends.length).toBeGreaterThanOrEqual(2);
    expect(new Set(sends.map((f) => f.id))).toEqual(new Set([p.id]));
    sock.push({ type: "sent", id: p.id, conv: AB, ts: 1 });
    await settle();
    expect(client.messages(AB)[0]?.status).toBe("sent");
    const count = sock.frames("send").length;
    await vi.advanceTimersByTimeAsync(60_000);
    expect(sock.frames("send")).toHaveLength(count);
    sock.push({ type: "message", ...msg(AB, 1, "alice", "hello", p.id) });
    await expect(p.stamped).resolves.toMatchObject({ seq: 1, id: p.id });
    const shown = client.messages(AB);
    expect(shown).toHaveLength(1);
    expect(shown[0]).toMatchObject({ seq: 1, body: "hello", mine: true, status: "sent" });
  });

  it("sends what was not acknowledged again after a reconnect, in order, with the same ids", async () => {
    const client = newClient();
    const sock = await connect(client, "alice");
    const a = client.send(AB, "one");
    const b = client.send(AB, "two");
    sock.push({ type: "sent", id: a.id, conv: AB, ts: 1 });
    sock.drop();
    const offline = client.send(AB, "three");
    await vi.advanceTimersByTimeAsync(60_000);
    const next = FakeSocket.last();
    next.accept();
    next.push(hello("alice"));
    await settle();
    expect(next.frames("send").map((f) => [f.id, f.body])).toEqual([
      [b.id, "two"],
      [offline.id, "three"],
    ]);
  });

  it("waits `retry_after_ms` on rate_limited, and fails for good on a refusal", async () => {
    const client = newClient();
    const sock = await connect(client, "alice");
    const p = client.send(AB, "fast");
    sock.push({ type: "error", code: "rate_limited", message: "slow down", id: p.id, retry_after_ms: 700 });
    await vi.advanceTimersByTimeAsync(699);
    expect(sock.frames("send")).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(sock.frames("send")).toHaveLength(2);
    expect(sock.lastFrame("send").id).toBe(p.id);

    const q = client.send("g~climb", "let me in");
    sock.push({ type: "sent", id: q.id, conv: "g~climb", ts: 1 });
    sock.push({ type: "error", code: "not_member", message: "not a member", id: q.id, conv: "g~climb" });
    await expect(q.stamped).rejects.toBeInstanceOf(ChatError);
    await expect(q.stamped).rejects.toMatchObject({ code: "not_member" });
    expect(client.messages("g~climb")[0]?.status).toBe("failed");
  });
});

describe("ordering, dedupe and gaps", () => {
  it("orders by seq and keeps one copy of each, whatever the arrival order", async () => {
    const client = newClient();
    const sock = await connect(client, "alice", { convs: [{ conv: AB, latest: 0 }] });
    for (const seq of [1, 3, 2, 2, 1, 3]) sock.push({ type: "message", ...msg(AB, seq, "bob") });
    await settle();
    expect(client.messages(AB).map((m) => m.seq)).toEqual([1, 2, 3]);
  });

  it("fills a gap with a history range and then acknowledges delivery up to the top", async () => {
    const client = newClient();
    const sock = await connect(client, "alice", { convs: [{ conv: AB, latest: 1 }], messages: [msg(AB, 1, "bob")] });
    await vi.advanceTimersByTimeAsync(200);
    expect(sock.lastFrame("delivered")).toEqual({ type: "delivered", conv: AB, seq: 1 });
    sock.push({ type: "message", ...msg(AB, 4, "bob") });
    await settle();
    const h = sock.lastFrame("history");
    expect(h).toMatchObject({ conv: AB, after: 1, before: 4 });
    // no delivered beyond what is held without a gap
    await vi.advanceTimersByTimeAsync(200);
    expect(sock.lastFrame("delivered").seq).toBe(1);
    sock.push({ type: "history", req: h.req, conv: AB, more: false, messages: [msg(AB, 2, "bob"), msg(AB, 3, "bob")] });
    await vi.advanceTimersByTimeAsync(200);
    expect(client.messages(AB).map((m) => m.seq)).toEqual([1, 2, 3, 4]);
    expect(sock.lastFrame("delivered")).toEqual({ type: "delivered", conv: AB, seq: 4 });
  });

  it("asks again while a fill says there is more", async () => {
    const client = newClient();
    const sock = await connect(client, "alice", { convs: [{ conv: AB, latest: 1 }], messages: [msg(AB, 1, "bob")] });
    sock.push({ type: "message", ...msg(AB, 6, "bob") });
    await settle();
    const h1 = sock.lastFrame("history");
    sock.push({ type: "history", req: h1.req, conv: AB, more: true, messages: [msg(AB, 2, "bob"), msg(AB, 3, "bob")] });
    await settle();
    const h2 = sock.lastFrame("history");
    expect(h2).toMatchObject({ after: 3, before: 6 });
    sock.push({ type: "history", req: h2.req, conv: AB, more: false, messages: [msg(AB, 4, "bob"), msg(AB, 5, "bob")] });
    await settle();
    expect(client.messages(AB).map((m) => m.seq)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(sock.frames("history")).toHaveLength(2);
  });

  it("treats what a complete fill did not bring as not there for the user (before it joined)", async () => {
    const client = newClient();
    const sock = await connect(client, "alice");
    // added to a group at seq 5: the first push it gets is the event
    sock.push({ type: "message", ...msg("g~x", 5, "bob", ""), event: { kind: "added", members: ["alice"] } });
    await settle();
    const h = sock.lastFrame("history");
    expect(h).toMatchObject({ conv: "g~x", after: 0, before: 5 });
    sock.push({ type: "history", req: h.req, conv: "g~x", more: false, messages: [] });
    await settle();
    sock.push({ type: "message", ...msg("g~x", 6, "bob") });
    await settle();
    expect(sock.frames("history")).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(200);
    expect(sock.lastFrame("delivered")).toEqual({ type: "delivered", conv: "g~x", seq: 6 });
  });

  it("loads older history on demand, before the oldest message held", async () => {
    const client = newClient({ initialMessages: 2 });
    const sock = await connect(client, "alice", { convs: [{ conv: AB, latest: 10 }], messages: [msg(AB, 9, "bob"), msg(AB, 10, "bob")] });
    expect(client.conversation(AB)?.hasOlder).toBe(true);
    const p = client.loadOlder(AB, 50);
    const h = sock.lastFrame("history");
    expect(h).toMatchObject({ conv: AB, before: 9, limit: 50 });
    sock.push({ type: "history", req: h.req, conv: AB, more: false, messages: [1, 2, 3, 4, 5, 6, 7, 8].map((s) => msg(AB, s, "bob")) });
    await expect(p).resolves.toBe(8);
    expect(client.messages(AB).map((m) => m.seq)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    expect(client.conversation(AB)?.hasOlder).toBe(false);
  });
});

describe("receipts and unread counts", () => {
  it("shows sent, delivered and read as the other member's watermarks move", async () => {
    const client = newClient();
    const sock = await connect(client, "alice");
    const p = client.send(AB, "hi");
    sock.push({ type: "sent", id: p.id, conv: AB, ts: 1 });
    sock.push({ type: "message", ...msg(AB, 1, "alice", "hi", p.id) });
    await settle();
    const status = () => client.messages(AB).map((m) => m.status);
    expect(status()).toEqual(["sent"]);
    sock.push({ type: "receipt", conv: AB, user: "bob", delivered: 1, read: 0 });
    await settle();
    expect(status()).toEqual(["delivered"]);
    sock.push({ type: "receipt", conv: AB, user: "bob", delivered: 1, read: 1 });
    await settle();
    expect(status()).toEqual(["read"]);
    // an older receipt arriving late changes nothing
    sock.push({ type: "receipt", conv: AB, user: "bob", delivered: 0, read: 0 });
    await settle();
    expect(status()).toEqual(["read"]);
  });

  it("counts a group message read only when every other member read it", async () => {
    const client = newClient();
    const sock = await connect(client, "alice");
    const g = client.createGroup("Climbing", ["bob", "carol"]);
    const create = sock.lastFrame("group");
    expect(create).toMatchObject({ op: "create", conv: g.conv, name: "Climbing", members: ["bob", "carol"] });
    sock.push({ type: "message", ...msg(g.conv, 1, "alice", "", create.id), event: { kind: "created", name: "Climbing", members: ["bob", "carol"] } });
    const p = client.send(g.conv, "saturday?");
    sock.push({ type: "message", ...msg(g.conv, 2, "alice", "saturday?", p.id) });
    await settle();
    const status = () => client.messages(g.conv).find((m) => m.seq === 2)?.status;
    sock.push({ type: "receipt", conv: g.conv, user: "bob", delivered: 2, read: 2 });
    await settle();
    expect(status()).toBe("sent");
    sock.push({ type: "receipt", conv: g.conv, user: "carol", delivered: 2, read: 0 });
    await settle();
    expect(status()).toBe("delivered");
    sock.push({ type: "receipt", conv: g.conv, user: "carol", delivered: 2, read: 2 });
    await settle();
    expect(status()).toBe("read");
    expect(client.conversation(g.conv)).toMatchObject({ title: "Climbing", memberCount: 3 });
  });

  it("counts unread messages and sends `read` when the user saw them", async () => {
    const client = newClient();
    const sock = await connect(client, "alice", { convs: [{ conv: AB, latest: 0 }] });
    sock.push({ type: "message", ...msg(AB, 1, "bob") });
    sock.push({ type: "message", ...msg(AB, 2, "bob") });
    await settle();
    expect(client.conversation(AB)?.unread).toBe(2);
    client.markRead(AB);
    expect(client.conversation(AB)?.unread).toBe(0);
    await vi.advanceTimersByTimeAsync(200);
    expect(sock.lastFrame("read")).toEqual({ type: "read", conv: AB, seq: 2 });
    // read on another device: the server's receipt for the user lowers the count here too
    sock.push({ type: "message", ...msg(AB, 3, "bob") });
    await settle();
    expect(client.conversation(AB)?.unread).toBe(1);
    sock.push({ type: "receipt", conv: AB, user: "alice", delivered: 3, read: 3 });
    await settle();
    expect(client.conversation(AB)?.unread).toBe(0);
  });

  it("sends the highest receipts again after a refusal and after a reconnect", async () => {
    const client = newClient();
    const sock = await connect(client, "alice", { convs: [{ conv: AB, latest: 0 }] });
    sock.push({ type: "message", ...msg(AB, 1, "bob") });
    await settle();
    client.markRead(AB);
    await vi.advanceTimersByTimeAsync(200);
    expect(sock.frames("read")).toHaveLength(1);
    sock.push({ type: "error", code: "rate_limited", message: "slow", conv: AB, retry_after_ms: 300 });
    await vi.advanceTimersByTimeAsync(300);
    expect(sock.frames("read")).toHaveLength(2);
    sock.drop();
    await vi.advanceTimersByTimeAsync(60_000);
    const next = FakeSocket.last();
    next.accept();
    next.push(hello("alice"));
    await settle();
    expect(next.lastFrame("read")).toEqual({ type: "read", conv: AB, seq: 1 });
  });
});

describe("typing and presence", () => {
  it("shows who types until the indicator expires, is stopped, or their message arrives", async () => {
    const client = newClient();
    const sock = await connect(client, "alice");
    sock.push({ type: "typing", conv: AB, user: "bob", active: true, ttl_ms: 6000 });
    await settle();
    expect(client.typingIn(AB)).toEqual(["bob"]);
    await vi.advanceTimersByTimeAsync(5999);
    expect(client.typingIn(AB)).toEqual(["bob"]);
    await vi.advanceTimersByTimeAsync(1);
    expect(client.typingIn(AB)).toEqual([]);

    sock.push({ type: "typing", conv: AB, user: "bob", active: true, ttl_ms: 6000 });
    sock.push({ type: "message", ...msg(AB, 1, "bob") });
    await settle();
    expect(client.typingIn(AB)).toEqual([]);

    sock.push({ type: "typing", conv: AB, user: "bob", active: true, ttl_ms: 6000 });
    sock.push({ type: "typing", conv: AB, user: "bob", active: false, ttl_ms: 6000 });
    await settle();
    expect(client.typingIn(AB)).toEqual([]);
  });

  it("sends typing at most every 3 s while the user types, and once when they stop", async () => {
    const client = newClient();
    const sock = await connect(client, "alice");
    for (let i = 0; i < 10; i++) {
      client.typing(AB);
      await vi.advanceTimersByTimeAsync(500);
    }
    expect(sock.frames("typing").filter((f) => f.active !== false)).toHaveLength(2);
    client.typing(AB, false);
    client.typing(AB, false);
    expect(sock.frames("typing").filter((f) => f.active === false)).toHaveLength(1);
  });

  it("subscribes to the users on screen, applies answers and pushes, and subscribes again after a reconnect", async () => {
    const client = newClient();
    const sock = await connect(client, "alice");
    void client.watchPresence(["bob", "carol", "bob"]);
    const sub = sock.lastFrame("presence_subscribe");
    expect(sub.users).toEqual(["bob", "carol"]);
    sock.push({ type: "presence", req: sub.req, users: [{ user: "bob", online: true }] });
    await settle();
    expect(client.presenceOf("bob")).toEqual({ user: "bob", online: true });
    expect(client.presenceOf("carol")).toBeUndefined();
    sock.push({ type: "presence", users: [{ user: "bob", online: false, last_seen: 42 }] });
    await settle();
    expect(client.presenceOf("bob")).toEqual({ user: "bob", online: false, last_seen: 42 });
    sock.drop();
    await vi.advanceTimersByTimeAsync(60_000);
    const next = FakeSocket.last();
    next.accept();
    next.push(hello("alice"));
    await settle();
    expect(next.lastFrame("presence_subscribe").users).toEqual(["bob", "carol"]);
  });

  it("subscribes again when a one-to-one peer it could not see yet gets a first message", async () => {
    const client = newClient();
    const sock = await connect(client, "alice");
    void client.watchPresence(["bob"]);
    const sub = sock.lastFrame("presence_subscribe");
    // no conversation with a message yet: bob is left out of the answer
    sock.push({ type: "presence", req: sub.req, users: [] });
    await settle();
    expect(client.presenceOf("bob")).toBeUndefined();
    sock.push({ type: "message", ...msg(AB, 1, "alice") });
    await vi.advanceTimersByTimeAsync(1000);
    const again = sock.frames("presence_subscribe");
    expect(again).toHaveLength(2);
    sock.push({ type: "presence", req: again[1]!.req, users: [{ user: "bob", online: true }] });
    await settle();
    expect(client.presenceOf("bob")?.online).toBe(true);
    // once visible, further messages change nothing
    sock.push({ type: "message", ...msg(AB, 2, "alice") });
    await vi.advanceTimersByTimeAsync(1000);
    expect(sock.frames("presence_subscribe")).toHaveLength(2);
  });

  it("asks again, a few times, for a one-to-one peer with messages whom the answer left out", async () => {
    const client = newClient();
    const sock = await connect(client, "bob");
    // the first message arrives before bob watches alice
    sock.push({ type: "message", ...msg(AB, 1, "alice") });
    await settle();
    void client.watchPresence(["alice"]);
    // the server's conversation index has not caught up yet: alice is left out, again and again
    for (let n = 1; n <= 6; n++) {
      const subs = sock.frames("presence_subscribe");
      expect(subs).toHaveLength(n);
      sock.push({ type: "presence", req: subs[n - 1]!.req, users: [] });
      await vi.advanceTimersByTimeAsync(20_000);
    }
    // five retries, then it stops asking
    expect(sock.frames("presence_subscribe")).toHaveLength(6);

    // a peer without messages is not asked for again
    const other = newClient();
    const sock2 = await connect(other, "bob");
    void other.watchPresence(["carol"]);
    sock2.push({ type: "presence", req: sock2.lastFrame("presence_subscribe").req, users: [] });
    await vi.advanceTimersByTimeAsync(20_000);
    expect(sock2.frames("presence_subscribe")).toHaveLength(1);
  });

  it("stops asking once the peer shows up", async () => {
    const client = newClient();
    const sock = await connect(client, "bob");
    sock.push({ type: "message", ...msg(AB, 1, "alice") });
    await settle();
    void client.watchPresence(["alice"]);
    sock.push({ type: "presence", req: sock.lastFrame("presence_subscribe").req, users: [] });
    await vi.advanceTimersByTimeAsync(1500);
    const again = sock.frames("presence_subscribe");
    expect(again).toHaveLength(2);
    sock.push({ type: "presence", req: again[1]!.req, users: [{ user: "alice", online: true }] });
    await settle();
    expect(client.presenceOf("alice")?.online).toBe(true);
    await vi.advanceTimersByTimeAsync(20_000);
    expect(sock.frames("presence_subscribe")).toHaveLength(2);
  });
});

describe("media", () => {
  it("uploads through the presigned URL, then sends the reference", async () => {
    const calls: { url: string; method: string; headers: Record<string, string>; body: unknown }[] = [];
    const fakeFetch = async (input: RequestInfo | URL, init?: RequestInit): Promise<Response> => {
      const url = String(input);
      calls.push({ url, method: init?.method ?? "GET", headers: (init?.headers ?? {}) as Record<string, string>, body: init?.body });
      if (url.endsWith("/v1/uploads")) {
        return new Response(
          JSON.stringify({
            media_id: "0123456789abcdef0123456789abcdef",
            upload: {
              method: "PUT",
              url: "http://s3.test/chat-media/media/0123?sig=1",
              headers: { "content-length": "5", "content-type": "image/png", "if-none-match": "*" },
            },
            expires_at_ms: 1,
            orphan_at_ms: 2,
          }),
          { status: 200, headers: { "content-type": "application/json" } },
        );
      }
      if (url.startsWith("http://s3.test/")) return new Response(null, { status: 200 });
      return new Response("{}", { status: 404 });
    };
    const client = newClient({ mediaUrl: "http://media.test/", fetch: fakeFetch as typeof fetch });
    const sock = await connect(client, "alice");
    const blob = new Blob([new Uint8Array([1, 2, 3, 4, 5])], { type: "image/png" });
    const p = client.sendMedia(AB, { data: blob, width: 4, height: 3 }, "look");
    expect(client.messages(AB)[0]).toMatchObject({ status: "uploading", body: "look", localMedia: blob });
    await vi.waitFor(() => expect(sock.frames("send")).toHaveLength(1));
    const [post, put] = calls;
    expect(post).toMatchObject({ url: "http://media.test/v1/uploads", method: "POST" });
    expect(post!.headers.Authorization).toBe("Bearer tok");
    expect(JSON.parse(post!.body as string)).toEqual({ conv: AB, content_type: "image/png", size: 5 });
    expect(put).toMatchObject({ url: "http://s3.test/chat-media/media/0123?sig=1", method: "PUT", body: blob });
    expect(put!.headers).toEqual({ "content-type": "image/png", "if-none-match": "*" });
    expect(sock.lastFrame("send")).toEqual({
      type: "send",
      conv: AB,
      id: p.id,
      body: "look",
      media: { id: "0123456789abcdef0123456789abcdef", content_type: "image/png", size: 5, width: 4, height: 3 },
    });
  });

  it("fails a media message whose upload is refused, without sending it", async () => {
    const fakeFetch = async (): Promise<Response> =>
      new Response(JSON.stringify({ code: "unsupported_type", message: "no" }), { status: 415 });
    const client = newClient({ mediaUrl: "http://media.test", fetch: fakeFetch as typeof fetch });
    const sock = await connect(client, "alice");
    const p = client.sendMedia(AB, { data: new Blob(["x"], { type: "image/tiff" }) });
    await expect(p.stamped).rejects.toMatchObject({ code: "unsupported_type", status: 415 });
    expect(sock.frames("send")).toHaveLength(0);
    expect(client.messages(AB)[0]?.status).toBe("failed");
  });
});
