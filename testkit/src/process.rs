//! [`ChildProcess`]: a `std::process::Child` that is killed on drop and can be
//! signalled for fault-injection tests.

use std::io;
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

/// A child process that is `SIGKILL`ed and reaped when dropped.
///
/// Signals are only ever sent while the child has not been reaped yet, so a
/// recycled PID can never be hit by mistake. Once the child has exited,
/// the signal methods are no-ops that return `Ok(())`.
#[derive(Debug)]
pub struct ChildProcess {
    child: Child,
    exit: Option<ExitStatus>,
}

impl ChildProcess {
    /// Spawns `cmd` and wraps the resulting child.
    pub fn spawn(cmd: &mut Command) -> io::Result<Self> {
        cmd.spawn().map(Self::new)
    }

    /// Wraps an already spawned child.
    pub fn new(child: Child) -> Self {
        Self { child, exit: None }
    }

    /// OS process id of the child.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The wrapped child (e.g. to take its stdout pipe).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Non-blocking check whether the child has exited (reaps it if so).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait()?;
        }
        Ok(self.exit)
    }

    /// `true` while the child has not exited (a stopped child is running).
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Blocks until the child exits.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        let status = self.child.wait()?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Waits up to `timeout` for the child to exit; `Ok(None)` on timeout.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the child unless it already
    /// exited.
    pub fn signal(&mut self, signal: libc::c_int) -> io::Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.pid())
            .map_err(|_| io::Error::other("pid does not fit in pid_t"))?;
        // SAFETY: plain syscall; the child has not been reaped (checked above
        // and only this value can reap it), so `pid` still refers to it.
        if unsafe { libc::kill(pid, signal) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Sends `SIGKILL` and waits for the child to exit (so its ports and
    /// files are released when this returns). Works on stopped children too.
    pub fn sigkill(&mut self) -> io::Result<ExitStatus> {
        self.signal(libc::SIGKILL)?;
        self.wait()
    }

    /// Sends `SIGTERM` (graceful shutdown); does not wait.
    pub fn sigterm(&mut self) -> io::Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// Sends `SIGSTOP` (freezes the process, e.g. to simulate a hung peer)
    /// and waits briefly until the kernel reports it as stopped.
    pub fn sigstop(&mut self) -> io::Result<()> {
        self.signal(libc::SIGSTOP)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match proc_state(self.pid()) {
                Some('T') | Some('t') | None => break,
                Some(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
        Ok(())
    }

    /// Sends `SIGCONT` (resumes a process stopped with [`Self::sigstop`]).
    pub fn sigcont(&mut self) -> io::Result<()> {
        self.signal(libc::SIGCONT)
    }
}

impl From<Child> for ChildProcess {
    fn from(child: Child) -> Self {
        Self::new(child)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.sigkill();
    }
}

/// Process state letter from `/proc/<pid>/stat` (Linux only; `None` if
/// unavailable).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Format: "pid (comm) S ..." where comm may contain spaces/parens.
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}
