// Wire types of the client protocol, version 1 (docs/protocol.md; the Rust side is
// protocol/src/frames.rs). Every frame is one JSON object in one text message.

/** The protocol version this library speaks (`hello.version`). */
export const PROTOCOL_VERSION = 1;

/** A photo, video, audio or document uploaded to the media service, as a message carries it. */
export interface MediaRef {
  id: string;
  content_type: string;
  size: number;
  width?: number;
  height?: number;
  duration_ms?: number;
  /** Media id of a preview image uploaded by the same sender to the same conversation. */
  thumbnail?: string;
}

/** A change of a group, the `event` of a group message. */
export type GroupEvent =
  | { kind: "created"; name: string; members: string[] }
  | { kind: "added"; members: string[] }
  | { kind: "removed"; members: string[] }
  | { kind: "left"; admin?: string }
  | { kind: "renamed"; name: string }
  | { kind: "promoted"; members: string[] }
  | { kind: "demoted"; members: string[] };

/** A stamped message: what pushes, history and sync carry. */
export interface Message {
  conv: string;
  /** Dense per conversation: 1, 2, 3, ... */
  seq: number;
  from: string;
  /** The sender's client message id. */
  id: string;
  /** Server time of stamping, ms since the epoch. */
  ts: number;
  body: string;
  event?: GroupEvent;
  media?: MediaRef;
}

export interface Limits {
  max_frame_bytes: number;
  max_body_bytes: number;
  sends_per_second: number;
  send_burst: number;
  history_page_max: number;
  receipts_per_second?: number;
  receipt_burst?: number;
  sync_page_max?: number;
  presence_batch_max?: number;
  presence_watch_max?: number;
  typing_per_second?: number;
  typing_burst?: number;
  typing_ttl_ms?: number;
  groups_per_hour?: number;
  group_members_per_minute?: number;
  new_conversations_per_minute?: number;
}

export interface Receipt {
  conv: string;
  user: string;
  delivered: number;
  read: number;
}

export interface MemberMarks {
  user: string;
  delivered: number;
  read: number;
}

export interface ConvState {
  conv: string;
  name?: string;
  member_count?: number;
  latest: number;
  unread: number;
  members: MemberMarks[];
  left?: number;
}

export interface ConvInfo {
  conv: string;
  name?: string;
  member_count: number;
  latest: number;
  unread: number;
  admin?: boolean;
  joined: number;
  left?: number;
}

export interface GroupMember {
  user: string;
  admin?: boolean;
  joined: number;
}

export interface PresenceState {
  user: string;
  online: boolean;
  /** When the user's last device went away, ms since the epoch. */
  last_seen?: number;
}

export type ErrorCode =
  | "bad_json"
  | "unknown_type"
  | "invalid_frame"
  | "invalid_id"
  | "body_too_large"
  | "not_member"
  | "not_admin"
  | "group_full"
  | "already_exists"
  | "last_admin"
  | "not_found"
  | "rate_limited"
  | "unavailable"
  | "invalid_token"
  | "internal"
  | "unauthorized"
  | "token_expired"
  | "too_many_connections"
  | "overloaded"
  | "media_not_found"
  | "media_mismatch";

export type GroupOp = "create" | "add" | "remove" | "leave" | "rename" | "promote" | "demote";

// ---------------------------------------------------------------------------------------------
// client frames
// ---------------------------------------------------------------------------------------------

export type SendFrame = { type: "send"; conv: string; id: string; body: string; media?: MediaRef };
export type GroupFrame = {
  type: "group";
  op: GroupOp;
  conv: string;
  id: string;
  name?: string;
  members?: string[];
};
export type HistoryRequest = {
  type: "history";
  req: string;
  conv: string;
  before?: number;
  after?: number;
  limit?: number;
};
export type SyncRequest = {
  type: "sync";
  req: string;
  since?: string;
  cursors?: Record<string, number>;
  next?: string;
  limit?: number;
};
export type ReceiptsRequest = { type: "receipts"; req: string; conv: string; seq?: number };
export type ConversationsRequest = { type: "conversations"; req: string; after?: string; limit?: number };
export type GroupInfoRequest = { type: "group_info"; req: string; conv: string };
export type PresenceRequest = { type: "presence"; req: string; users: string[] };
export type PresenceSubscribeRequest = { type: "presence_subscribe"; req: string; users: string[] };
export type PresenceSettingsRequest = { type: "presence_settings"; req: string; hide_last_seen?: boolean };

export type ClientRequest =
  | HistoryRequest
  | SyncRequest
  | ReceiptsRequest
  | ConversationsRequest
  | GroupInfoRequest
  | PresenceRequest
  | PresenceSubscribeRequest
  | PresenceSettingsRequest;

export type ClientFrame =
  | SendFrame
  | GroupFrame
  | ClientRequest
  | { type: "delivered"; conv: string; seq: number }
  | { type: "read"; conv: string; seq: number }
  | { type: "typing"; conv: string; active?: boolean }
  | { type: "ping" };

// ---------------------------------------------------------------------------------------------
// server frames
// ---------------------------------------------------------------------------------------------

export type HelloFrame = {
  type: "hello";
  version: number;
  user: string;
  device: string;
  heartbeat_ms: number;
  limits: Limits;
};
export type SentFrame = { type: "sent"; id: string; conv: string; ts: number };
export type MessageFrame = { type: "message" } & Message;
export type HistoryAnswer = { type: "history"; req: string; conv: string; messages: Message[]; more: boolean };
export type ReceiptFrame = { type: "receipt" } & Receipt;
export type SyncAnswer = {
  type: "sync";
  req: string;
  convs: ConvState[];
  messages: Message[];
  more: boolean;
  next?: string;
  token?: string;
};
export type ReceiptsAnswer = {
  type: "receipts";
  req: string;
  conv: string;
  members: MemberMarks[];
  seq?: number;
  delivered_to?: string[];
  read_by?: string[];
};
export type ConversationsAnswer = {
  type: "conversations";
  req: string;
  convs: ConvInfo[];
  more: boolean;
  next?: string;
};
export type GroupInfoAnswer = {
  type: "group_info";
  req: string;
  conv: string;
  name: string;
  members: GroupMember[];
  seq: number;
};
export type PresenceFrame = { type: "presence"; req?: string; users: PresenceState[] };
export type PresenceSettingsAnswer = { type: "presence_settings"; req: string; hide_last_seen: boolean };
export type TypingFrame = { type: "typing"; conv: string; user: string; active: boolean; ttl_ms: number };
export type ErrorFrame = {
  type: "error";
  code: ErrorCode;
  message: string;
  id?: string;
  req?: string;
  conv?: string;
  retry_after_ms?: number;
};

export type ServerFrame =
  | HelloFrame
  | SentFrame
  | MessageFrame
  | HistoryAnswer
  | ReceiptFrame
  | SyncAnswer
  | ReceiptsAnswer
  | ConversationsAnswer
  | GroupInfoAnswer
  | ErrorFrame
  | { type: "pong" }
  | PresenceFrame
  | PresenceSettingsAnswer
  | TypingFrame;

/** The answer frame type of each request type. */
export interface AnswerOf {
  history: HistoryAnswer;
  sync: SyncAnswer;
  receipts: ReceiptsAnswer;
  conversations: ConversationsAnswer;
  group_info: GroupInfoAnswer;
  presence: PresenceFrame;
  presence_subscribe: PresenceFrame;
  presence_settings: PresenceSettingsAnswer;
}

/** WebSocket close codes the gateway uses (docs/protocol.md, "Close codes"). */
export const CloseCode = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  MESSAGE_TOO_BIG: 1009,
  HEARTBEAT_TIMEOUT: 4000,
  SLOW_CONSUMER: 4001,
  TOKEN_EXPIRED: 4002,
} as const;
