//! Command line: one subcommand per mode, each with its own flags (`bench <mode> --help`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

const ABOUT: &str = "Load generator and benchmarks of the chat backend, measured against the \
broker's own ceiling in the same run";

const LONG_ABOUT: &str = "\
Load generator and benchmarks of the chat backend, measured against the broker's own ceiling \
in the same run.

Every mode starts its own nats-server (random port, temp dir) and, except `baseline`, the real \
service binaries (gateway, sequencer with its embedded store, fan-out worker) found next to this \
executable: build them with `cargo build --release --workspace --bins` and run \
`target/release/bench`. Load is open loop: sends are scheduled at a fixed offered rate and \
every latency is measured from the intended send time, so a stall shows as latency. Latencies \
are HDR histograms (p50/p90/p99/p99.9/max). CPU seconds and RSS of every process (this one \
included) come from /proc.

Each run prints a summary and the command line, and writes <out>/<mode>.json (and a \
timestamped copy); `max` also writes <out>/max.csv. scripts/plot-bench.py turns max.json into \
an SVG of latency percentiles against offered rate.";

#[derive(Debug, Parser, Serialize)]
#[command(name = "bench", about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(Debug, Subcommand, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The broker's ceiling: raw JetStream async publish + pull consume, and core NATS
    /// pub/sub, through async-nats with the same payload size.
    Baseline(BaselineArgs),
    /// One-to-one conversations over real WebSockets through the whole pipeline (store on) at
    /// a fixed offered rate: offered, acked, delivered, "sent" ack and delivery latency, CPU
    /// per message, delivered/s over the same-run JetStream baseline.
    Dm(DmArgs),
    /// Search for the highest offered rate sustained for --duration seconds (>= 99.9%
    /// delivered, backlog not growing, p99 < 500 ms), then a trial at half of it.
    Max(MaxArgs),
    /// Overload: a reference phase at half the max sustained rate (--max-rate, from `max`),
    /// --factor times it for --overload seconds, then half again: nothing acked lost, peak RSS
    /// of every process, slow consumers cut and recovered through sync, typing shed first,
    /// and the time until delivery latency is back.
    Overload(OverloadArgs),
    /// N authenticated, subscribed idle connections: gateway memory per connection and idle
    /// CPU. The open-file limit is raised to the hard limit (inherited by the gateway), which
    /// bounds N: each side needs one descriptor per connection.
    Idle(IdleArgs),
    /// One load-generator process of `idle --clients N` (started by it; not for direct use):
    /// holds its share of the connections, reconnects them, reports on stdout.
    #[command(hide = true)]
    IdleClient(IdleClientArgs),
    /// A device offline while K messages arrive, then reconnecting: time until it has all.
    Catchup(CatchupArgs),
    /// Group fan-out: a group of N members (one WebSocket each) gets messages at a fixed
    /// offered rate; deliveries per second, delivery latency at every member, and one-to-one
    /// latency under the same load.
    Group(GroupArgs),
    /// Presence at scale, simulated at the NATS level: N online users on simulated gateways
    /// against the real presence binary; connect updates/s, then KV writes, pushes, query
    /// latency and CPU per online user with heartbeats and churn.
    Presence(PresenceArgs),
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Baseline(_) => "baseline",
            Self::Dm(_) => "dm",
            Self::Max(_) => "max",
            Self::Overload(_) => "overload",
            Self::Idle(_) => "idle",
            Self::IdleClient(_) => "idle-client",
            Self::Catchup(_) => "catchup",
            Self::Group(_) => "group",
            Self::Presence(_) => "presence",
        }
    }
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct Output {
    /// Directory for the JSON (and CSV) results [default: <target dir>/bench]
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct Load {
    /// Message body size in bytes (the baseline's payload size too)
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Messages in each baseline measurement (JetStream, core NATS)
    #[arg(long, default_value_t = 100_000)]
    pub baseline_msgs: u64,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct BaselineArgs {
    #[command(flatten)]
    pub load: Load,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct Pipeline {
    /// One-to-one conversations: a sender and a recipient each, one WebSocket per user. The
    /// offered rate is spread evenly, so each sender sends rate/pairs per second (it must stay
    /// under 90% of the gateway's per-user limit the cluster sets, 1,000/s)
    #[arg(long, default_value_t = 200)]
    pub pairs: usize,
    /// After the offered window, seconds to wait for every ack and delivery
    #[arg(long, default_value_t = 30.0)]
    pub drain: f64,
    /// Conversation partitions to provision (default: the deployment default,
    /// `chat_protocol::subjects::DEFAULT_PARTITIONS`, 16)
    #[arg(long, value_name = "N")]
    pub partitions: Option<u32>,
    /// Run nats-server with `jetstream { sync_interval: always }`: every write fsynced before
    /// its ack (`nats/durable.conf`, the mode that survives a power loss). The baseline is
    /// measured on the same server
    #[arg(long)]
    pub sync_always: bool,
    /// The services reach nats-server over TLS with client certificates (test-only files of
    /// testkit/fixtures/tls): the gateway's push connection and every async-nats client. The
    /// baseline and the bench's own clients stay plain on the same port, so the ratio to it
    /// includes what TLS costs
    #[arg(long)]
    pub tls: bool,
}

impl Pipeline {
    /// How nats-server runs for this pipeline.
    pub fn nats_mode(&self) -> crate::system::NatsMode {
        crate::system::NatsMode {
            sync_always: self.sync_always,
            tls: self.tls,
        }
    }
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct DmArgs {
    /// Offered messages per second (all conversations together)
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Seconds of offered load
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    #[command(flatten)]
    pub pipeline: Pipeline,
    #[command(flatten)]
    pub load: Load,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct MaxArgs {
    /// Offered rate of the first trial, messages per second
    #[arg(long, default_value_t = 2000.0)]
    pub start_rate: f64,
    /// Seconds each trial offers load (the rate must be sustained this long)
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Most trials in the search
    #[arg(long, default_value_t = 8)]
    pub steps: u32,
    /// Rate multiplier while trials pass (and divisor while they fail) before bisecting
    #[arg(long, default_value_t = 1.5)]
    pub growth: f64,
    /// Stop bisecting when (lowest failure - best pass) / best pass is at most this
    #[arg(long, default_value_t = 0.1)]
    pub precision: f64,
    /// Skip the final trial at half the best rate
    #[arg(long)]
    pub no_half: bool,
    #[command(flatten)]
    pub pipeline: Pipeline,
    #[command(flatten)]
    pub load: Load,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct OverloadArgs {
    /// The max sustained rate measured by `bench max`, messages per second
    #[arg(long)]
    pub max_rate: f64,
    /// The overload phase offers this many times --max-rate
    #[arg(long, default_value_t = 1.5)]
    pub factor: f64,
    /// The reference phase before and the phase after the overload offer this many times
    /// --max-rate
    #[arg(long, default_value_t = 0.5)]
    pub after_factor: f64,
    /// Seconds of the reference phase
    #[arg(long, default_value_t = 30.0)]
    pub reference: f64,
    /// Seconds of overload
    #[arg(long, default_value_t = 120.0)]
    pub overload: f64,
    /// Seconds of the phase after the overload (recovery must happen within it)
    #[arg(long, default_value_t = 240.0)]
    pub after: f64,
    /// Slow recipients, each flooded by a sender of its own while it stops reading
    #[arg(long, default_value_t = 4)]
    pub slow: usize,
    /// Seconds each slow recipient stops reading
    #[arg(long, default_value_t = 20.0)]
    pub stall: f64,
    /// How many seconds before the overload the slow recipients stop reading (within the
    /// reference phase, while the pipeline still keeps up and their flood arrives at once)
    #[arg(long, default_value_t = 15.0)]
    pub stall_lead: f64,
    /// Messages per second each slow recipient's sender sends it while it stalls
    #[arg(long, default_value_t = 100.0)]
    pub slow_rate: f64,
    /// Body size of those messages, bytes
    #[arg(long, default_value_t = 4096)]
    pub slow_size: usize,
    #[command(flatten)]
    pub pipeline: Pipeline,
    #[command(flatten)]
    pub load: Load,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct IdleArgs {
    /// Idle connections to open (one user each)
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Connections per client source address (127.0.0.2, 127.0.0.3, ...)
    #[arg(long, default_value_t = 10_000)]
    pub per_ip: usize,
    /// Handshakes in flight at once
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Seconds to hold them open while measuring idle CPU (heartbeats: every 15 s)
    #[arg(long, default_value_t = 20.0)]
    pub hold: f64,
    /// Seconds between the gateway's start and the first connection (RSS at 0 is sampled at
    /// the end of it): time to attach a profiler, e.g. `heaptrack -p <gateway pid>`
    #[arg(long, default_value_t = 0.5)]
    pub settle: f64,
    /// Gateway processes on the one nats-server; user i connects to gateway i mod N
    #[arg(long, default_value_t = 1)]
    pub gateways: usize,
    /// Load-generator processes holding the connections (0: this process holds them all).
    /// Each process stays under the open-file limit: give one per 15,000 connections or so
    #[arg(long, default_value_t = 0)]
    pub clients: usize,
    /// Each gateway's `max_connections` (0: none); set it below the open-file limit so a full
    /// gateway answers 503 instead of failing with EMFILE
    #[arg(long, default_value_t = 19_000)]
    pub max_per_gateway: usize,
    /// Then churn for this many seconds: every client process connects fresh users (connect,
    /// authenticate, subscribe, `hello`) and closes them again, `--concurrency` at a time
    /// (needs --clients)
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// Then SIGKILL gateway-1 and measure until its clients are back on the others (jittered
    /// backoff as in docs/protocol.md) and receive pushes again (needs --clients, --gateways >= 2)
    #[arg(long)]
    pub kill: bool,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct IdleClientArgs {
    /// Gateway URLs, comma-separated
    #[arg(long)]
    pub urls: String,
    /// First global user index of this process
    #[arg(long)]
    pub first: usize,
    /// Connections of this process
    #[arg(long)]
    pub count: usize,
    #[arg(long)]
    pub per_ip: usize,
    #[arg(long)]
    pub concurrency: usize,
    /// This process's number (its churn users and source addresses)
    #[arg(long)]
    pub index: usize,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct CatchupArgs {
    /// Messages that arrive while the device is offline
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,
    /// Users sending them, one conversation each with the offline user
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Message body size in bytes
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct GroupArgs {
    /// Group sizes to run, one trial each (comma separated)
    #[arg(long, value_delimiter = ',', default_values_t = [256, 1024])]
    pub members: Vec<usize>,
    /// Group messages offered per second
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds of offered load per group size
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Members that send, round robin
    #[arg(long, default_value_t = 8)]
    pub senders: usize,
    /// One-to-one conversations loaded at the same time (0: none)
    #[arg(long, default_value_t = 50)]
    pub dm_pairs: usize,
    /// One-to-one messages offered per second at the same time
    #[arg(long, default_value_t = 100.0)]
    pub dm_rate: f64,
    /// The fan-out worker's per-group budget, deliveries/s (and burst); default: its own
    /// default (2,000/s)
    #[arg(long)]
    pub conv_budget: Option<u32>,
    /// The per-group burst with --conv-budget [default: the budget]
    #[arg(long, requires = "conv_budget")]
    pub conv_burst: Option<u32>,
    /// Message body size in bytes
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// After the window, seconds to wait for every delivery
    #[arg(long, default_value_t = 60.0)]
    pub drain: f64,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct PresenceArgs {
    /// Online users, spread evenly over the simulated gateways
    #[arg(long, default_value_t = 100_000)]
    pub users: usize,
    /// Simulated gateways
    #[arg(long, default_value_t = 10)]
    pub gateways: usize,
    /// Seconds between two full-state heartbeats of one gateway
    #[arg(long, default_value_t = 30.0)]
    pub heartbeat: f64,
    /// Seconds of steady state measured
    #[arg(long, default_value_t = 90.0)]
    pub duration: f64,
    /// Users per second that go offline and come back one second later
    #[arg(long, default_value_t = 200.0)]
    pub churn: f64,
    /// Users watched (spread over the gateways, each watching users of the others)
    #[arg(long, default_value_t = 20_000)]
    pub watched: usize,
    /// Presence queries per second during the steady state
    #[arg(long, default_value_t = 50.0)]
    pub query_rate: f64,
    /// Users per query
    #[arg(long, default_value_t = 50)]
    pub query_batch: usize,
    /// The presence service's per-key TTL of online keys, seconds
    #[arg(long, default_value_t = 90)]
    pub online_ttl: u64,
    #[command(flatten)]
    pub output: Output,
}
