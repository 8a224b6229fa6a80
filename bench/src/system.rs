//! The system under test: one nats-server, one gateway, one sequencer (embedded store on) and one
//! fan-out worker, the real binaries as child processes ([`chat_e2e::cluster::Cluster`]), found
//! next to the `bench` executable (`cargo build --release --workspace --bins` builds them all).
//!
//! The cluster sets the gateway's per-user limits to 1,000 sends/s (burst 2,000); every mode
//! spreads its load over enough users that no user comes near it (checked before a run).

use std::time::Duration;

use anyhow::{Context, Result};
use chat_e2e::cluster::{Cluster, ClusterConfig, SECRET};
use chat_protocol::{
    jetstream::{fanout_consumer, fanout_group_consumer, sequencer_consumer},
    subjects::{STREAM_INBOUND, STREAM_STAMPED},
};
use serde::Serialize;

use crate::procstat::Proc;

/// nats-server's durability mode that survives a power loss (`nats/durable.conf`): every
/// JetStream write is fsynced before it is acked.
pub const SYNC_ALWAYS: &str = "jetstream {\n  sync_interval: always\n}\n";

/// How the bench's nats-server runs, and how the services reach it.
#[derive(Debug, Clone, Copy, Default)]
pub struct NatsMode {
    /// [`SYNC_ALWAYS`].
    pub sync_always: bool,
    /// TLS with client certificates (`verify: true`) for the services, with the test-only files
    /// of `testkit/fixtures/tls/`. The bench's own connections (its baseline, load and
    /// backlog readings) stay plain on the same port (`allow_non_tls`).
    pub tls: bool,
}

impl NatsMode {
    /// Lines for nats-server's configuration file, if any; with TLS, its monitoring endpoint
    /// on `monitor` (for [`check_tls`]).
    fn config(&self, monitor: u16) -> Option<String> {
        let mut config = String::new();
        if self.sync_always {
            config.push_str(SYNC_ALWAYS);
        }
        if self.tls {
            config.push_str(&format!(
                "http: \"127.0.0.1:{monitor}\"\nallow_non_tls: true\n{}",
                chat_testkit::tls::server_config("")
            ));
        }
        (!config.is_empty()).then_some(config)
    }

    /// The `nats_tls` settings of a service whose env prefix is `prefix` (none without TLS).
    fn service_env(&self, prefix: &str) -> Vec<(String, String)> {
        if !self.tls {
            return Vec::new();
        }
        [
            ("CA_FILE", "test-only-ca.pem"),
            ("CERT_FILE", "test-only-client.pem"),
            ("KEY_FILE", "test-only-client-key.pem"),
        ]
        .into_iter()
        .map(|(field, name)| {
            let path = chat_testkit::tls::fixture(name).display().to_string();
            (format!("{prefix}_NATS_TLS__{field}"), path)
        })
        .collect()
    }
}

/// Checks on nats-server's `/connz` (monitoring at `monitor`) that every connection of the
/// services is TLS, and that each kind is there: the gateway's client and push connection,
/// the sequencer, the fan-out worker. Returns their names.
async fn check_tls(monitor: u16) -> Result<Vec<String>> {
    let body = http_get(&format!("127.0.0.1:{monitor}"), "/connz?limit=4096").await?;
    let connz: serde_json::Value = serde_json::from_str(&body).context("/connz is not JSON")?;
    let mut services = Vec::new();
    for c in connz["connections"]
        .as_array()
        .context("/connz has no connections")?
    {
        let name = c["name"].as_str().unwrap_or_default();
        if !["gateway", "sequencer", "fanout"]
            .iter()
            .any(|s| name.starts_with(s))
        {
            continue;
        }
        anyhow::ensure!(
            c["tls_version"].as_str().is_some_and(|v| !v.is_empty()),
            "--tls: the connection {name:?} is not TLS"
        );
        services.push(name.to_owned());
    }
    services.sort();
    for kind in ["gateway", "gateway-push", "sequencer", "fanout"] {
        anyhow::ensure!(
            services
                .iter()
                .any(|n| n == kind || n.starts_with(&format!("{kind} "))),
            "--tls: no {kind} connection on the server ({services:?})"
        );
    }
    Ok(services)
}

/// `GET path` from `addr` over plain HTTP/1.0; the body.
pub(crate) async fn http_get(addr: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut buf)).await??;
    Ok(buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

/// Sends per second per user the cluster's gateway allows (see the module doc).
pub const USER_SEND_LIMIT: f64 = 1000.0;

/// nats-server plus the services, started and ready.
pub struct System {
    pub cluster: Cluster,
}

/// Messages waiting in the pipeline's consumers at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Backlog {
    /// Seconds since the trial started.
    pub t_s: f64,
    /// `CHAT_IN` (sequencer consumers): not yet delivered plus delivered but unacked.
    pub inbound: u64,
    /// `CHAT_MSGS` (fan-out consumers), the same.
    pub stamped: u64,
}

impl Backlog {
    pub fn total(&self) -> u64 {
        self.inbound + self.stamped
    }
}

impl System {
    /// Starts nats-server, provisions it, and starts every service; with `services: false`
    /// only nats-server runs (the baseline).
    pub async fn start(services: bool) -> Result<Self> {
        Self::start_with(services, &[]).await
    }

    /// Like [`System::start`], with extra environment variables for the fan-out worker (its
    /// group budgets, say).
    pub async fn start_with(services: bool, fanout_env: &[(&str, String)]) -> Result<Self> {
        Self::start_partitioned(services, fanout_env, None).await
    }

    /// Like [`System::start_with`], with `partitions` conversation partitions.
    pub async fn start_partitioned(
        services: bool,
        fanout_env: &[(&str, String)],
        partitions: Option<u32>,
    ) -> Result<Self> {
        Self::start_full(services, fanout_env, &[], partitions).await
    }

    /// Like [`System::start_partitioned`], with extra environment variables for the gateway
    /// too (its admin listener, say).
    pub async fn start_full(
        services: bool,
        fanout_env: &[(&str, String)],
        gateway_env: &[(&str, String)],
        partitions: Option<u32>,
    ) -> Result<Self> {
        Self::start_configured(
            services,
            fanout_env,
            gateway_env,
            partitions,
            NatsMode::default(),
        )
        .await
    }

    /// Like [`System::start_full`], with nats-server in `mode` (fsync always, TLS).
    pub async fn start_configured(
        services: bool,
        fanout_env: &[(&str, String)],
        gateway_env: &[(&str, String)],
        partitions: Option<u32>,
        mode: NatsMode,
    ) -> Result<Self> {
        let n = usize::from(services);
        let monitor = chat_testkit::free_port();
        let nats_config = mode.config(monitor);
        let mut cluster = Cluster::with_nats_config(
            ClusterConfig {
                gateways: n,
                sequencers: n,
                fanouts: n,
                // The production default (one sequencer: it owns every partition either way).
                sequencer_balance: true,
            },
            partitions,
            nats_config.as_deref(),
        )
        .await;
        let services_of = [
            (
                "CHAT_GATEWAY",
                cluster.gateways.iter_mut().collect::<Vec<_>>(),
            ),
            ("CHAT_SEQUENCER", cluster.sequencers.iter_mut().collect()),
            ("CHAT_FANOUT", cluster.fanouts.iter_mut().collect()),
        ];
        for (prefix, services) in services_of {
            let env = mode.service_env(prefix);
            for s in services {
                for (k, v) in &env {
                    s.set_env(k, v);
                }
            }
        }
        for f in &mut cluster.fanouts {
            for (k, v) in fanout_env {
                f.set_env(k, v);
            }
        }
        for g in &mut cluster.gateways {
            for (k, v) in gateway_env {
                g.set_env(k, v);
            }
        }
        if services {
            for s in cluster.sequencers.iter_mut().chain(&mut cluster.fanouts) {
                s.spawn();
            }
            cluster.spawn_gateways().await;
        }
        let sys = Self { cluster };
        if services {
            sys.wait_pinned(Duration::from_secs(60)).await?;
            if mode.tls {
                let names = check_tls(monitor).await?;
                println!("TLS (client certificates): {}", names.join(", "));
            }
        }
        Ok(sys)
    }

    /// nats-server, `gateways` gateways (each with `max_connections` = `max_per_gateway`), one
    /// sequencer and one fan-out worker: the idle fleet (`bench idle --clients`).
    pub async fn start_fleet(gateways: usize, max_per_gateway: usize) -> Result<Self> {
        let mut cluster = Cluster::new(ClusterConfig {
            gateways: gateways.max(1),
            sequencers: 1,
            fanouts: 1,
            // The production default (one sequencer: it owns every partition either way).
            sequencer_balance: true,
        })
        .await;
        for g in &mut cluster.gateways {
            g.set_env("CHAT_GATEWAY_MAX_CONNECTIONS", &max_per_gateway.to_string());
        }
        for s in cluster.sequencers.iter_mut().chain(&mut cluster.fanouts) {
            s.spawn();
        }
        cluster.spawn_gateways().await;
        let sys = Self { cluster };
        sys.wait_pinned(Duration::from_secs(60)).await?;
        Ok(sys)
    }

    /// Waits until a process pulls every partition consumer (the sequencer's and the fan-out
    /// worker's, one-to-one and group): a service that is up but not pulling yet (the fan-out
    /// worker listens for its peers first) would otherwise show as latency in the first trial.
    async fn wait_pinned(&self, limit: Duration) -> Result<()> {
        let js = self.cluster.js();
        let deadline = tokio::time::Instant::now() + limit;
        let partitions = chat_protocol::jetstream::live_partitions(&js).await?;
        let consumers: Vec<(&str, String)> = (0..partitions)
            .flat_map(|p| {
                [
                    (STREAM_INBOUND, sequencer_consumer(p)),
                    (STREAM_STAMPED, fanout_consumer(p)),
                    (STREAM_STAMPED, fanout_group_consumer(p)),
                ]
            })
            .collect();
        for (stream, name) in consumers {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
                .get_consumer_from_stream(&name, stream)
                .await
                .with_context(|| format!("consumer {name} of {stream}"))?;
            // A pull request waiting on the consumer: some process pulls it.
            while consumer.info().await.context("consumer info")?.num_waiting == 0 {
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!("no service pulls {stream}/{name} after {limit:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    pub fn secret(&self) -> &'static [u8] {
        SECRET.as_bytes()
    }

    /// `ws://127.0.0.1:<port>/ws` of the gateway.
    pub fn gateway_url(&self) -> &str {
        &self.cluster.gateway_urls[0]
    }

    pub fn nats_url(&self) -> String {
        self.cluster.nats.url()
    }

    /// Every process of the run, the load generator first.
    pub fn procs(&self) -> Vec<Proc> {
        let mut procs = vec![
            Proc {
                name: "bench".into(),
                pid: std::process::id(),
            },
            Proc {
                name: "nats-server".into(),
                pid: self.cluster.nats.pid(),
            },
        ];
        let c = &self.cluster;
        for s in c.gateways.iter().chain(&c.sequencers).chain(&c.fanouts) {
            procs.push(Proc {
                name: s.name().to_owned(),
                pid: s.pid(),
            });
        }
        procs
    }

    /// The pipeline's consumer backlog now (sum over the partition consumers), read with one
    /// consumer list request per stream.
    pub async fn backlog(&self) -> Result<Backlog> {
        use futures::TryStreamExt;
        let js = self.cluster.js();
        let mut b = Backlog::default();
        for (stream, prefix) in [(STREAM_INBOUND, "seq-p"), (STREAM_STAMPED, "fanout-p")] {
            let infos: Vec<_> = js
                .get_stream(stream)
                .await
                .with_context(|| format!("stream {stream}"))?
                .consumers()
                .try_collect()
                .await
                .with_context(|| format!("consumers of {stream}"))?;
            let sum: u64 = infos
                .iter()
                .filter(|i| i.name.starts_with(prefix))
                .map(|i| i.num_pending + i.num_ack_pending as u64)
                .sum();
            if stream == STREAM_INBOUND {
                b.inbound = sum;
            } else {
                b.stamped = sum;
            }
        }
        Ok(b)
    }

    /// Waits until the backlog is empty, at most `limit`; `true` if it emptied.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.backlog().await.is_ok_and(|b| b.total() == 0) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the services (SIGTERM, drain order), then nats-server on drop.
    pub fn stop(mut self) -> Vec<String> {
        self.cluster.stop_services(Duration::from_secs(10))
    }
}
