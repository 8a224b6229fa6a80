//! What every run writes: the human summary on stdout, the command line that reproduces it,
//! and a JSON file (`<out>/<mode>.json`, plus a timestamped copy) with the machine, the
//! resolved settings and every figure.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::procstat::Usage;

/// Where the run happened.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub mem_total_kib: u64,
    /// 1-minute load average when the run started (other work on the box shows here).
    pub loadavg_at_start: String,
    pub kernel: String,
    /// `release` or `debug`: the build of the load generator (and of the services beside it).
    pub profile: &'static str,
    pub git_commit: Option<String>,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_default();
        let mem_total_kib = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let git_commit = Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        Self {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            mem_total_kib,
            loadavg_at_start: fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            git_commit,
        }
    }

    pub fn line(&self) -> String {
        format!(
            "machine: {} x {}, {:.1} GiB, load {} ({} build, commit {})",
            self.cores,
            self.cpu_model,
            self.mem_total_kib as f64 / 1024.0 / 1024.0,
            self.loadavg_at_start,
            self.profile,
            self.git_commit.as_deref().unwrap_or("?"),
        )
    }
}

/// The command line of this run, quoted for a POSIX shell.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line per process: CPU seconds, cores, CPU per 1,000 delivered, RSS.
pub fn usage_table(usage: &[Usage]) -> String {
    let mut s = String::from(
        "  process        cpu s   cores  ms cpu/1k delivered  rss KiB (start -> end)\n",
    );
    for u in usage {
        let per_k = u
            .cpu_ms_per_1000_delivered
            .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        s.push_str(&format!(
            "  {:<12} {:>7.2} {:>7.3} {:>19}  {} -> {}\n",
            u.name, u.cpu_s, u.cores, per_k, u.rss_start_kib, u.rss_end_kib
        ));
    }
    let other = other_cores(usage);
    if other > NOISY_CORES {
        s.push_str(&format!(
            "  NOTE: processes outside this run used {other:.2} cores meanwhile: noisy figures\n"
        ));
    }
    s
}

/// Above this many cores used by processes outside the run, a measurement counts as noisy.
pub const NOISY_CORES: f64 = 0.25;

/// Cores used by processes outside the run (the `other` row).
pub fn other_cores(usage: &[Usage]) -> f64 {
    usage
        .iter()
        .find(|u| u.name == crate::procstat::OTHER)
        .map_or(0.0, |u| u.cores)
}

/// The whole record of one run.
#[derive(Debug, Serialize)]
pub struct Record<'a, A: Serialize, R: Serialize> {
    pub mode: &'a str,
    /// Reproduce the run with this.
    pub command: String,
    /// Every setting, defaults resolved.
    pub settings: &'a A,
    pub machine: Machine,
    /// Seconds since the Unix epoch when the run ended.
    pub finished_at: u64,
    pub result: &'a R,
}

/// Writes `<out>/<mode>.json` and `<out>/<mode>-<unix time>.json`; returns the first path.
pub fn write<A: Serialize, R: Serialize>(
    out: &Path,
    mode: &str,
    settings: &A,
    machine: Machine,
    result: &R,
) -> Result<PathBuf> {
    fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let finished_at = chat_protocol::now_ms() / 1000;
    let record = Record {
        mode,
        command: command_line(),
        settings,
        machine,
        finished_at,
        result,
    };
    let json = serde_json::to_string_pretty(&record)?;
    let latest = out.join(format!("{mode}.json"));
    fs::write(&latest, &json).with_context(|| format!("write {}", latest.display()))?;
    let stamped = out.join(format!("{mode}-{finished_at}.json"));
    fs::write(&stamped, &json).with_context(|| format!("write {}", stamped.display()))?;
    Ok(latest)
}
