//! Metric names. Labels never carry user or gateway ids.

pub const REPORTS: &str = "presence_reports_total";
pub const KV_WRITES: &str = "presence_kv_writes_total";
pub const KV_WRITE_FAILURES: &str = "presence_kv_write_failures_total";
pub const EXPIRED: &str = "presence_expired_total";
pub const PUSHED_STATES: &str = "presence_pushed_states_total";
pub const PUSHES: &str = "presence_pushes_total";
pub const COALESCED: &str = "presence_coalesced_total";
pub const QUERIES: &str = "presence_queries_total";
pub const QUERY_SECONDS: &str = "presence_query_seconds";
pub const TYPING_RELAYED: &str = "presence_typing_relayed_total";
pub const TYPING_DROPPED: &str = "presence_typing_dropped_total";
pub const ONLINE_USERS: &str = "presence_online_users";
pub const WATCHES: &str = "presence_watches";

pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        REPORTS,
        "gateway reports received, by kind (events, heartbeat)"
    );
    describe_counter!(
        KV_WRITES,
        "KV writes, by op (online, offline, seen, settings)"
    );
    describe_counter!(KV_WRITE_FAILURES, "KV writes that failed");
    describe_counter!(
        EXPIRED,
        "online keys that expired by their TTL (gateway gone)"
    );
    describe_counter!(PUSHED_STATES, "user states pushed to gateways");
    describe_counter!(PUSHES, "push messages published (one per gateway per tick)");
    describe_counter!(
        COALESCED,
        "due pushes skipped: the state equals the last one pushed"
    );
    describe_counter!(QUERIES, "presence queries answered, by result");
    describe_histogram!(QUERY_SECONDS, "time to answer a presence query");
    describe_counter!(
        TYPING_RELAYED,
        "typing indicators relayed to a group member"
    );
    describe_counter!(TYPING_DROPPED, "group typing indicators dropped, by reason");
    describe_gauge!(
        ONLINE_USERS,
        "users with a device connected, as this replica sees it"
    );
    describe_gauge!(WATCHES, "(watched user, gateway) pairs this replica knows");
}
