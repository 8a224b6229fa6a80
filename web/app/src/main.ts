// The chat web app: sign in, conversation list, conversation view. Plain DOM on @chat/client;
// everything it shows comes from the client's state, re-rendered (once per frame) on `change`.

import "./style.css";
import {
  ChatClient,
  ChatError,
  dmId,
  dmPeer,
  isValidId,
  randomId,
  type ConversationView,
  type GroupEvent,
  type MessageView,
} from "@chat/client";
import { h, clear } from "./dom.js";

interface AppConfig {
  gateway_url: string;
  media_url: string;
  dev_tokens: boolean;
}

const root = document.getElementById("app")!;
const store = {
  get user(): string | null {
    return localStorage.getItem("chat.user");
  },
  set user(u: string | null) {
    if (u) localStorage.setItem("chat.user", u);
    else localStorage.removeItem("chat.user");
  },
  get token(): string | null {
    return sessionStorage.getItem("chat.token");
  },
  set token(t: string | null) {
    if (t) sessionStorage.setItem("chat.token", t);
    else sessionStorage.removeItem("chat.token");
  },
  /** One device id per browser profile: the server's cursors and sync tokens are per device. */
  get device(): string {
    let d = localStorage.getItem("chat.device");
    if (!d) localStorage.setItem("chat.device", (d = `web-${randomId().slice(0, 12)}`));
    return d;
  },
};

async function loadConfig(): Promise<AppConfig> {
  try {
    const res = await fetch("/config.json", { cache: "no-store" });
    if (res.ok) return (await res.json()) as AppConfig;
  } catch {
    // served by something else: use the defaults
  }
  return { gateway_url: "/ws", media_url: "", dev_tokens: false };
}

// -----------------------------------------------------------------------------------------------
// sign in
// -----------------------------------------------------------------------------------------------

async function devToken(user: string): Promise<{ token: string; expires_at_ms: number }> {
  const res = await fetch(`/dev/token?user=${encodeURIComponent(user)}`, { cache: "no-store" });
  const body = (await res.json().catch(() => ({}))) as { token?: string; expires_at_ms?: number; message?: string };
  if (!res.ok || !body.token) throw new Error(body.message || `token endpoint answered ${res.status}`);
  return { token: body.token, expires_at_ms: body.expires_at_ms ?? Date.now() + 3600_000 };
}

function showSignIn(config: AppConfig, problem?: string): void {
  clear(root);
  const user = h("input", {
    id: "signin-user",
    name: "user",
    placeholder: "alice",
    autocomplete: "username",
    autocapitalize: "none",
    spellcheck: "false",
    required: true,
    pattern: "[A-Za-z0-9_\\-]{1,64}",
    value: store.user ?? "",
  });
  const token = h("textarea", { id: "signin-token", name: "token", rows: 3, placeholder: "eyJhbGciOi…" });
  const error = h("p", { class: "error", role: "alert" }, problem ?? "");
  const form = h(
    "form",
    { class: "signin-form" },
    h("h1", {}, "Chat"),
    config.dev_tokens
      ? [
          h("label", { for: "signin-user" }, "Sign in as"),
          user,
          h("p", { class: "hint" }, "Development sign-in: any user id (letters, digits, _ and -) gets a token from this local server."),
        ]
      : [h("label", { for: "signin-token" }, "Token"), token, h("p", { class: "hint" }, "Paste a token (e.g. from `chat token alice`).")],
    h("button", { type: "submit", class: "primary" }, "Sign in"),
    error,
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (config.dev_tokens) {
      const u = user.value.trim();
      if (!isValidId(u)) {
        error.textContent = "A user id is 1–64 letters, digits, _ or -.";
        return;
      }
      store.user = u;
      store.token = null;
    } else {
      store.token = token.value.trim();
      store.user = null;
    }
    start(config);
  });
  root.append(h("section", { class: "signin" }, form));
  (config.dev_tokens ? user : token).focus();
}

function tokenSource(config: AppConfig): () => Promise<string> {
  let cached: { token: string; expires_at_ms: number } | undefined;
  return async () => {
    if (!config.dev_tokens) {
      const t = store.token;
      if (!t) throw new Error("no token");
      return t;
    }
    if (!cached || cached.expires_at_ms - 60_000 < Date.now()) cached = await devToken(store.user!);
    return cached.token;
  };
}

// -----------------------------------------------------------------------------------------------
// the app
// -----------------------------------------------------------------------------------------------

let client: ChatClient | undefined;

async function start(config: AppConfig): Promise<void> {
  const getToken = tokenSource(config);
  try {
    await getToken();
  } catch (err) {
    store.user = null;
    showSignIn(config, `Cannot sign in: ${(err as Error).message}`);
    return;
  }
  client?.close();
  const c = new ChatClient({
    url: config.gateway_url || "/ws",
    mediaUrl: config.media_url || location.origin,
    token: getToken,
    device: store.device,
  });
  client = c;
  new ChatApp(c, () => {
    c.close();
    client = undefined;
    store.user = null;
    store.token = null;
    location.hash = "";
    showSignIn(config);
  });
  c.connect();
  window.addEventListener("online", () => c.reconnectNow());
}

const STATUS_LABEL: Record<string, string> = {
  uploading: "Uploading",
  pending: "Sending",
  sent: "Sent",
  delivered: "Delivered",
  read: "Read",
  failed: "Not sent",
};
const STATUS_ICON: Record<string, string> = {
  uploading: "⇡",
  pending: "◷",
  sent: "✓",
  delivered: "✓✓",
  read: "✓✓",
  failed: "!",
};

class ChatApp {
  private readonly el: HTMLElement;
  private readonly listEl: HTMLElement;
  private readonly meEl: HTMLElement;
  private readonly bannerEl: HTMLElement;
  private readonly newChatForm: HTMLFormElement;
  private readonly newGroupForm: HTMLFormElement;
  private readonly chatTitle: HTMLElement;
  private readonly chatSub: HTMLElement;
  private readonly messagesEl: HTMLElement;
  private readonly composer: HTMLFormElement;
  private readonly input: HTMLInputElement;
  private readonly fileInput: HTMLInputElement;
  private readonly previewEl: HTMLElement;
  private readonly emptyEl: HTMLElement;

  private open: string | undefined;
  private renderQueued = false;
  private readonly msgNodes = new Map<string, { sig: string; el: HTMLElement }>();
  private readonly convNodes = new Map<string, { sig: string; el: HTMLElement }>();
  private readonly objectUrls = new Map<string, string>();
  private pendingImage: { file: File; url: string; width?: number; height?: number } | undefined;
  private groupInfoAsked = new Set<string>();
  private stickToBottom = true;

  constructor(
    private readonly client: ChatClient,
    signOut: () => void,
  ) {
    clear(root);
    this.meEl = h("div", { class: "me" });
    this.bannerEl = h("div", { class: "banner", role: "status", hidden: true });
    this.listEl = h("ul", { class: "convs", "aria-label": "Conversations" });

    const newChatUser = h("input", { name: "user", placeholder: "user id, e.g. bob", autocapitalize: "none", spellcheck: "false", required: true });
    this.newChatForm = h(
      "form",
      { class: "new-form new-chat", hidden: true, "aria-label": "New chat" },
      newChatUser,
      h("button", { type: "submit", class: "primary" }, "Chat"),
    );
    this.newChatForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const other = newChatUser.value.trim();
      const me = this.client.user;
      if (!me || !isValidId(other) || other === me) {
        newChatUser.setCustomValidity("Enter another user's id");
        newChatUser.reportValidity();
        return;
      }
      newChatUser.value = "";
      this.newChatForm.hidden = true;
      this.navigate(dmId(me, other));
    });
    newChatUser.addEventListener("input", () => newChatUser.setCustomValidity(""));

    const groupName = h("input", { name: "name", placeholder: "group name", required: true, maxlength: 256 });
    const groupMembers = h("input", { name: "members", placeholder: "members: bob, carol", autocapitalize: "none", spellcheck: "false" });
    this.newGroupForm = h(
      "form",
      { class: "new-form new-group", hidden: true, "aria-label": "New group" },
      groupName,
      groupMembers,
      h("button", { type: "submit", class: "primary" }, "Create"),
    );
    this.newGroupForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const members = groupMembers.value
        .split(/[\s,]+/)
        .map((s) => s.trim())
        .filter((s) => s && s !== this.client.user);
      const bad = members.find((m) => !isValidId(m));
      if (bad) {
        groupMembers.setCustomValidity(`not a user id: ${bad}`);
        groupMembers.reportValidity();
        return;
      }
      const g = this.client.createGroup(groupName.value.trim(), [...new Set(members)]);
      groupName.value = groupMembers.value = "";
      this.newGroupForm.hidden = true;
      this.navigate(g.conv);
    });
    groupMembers.addEventListener("input", () => groupMembers.setCustomValidity(""));

    const toggle = (form: HTMLFormElement, other: HTMLFormElement) => () => {
      other.hidden = true;
      form.hidden = !form.hidden;
      if (!form.hidden) (form.querySelector("input") as HTMLInputElement).focus();
    };
    const listPane = h(
      "aside",
      { class: "list-pane" },
      h(
        "header",
        { class: "bar" },
        this.meEl,
        h(
          "div",
          { class: "actions" },
          h("button", { type: "button", class: "ghost", onclick: toggle(this.newChatForm, this.newGroupForm) }, "New chat"),
          h("button", { type: "button", class: "ghost", onclick: toggle(this.newGroupForm, this.newChatForm) }, "New group"),
          h("button", { type: "button", class: "ghost", title: "Sign out", onclick: signOut }, "Sign out"),
        ),
      ),
      this.bannerEl,
      this.newChatForm,
      this.newGroupForm,
      this.listEl,
    );

    this.chatTitle = h("h2", { class: "chat-title" });
    this.chatSub = h("div", { class: "chat-sub", "aria-live": "polite" });
    this.messagesEl = h("div", { class: "messages", role: "log", "aria-label": "Messages" });
    this.messagesEl.addEventListener("scroll", () => {
      const m = this.messagesEl;
      this.stickToBottom = m.scrollHeight - m.scrollTop - m.clientHeight < 40;
    });
    this.input = h("input", { name: "text", placeholder: "Message", autocomplete: "off", "aria-label": "Message" });
    this.fileInput = h("input", { type: "file", accept: "image/*", class: "file", "aria-label": "Attach an image" });
    this.previewEl = h("div", { class: "preview", hidden: true });
    this.composer = h(
      "form",
      { class: "composer" },
      h("label", { class: "attach ghost", title: "Attach an image" }, clipIcon(), this.fileInput),
      this.input,
      h("button", { type: "submit", class: "primary send", "aria-label": "Send" }, "➤"),
    );
    this.composer.addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.sendFromComposer();
    });
    this.input.addEventListener("input", () => {
      if (!this.open) return;
      this.client.typing(this.open, this.input.value.length > 0);
    });
    this.fileInput.addEventListener("change", () => {
      const file = this.fileInput.files?.[0];
      this.fileInput.value = "";
      if (file) void this.pickImage(file);
    });
    this.emptyEl = h("div", { class: "empty" }, h("p", {}, "Pick a conversation, or start a new chat."));
    const chatPane = h(
      "main",
      { class: "chat-pane" },
      h(
        "header",
        { class: "bar" },
        h("button", { type: "button", class: "ghost back", "aria-label": "Back", onclick: () => this.navigate(undefined) }, "‹"),
        h("div", { class: "chat-head" }, this.chatTitle, this.chatSub),
      ),
      this.messagesEl,
      this.previewEl,
      this.composer,
    );
    this.el = h("div", { class: "shell", "data-view": "list" }, listPane, chatPane, this.emptyEl);
    root.append(this.el);

    client.on("change", () => this.queueRender());
    client.on("message", ({ message }) => {
      if (message.conv === this.open) this.stickToBottomIfNear();
    });
    window.addEventListener("hashchange", () => this.route());
    document.addEventListener("visibilitychange", () => this.queueRender());
    this.route();
  }

  // ---- navigation ----

  private navigate(conv: string | undefined): void {
    const hash = conv ? `#/c/${encodeURIComponent(conv)}` : "#/";
    if (location.hash !== hash) location.hash = hash;
    else this.route();
  }

  private route(): void {
    const m = /^#\/c\/(.+)$/.exec(location.hash);
    const conv = m ? decodeURIComponent(m[1]!) : undefined;
    if (conv !== this.open) {
      if (this.open) this.client.typing(this.open, false);
      this.open = conv;
      this.clearPendingImage();
      this.input.value = "";
      this.stickToBottom = true;
      for (const n of this.msgNodes.values()) n.el.remove();
      this.msgNodes.clear();
      if (conv) {
        this.client.openConversation(conv);
        // Pushes can be missed: a chat that opens asks for its peer's presence now.
        const peer = this.client.user ? dmPeer(conv, this.client.user) : undefined;
        if (peer && this.client.state === "open") void this.client.queryPresence([peer]).catch(() => []);
      }
    }
    this.el.dataset.view = conv ? "chat" : "list";
    this.queueRender();
    if (conv && matchMedia("(min-width: 720px)").matches) this.input.focus();
  }

  // ---- sending ----

  private sendFromComposer(): void {
    const conv = this.open;
    if (!conv) return;
    const text = this.input.value.trim();
    const img = this.pendingImage;
    if (!text && !img) return;
    if (img) {
      this.client.sendMedia(conv, { data: img.file, contentType: img.file.type || "image/jpeg", ...(img.width ? { width: img.width, height: img.height! } : {}) }, text);
      this.pendingImage = undefined;
      this.previewEl.hidden = true;
      clear(this.previewEl);
    } else {
      this.client.send(conv, text);
    }
    this.client.typing(conv, false);
    this.input.value = "";
    this.stickToBottom = true;
    this.queueRender();
  }

  private async pickImage(file: File): Promise<void> {
    this.clearPendingImage();
    const url = URL.createObjectURL(file);
    const pending: { file: File; url: string; width?: number; height?: number } = { file, url };
    this.pendingImage = pending;
    const img = h("img", { src: url, alt: "Image to send" });
    clear(this.previewEl);
    this.previewEl.append(
      img,
      h("span", { class: "preview-name" }, `${file.name} · ${formatSize(file.size)}`),
      h("button", { type: "button", class: "ghost", "aria-label": "Remove image", onclick: () => this.clearPendingImage() }, "✕"),
    );
    this.previewEl.hidden = false;
    try {
      await img.decode();
      pending.width = img.naturalWidth;
      pending.height = img.naturalHeight;
    } catch {
      // not decodable here: send it without dimensions
    }
    this.input.focus();
  }

  private clearPendingImage(): void {
    if (this.pendingImage) URL.revokeObjectURL(this.pendingImage.url);
    this.pendingImage = undefined;
    this.previewEl.hidden = true;
    clear(this.previewEl);
  }

  // ---- rendering ----

  private queueRender(): void {
    if (this.renderQueued) return;
    this.renderQueued = true;
    requestAnimationFrame(() => {
      this.renderQueued = false;
      this.render();
    });
  }

  private stickToBottomIfNear(): void {
    const m = this.messagesEl;
    if (m.scrollHeight - m.scrollTop - m.clientHeight < 120) this.stickToBottom = true;
  }

  private render(): void {
    const c = this.client;
    const me = c.user;
    const state = c.state;
    clear(this.meEl);
    this.meEl.append(
      h("span", { class: `dot ${state === "open" ? "on" : ""}`, title: state }),
      h("strong", { class: "me-name", "data-testid": "me" }, me ?? "…"),
    );
    this.bannerEl.hidden = state === "open";
    this.bannerEl.textContent = state === "open" ? "" : state === "closed" ? "Signed out" : "Connecting…";

    const convs = c.conversations();
    // Presence of the people on screen: the one-to-one peers in the list.
    const peers = convs.map((v) => v.peer).filter((p): p is string => !!p);
    void c.watchPresence(peers);
    this.renderList(convs);

    if (!this.open) {
      this.emptyEl.hidden = false;
      return;
    }
    this.emptyEl.hidden = true;
    const view = c.conversation(this.open);
    if (!view) return;
    this.renderChat(view);
  }

  private renderList(convs: ConversationView[]): void {
    const seen = new Set<string>();
    const items: HTMLElement[] = [];
    for (const v of convs) {
      seen.add(v.id);
      const online = v.peer ? this.client.presenceOf(v.peer)?.online : undefined;
      const typing = this.client.typingIn(v.id);
      const preview = typing.length ? (v.kind === "dm" ? "typing…" : `${typing.join(", ")} typing…`) : v.last ? previewOf(v.last, v.kind) : "";
      const when = v.last ? formatTime(v.last.ts) : "";
      const sig = JSON.stringify([v.title, v.unread, online, preview, when, v.id === this.open, v.last?.status]);
      let node = this.convNodes.get(v.id);
      if (!node || node.sig !== sig) {
        const el = h(
          "li",
          { class: `conv ${v.id === this.open ? "active" : ""}`, "data-conv": v.id },
          h(
            "button",
            { type: "button", onclick: () => this.navigate(v.id) },
            h("span", { class: "avatar" }, v.title.slice(0, 1).toUpperCase(), online ? h("span", { class: "online-dot", title: "online" }) : null),
            h(
              "span",
              { class: "conv-main" },
              h("span", { class: "conv-top" }, h("span", { class: "conv-title" }, v.title), h("span", { class: "conv-time" }, when)),
              h(
                "span",
                { class: "conv-bottom" },
                h("span", { class: `conv-preview ${typing.length ? "typing" : ""}` }, preview),
                v.unread > 0 ? h("span", { class: "unread", "data-testid": "unread", "aria-label": `${v.unread} unread` }, String(v.unread)) : null,
              ),
            ),
          ),
        );
        node?.el.replaceWith(el);
        node = { sig, el };
        this.convNodes.set(v.id, node);
      }
      items.push(node.el);
    }
    for (const [id, n] of this.convNodes) {
      if (!seen.has(id)) {
        n.el.remove();
        this.convNodes.delete(id);
      }
    }
    reorder(this.listEl, items);
    if (convs.length === 0) this.listEl.replaceChildren(h("li", { class: "conv-empty" }, "No conversations yet. Start one with New chat."));
  }

  private renderChat(v: ConversationView): void {
    const c = this.client;
    this.chatTitle.textContent = v.title;
    const typing = c.typingIn(v.id);
    let sub = "";
    if (typing.length) sub = v.kind === "dm" ? "typing…" : `${typing.join(", ")} ${typing.length > 1 ? "are" : "is"} typing…`;
    else if (v.kind === "dm" && v.peer) {
      const p = c.presenceOf(v.peer);
      if (p?.online) sub = "online";
      else if (p?.last_seen) sub = `last seen ${formatLastSeen(p.last_seen)}`;
    } else if (v.kind === "group") {
      sub = v.members ? v.members.join(", ") : `${v.memberCount} members`;
      if (!v.members && !this.groupInfoAsked.has(v.id) && c.state === "open") {
        this.groupInfoAsked.add(v.id);
        void c.groupInfo(v.id).catch(() => this.groupInfoAsked.delete(v.id));
      }
    }
    // On a phone the open chat hides the list and its banner: say it here.
    if (c.state !== "open" && !typing.length) sub = "connecting…";
    this.chatSub.textContent = sub;
    this.chatSub.classList.toggle("typing", typing.length > 0);
    this.composer.hidden = v.left !== undefined;

    const msgs = c.messages(v.id);
    if (msgs.length === 0 && v.hasOlder && c.state === "open") void c.loadOlder(v.id).catch(() => 0);
    const seen = new Set<string>();
    const nodes: HTMLElement[] = [];
    if (v.hasOlder && msgs.length > 0) {
      nodes.push(this.olderButton(v.id));
      seen.add("older");
    }
    let prevDay = "";
    for (const m of msgs) {
      const day = new Date(m.ts).toDateString();
      if (day !== prevDay) {
        prevDay = day;
        const key = `day:${day}`;
        seen.add(key);
        nodes.push(this.cached(key, day, () => h("div", { class: "day" }, formatDay(m.ts))));
      }
      seen.add(m.key);
      nodes.push(this.messageNode(m, v));
    }
    for (const [key, n] of this.msgNodes) {
      if (!seen.has(key)) {
        n.el.remove();
        this.msgNodes.delete(key);
      }
    }
    const el = this.messagesEl;
    const oldHeight = el.scrollHeight;
    const oldTop = el.scrollTop;
    const firstBefore = el.firstElementChild;
    reorder(el, nodes);
    if (this.stickToBottom) el.scrollTop = el.scrollHeight;
    else if (firstBefore && el.firstElementChild !== firstBefore) el.scrollTop = oldTop + (el.scrollHeight - oldHeight);

    // On screen and the tab visible: the user sees these messages.
    if (document.visibilityState === "visible" && v.unread > 0) c.markRead(v.id);
  }

  private olderButton(conv: string): HTMLElement {
    return this.cached("older", conv, () => {
      const b = h("button", { type: "button", class: "ghost older" }, "Load earlier messages");
      b.addEventListener("click", () => {
        this.stickToBottom = false;
        void this.client.loadOlder(conv).catch(() => 0);
      });
      return b;
    });
  }

  private cached(key: string, sig: string, make: () => HTMLElement): HTMLElement {
    const n = this.msgNodes.get(key);
    if (n && n.sig === sig) return n.el;
    const el = make();
    n?.el.replaceWith(el);
    this.msgNodes.set(key, { sig, el });
    return el;
  }

  private messageNode(m: MessageView, v: ConversationView): HTMLElement {
    const sig = JSON.stringify([m.seq, m.status, m.body, m.media?.id, !!m.localMedia, m.error?.code]);
    return this.cached(m.key, sig, () => {
      if (m.event) return h("div", { class: "event", "data-seq": m.seq ?? "" }, describeEvent(m.from, m.event, this.client.user));
      const parts: (Node | null)[] = [];
      if (!m.mine && v.kind === "group") parts.push(h("div", { class: "sender" }, m.from));
      if (m.media) parts.push(this.mediaNode(m));
      else if (m.localMedia) parts.push(this.mediaNode(m));
      if (m.body) parts.push(h("div", { class: "text" }, m.body));
      const meta = h("span", { class: "meta" }, h("time", { datetime: new Date(m.ts).toISOString() }, formatTime(m.ts)));
      if (m.mine && m.status) {
        meta.append(
          h(
            "span",
            { class: `ticks ${m.status}`, "data-testid": "status", "data-status": m.status, title: STATUS_LABEL[m.status] ?? m.status, "aria-label": STATUS_LABEL[m.status] ?? m.status },
            STATUS_ICON[m.status] ?? "",
          ),
        );
      }
      parts.push(meta);
      if (m.status === "failed") {
        parts.push(
          h(
            "div",
            { class: "failed" },
            `Not sent${m.error ? ` (${m.error.code})` : ""}. `,
            h("button", { type: "button", class: "link", onclick: () => this.client.retry(m.id) }, "Retry"),
            h("button", { type: "button", class: "link", onclick: () => this.client.discard(m.id) }, "Delete"),
          ),
        );
      }
      return h(
        "div",
        { class: `msg ${m.mine ? "mine" : "theirs"}`, "data-seq": m.seq ?? "", "data-id": m.id, "data-testid": "message" },
        h("div", { class: "bubble" }, ...parts),
      );
    });
  }

  private mediaNode(m: MessageView): HTMLElement {
    const media = m.media;
    const type = media?.content_type ?? m.localMedia?.type ?? "";
    if (!type.startsWith("image/")) {
      const a = h("a", { class: "file", target: "_blank", rel: "noopener" }, `File: ${type || "unknown type"} · ${formatSize(media?.size ?? m.localMedia?.size ?? 0)}`);
      if (media) void this.client.mediaDownloadUrl(media.id).then((u) => (a.href = u), () => undefined);
      return a;
    }
    const img = h("img", { class: "photo", alt: m.body ? `Photo: ${m.body}` : "Photo", "data-testid": "photo", loading: "lazy", decoding: "async" });
    if (media?.width && media.height) {
      img.width = media.width;
      img.height = media.height;
      img.style.aspectRatio = `${media.width} / ${media.height}`;
    }
    if (m.localMedia) {
      let url = this.objectUrls.get(m.id);
      if (!url) this.objectUrls.set(m.id, (url = URL.createObjectURL(m.localMedia)));
      img.src = url;
    } else if (media) {
      img.classList.add("loading");
      const load = (attempt: number): void => {
        void this.client.mediaDownloadUrl(media.id).then(
          (u) => {
            img.src = u;
            img.classList.remove("loading");
          },
          (err: unknown) => {
            const retryable = !(err instanceof ChatError) || err.retryable;
            if (retryable && attempt < 5) setTimeout(() => load(attempt + 1), 1000 * 2 ** attempt);
            else img.alt = "Photo unavailable";
          },
        );
      };
      load(0);
    }
    img.addEventListener("load", () => {
      if (this.stickToBottom) this.messagesEl.scrollTop = this.messagesEl.scrollHeight;
    });
    return img;
  }
}

// -----------------------------------------------------------------------------------------------
// helpers
// -----------------------------------------------------------------------------------------------

/** A paper clip, drawn (an emoji needs a font that not every machine has). */
function clipIcon(): SVGSVGElement {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("width", "22");
  svg.setAttribute("height", "22");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", "M16.5 6.5v10a4.5 4.5 0 0 1-9 0V5a3 3 0 0 1 6 0v10.5a1.5 1.5 0 0 1-3 0V6.5");
  path.setAttribute("fill", "none");
  path.setAttribute("stroke", "currentColor");
  path.setAttribute("stroke-width", "1.8");
  path.setAttribute("stroke-linecap", "round");
  svg.append(path);
  return svg;
}

/** Puts `nodes` into `parent` in this order, moving only what is out of place. */
function reorder(parent: HTMLElement, nodes: HTMLElement[]): void {
  let cursor = parent.firstElementChild;
  for (const n of nodes) {
    if (n === cursor) {
      cursor = cursor.nextElementSibling;
      continue;
    }
    parent.insertBefore(n, cursor);
  }
  while (cursor) {
    const next = cursor.nextElementSibling;
    cursor.remove();
    cursor = next;
  }
}

function previewOf(m: MessageView, kind: "dm" | "group"): string {
  if (m.event) return describeEvent(m.from, m.event, client?.user);
  const who = m.mine ? "You: " : kind === "group" ? `${m.from}: ` : "";
  const what = m.media || m.localMedia ? `Photo${m.body ? `: ${m.body}` : ""}` : m.body;
  return who + what;
}

function describeEvent(from: string, ev: GroupEvent, me: string | undefined): string {
  const name = (u: string) => (u === me ? "you" : u);
  const who = from === me ? "You" : from;
  const list = (us: string[]) => us.map(name).join(", ");
  switch (ev.kind) {
    case "created":
      return `${who} created the group “${ev.name}”${ev.members.length ? ` with ${list(ev.members)}` : ""}`;
    case "added":
      return `${who} added ${list(ev.members)}`;
    case "removed":
      return `${who} removed ${list(ev.members)}`;
    case "left":
      return `${who} left${ev.admin ? `; ${name(ev.admin)} is now admin` : ""}`;
    case "renamed":
      return `${who} renamed the group to “${ev.name}”`;
    case "promoted":
      return `${who} made ${list(ev.members)} admin`;
    case "demoted":
      return `${who} removed ${list(ev.members)} as admin`;
  }
}

function formatTime(ts: number): string {
  return new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function formatDay(ts: number): string {
  const d = new Date(ts);
  const today = new Date();
  if (d.toDateString() === today.toDateString()) return "Today";
  const y = new Date(today);
  y.setDate(today.getDate() - 1);
  if (d.toDateString() === y.toDateString()) return "Yesterday";
  return d.toLocaleDateString([], { day: "numeric", month: "long", year: d.getFullYear() === today.getFullYear() ? undefined : "numeric" });
}

function formatLastSeen(ts: number): string {
  const d = new Date(ts);
  const day = formatDay(ts);
  return `${day === "Today" || day === "Yesterday" ? day.toLowerCase() : day} at ${formatTime(d.getTime())}`;
}

function formatSize(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

void (async () => {
  const config = await loadConfig();
  if ((config.dev_tokens && store.user) || (!config.dev_tokens && store.token)) await start(config);
  else showSignIn(config);
})();
