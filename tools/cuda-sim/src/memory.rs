//! Device memory of the stand-in: host memory whose addresses are the device pointers.
//!
//! Every allocation is its own mapping, placed so that it ends (rounded up to 16 bytes) right
//! before a PROT_NONE guard page: a kernel that reads or writes past the end faults at once, and
//! the launch fails with CUDA_ERROR_ILLEGAL_ADDRESS. The up-to-15 bytes of slack before the guard
//! are filled like the rest and checked after every launch that was handed the buffer. New memory
//! is filled with 0xFF bytes, a NaN in f32, bf16 and f16 (and -1 in integers), so a kernel that
//! reads what nobody wrote produces NaN instead of a plausible zero.

use std::collections::BTreeMap;
use std::sync::Mutex;

const PAGE: usize = 4096;
/// cudaMalloc's alignment is 256 bytes; the stand-in keeps 16 so that the end of every buffer
/// sits within 16 bytes of its guard page (16 is what vector loads and cp.async need).
const ALIGN: usize = 16;
pub const POISON: u8 = 0xff;

struct Alloc {
    size: usize,
    map: usize,
    map_len: usize,
}

static ALLOCS: Mutex<BTreeMap<u64, Alloc>> = Mutex::new(BTreeMap::new());

fn allocs() -> std::sync::MutexGuard<'static, BTreeMap<u64, Alloc>> {
    ALLOCS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new buffer of `size` bytes filled with POISON; None when the mapping fails or the live
/// buffers would exceed the device size the environment sets (`reported_memory::limit`).
pub fn alloc(size: usize) -> Option<u64> {
    if let Some(total) = crate::reported_memory::limit() {
        if in_use().saturating_add(size) > total {
            return None;
        }
    }
    let body = size.checked_add(ALIGN - 1)? & !(ALIGN - 1);
    let map_len = body.checked_add(PAGE - 1)? / PAGE * PAGE + PAGE;
    // SAFETY: an anonymous private mapping; the result is checked.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return None;
    }
    let guard = map as usize + map_len - PAGE;
    // SAFETY: the last page of the mapping just made.
    unsafe { libc::mprotect(guard as *mut libc::c_void, PAGE, libc::PROT_NONE) };
    let base = guard - body;
    // SAFETY: [base, guard) lies inside the writable part of the mapping.
    unsafe { std::ptr::write_bytes(base as *mut u8, POISON, body) };
    allocs().insert(
        base as u64,
        Alloc {
            size,
            map: map as usize,
            map_len,
        },
    );
    Some(base as u64)
}

/// Frees the buffer that starts at `ptr`; false if no live buffer starts there.
pub fn free(ptr: u64) -> bool {
    let Some(a) = allocs().remove(&ptr) else {
        return false;
    };
    // SAFETY: the mapping made by `alloc`, removed from the table so no one else frees it.
    unsafe { libc::munmap(a.map as *mut libc::c_void, a.map_len) };
    true
}

/// (start, size) of the live buffer containing `ptr`.
pub fn containing(ptr: u64) -> Option<(u64, usize)> {
    let t = allocs();
    let (&base, a) = t.range(..=ptr).next_back()?;
    (ptr < base + a.size.max(1) as u64).then_some((base, a.size))
}

/// Checks that [ptr, ptr + len) lies inside one live buffer; the error says where it falls.
pub fn check(ptr: u64, len: usize, what: &str) -> Result<(), String> {
    if len == 0 {
        return Ok(());
    }
    match containing(ptr) {
        Some((base, size)) if ptr + len as u64 <= base + size as u64 => Ok(()),
        Some((base, size)) => Err(format!(
            "{what}: {len} bytes at offset {} of a {size}-byte device buffer run {} bytes past its end",
            ptr - base,
            ptr + len as u64 - (base + size as u64)
        )),
        None => Err(format!(
            "{what}: address {ptr:#x} is not inside any live device allocation"
        )),
    }
}

/// The allocation whose guard page holds `addr`, as (start, size): a fault there is a read or
/// write past the end of that buffer.
pub fn guarded_by(addr: u64) -> Option<(u64, usize)> {
    let t = allocs();
    t.iter()
        .find(|(_, a)| {
            let guard = (a.map + a.map_len - PAGE) as u64;
            (guard..guard + PAGE as u64).contains(&addr)
        })
        .map(|(&b, a)| (b, a.size))
}

/// Checks that the slack bytes between the end of the buffer at `base` and its guard page still
/// hold POISON: a kernel that wrote up to 15 bytes past the end changed them.
pub fn slack_intact(base: u64) -> Result<(), String> {
    let t = allocs();
    let Some(a) = t.get(&base) else {
        return Ok(());
    };
    let end = a.map + a.map_len - PAGE;
    let start = base as usize + a.size;
    // SAFETY: [start, end) is inside the live mapping of this allocation.
    let slack = unsafe { std::slice::from_raw_parts(start as *const u8, end - start) };
    match slack.iter().position(|&b| b != POISON) {
        None => Ok(()),
        Some(i) => Err(format!(
            "a kernel wrote {} bytes past the end of a {}-byte device buffer",
            i + 1,
            a.size
        )),
    }
}

/// Bytes in live buffers (for cuMemGetInfo).
pub fn in_use() -> usize {
    allocs().values().map(|a| a.size).sum()
}
