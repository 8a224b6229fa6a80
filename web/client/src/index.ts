// @chat/client: a typed client for the chat backend (docs/protocol.md), with no dependencies.
export { ChatClient } from "./client.js";
export type {
  ChatClientOptions,
  ChatEvents,
  ConnectionState,
  ConversationView,
  MessageStatus,
  MessageView,
  PendingSend,
  WebSocketFactory,
  WebSocketLike,
} from "./client.js";
export { Conversation } from "./conversation.js";
export type { ConversationKind, Gap, Marks } from "./conversation.js";
export { ChatError } from "./errors.js";
export { backoffDelay, DEFAULT_BACKOFF } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
export { Emitter } from "./emitter.js";
export { dmId, dmMembers, dmPeer, isGroupId, isValidId, newGroupId, randomId } from "./ids.js";
export { MediaApi } from "./media.js";
export type { DownloadTicket, PresignedRequest, UploadInput, UploadTicket } from "./media.js";
export * from "./protocol.js";
