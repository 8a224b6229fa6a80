// The media service's HTTP API (docs/protocol.md, "Media"; OpenAPI at /openapi.json): ask for a
// presigned upload URL, PUT the bytes straight to the object store, ask for download URLs.

import { ChatError } from "./errors.js";
import type { MediaRef } from "./protocol.js";

export interface PresignedRequest {
  method: string;
  url: string;
  headers: Record<string, string>;
}

export interface UploadTicket {
  media_id: string;
  upload: PresignedRequest;
  expires_at_ms: number;
  orphan_at_ms: number;
}

export interface DownloadTicket {
  media_id: string;
  content_type: string;
  size: number;
  download: PresignedRequest;
  expires_at_ms: number;
}

/** What to upload: the bytes, their type, and what a recipient needs to render them. */
export interface UploadInput {
  data: Blob;
  /** Defaults to the blob's own type, then `application/octet-stream`. */
  contentType?: string;
  width?: number;
  height?: number;
  durationMs?: number;
}

// Headers a browser sets itself and refuses from scripts; the store checks them all the same.
const FORBIDDEN = new Set(["content-length", "host", "connection"]);

export class MediaApi {
  private downloads = new Map<string, Promise<DownloadTicket>>();

  constructor(
    private readonly baseUrl: string,
    private readonly token: () => Promise<string>,
    private readonly fetchImpl: typeof fetch = (...args) => globalThis.fetch(...args),
    private readonly now: () => number = Date.now,
  ) {}

  private async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const headers: Record<string, string> = { Authorization: `Bearer ${await this.token()}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let res: Response;
    try {
      res = await this.fetchImpl(this.baseUrl.replace(/\/+$/, "") + path, {
        method,
        headers,
        body: body === undefined ? null : JSON.stringify(body),
      });
    } catch (err) {
      throw new ChatError("unavailable", `media service unreachable: ${String(err)}`);
    }
    if (!res.ok) throw await httpError(res, "media service");
    return (await res.json()) as T;
  }

  /** Asks for an upload URL and uploads `input` with it. Returns the reference to send. */
  async upload(conv: string, input: UploadInput): Promise<MediaRef> {
    const contentType = input.contentType || input.data.type || "application/octet-stream";
    const size = input.data.size;
    const ticket = await this.call<UploadTicket>("POST", "/v1/uploads", { conv, content_type: contentType, size });
    const headers: Record<string, string> = {};
    for (const [k, v] of Object.entries(ticket.upload.headers)) {
      if (!FORBIDDEN.has(k.toLowerCase())) headers[k] = v;
    }
    let res: Response;
    try {
      res = await this.fetchImpl(ticket.upload.url, { method: ticket.upload.method, headers, body: input.data });
    } catch (err) {
      throw new ChatError("unavailable", `object store unreachable: ${String(err)}`);
    }
    if (!res.ok) throw await httpError(res, "object store");
    const ref: MediaRef = { id: ticket.media_id, content_type: contentType, size };
    if (input.width) ref.width = input.width;
    if (input.height) ref.height = input.height;
    if (input.durationMs) ref.duration_ms = input.durationMs;
    return ref;
  }

  /** A download URL for `mediaId`, reused until shortly before it expires. */
  async downloadUrl(mediaId: string): Promise<string> {
    let ticket = this.downloads.get(mediaId);
    if (ticket) {
      const t = await ticket.catch(() => undefined);
      if (!t || t.expires_at_ms - 30_000 <= this.now()) ticket = undefined;
    }
    if (!ticket) {
      ticket = this.call<DownloadTicket>("GET", `/v1/media/${encodeURIComponent(mediaId)}`);
      this.downloads.set(mediaId, ticket);
      ticket.catch(() => this.downloads.delete(mediaId));
    }
    return (await ticket).download.url;
  }
}

async function httpError(res: Response, what: string): Promise<ChatError> {
  let code = "http";
  let message = `${what} answered ${res.status}`;
  let retryAfter: number | undefined;
  try {
    const text = await res.text();
    const body = JSON.parse(text) as { code?: string; message?: string; retry_after_ms?: number };
    if (body.code) code = body.code;
    if (body.message) message = `${what}: ${body.message}`;
    retryAfter = body.retry_after_ms;
  } catch {
    // Not JSON (the object store answers XML): the status says enough.
  }
  if (code === "http" && res.status >= 500) code = "unavailable";
  return new ChatError(code, message, retryAfter, res.status);
}
