import type { ErrorCode } from "./protocol.js";

/** Codes of failures the library itself reports, beside the server's. */
export type LocalErrorCode = "disconnected" | "timeout" | "closed" | "http";

/** A failure with a code to branch on (never parse `message`). */
export class ChatError extends Error {
  override readonly name = "ChatError";
  constructor(
    readonly code: ErrorCode | LocalErrorCode | string,
    message: string,
    readonly retryAfterMs?: number,
    /** HTTP status, for media API failures. */
    readonly status?: number,
  ) {
    super(message);
  }

  /** Worth retrying the same operation later (with the same client id). */
  get retryable(): boolean {
    return RETRYABLE.has(this.code) || (this.status !== undefined && this.status >= 500);
  }
}

const RETRYABLE = new Set<string>(["unavailable", "internal", "rate_limited", "disconnected", "timeout"]);
