// Reconnect and retry delays: exponential with jitter, so that a gateway restart does not bring
// every client back at the same instant.

export interface BackoffOptions {
  /** The first delay's ceiling (ms). */
  baseMs: number;
  /** No delay is longer than this (ms). */
  maxMs: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { baseMs: 500, maxMs: 30_000 };

/**
 * The delay before attempt `attempt` (0 for the first retry): a ceiling that doubles with each
 * attempt up to `maxMs`, and a uniformly random delay between half the ceiling and the ceiling
 * ("equal jitter": never zero, never in lockstep).
 */
export function backoffDelay(attempt: number, opts: BackoffOptions = DEFAULT_BACKOFF, random: () => number = Math.random): number {
  const ceiling = Math.min(opts.maxMs, opts.baseMs * 2 ** Math.max(0, Math.min(attempt, 30)));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}
