//! `up`'s supervision: a child that exits is started again with backoff;
//! one that keeps failing right after starting is given up on, stopping the
//! cluster with a message naming it and its log.
//!
//! What a restart means per component: an expert node re-registers (a new
//! incarnation at a new address) and the coordinator places experts on it
//! again; a coordinator re-joins the election; a router comes back on the
//! same ports when they were fixed, but the requests it was serving fail
//! (they lived in its memory).

use super::child::{Running, Spec};
use anyhow::{Result, bail};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A run shorter than this counts as a failed start.
const QUICK: Duration = Duration::from_secs(10);
/// Consecutive failed starts before `up` gives up.
const MAX_FAILED_STARTS: u32 = 5;

/// Wait before restart n (1-based) of a run of failed starts.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(250u64 << n.saturating_sub(1).min(5)).min(Duration::from_secs(8))
}

pub struct Supervised {
    pub spec: Spec,
    pub run: Option<Running>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub log: PathBuf,
    failed_starts: u32,
    restart_at: Option<Instant>,
}

impl Supervised {
    pub fn new(spec: Spec, log: PathBuf) -> Self {
        Supervised { spec, run: None, restarts: 0, last_exit: None, log, failed_starts: 0, restart_at: None }
    }

    /// The start line of the running incarnation, once printed.
    pub fn start_line(&self) -> Option<&str> {
        self.run.as_ref().and_then(|r| r.start_line.as_deref())
    }

    pub fn pid(&self) -> Option<u32> {
        self.run.as_ref().map(|r| r.pid)
    }

    pub fn start(&mut self) -> Result<()> {
        self.run = Some(Running::spawn(&self.spec, &self.log)?);
        self.restart_at = None;
        Ok(())
    }
}

/// Every child `up` runs, in start order.
pub struct Supervisor {
    pub children: Vec<Supervised>,
    /// Called with a child's name at each restart (the metric).
    pub on_restart: Box<dyn Fn(&str) + Send>,
}

impl Supervisor {
    pub fn get(&self, name: &str) -> Option<&Supervised> {
        self.children.iter().find(|c| c.spec.name == name)
    }

    /// One supervision round: start lines picked up, exits noticed (and
    /// restarts scheduled), due restarts made. Returns whether anything a
    /// state file shows changed; an error when a child keeps failing.
    pub fn poll(&mut self) -> Result<bool> {
        let mut changed = false;
        let now = Instant::now();
        for c in &mut self.children {
            if let Some(r) = &mut c.run {
                changed |= r.poll_line();
                if let Some(how) = r.exited() {
                    let ran = r.started.elapsed();
                    c.run = None;
                    c.failed_starts = if ran < QUICK { c.failed_starts + 1 } else { 1 };
                    if c.failed_starts > MAX_FAILED_STARTS {
                        bail!(
                            "{} keeps failing at start ({how}, {MAX_FAILED_STARTS} restarts in a row within {QUICK:?}); its log: {}",
                            c.spec.name,
                            c.log.display()
                        );
                    }
                    let wait = backoff(c.failed_starts);
                    eprintln!("up: {} exited ({how}); restarting it in {wait:?}", c.spec.name);
                    c.last_exit = Some(how);
                    c.restart_at = Some(now + wait);
                    changed = true;
                }
            }
            if c.run.is_none() && c.restart_at.is_some_and(|t| t <= now) {
                c.restarts += 1;
                eprintln!("up: restarting {} (restart {}; log {})", c.spec.name, c.restarts, c.log.display());
                (self.on_restart)(&c.spec.name);
                if let Err(e) = c.start() {
                    // Could not even spawn it: try again later, as a failed start.
                    eprintln!("up: {e:#}");
                    c.failed_starts += 1;
                    c.restart_at = Some(now + backoff(c.failed_starts));
                }
                changed = true;
            }
        }
        Ok(changed)
    }

    /// SIGTERM to every child (they drain), then SIGKILL after `grace`.
    pub fn stop_all(&mut self, grace: Duration) {
        for c in self.children.iter().rev() {
            if let Some(r) = &c.run
                && let Err(e) = r.terminate()
                && e.raw_os_error() != Some(libc::ESRCH)
            {
                eprintln!("up: stopping {}: {e}", c.spec.name);
            }
        }
        let deadline = Instant::now() + grace;
        for c in self.children.iter_mut().rev() {
            if let Some(r) = &mut c.run {
                while Instant::now() < deadline && r.exited().is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if let Err(e) = r.kill() {
                    eprintln!("up: reaping {}: {e}", c.spec.name);
                }
            }
            c.run = None;
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_all(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::up::child::Kind;

    fn sh(name: &str, script: &str, dir: &std::path::Path) -> Supervised {
        let spec = Spec {
            name: name.into(),
            kind: Kind::Node,
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
        };
        Supervised::new(spec, dir.join(format!("{name}.log")))
    }

    fn poll_until(s: &mut Supervisor, limit: Duration, mut done: impl FnMut(&Supervisor) -> bool) -> Result<()> {
        let t0 = Instant::now();
        while !done(s) {
            assert!(t0.elapsed() < limit, "not reached within {limit:?}");
            s.poll()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    #[test]
    fn a_child_that_exits_is_restarted_and_one_that_keeps_failing_is_given_up_on() {
        let dir = std::env::temp_dir().join(format!("em-sup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let restarted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = restarted.clone();
        let mut s = Supervisor {
            children: vec![sh("steady", "echo up; exec sleep 30", &dir), sh("broken", "echo oops >&2; exit 3", &dir)],
            on_restart: Box::new(move |n| r.lock().unwrap().push(n.to_string())),
        };
        for c in &mut s.children {
            c.start().unwrap();
        }
        poll_until(&mut s, Duration::from_secs(5), |s| s.get("steady").unwrap().start_line() == Some("up")).unwrap();
        // Kill the steady one: it comes back with a new pid.
        let pid = s.get("steady").unwrap().pid().unwrap();
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        poll_until(&mut s, Duration::from_secs(5), |s| s.get("steady").unwrap().pid().is_some_and(|p| p != pid))
            .unwrap();
        assert_eq!(s.get("steady").unwrap().last_exit.as_deref(), Some("signal 9"));
        // The broken one exhausts its restarts; the error names it and its log.
        let t0 = Instant::now();
        let e = loop {
            assert!(t0.elapsed() < Duration::from_secs(30), "never gave up");
            if let Err(e) = s.poll() {
                break e.to_string();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(e.contains("broken keeps failing at start") && e.contains("broken.log"), "{e}");
        assert!(std::fs::read_to_string(dir.join("broken.log")).unwrap().contains("oops"), "its stderr is in its log");
        let names = restarted.lock().unwrap().clone();
        assert!(
            names.contains(&"steady".to_string())
                && names.iter().filter(|n| *n == "broken").count() == MAX_FAILED_STARTS as usize,
            "{names:?}"
        );
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
