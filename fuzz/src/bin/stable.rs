//! A fuzzing harness for stable Rust, where cargo-fuzz (nightly, libFuzzer) is not available: it
//! mutates the seed corpus of a target with a simple deterministic mutator and runs each input in a
//! forked child under an address-space limit and an alarm, so a crash, an allocation beyond the
//! limit or a hang is counted and saved instead of ending the run. No coverage feedback: it finds
//! what mutations of real files reach, which is what the hostile-file defects were.
//!
//! ```text
//! stable seed [--fixtures DIR] [--corpus DIR]
//! stable TARGET [--seconds N] [--mem-mb MB] [--timeout S] [--seed N] [--corpus DIR] [--max-len B]
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Allocation failure ends a child with this code, so running out of the memory limit is told
/// apart from a crash (Rust's own handler would abort, like any other crash).
const OOM_EXIT: i32 = 77;
const PANIC_EXIT: i32 = 101;

struct Counting;

// SAFETY: every call is forwarded to the system allocator unchanged; only a failed allocation
// (null) is turned into an exit.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if p.is_null() {
            unsafe { libc::_exit(OOM_EXIT) };
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if p.is_null() {
            unsafe { libc::_exit(OOM_EXIT) };
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, n) };
        if q.is_null() {
            unsafe { libc::_exit(OOM_EXIT) };
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// xorshift64*: deterministic, so input `i` of a run can be rebuilt from the seed alone.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that sit on the edges of sizes, counts and shapes.
const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_fff0,
    0xffff_ffff,
    1 << 40,
    (1 << 62) + 1,
    i64::MAX as u64,
    u64::MAX,
];

/// One to eight stacked mutations of `base` (with `other` for splicing), at most `max_len` long.
fn mutate(base: &[u8], other: &[u8], rng: &mut Rng, max_len: usize) -> Vec<u8> {
    let mut d = base.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(d.len() + 1);
        match rng.below(9) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            1 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] = rng.next() as u8;
            }
            2 => {
                // An edge value, little- or big-endian, 1 to 8 bytes wide, over what is there.
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let w = [1, 2, 4, 8][rng.below(4)];
                let bytes = if rng.below(2) == 0 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let src = if bytes[0] == 0 && w < 8 {
                    &bytes[8 - w..]
                } else {
                    &bytes[..w]
                };
                for (k, b) in src.iter().enumerate() {
                    if let Some(x) = d.get_mut(at + k) {
                        *x = *b;
                    }
                }
            }
            3 => {
                // ASCII digits: the text numbers of headers (.npy shapes, JSON, pickle lines).
                let n = INTERESTING[rng.below(INTERESTING.len())].to_string();
                let end = (at + rng.below(8)).min(d.len());
                d.splice(at..end, n.bytes());
            }
            4 if !d.is_empty() => {
                let len = 1 + rng.below(64.min(d.len()));
                let end = (at + len).min(d.len());
                d.drain(at.min(end)..end);
            }
            5 => {
                let n = 1 + rng.below(32);
                let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(at..at, ins);
            }
            6 if !d.is_empty() => {
                // Repeat a chunk: nesting, repeated opcodes, duplicated records.
                let start = rng.below(d.len());
                let len = 1 + rng.below(16.min(d.len() - start));
                let chunk = d[start..start + len].to_vec();
                for _ in 0..1 + rng.below(16) {
                    d.splice(at..at, chunk.iter().copied());
                }
            }
            7 if !other.is_empty() => {
                let s = rng.below(other.len());
                let len = 1 + rng.below(256.min(other.len() - s));
                let end = (at + rng.below(256)).min(d.len());
                d.splice(at..end, other[s..s + len].iter().copied());
            }
            8 => d.truncate(at),
            _ => {}
        }
        d.truncate(max_len);
    }
    d
}

#[derive(Default)]
struct Counts {
    execs: u64,
    ok: u64,
    crashes: u64,
    ooms: u64,
    timeouts: u64,
}

enum Outcome {
    Ok,
    Crash(String),
    Oom,
    Timeout,
}

/// Runs `f(input)` in a forked child limited to `mem` bytes of address space and `timeout`.
fn run_child(f: fn(&[u8]), input: &[u8], mem: u64, timeout: Duration) -> Outcome {
    // SAFETY: the parent is single-threaded (it never runs library code), so the child may do
    // anything; it leaves with _exit and never returns into the parent's code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        panic!("fork failed: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            let lim = libc::rlimit {
                rlim_cur: mem as libc::rlim_t,
                rlim_max: mem as libc::rlim_t,
            };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            libc::alarm(timeout.as_secs().max(1) as u32);
        }
        let code = match std::panic::catch_unwind(|| f(input)) {
            Ok(()) => 0,
            Err(_) => PANIC_EXIT,
        };
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            0 => Outcome::Ok,
            OOM_EXIT => Outcome::Oom,
            PANIC_EXIT => Outcome::Crash("panic".into()),
            c => Outcome::Crash(format!("exit {c}")),
        }
    } else if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGALRM {
        Outcome::Timeout
    } else {
        Outcome::Crash(format!("signal {}", libc::WTERMSIG(status)))
    }
}

fn arg<T: std::str::FromStr>(args: &[String], key: &str, default: T) -> T {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{key} {v}: not a valid value"))
        })
        .unwrap_or(default)
}

fn here() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn seed_cmd(args: &[String]) {
    let fixtures: PathBuf = arg(args, "--fixtures", here().join("../tests/fixtures"));
    let corpus: PathBuf = arg(args, "--corpus", here().join("corpus"));
    match mood_fuzz::seed::write_corpus(&fixtures, &corpus) {
        Ok(counts) => {
            for (t, n) in counts {
                println!("{t}: {n} seeds in {}", corpus.join(t).display());
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn load_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(target) = args.first().cloned() else {
        eprintln!("usage: stable seed | stable TARGET [--seconds N] [--mem-mb MB] [--timeout S] [--seed N] [--corpus DIR] [--max-len B]");
        std::process::exit(2);
    };
    if target == "seed" {
        return seed_cmd(&args);
    }
    let Some(&(_, f)) = mood_fuzz::TARGETS.iter().find(|(n, _)| *n == target) else {
        let names: Vec<&str> = mood_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("unknown target `{target}`; targets: {}", names.join(", "));
        std::process::exit(2);
    };
    let seconds: u64 = arg(&args, "--seconds", 60);
    let mem = arg::<u64>(&args, "--mem-mb", 2048) << 20;
    let timeout = Duration::from_secs(arg(&args, "--timeout", 10));
    let seed: u64 = arg(&args, "--seed", 1);
    let max_len: usize = arg(&args, "--max-len", 1 << 20);
    let corpus_dir: PathBuf = arg(&args, "--corpus", here().join("corpus")).join(&target);
    let corpus = load_corpus(&corpus_dir);
    if corpus.is_empty() {
        eprintln!(
            "no seeds in {}: run `cargo run --release --no-default-features --bin stable -- seed` first",
            corpus_dir.display()
        );
        std::process::exit(2);
    }
    // Children get one worker thread each and a scratch directory of this run.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let scratch = std::env::temp_dir().join(format!("mood-fuzz-{target}-{}", std::process::id()));
    std::env::set_var("MOOD_FUZZ_SCRATCH", &scratch);
    // Panics are counted, not printed once per input.
    std::panic::set_hook(Box::new(|_| {}));
    let artifacts = here().join("artifacts").join(&target);
    let mut c = Counts::default();
    let start = Instant::now();
    let deadline = Duration::from_secs(seconds);
    // Every seed once as it is, then mutations.
    let mut i = 0u64;
    while start.elapsed() < deadline {
        let input = if (i as usize) < corpus.len() {
            corpus[i as usize].clone()
        } else {
            let mut rng = Rng::new(seed ^ i.wrapping_mul(0xD134_2543_DE82_EF95));
            let base = &corpus[rng.below(corpus.len())];
            let other = &corpus[rng.below(corpus.len())];
            mutate(base, other, &mut rng, max_len)
        };
        let outcome = run_child(f, &input, mem, timeout);
        c.execs += 1;
        let kind = match outcome {
            Outcome::Ok => {
                c.ok += 1;
                None
            }
            Outcome::Crash(why) => {
                c.crashes += 1;
                Some(format!("crash-{why}").replace(' ', "-"))
            }
            Outcome::Oom => {
                c.ooms += 1;
                Some("oom".to_string())
            }
            Outcome::Timeout => {
                c.timeouts += 1;
                Some("timeout".to_string())
            }
        };
        if let Some(kind) = kind {
            std::fs::create_dir_all(&artifacts).ok();
            let p = artifacts.join(format!("{kind}-{i}"));
            std::fs::write(&p, &input).ok();
            eprintln!("{target}: input {i}: {kind}, saved as {}", p.display());
        }
        i += 1;
    }
    std::fs::remove_dir_all(&scratch).ok();
    println!(
        "{target}: {} executions in {:.0} s ({} seeds, seed {seed}, {} MB, {} s timeout): {} crashes, {} out of memory, {} timeouts",
        c.execs,
        start.elapsed().as_secs_f64(),
        corpus.len(),
        mem >> 20,
        timeout.as_secs(),
        c.crashes,
        c.ooms,
        c.timeouts
    );
    if c.crashes + c.ooms + c.timeouts > 0 {
        std::process::exit(1);
    }
}
