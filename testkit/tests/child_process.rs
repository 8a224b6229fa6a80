//! Tests for `chat_testkit::ChildProcess`.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use chat_testkit::ChildProcess;

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

fn sleeper() -> ChildProcess {
    ChildProcess::spawn(Command::new("sleep").arg("60")).expect("spawn sleep")
}

#[test]
fn sigstop_sigcont_sigkill() {
    let mut child = sleeper();
    let pid = child.pid();
    assert!(child.is_running());

    child.sigstop().unwrap();
    assert_eq!(state(pid), Some('T'));
    assert!(child.is_running());

    child.sigcont().unwrap();
    assert_ne!(state(pid), Some('T'));

    let status = child.sigkill().unwrap();
    assert_eq!(status.signal(), Some(SIGKILL));
    assert!(!child.is_running());
    // Reaped: no zombie left behind; further signals are no-ops.
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    child.sigstop().unwrap();
    child.sigcont().unwrap();
    child.sigkill().unwrap();
}

#[test]
fn stopped_child_is_killed_on_drop() {
    let mut child = sleeper();
    let pid = child.pid();
    child.sigstop().unwrap();
    drop(child);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn exited_child_and_wait_timeout() {
    let mut child = ChildProcess::spawn(&mut Command::new("true")).unwrap();
    let status = child
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("`true` exits");
    assert!(status.success());
    assert!(!child.is_running());

    let mut child = ChildProcess::from(Command::new("sleep").arg("60").spawn().unwrap());
    assert!(
        child
            .wait_timeout(Duration::from_millis(50))
            .unwrap()
            .is_none()
    );
    child.sigterm().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(SIGTERM));
}
