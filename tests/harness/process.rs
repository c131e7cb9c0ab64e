//! Every process a test starts is owned by a [`Guard`]: dropped, also while a panic unwinds, it stops the process
//! (and whatever the process started) and reaps it. Signals go through the `nix` crate, never an external `kill`,
//! which a minimal system may lack. Every wait has a deadline and fails naming what it waited for.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// How long a command run to completion ([`output`], [`Run::run`]) may take: a server's self-test or a Nix build
/// on a loaded machine takes well over a minute, a hung one is stopped long before nextest's 10 minutes.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(300);

/// How long a process has between its stop signal and SIGKILL.
const GRACE: Duration = Duration::from_secs(10);

/// A child process that is stopped and reaped when the guard is dropped.
pub struct Guard {
    child: Option<Child>,
    name: String,
    stop_signal: Signal,
}

impl Guard {
    /// Spawns `command`, naming it `name` in every failure message.
    pub fn spawn(command: &mut Command, name: &str) -> Guard {
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start {name} ({command:?}): {e}; run scripts/install-test-deps")
        });
        Guard::new(child, name)
    }

    /// Takes ownership of an already spawned `child`.
    pub fn new(child: Child, name: &str) -> Guard {
        Guard {
            child: Some(child),
            name: name.to_owned(),
            stop_signal: Signal::SIGTERM,
        }
    }

    /// The signal that asks this process to stop (SIGTERM unless set; nginx wants SIGQUIT to stop gracefully).
    pub fn stop_signal(mut self, signal: Signal) -> Guard {
        self.stop_signal = signal;
        self
    }

    fn child(&mut self) -> &mut Child {
        let name = &self.name;
        self.child
            .as_mut()
            .unwrap_or_else(|| panic!("{name} was already stopped"))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("{} was already stopped", self.name))
            .id()
    }

    /// The child itself, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        self.child()
    }

    /// Whether the process is still there (not exited, or exited but not reaped by this guard yet).
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// Sends `signal`; panics if it cannot be delivered.
    pub fn signal(&self, signal: Signal) {
        if let Err(e) = signal_pid(self.pid(), signal) {
            panic!(
                "cannot send {signal} to {} ({}): {e}",
                self.name,
                self.pid()
            );
        }
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let name = self.name.clone();
        self.child()
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for {name}: {e}"))
    }

    /// Waits up to `deadline` for the process to exit by itself; fails the test after it (and the drop kills it).
    pub fn wait(&mut self, deadline: Duration) -> ExitStatus {
        self.wait_within(deadline)
            .unwrap_or_else(|| panic!("{} did not exit within {deadline:?}", self.name))
    }

    fn wait_within(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if started.elapsed() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends the stop signal and waits for the exit status; fails the test if the process ignores it.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(self.stop_signal);
        let status = self.wait_within(DEADLINE);
        let status = status.unwrap_or_else(|| {
            panic!(
                "{} ignored {} for {DEADLINE:?}",
                self.name, self.stop_signal
            )
        });
        self.child = None;
        status
    }

    /// SIGKILL, as a crash would, and reap. What the process started is killed too.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_tree(&mut child);
        }
    }

    /// Waits up to `deadline` for the process to exit and collects the output it was spawned to pipe.
    pub fn wait_with_output(mut self, deadline: Duration) -> Output {
        let child = self.child();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (stdout, stderr) = (read_in_background(stdout), read_in_background(stderr));
        let status = self.wait(deadline);
        self.child = None;
        Output {
            status,
            stdout: collect(stdout, deadline, &self.name),
            stderr: collect(stderr, deadline, &self.name),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let _ = signal_pid(child.id(), self.stop_signal);
            let started = Instant::now();
            while started.elapsed() < GRACE {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        kill_tree(&mut child);
    }
}

/// Sends `signal` to process `pid`.
pub fn signal_pid(pid: u32, signal: Signal) -> nix::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| nix::errno::Errno::ESRCH)?;
    kill(Pid::from_raw(pid), signal)
}

/// `signal` by name (`"TERM"`, `"SIGHUP"`, …) to `pid`; whether it was delivered.
pub fn send_signal(pid: u32, signal: &str) -> bool {
    let name = if signal.starts_with("SIG") {
        signal.to_owned()
    } else {
        format!("SIG{signal}")
    };
    let signal: Signal = name
        .parse()
        .unwrap_or_else(|_| panic!("no signal called {name}"));
    signal_pid(pid, signal).is_ok()
}

/// SIGKILL to `child` and to every process below it (collected first: once the parent dies they are orphans
/// nobody would stop, such as nginx's workers), then reaps `child`.
fn kill_tree(child: &mut Child) {
    let mut doomed = vec![child.id()];
    let mut i = 0;
    while i < doomed.len() {
        let parent = doomed[i];
        doomed.extend(children_of(parent));
        i += 1;
    }
    for pid in doomed {
        let _ = signal_pid(pid, Signal::SIGKILL);
    }
    let _ = child.wait();
}

/// The processes whose parent is `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| parent_of(*candidate) == Some(pid))
        .collect()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may hold spaces and parentheses, so parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn read_in_background(pipe: Option<impl Read + Send + 'static>) -> Option<mpsc::Receiver<Vec<u8>>> {
    let mut pipe = pipe?;
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        let _ = send.send(bytes);
    });
    Some(receive)
}

fn collect(reader: Option<mpsc::Receiver<Vec<u8>>>, deadline: Duration, name: &str) -> Vec<u8> {
    match reader {
        None => Vec::new(),
        Some(reader) => reader.recv_timeout(deadline).unwrap_or_else(|_| {
            panic!("{name} exited but its output was still open after {deadline:?}")
        }),
    }
}

/// Runs `command` to completion within [`COMMAND_DEADLINE`], capturing stdout and stderr (as `Command::output` does);
/// kills it and fails the test naming it if it takes longer.
pub fn output(command: &mut Command) -> Output {
    output_within(command, COMMAND_DEADLINE)
}

/// [`output`] with a deadline of its own.
pub fn output_within(command: &mut Command, deadline: Duration) -> Output {
    let name = format!("{command:?}");
    if command.get_program().is_empty() {
        panic!("no program to run");
    }
    // stdin is left as the caller set it (inherited by default; `scripts/test` runs the suite on /dev/null).
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    Guard::spawn(command, &name).wait_with_output(deadline)
}

/// [`Command::output`] with a deadline: `command.run()` instead of `command.output().unwrap()`.
pub trait Run {
    /// Runs to completion within [`COMMAND_DEADLINE`], capturing stdout and stderr.
    fn run(&mut self) -> Output;
}

impl Run for Command {
    fn run(&mut self) -> Output {
        output(self)
    }
}

/// Polls `condition` until it holds; panics naming `what` after [`DEADLINE`].
pub fn wait_until(what: &str, condition: impl FnMut() -> bool) {
    wait_until_within(what, DEADLINE, condition)
}

/// Polls `condition` until it holds; panics naming `what` after `deadline`.
pub fn wait_until_within(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
