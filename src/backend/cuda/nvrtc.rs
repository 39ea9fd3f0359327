//! Run-time compilation of the embedded kernels with NVRTC (through cudarc, loaded with dlopen),
//! to PTX (`compute_XX`) or to a CUBIN (`sm_XX`, the full ptxas pass, which also reports registers
//! and spills), with a disk cache.
//!
//! - The library must be found by the dynamic loader: set LD_LIBRARY_PATH to the directory of
//!   libnvrtc.so.13 (a RUNPATH is not enough: libnvrtc dlopens libnvrtc-builtins by bare name).
//! - cuda_fp16.h / cuda_bf16.h are not bundled with NVRTC 13: their directory comes from
//!   `MOOD_CUDA_INCLUDE`, else `include/` next to the loaded libnvrtc's `lib/` (the pip wheel
//!   layout nvidia/cu13/{lib,include} and the toolkit's), else `$CUDA_HOME/include`, else
//!   /usr/local/cuda/include.
//! - Cache: `$XDG_CACHE_HOME/mood/nvrtc` or `~/.cache/mood/nvrtc`, one entry per hash of (source,
//!   arch, options, NVRTC version); files are written under a temporary name and renamed, so a
//!   reader never sees half an entry. `MOOD_NVRTC_CACHE=0` turns it off.
//! - NVRTC itself can crash the process (a SIGSEGV inside nvrtcCompileProgram was seen with 13.0 on
//!   a degenerate sm_90a source); tests therefore compile each file in a child process.

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cudarc::nvrtc::{result, sys};

use crate::error::{Error, Result};

/// What NVRTC produces: PTX (JIT-compiled by the driver at load) or a CUBIN (SASS for one arch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Ptx,
    Cubin,
}

impl Target {
    /// `sm_90` asks for a CUBIN, `compute_90` for PTX (NVRTC's own convention).
    pub fn of_arch(arch: &str) -> Result<Target> {
        if arch.starts_with("sm_") {
            Ok(Target::Cubin)
        } else if arch.starts_with("compute_") {
            Ok(Target::Ptx)
        } else {
            Err(Error::Cuda(format!(
                "arch `{arch}`: expected sm_XX (CUBIN) or compute_XX (PTX)"
            )))
        }
    }

    fn ext(self) -> &'static str {
        match self {
            Target::Ptx => "ptx",
            Target::Cubin => "cubin",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Compiled {
    pub stem: String,
    pub arch: String,
    pub target: Target,
    /// PTX text (NUL-terminated, as NVRTC returns it) or CUBIN bytes.
    pub image: Vec<u8>,
    /// NVRTC's program log; with `--ptxas-options=-v` it holds the per-kernel register report.
    pub log: String,
    pub from_cache: bool,
}

/// Whether libnvrtc can be dlopened. Cheap after the first call; never panics.
pub fn available() -> bool {
    // SAFETY: only attempts dlopen of the candidate names and reports success.
    unsafe { sys::is_culib_present() }
}

fn require() -> Result<()> {
    if available() {
        Ok(())
    } else {
        Err(Error::Cuda(
            "libnvrtc not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc==13.0.88` \
             and put its lib directory on LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// NVRTC's (major, minor) version.
pub fn version() -> Result<(i32, i32)> {
    require()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); the out-pointers are valid.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Cuda(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// The file the dynamic loader mapped for libnvrtc, once it is loaded (after `version()`), read
/// from /proc/self/maps: cudarc keeps its handle private.
pub fn library_path() -> Option<PathBuf> {
    super::loaded_library("libnvrtc")
}

fn has_headers(dir: &Path) -> bool {
    dir.join("cuda_fp16.h").is_file() && dir.join("cuda_bf16.h").is_file()
}

/// The directory holding cuda_fp16.h and cuda_bf16.h, by the search order in the module docs.
pub fn include_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MOOD_CUDA_INCLUDE").filter(|v| !v.is_empty()) {
        // An explicit setting wins even if it looks wrong: NVRTC's error will then name it.
        return Some(PathBuf::from(dir));
    }
    let _ = version(); // loads the library so that its path shows in /proc/self/maps
    let mut candidates = Vec::new();
    if let Some(lib) = library_path().as_deref().and_then(Path::parent) {
        if let Some(up) = lib.parent() {
            candidates.push(up.join("include"));
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(home).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates.into_iter().find(|d| has_headers(d))
}

/// Compiles kernels/<stem>.cu for `arch` (`sm_90` → CUBIN, `compute_90` → PTX) with extra NVRTC
/// `options`, through the disk cache.
pub fn compile(stem: &str, arch: &str, options: &[String]) -> Result<Compiled> {
    compile_with(stem, arch, options, cache_enabled())
}

/// As `compile`, always running NVRTC (for tests and for `--ptxas-options=-v` reports).
pub fn compile_uncached(stem: &str, arch: &str, options: &[String]) -> Result<Compiled> {
    compile_with(stem, arch, options, false)
}

fn cache_enabled() -> bool {
    std::env::var("MOOD_NVRTC_CACHE").map_or(true, |v| v != "0")
}

fn compile_with(stem: &str, arch: &str, options: &[String], use_cache: bool) -> Result<Compiled> {
    let source = super::kernel_source(stem)
        .ok_or_else(|| Error::Cuda(format!("no kernel family `{stem}` (kernels/{stem}.cu)")))?;
    // The headers it includes are spliced in, so the cache key below covers them too.
    let source = &super::with_headers(source, &format!("{stem}.cu"));
    let target = Target::of_arch(arch)?;
    require()?;
    let (major, minor) = version()?;
    let mut opts = vec![format!("--gpu-architecture={arch}")];
    if let Some(inc) = include_dir() {
        opts.push(format!("--include-path={}", inc.display()));
    }
    opts.extend(options.iter().cloned());

    let entry = use_cache.then(|| {
        let key = cache_key(source, &opts, (major, minor));
        cache_dir().map(|d| d.join(format!("{stem}-{arch}-{key:016x}")))
    });
    let entry = entry.flatten();
    if let Some(base) = &entry {
        if let Some((image, log)) = cache_read(base, target) {
            return Ok(Compiled {
                stem: stem.into(),
                arch: arch.into(),
                target,
                image,
                log,
                from_cache: true,
            });
        }
    }
    let (image, log) = compile_source(&format!("{stem}.cu"), source, target, &opts)?;
    if let Some(base) = &entry {
        // A cache that cannot be written only costs a recompile next time.
        let _ = cache_write(base, target, &image, &log);
    }
    Ok(Compiled {
        stem: stem.into(),
        arch: arch.into(),
        target,
        image,
        log,
        from_cache: false,
    })
}

/// Deletes the NVRTC program when compilation returns or fails.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs NVRTC on one source; returns (image, log). The log is part of the error on failure.
pub fn compile_source(
    name: &str,
    source: &str,
    target: Target,
    options: &[String],
) -> Result<(Vec<u8>, String)> {
    require()?;
    let nul = |what: &str| Error::Cuda(format!("{name}: NUL byte in {what}"));
    if options.iter().any(|o| o.contains('\0')) {
        return Err(nul("an option")); // cudarc would unwrap CString::new on it
    }
    let src = CString::new(source).map_err(|_| nul("the source"))?;
    let cname = CString::new(name).map_err(|_| nul("the name"))?;
    let fail = |step: &str, e: result::NvrtcError| Error::Cuda(format!("{name}: {step}: {e:?}"));
    let prog = Program(result::create_program(&src, Some(&cname)).map_err(|e| fail("create", e))?);
    // SAFETY: prog is live until `prog` drops at the end of this function.
    let compiled = unsafe { result::compile_program(prog.0, options) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(prog.0) }
        .map(|l| c_chars_to_string(&l))
        .unwrap_or_default();
    if let Err(e) = compiled {
        let hint = if log.contains("could not open source file") {
            "\n(hint: set MOOD_CUDA_INCLUDE to the directory holding cuda_fp16.h and cuda_bf16.h)"
        } else {
            ""
        };
        return Err(Error::Cuda(format!(
            "{name}: NVRTC failed ({e:?}) with options {options:?}:\n{log}{hint}"
        )));
    }
    let image = match target {
        // SAFETY: the program compiled successfully.
        Target::Ptx => unsafe { result::get_ptx(prog.0) }
            .map(|p| p.iter().map(|&c| c as u8).collect())
            .map_err(|e| fail("get PTX", e))?,
        Target::Cubin => {
            let mut size = 0usize;
            // SAFETY: valid program and out-pointer; the buffer below has the reported size.
            unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
                .result()
                .map_err(|e| fail("get CUBIN size", e))?;
            let mut buf = vec![0u8; size];
            // SAFETY: as above.
            unsafe { sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast()) }
                .result()
                .map_err(|e| fail("get CUBIN", e))?;
            buf
        }
    };
    Ok((image, log))
}

/// `$XDG_CACHE_HOME/mood/nvrtc`, or `~/.cache/mood/nvrtc`; created when first written.
pub fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("mood").join("nvrtc"))
}

/// 64-bit FNV-1a over every input, each length-prefixed so that boundaries cannot shift. A cache
/// holds a few dozen entries, so 64 bits make a collision negligible, and FNV, unlike std's
/// hasher, is stable across Rust releases.
fn cache_key(source: &str, options: &[String], version: (i32, i32)) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(source.as_bytes());
    for o in options {
        eat(o.as_bytes());
    }
    eat(format!("nvrtc {}.{}", version.0, version.1).as_bytes());
    h
}

fn cache_read(base: &Path, target: Target) -> Option<(Vec<u8>, String)> {
    // The image is written last, so its presence means the log is complete too.
    let image = std::fs::read(base.with_extension(target.ext())).ok()?;
    let log = std::fs::read_to_string(base.with_extension("log")).ok()?;
    Some((image, log))
}

fn cache_write(base: &Path, target: Target, image: &[u8], log: &str) -> Result<()> {
    // Temporary names carry only the process id: serialise writers within one process.
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = base.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::fsutil::write_atomic(&base.with_extension("log"), log.as_bytes())?;
    crate::fsutil::write_atomic(&base.with_extension(target.ext()), image)
}

/// One kernel's line of the ptxas report (`--ptxas-options=-v`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub name: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
}

/// Parses ptxas' verbose report from an NVRTC log: per entry function its registers, stack frame
/// and spill bytes. Lines look like
/// `ptxas info    : Function properties for NAME` /
/// `    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads` /
/// `ptxas info    : Used 32 registers, ...`.
pub fn ptxas_report(log: &str) -> Vec<KernelStats> {
    let mut out: Vec<KernelStats> = Vec::new();
    let number_before = |line: &str, word: &str| -> Option<u32> {
        let i = line.find(word)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line
            .split("Compiling entry function '")
            .nth(1)
            .or_else(|| line.split("Function properties for ").nth(1))
        {
            let name = rest.trim().trim_end_matches(['\'', ':']);
            let name = name.split('\'').next().unwrap_or(name).to_string();
            if out.last().is_none_or(|k| k.name != name) {
                out.push(KernelStats {
                    name,
                    ..Default::default()
                });
            }
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes spill stores") {
                k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains(" registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_report_reads_registers_and_spills() {
        let log = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'softmax_rows_f32' for 'sm_90'
ptxas info    : Function properties for softmax_rows_f32
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, used 0 barriers, 384 bytes cmem[0]
ptxas info    : Compiling entry function 'big' for 'sm_90'
ptxas info    : Function properties for big
    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 31744 bytes smem, 392 bytes cmem[0]
";
        let r = ptxas_report(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            KernelStats {
                name: "softmax_rows_f32".into(),
                registers: 18,
                ..Default::default()
            }
        );
        assert_eq!(
            (r[1].registers, r[1].spill_stores, r[1].spill_loads),
            (255, 16, 8)
        );
        assert_eq!(r[1].stack_bytes, 24);
    }

    #[test]
    fn arch_picks_the_target() {
        assert_eq!(Target::of_arch("sm_90").unwrap(), Target::Cubin);
        assert_eq!(Target::of_arch("compute_90").unwrap(), Target::Ptx);
        assert!(Target::of_arch("90").is_err());
    }

    #[test]
    fn cache_key_depends_on_every_input() {
        let o = vec!["--gpu-architecture=sm_90".to_string()];
        let k = cache_key("src", &o, (13, 0));
        assert_ne!(k, cache_key("src ", &o, (13, 0)));
        assert_ne!(k, cache_key("src", &[], (13, 0)));
        assert_ne!(k, cache_key("src", &o, (13, 1)));
        assert_eq!(k, cache_key("src", &o, (13, 0)));
    }
}
