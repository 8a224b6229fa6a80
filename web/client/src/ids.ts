// Ids as the protocol defines them (docs/protocol.md, "Ids").

const ID_RE = /^[A-Za-z0-9_-]{1,64}$/;

/** A user, device, client message or request id: 1-64 characters of `[A-Za-z0-9_-]`. */
export function isValidId(id: string): boolean {
  return ID_RE.test(id);
}

/** The one-to-one conversation of two different users: `dm~<a>~<b>`, the ids in byte order. */
export function dmId(a: string, b: string): string {
  if (!isValidId(a) || !isValidId(b)) throw new RangeError(`not a user id: ${isValidId(a) ? b : a}`);
  if (a === b) throw new RangeError("a one-to-one conversation needs two different users");
  // Ids are ASCII, so UTF-16 order is byte order.
  return a < b ? `dm~${a}~${b}` : `dm~${b}~${a}`;
}

/** The two members of a one-to-one conversation id, or undefined for anything else. */
export function dmMembers(conv: string): [string, string] | undefined {
  const parts = conv.split("~");
  if (parts.length !== 3 || parts[0] !== "dm") return undefined;
  const [, a, b] = parts as [string, string, string];
  return isValidId(a) && isValidId(b) && a < b ? [a, b] : undefined;
}

/** The other member of a one-to-one conversation, seen from `me`. */
export function dmPeer(conv: string, me: string): string | undefined {
  const members = dmMembers(conv);
  if (!members || !members.includes(me)) return undefined;
  return members[0] === me ? members[1] : members[0];
}

export function isGroupId(conv: string): boolean {
  return conv.startsWith("g~") && isValidId(conv.slice(2));
}

/** 128 random bits in hex: client message ids, group ids, device ids. */
export function randomId(): string {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A new group id (`g~<random>`). */
export function newGroupId(): string {
  return `g~${randomId()}`;
}
