// One conversation as a device knows it: the messages it holds, ordered and deduplicated by seq,
// the cursor up to which it has everything (the `sync` cursor), the members' receipt watermarks
// and, for groups, who the members are. Pure bookkeeping: no I/O, no timers.

import { dmMembers } from "./ids.js";
import type { GroupEvent, Message } from "./protocol.js";

export type ConversationKind = "dm" | "group";

export interface Marks {
  delivered: number;
  read: number;
}

/** A missing range of seqs: `after < seq < before` (`before` absent: everything after `after`). */
export interface Gap {
  after: number;
  before?: number;
}

export class Conversation {
  readonly kind: ConversationKind;
  name: string | undefined;
  memberCount = 0;
  /** The seq the user sees the conversation from (the event that added it). */
  joined = 1;
  /** Set once the user is no longer a member: the seq of the event that removed it. */
  left: number | undefined;
  admin = false;
  /** The newest seq known to exist (from messages, sync, conversation lists, watermarks). */
  latest = 0;
  /**
   * Every message with seq in (start, top] is here, where start is where this device began
   * holding the conversation; older ones are history, fetched on demand. The `sync` cursor.
   */
  top = 0;
  /** When this device first heard of it (orders conversations without messages). */
  readonly createdAt: number;

  private readonly byseq = new Map<number, Message>();
  private sorted: Message[] | undefined;
  private readonly marks = new Map<string, Marks>();
  /** Group members and the seq each joined at, as of `rosterSeq`; undefined until known. */
  private roster: Map<string, number> | undefined;
  private rosterSeq = 0;

  constructor(
    readonly id: string,
    now: number,
  ) {
    this.kind = id.startsWith("g~") ? "group" : "dm";
    this.createdAt = now;
    const dm = dmMembers(id);
    if (dm) {
      this.roster = new Map(dm.map((u) => [u, 1]));
      this.memberCount = 2;
    }
  }

  /** Stores `m` unless it is already here. Returns whether it was new. */
  add(m: Message): boolean {
    if (this.byseq.has(m.seq)) return false;
    this.byseq.set(m.seq, m);
    this.sorted = undefined;
    if (m.seq > this.latest) this.latest = m.seq;
    if (m.event) this.applyEvent(m.seq, m.from, m.event);
    this.advance();
    return true;
  }

  has(seq: number): boolean {
    return this.byseq.has(seq);
  }

  get size(): number {
    return this.byseq.size;
  }

  /** The messages held, ascending by seq. */
  messages(): readonly Message[] {
    if (!this.sorted) this.sorted = [...this.byseq.values()].sort((a, b) => a.seq - b.seq);
    return this.sorted;
  }

  last(): Message | undefined {
    const all = this.messages();
    return all[all.length - 1];
  }

  /** The oldest seq held (or top + 1 when none): history before it is older. */
  oldest(): number {
    return this.messages()[0]?.seq ?? this.top + 1;
  }

  /** Whether older messages than those held may exist for this user. */
  hasOlder(): boolean {
    return this.oldest() > Math.max(1, this.joined);
  }

  /** Moves `top` over the messages held right above it. Returns whether it moved. */
  advance(): boolean {
    const before = this.top;
    while (this.byseq.has(this.top + 1)) this.top++;
    return this.top !== before;
  }

  /** Where this device starts holding the conversation: messages up to `seq` count as history. */
  startAt(seq: number): void {
    if (seq > this.top) {
      this.top = seq;
      this.advance();
    }
  }

  /** The first range of seqs above `top` known to exist but not held, if any. */
  missing(): Gap | undefined {
    if (this.latest <= this.top) return undefined;
    let above: number | undefined;
    for (const seq of this.byseq.keys()) {
      if (seq > this.top && (above === undefined || seq < above)) above = seq;
    }
    if (above === undefined) return { after: this.top };
    return above > this.top + 1 ? { after: this.top, before: above } : undefined;
  }

  /**
   * A fill of `gap` came back complete: what it did not bring does not exist for this user
   * (before it joined, after it left). Moves `top` past the range.
   */
  closeGap(gap: Gap): void {
    const end = gap.before !== undefined ? gap.before - 1 : this.latest;
    if (end > this.top) this.top = end;
    this.advance();
  }

  /** Raises a member's watermarks (they only ever grow, whatever order receipts arrive in). */
  mark(user: string, delivered: number, read: number): boolean {
    const m = this.marks.get(user) ?? { delivered: 0, read: 0 };
    const next = { delivered: Math.max(m.delivered, delivered, read), read: Math.max(m.read, read) };
    if (next.delivered === m.delivered && next.read === m.read && this.marks.has(user)) return false;
    this.marks.set(user, next);
    if (next.delivered > this.latest) this.latest = next.delivered;
    return true;
  }

  marksOf(user: string): Marks {
    return this.marks.get(user) ?? { delivered: 0, read: 0 };
  }

  /** Messages after `me`'s read watermark, counted from when it joined. */
  unread(me: string): number {
    const from = Math.max(this.marksOf(me).read, this.joined - 1);
    const end = this.left ?? this.latest;
    return Math.max(0, end - from);
  }

  /** Replaces the group's member list (as of `seq`) with `members`. */
  setRoster(members: Iterable<[string, number]>, seq: number): void {
    if (this.kind !== "group" || seq < this.rosterSeq) return;
    this.roster = new Map(members);
    this.rosterSeq = seq;
    this.memberCount = this.roster.size;
  }

  members(): string[] | undefined {
    return this.roster ? [...this.roster.keys()].sort() : undefined;
  }

  /**
   * What `me`'s message `seq` has reached: `read` once every other member who was there when it
   * was sent read it, `delivered` once each has it on some device, else `sent`.
   */
  statusOf(seq: number, me: string): "sent" | "delivered" | "read" {
    if (!this.roster) return "sent";
    const others = [...this.roster].filter(([user, joined]) => user !== me && joined <= seq);
    if (others.length === 0) return "sent";
    if (others.every(([u]) => this.marksOf(u).read >= seq)) return "read";
    if (others.every(([u]) => this.marksOf(u).delivered >= seq)) return "delivered";
    return "sent";
  }

  private applyEvent(seq: number, from: string, ev: GroupEvent): void {
    if (ev.kind === "created" || ev.kind === "renamed") {
      if (seq >= this.rosterSeq || this.name === undefined) this.name = ev.name;
    }
    // Membership changes apply on top of a known member list, in order; a list learned at a
    // later seq (sync, group_info) already has the older ones in it.
    if (seq <= this.rosterSeq) return;
    if (!this.roster && ev.kind !== "created") return;
    const roster = this.roster ?? new Map<string, number>();
    switch (ev.kind) {
      case "created":
        roster.clear();
        roster.set(from, seq);
        for (const u of ev.members) roster.set(u, seq);
        break;
      case "added":
        for (const u of ev.members) roster.set(u, seq);
        break;
      case "removed":
        for (const u of ev.members) roster.delete(u);
        break;
      case "left":
        roster.delete(from);
        break;
      default:
        return;
    }
    this.roster = roster;
    this.rosterSeq = seq;
    this.memberCount = roster.size;
  }
}
