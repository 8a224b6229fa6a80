//! A real three-node (or n-node) nats-server cluster with JetStream, for R3 streams.

use std::time::{Duration, Instant};

use crate::{NatsServer, free_port};

/// How long [`NatsCluster::start`] waits for the JetStream meta leader.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// `n` nats-servers on `127.0.0.1`, routed to each other as cluster `chat-test`, each with its
/// own temp dir and JetStream store (see [`NatsServer`]). Streams created with
/// `num_replicas: 3` are replicated over them. Dropping it kills every node.
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes and waits until JetStream has a meta leader (streams can be created).
    ///
    /// # Panics
    /// If a node does not start, or the cluster forms no JetStream meta leader in time.
    pub async fn start(n: usize) -> Self {
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes: Vec<String> = route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let mut nodes: Vec<NatsServer> = (0..n)
            .map(|i| {
                let extra = format!(
                    "server_name: n{i}\ncluster {{\n  name: chat-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    route_ports[i],
                    routes.join(", ")
                );
                NatsServer::spawn_on(client_ports[i], &extra)
            })
            .collect();
        tokio::task::block_in_place(|| nodes.iter_mut().for_each(NatsServer::wait_started));
        let cluster = Self { nodes };
        cluster.wait_jetstream().await;
        cluster
    }

    /// A client URL listing every node (clients fail over between them).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Connects a client to the cluster.
    pub async fn client(&self) -> async_nats::Client {
        let servers: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|n| n.url().parse().expect("node URL"))
            .collect();
        async_nats::ConnectOptions::new()
            .connect(servers)
            .await
            .unwrap_or_else(|e| panic!("connect to cluster {}: {e}", self.url()))
    }

    async fn wait_jetstream(&self) {
        let client = self.client().await;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            // Answered with an error until the cluster has a meta leader.
            if let Ok(reply) = client.request("$JS.API.INFO", "".into()).await
                && serde_json::from_slice::<serde_json::Value>(&reply.payload)
                    .is_ok_and(|v| v.get("error").is_none() && v.get("streams").is_some())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster formed no JetStream meta leader within {READY_TIMEOUT:?}; logs:\n{}",
                self.nodes
                    .iter()
                    .map(|n| n.logs())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
