//! Progress of long work for the three places stderr goes: a terminal gets indicatif's bar; a file
//! or pipe (a batch scheduler's log) gets one plain line every few seconds with the count, the
//! rate and the time left, which a bar's carriage returns would turn into one unreadable line;
//! `--quiet` gets nothing. The lines come from a ticker thread, so a log moves even while one
//! step takes longer than the interval.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);
/// Milliseconds between plain lines; 30 s keeps a day-long job's log short.
static INTERVAL_MS: AtomicU64 = AtomicU64::new(30_000);

/// Sets `--quiet` and `--progress-every SECS` for the whole process.
pub fn configure(quiet: bool, every_secs: Option<f64>) {
    QUIET.store(quiet, Ordering::Relaxed);
    if let Some(s) = every_secs.filter(|s| s.is_finite() && *s > 0.0) {
        INTERVAL_MS.store(((s * 1000.0) as u64).max(1), Ordering::Relaxed);
    }
}

/// Whether `--quiet` was given (commands also drop their notes then).
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

struct Lines {
    what: String,
    unit: String,
    len: AtomicU64,
    pos: AtomicU64,
    msg: Mutex<String>,
    start: Instant,
    /// Set when the work is over; the condition variable wakes the ticker at once.
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Lines {
    fn line(&self) -> String {
        let (len, pos) = (
            self.len.load(Ordering::Relaxed),
            self.pos.load(Ordering::Relaxed),
        );
        let secs = self.start.elapsed().as_secs_f64();
        let rate = pos as f64 / secs.max(1e-9);
        let eta = if pos > 0 && len >= pos {
            format!("{:.0} s", (len - pos) as f64 / rate)
        } else {
            "unknown".into()
        };
        let msg = self.msg.lock().map(|m| m.clone()).unwrap_or_default();
        format!(
            "{}: {pos}/{len} {} ({:.0}%), {rate:.2} {}/s, {secs:.0} s elapsed, ETA {eta}{}",
            self.what,
            self.unit,
            100.0 * pos as f64 / len.max(1) as f64,
            self.unit,
            if msg.is_empty() {
                String::new()
            } else {
                format!(", {msg}")
            }
        )
    }
}

enum Inner {
    Bar(ProgressBar),
    Lines(Arc<Lines>, Mutex<Option<std::thread::JoinHandle<()>>>),
    Hidden,
}

/// A progress display over `len` items; see the module comment for where it goes.
pub struct Progress {
    inner: Inner,
}

impl Progress {
    /// `what` names the work in plain lines ("extract"), `unit` the items ("images").
    pub fn new(len: u64, unit: &str, what: &str) -> Progress {
        let inner = if quiet() {
            Inner::Hidden
        } else if std::io::stderr().is_terminal() {
            let pb = ProgressBar::new(len);
            let tmpl = format!(
                "{{spinner}} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}}) {{msg}}"
            );
            pb.set_style(
                ProgressStyle::with_template(&tmpl)
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            // The spinner and clock move during a long step, so a slow step does not look hung.
            pb.enable_steady_tick(Duration::from_millis(250));
            Inner::Bar(pb)
        } else {
            let state = Arc::new(Lines {
                what: what.into(),
                unit: unit.into(),
                len: AtomicU64::new(len),
                pos: AtomicU64::new(0),
                msg: Mutex::new(String::new()),
                start: Instant::now(),
                stop: Mutex::new(false),
                wake: Condvar::new(),
            });
            let every = Duration::from_millis(INTERVAL_MS.load(Ordering::Relaxed));
            let s = state.clone();
            let ticker = std::thread::spawn(move || {
                let mut stop = match s.stop.lock() {
                    Ok(g) => g,
                    Err(_) => return,
                };
                loop {
                    // Checked before each wait: a stop set before this thread first takes the
                    // lock (an error right after the start) has already been notified, and
                    // waiting would hold the process's exit for a whole interval.
                    if *stop {
                        return;
                    }
                    let (g, timeout) = match s.wake.wait_timeout(stop, every) {
                        Ok(r) => r,
                        Err(_) => return,
                    };
                    stop = g;
                    if *stop {
                        return;
                    }
                    if timeout.timed_out() {
                        eprintln!("{}", s.line());
                    }
                }
            });
            Inner::Lines(state, Mutex::new(Some(ticker)))
        };
        Progress { inner }
    }

    pub fn inc(&self, n: u64) {
        match &self.inner {
            Inner::Bar(b) => b.inc(n),
            Inner::Lines(s, _) => {
                s.pos.fetch_add(n, Ordering::Relaxed);
            }
            Inner::Hidden => {}
        }
    }

    pub fn set_position(&self, pos: u64) {
        match &self.inner {
            Inner::Bar(b) => b.set_position(pos),
            Inner::Lines(s, _) => s.pos.store(pos, Ordering::Relaxed),
            Inner::Hidden => {}
        }
    }

    pub fn set_message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.inner {
            Inner::Bar(b) => b.set_message(msg),
            Inner::Lines(s, _) => {
                if let Ok(mut m) = s.msg.lock() {
                    *m = msg;
                }
            }
            Inner::Hidden => {}
        }
    }

    /// Runs `f` (which prints) with the bar out of the way.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.inner {
            Inner::Bar(b) => b.suspend(f),
            _ => f(),
        }
    }

    pub fn finish_and_clear(&self) {
        match &self.inner {
            Inner::Bar(b) => b.finish_and_clear(),
            Inner::Lines(s, ticker) => {
                if let Ok(mut stop) = s.stop.lock() {
                    *stop = true;
                }
                s.wake.notify_all();
                if let Some(t) = ticker.lock().ok().and_then(|mut t| t.take()) {
                    let _ = t.join();
                }
            }
            Inner::Hidden => {}
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish_and_clear();
    }
}
