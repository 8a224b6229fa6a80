//! A whole cluster of **real processes** for fault injection: one nats-server (the test kit's
//! [`NatsServer`], random port, temp dir), the streams and consumers provisioned with
//! [`provision_all`], and the service binaries `gateway`, `sequencer` and `fanout-worker` from
//! the cargo target directory as child processes.
//!
//! Services are configured only through their environment variables (`CHAT_GATEWAY_*`,
//! `CHAT_SEQUENCER_*`, `CHAT_FANOUT_*`, see each service's README), with the admin endpoint off,
//! `RUST_LOG=warn` (or `FAULTS_LOG`), and stdout and stderr appended to
//! `<temp dir>/logs/<name>.log`. Each
//! sequencer has its own store directory and instance id (`seq-a`, `seq-b`, ...: the value of
//! the `Chat-Stamper` header on what it stamps).
//!
//! Every service can be SIGKILLed, SIGSTOPped, resumed, restarted with the same settings, or
//! stopped with SIGTERM (it drains). Dropping a [`Cluster`] kills whatever still runs and, when
//! the thread is panicking (a failed scenario), prints the tail of every log first.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use chat_protocol::jetstream::{Overrides, provision_all};
use chat_testkit::{ChildProcess, NatsServer};

/// HS256 secret shared by the gateways and the simulated clients (letters only: figment would
/// parse a numeric env value as a number).
pub const SECRET: &str = "fault-suite-secret";

/// Set (non-empty) to keep each scenario's temp dir (logs, stores) after the run.
pub const KEEP_DIR_ENV: &str = "FAULTS_KEEP_DIR";

/// The services' `RUST_LOG` (default `warn`), e.g. `FAULTS_LOG=info` to see every hold-back
/// and pull stream restart of the sequencers in their logs.
pub const LOG_ENV: &str = "FAULTS_LOG";

/// How much of each log a failed scenario prints.
const LOG_TAIL_BYTES: u64 = 6 * 1024;

/// The cargo profile directory holding this test binary: `current_exe()` is
/// `<target>/<profile>/deps/<test>-<hash>`, so this is `<target>/<profile>`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe of the test binary");
    let parent = exe.parent().expect("the test binary lives in a directory");
    let dir = if parent.file_name().is_some_and(|n| n == "deps") {
        parent.parent().unwrap_or(parent)
    } else {
        parent
    };
    dir.to_path_buf()
}

/// The cargo target directory (`<target>` above; `<target>/<triple>` when cross-compiling).
pub fn target_dir() -> PathBuf {
    let profile = profile_dir();
    profile.parent().map_or(profile.clone(), Path::to_path_buf)
}

/// Path of a service binary (`gateway`, `sequencer`, `fanout-worker`) built next to this test.
///
/// # Panics
/// If it is missing, telling how to build it.
pub fn service_bin(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    if !path.is_file() {
        panic!(
            "the `{name}` binary is missing at {}: the fault suite runs the real service \
             binaries; run `cargo build --workspace --bins` first (`cargo test --workspace` \
             builds them too)",
            path.display()
        );
    }
    path
}

/// One service child process and how to start it again.
#[derive(Debug)]
pub struct Service {
    name: String,
    bin: PathBuf,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    log: PathBuf,
    child: Option<ChildProcess>,
    spawns: u32,
}

impl Service {
    fn new(name: &str, bin: PathBuf, env: Vec<(String, String)>, dir: &Path) -> Self {
        Self {
            name: name.to_owned(),
            bin,
            env,
            cwd: dir.to_path_buf(),
            log: dir.join("logs").join(format!("{name}.log")),
            child: None,
            spawns: 0,
        }
    }

    /// Sets (or overrides) an environment variable for its next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Its name in logs and summaries (`gateway-1`, `seq-a`, `fanout-a`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// PID of the most recent process (0 before the first spawn).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, ChildProcess::pid)
    }

    /// Starts the process (again), appending to the same log file.
    ///
    /// # Panics
    /// If it is already running or cannot be spawned.
    pub fn spawn(&mut self) {
        assert!(!self.is_running(), "{} is already running", self.name);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open service log");
        self.spawns += 1;
        let _ = writeln!(
            log,
            "----- {} start #{} at {} ms -----",
            self.name,
            self.spawns,
            chat_protocol::now_ms()
        );
        let err = log.try_clone().expect("clone log handle");
        let mut cmd = Command::new(&self.bin);
        // Settings come only from what this harness sets: drop any inherited CHAT_* variable.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CHAT_") {
                cmd.env_remove(key);
            }
        }
        let level = std::env::var(LOG_ENV)
            .ok()
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| "warn".to_owned());
        cmd.env_remove("LOG_FORMAT")
            .env("RUST_LOG", level)
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        let child = ChildProcess::spawn(&mut cmd)
            .unwrap_or_else(|e| panic!("cannot spawn {} ({}): {e}", self.name, self.bin.display()));
        self.child = Some(child);
    }

    /// `true` while the process has not exited (a stopped process is running).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildProcess::is_running)
    }

    /// SIGKILL, and wait until it is gone.
    pub fn sigkill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child
                .sigkill()
                .unwrap_or_else(|e| panic!("SIGKILL {}: {e}", self.name));
        }
    }

    /// SIGSTOP (frozen: its sockets stay open, it answers nothing).
    pub fn sigstop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child
                .sigstop()
                .unwrap_or_else(|e| panic!("SIGSTOP {}: {e}", self.name));
        }
    }

    /// SIGCONT after [`Service::sigstop`].
    pub fn sigcont(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child
                .sigcont()
                .unwrap_or_else(|e| panic!("SIGCONT {}: {e}", self.name));
        }
    }

    /// Sends SIGTERM (a graceful drain) without waiting.
    pub fn sigterm(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.sigterm();
        }
    }

    /// Waits for the process to exit after [`Service::sigterm`]; SIGKILLs it after `timeout`.
    /// `Ok(None)` if it was not running; `Err` describes an overrun or a failed exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, String> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        match child.wait_timeout(timeout) {
            Ok(Some(status)) if status.success() => Ok(Some(status)),
            Ok(Some(status)) => Err(format!("{} exited with {status}", self.name)),
            Ok(None) => {
                let _ = child.sigkill();
                Err(format!(
                    "{} did not exit within {timeout:?} of SIGTERM (killed)",
                    self.name
                ))
            }
            Err(e) => Err(format!("waiting for {}: {e}", self.name)),
        }
    }

    /// The last `max` bytes of its log.
    pub fn log_tail(&self, max: u64) -> String {
        tail(&self.log, max)
    }

    /// Path of its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(len.saturating_sub(max))).is_ok() {
        let _ = file.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// How many of each service to run, and how the sequencers share the partitions.
#[derive(Debug, Clone, Copy)]
pub struct ClusterConfig {
    pub gateways: usize,
    pub sequencers: usize,
    pub fanouts: usize,
    /// `CHAT_SEQUENCER_BALANCE`: `true` (the production default), the sequencers split the
    /// partitions by rendezvous hashing over their heartbeats; `false`, every sequencer
    /// competes for every partition and the first one to pull owns them all (the others are
    /// hot standbys), which makes "the old owner" of every conversation one known process.
    pub sequencer_balance: bool,
}

/// nats-server plus every service process, in one temp dir.
pub struct Cluster {
    pub nats: NatsServer,
    pub gateways: Vec<Service>,
    /// `ws://127.0.0.1:<port>/ws`, one per gateway.
    pub gateway_urls: Vec<String>,
    pub sequencers: Vec<Service>,
    /// Store directory of each sequencer (kept after it exits, for the checker).
    pub store_dirs: Vec<PathBuf>,
    pub fanouts: Vec<Service>,
    client: async_nats::Client,
    dir: tempfile::TempDir,
}

/// `a`, `b`, `c`, ... for instance names.
fn letter(i: usize) -> char {
    char::from(b'a' + u8::try_from(i % 26).expect("small"))
}

impl Cluster {
    /// Starts nats-server, provisions every stream and consumer, and prepares every service.
    /// Nothing is spawned yet: see [`Cluster::spawn_gateways`] and the `spawn` methods of the
    /// services, so a scenario decides which sequencer and fan-out worker pull first.
    ///
    /// # Panics
    /// Outside a multi-thread tokio runtime (starting nats-server blocks), if a service binary
    /// is missing, or if nats-server cannot start or be provisioned.
    pub async fn new(config: ClusterConfig) -> Self {
        Self::with_partitions(config, None).await
    }

    /// [`Cluster::new`] with `partitions` conversation partitions (default: the default count).
    pub async fn with_partitions(config: ClusterConfig, partitions: Option<u32>) -> Self {
        let mut dir = tempfile::Builder::new()
            .prefix("chat-faults-")
            .tempdir()
            .expect("temp dir");
        if std::env::var_os(KEEP_DIR_ENV).is_some_and(|v| !v.is_empty()) {
            dir.disable_cleanup(true);
            eprintln!("{KEEP_DIR_ENV}: keeping {}", dir.path().display());
        }
        fs::create_dir_all(dir.path().join("logs")).expect("logs dir");
        let nats = tokio::task::block_in_place(NatsServer::start);
        let client = nats.client().await;
        provision_all(
            &client,
            &Overrides {
                partitions,
                ..Overrides::default()
            },
        )
        .await
        .expect("provision streams and consumers");
        let url = nats.url();
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };

        let gateway_bin = service_bin("gateway");
        let mut gateways = Vec::new();
        let mut gateway_urls = Vec::new();
        for i in 0..config.gateways {
            let listen = format!("127.0.0.1:{}", chat_testkit::free_port());
            gateway_urls.push(format!("ws://{listen}/ws"));
            gateways.push(Service::new(
                &format!("gateway-{}", i + 1),
                gateway_bin.clone(),
                env(&[
                    ("CHAT_GATEWAY_LISTEN", &listen),
                    ("CHAT_GATEWAY_ADMIN_LISTEN", ""),
                    ("CHAT_GATEWAY_NATS_URL", &url),
                    ("CHAT_GATEWAY_AUTH__HS256_SECRET", SECRET),
                    // The simulated users send and acknowledge far faster than a person.
                    ("CHAT_GATEWAY_SENDS_PER_SECOND", "1000"),
                    ("CHAT_GATEWAY_SEND_BURST", "2000"),
                    ("CHAT_GATEWAY_RECEIPTS_PER_SECOND", "1000"),
                    ("CHAT_GATEWAY_RECEIPT_BURST", "2000"),
                    ("CHAT_GATEWAY_SHUTDOWN_GRACE_MS", "3000"),
                ]),
                dir.path(),
            ));
        }

        let sequencer_bin = service_bin("sequencer");
        let mut sequencers = Vec::new();
        let mut store_dirs = Vec::new();
        for i in 0..config.sequencers {
            let name = format!("seq-{}", letter(i));
            let store = dir.path().join(&name).join("store");
            let store_str = store.display().to_string();
            store_dirs.push(store);
            sequencers.push(Service::new(
                &name,
                sequencer_bin.clone(),
                env(&[
                    ("CHAT_SEQUENCER_NATS_URL", &url),
                    ("CHAT_SEQUENCER_ADMIN_LISTEN", ""),
                    ("CHAT_SEQUENCER_STORE_DIR", &store_str),
                    ("CHAT_SEQUENCER_INSTANCE_ID", &name),
                    (
                        "CHAT_SEQUENCER_BALANCE",
                        if config.sequencer_balance {
                            "true"
                        } else {
                            "false"
                        },
                    ),
                ]),
                dir.path(),
            ));
        }

        let fanout_bin = service_bin("fanout-worker");
        let fanouts = (0..config.fanouts)
            .map(|i| {
                Service::new(
                    &format!("fanout-{}", letter(i)),
                    fanout_bin.clone(),
                    env(&[
                        ("CHAT_FANOUT_NATS_URL", &url),
                        ("CHAT_FANOUT_ADMIN_LISTEN", ""),
                    ]),
                    dir.path(),
                )
            })
            .collect();

        Self {
            nats,
            gateways,
            gateway_urls,
            sequencers,
            store_dirs,
            fanouts,
            client,
            dir,
        }
    }

    /// Spawns every gateway and waits until each accepts TCP connections.
    pub async fn spawn_gateways(&mut self) {
        for g in &mut self.gateways {
            g.spawn();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for url in &self.gateway_urls {
            let addr: SocketAddr = url
                .trim_start_matches("ws://")
                .trim_end_matches("/ws")
                .parse()
                .expect("gateway address");
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "gateway at {addr} not listening within 15 s\n{}",
                    self.log_tails()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// The harness's own NATS connection (reconnects on its own after a nats-server restart).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// A JetStream context on [`Cluster::client`].
    pub fn js(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client.clone())
    }

    /// The temp dir holding logs, stores and the NATS data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops every service with SIGTERM, in drain order: gateways (no more client traffic), then
    /// fan-out workers, then sequencers. Each group drains concurrently. Returns one line per
    /// service that overran `timeout` or exited unsuccessfully.
    pub fn stop_services(&mut self, timeout: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        for group in [&mut self.gateways, &mut self.fanouts, &mut self.sequencers] {
            // Only what still runs: a process the scenario killed has nothing to drain.
            let mut running: Vec<&mut Service> = group
                .iter_mut()
                .filter_map(|s| s.is_running().then_some(s))
                .collect();
            for s in &mut running {
                s.sigterm();
            }
            for s in &mut running {
                if let Err(e) = s.wait_exit(timeout) {
                    problems.push(e);
                }
            }
        }
        problems
    }

    /// The tail of every log (services and nats-server), for failure reports.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        let services = self
            .gateways
            .iter()
            .chain(&self.sequencers)
            .chain(&self.fanouts);
        for s in services {
            out.push_str(&format!(
                "--- {} ({}) ---\n{}\n",
                s.name(),
                s.log_path().display(),
                s.log_tail(LOG_TAIL_BYTES)
            ));
        }
        out.push_str(&format!(
            "--- nats-server ({}) ---\n{}\n",
            self.nats.log_path().display(),
            tail(&self.nats.log_path(), LOG_TAIL_BYTES)
        ));
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== service logs (temp dir {}) =====\n{}===== end of logs =====",
                self.dir.path().display(),
                self.log_tails()
            );
        }
        // Services first (ChildProcess kills on drop), then nats-server.
        self.gateways.clear();
        self.fanouts.clear();
        self.sequencers.clear();
    }
}
