//! Resource sampling from `/proc`: CPU seconds (user + system, every thread) and resident
//! memory of each process of the run, the load generator included.

use std::{fs, time::Instant};

use serde::Serialize;

/// One process of the run: its role and pid.
#[derive(Debug, Clone)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
}

/// What `/proc/<pid>` says at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    /// User + system CPU seconds since the process started (all threads).
    pub cpu_s: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
}

/// CPU seconds and RSS of `pid`, or `None` if it is gone.
pub fn sample(pid: u32) -> Option<Sample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Some(Sample {
        cpu_s: (utime + stime) as f64 / clock_ticks(),
        rss_kib,
    })
}

/// The peak resident set of `pid` so far (`VmHWM`), KiB, or `None` if it is gone.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU seconds the whole machine has been busy (every core, every process), from `/proc/stat`.
pub fn machine_busy_s() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find_map(|l| l.strip_prefix("cpu ")) else {
        return 0.0;
    };
    let v: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    busy as f64 / clock_ticks()
}

/// Name of the pseudo-process that stands for everything else on the machine.
pub const OTHER: &str = "other";

/// Samples of every process at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    at: Instant,
    machine_busy_s: f64,
    samples: Vec<(Proc, Option<Sample>)>,
}

impl Snapshot {
    pub fn take(procs: &[Proc]) -> Self {
        Self {
            at: Instant::now(),
            machine_busy_s: machine_busy_s(),
            samples: procs.iter().map(|p| (p.clone(), sample(p.pid))).collect(),
        }
    }

    /// RSS of the process named `name`, KiB (0 if unknown).
    pub fn rss_kib(&self, name: &str) -> u64 {
        self.samples
            .iter()
            .find(|(p, _)| p.name == name)
            .and_then(|(_, s)| s.map(|s| s.rss_kib))
            .unwrap_or(0)
    }
}

/// One process's use of resources between two snapshots.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub name: String,
    pub pid: u32,
    /// CPU seconds used between the snapshots.
    pub cpu_s: f64,
    /// Average share of one core over the interval (1.0 = one core busy).
    pub cores: f64,
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    /// CPU milliseconds per 1,000 delivered messages (= microseconds per message); absent when
    /// nothing was delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ms_per_1000_delivered: Option<f64>,
}

/// Per-process usage between `a` and `b`, with CPU per 1,000 of `delivered` messages, and a
/// last row [`OTHER`]: CPU the machine spent outside this run's processes (another build, say),
/// which tells how quiet the box was.
pub fn usage(a: &Snapshot, b: &Snapshot, delivered: u64) -> Vec<Usage> {
    let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    let per_k = |cpu_s: f64| (delivered > 0).then(|| cpu_s * 1e6 / delivered as f64);
    let mut rows: Vec<Usage> = a
        .samples
        .iter()
        .zip(&b.samples)
        .map(|((p, sa), (_, sb))| {
            let (sa, sb) = (sa.unwrap_or_default(), sb.unwrap_or_default());
            let cpu_s = (sb.cpu_s - sa.cpu_s).max(0.0);
            Usage {
                name: p.name.clone(),
                pid: p.pid,
                cpu_s,
                cores: cpu_s / wall,
                rss_start_kib: sa.rss_kib,
                rss_end_kib: sb.rss_kib,
                cpu_ms_per_1000_delivered: per_k(cpu_s),
            }
        })
        .collect();
    let ours: f64 = rows.iter().map(|u| u.cpu_s).sum();
    let other = (b.machine_busy_s - a.machine_busy_s - ours).max(0.0);
    rows.push(Usage {
        name: OTHER.into(),
        pid: 0,
        cpu_s: other,
        cores: other / wall,
        rss_start_kib: 0,
        rss_end_kib: 0,
        cpu_ms_per_1000_delivered: None,
    });
    rows
}

/// CPU microseconds per delivered message of the chat services together (gateway, sequencer,
/// fan-out worker: everything but nats-server and the load generator).
pub fn services_us_per_msg(usage: &[Usage], delivered: u64) -> Option<f64> {
    if delivered == 0 {
        return None;
    }
    let cpu: f64 = usage
        .iter()
        .filter(|u| is_service(&u.name))
        .map(|u| u.cpu_s)
        .sum();
    Some(cpu * 1e6 / delivered as f64)
}

/// The chat's own services, as named by the cluster (`gateway-1`, `seq-a`, `fanout-a`).
pub fn is_service(name: &str) -> bool {
    name.starts_with("gateway") || name.starts_with("seq-") || name.starts_with("fanout")
}

/// Raises this process's open-file limit (soft) to its hard limit; children spawned afterwards
/// (nats-server and the services) inherit it. Returns the (soft, hard) limit now in force.
pub fn raise_nofile() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the plain struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return (0, 0);
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    (lim.rlim_cur, lim.rlim_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss_kib > 0);
        assert!(sample(u32::MAX).is_none());
        let peak = peak_rss_kib(std::process::id()).expect("own /proc entry");
        assert!(peak >= s.rss_kib.min(peak) && peak > 0);
        assert!(peak_rss_kib(u32::MAX).is_none());
    }
}
