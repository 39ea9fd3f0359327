//! A tiny per-op wall-clock profile, off by default. `mood bench --profile` turns it on and prints
//! where a forward spends its time, by op family (the same stems as `backend::cpu`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn reset() {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// Accumulated (op, total time, calls), sorted by time, longest first.
pub fn snapshot() -> Vec<(&'static str, Duration, u64)> {
    let totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = totals.iter().map(|(k, (d, n))| (*k, *d, *n)).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

/// Times the enclosing scope under `op` when profiling is on; free otherwise.
pub struct Scope {
    op: &'static str,
    start: Option<Instant>,
}

pub fn scope(op: &'static str) -> Scope {
    let start = ENABLED.load(Ordering::Relaxed).then(Instant::now);
    Scope { op, start }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            let dt = start.elapsed();
            let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            let e = totals.entry(self.op).or_default();
            e.0 += dt;
            e.1 += 1;
        }
    }
}
