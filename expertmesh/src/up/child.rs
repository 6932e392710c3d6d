//! One child process of `expertmesh up`: started tied to `up` (it dies with
//! it), its first stdout line (the machine-readable start line) read on a
//! thread of its own, and its stderr copied line by line to `up`'s stderr
//! and to its own log file.

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Coordinator,
    Node,
    Router,
}

/// How to start a child (again).
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub kind: Kind,
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// A started child.
pub struct Running {
    child: Child,
    pub pid: u32,
    pub started: Instant,
    line: mpsc::Receiver<String>,
    /// Its start line, once printed.
    pub start_line: Option<String>,
}

impl Running {
    /// Starts `spec`, its stderr appended to `log`.
    pub fn spawn(spec: &Spec, log: &Path) -> Result<Self> {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args).stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        expertmesh_plumbing::process::tie_to_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", spec.name))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let stderr = child.stderr.take().context("child stderr")?;
        let (tx, line) = mpsc::channel();
        std::thread::Builder::new().name(format!("stdout-{}", spec.name)).spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next()
                && tx.send(first.trim().to_string()).is_err()
            {
                return;
            }
            // Nothing else is expected on stdout; keep the pipe drained.
            lines.map_while(Result::ok).for_each(drop);
        })?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("{}", log.display()))?;
        std::thread::Builder::new().name(format!("stderr-{}", spec.name)).spawn(move || tee(stderr, file))?;
        Ok(Running { pid: child.id(), child, started: Instant::now(), line, start_line: None })
    }

    /// Picks up the start line if it has been printed since.
    pub fn poll_line(&mut self) -> bool {
        match self.line.try_recv() {
            Ok(l) if self.start_line.is_none() => {
                self.start_line = Some(l);
                true
            }
            _ => false,
        }
    }

    /// How it ended, if it has.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(describe(status)),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    /// SIGTERM: the child drains. A child that has exited already (not yet
    /// reaped, so the pid is still ours) ignores it.
    pub fn terminate(&self) -> std::io::Result<()> {
        // SAFETY: plain kill(2) on a pid we spawned and have not reaped.
        match unsafe { libc::kill(self.pid as i32, libc::SIGTERM) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    /// SIGKILL (if still running) and reap.
    pub fn kill(&mut self) -> std::io::Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill()?;
        }
        self.child.wait().map(drop)
    }
}

/// "exit status 1", "signal 9".
fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => s.to_string(),
    }
}

/// Copies a child's stderr to ours and to its log, a line at a time so
/// children's lines never interleave mid-line.
fn tee(from: impl std::io::Read, mut log: std::fs::File) {
    let mut r = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                // A full disk or a closed terminal must not stop the child
                // (its pipe would fill): such lines are lost, not fatal.
                if std::io::stderr().lock().write_all(&line).is_err() || log.write_all(&line).is_err() {
                    continue;
                }
            }
        }
    }
}
