//! The host-compiled kernels, as listed by the registries build.rs generates (cpp/kernel_table.h).

use std::ffi::{c_char, c_void, CStr};

#[repr(C)]
pub struct KernelEntry {
    name: *const c_char,
    file: *const c_char,
    pub call: unsafe extern "C" fn(*mut *mut c_void),
    pub nparams: u32,
    param_sizes: *const u32,
    param_is_pointer: *const u8,
    /// The kernel's __launch_bounds__ maximum threads per block, 0 for none.
    pub max_threads: u32,
    pub dyn_smem: Option<unsafe extern "C" fn() -> *mut c_void>,
}

// SAFETY: the tables are immutable C++ constants.
unsafe impl Sync for KernelEntry {}

impl KernelEntry {
    pub fn name(&self) -> &'static str {
        // SAFETY: a string literal of the generated registry.
        unsafe { CStr::from_ptr(self.name) }.to_str().unwrap_or("?")
    }
    pub fn file(&self) -> &'static str {
        // SAFETY: as above.
        unsafe { CStr::from_ptr(self.file) }.to_str().unwrap_or("?")
    }
    pub fn param_sizes(&self) -> &'static [u32] {
        // SAFETY: an array of nparams (+1) entries in the registry.
        unsafe { std::slice::from_raw_parts(self.param_sizes, self.nparams as usize) }
    }
    pub fn param_is_pointer(&self) -> &'static [u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.param_is_pointer, self.nparams as usize) }
    }
    /// (offset, size) of each parameter in the kernel's parameter buffer (natural alignment).
    pub fn param_layout(&self) -> Vec<(usize, usize)> {
        let mut off = 0usize;
        self.param_sizes()
            .iter()
            .map(|&s| {
                let s = s as usize;
                off = off.div_ceil(s.max(1)) * s.max(1);
                let at = off;
                off += s;
                (at, s)
            })
            .collect()
    }
}

mod generated {
    use super::KernelEntry;
    include!(concat!(env!("OUT_DIR"), "/tables.rs"));
}

/// Every host-compiled kernel: (kernel file stem, entry).
pub fn all() -> impl Iterator<Item = (&'static str, &'static KernelEntry)> {
    generated::TABLES.iter().flat_map(|&(stem, first, len)| {
        // SAFETY: `first` is the first of `len` consecutive entries of one C++ array.
        let entries = unsafe { std::slice::from_raw_parts(first as *const KernelEntry, *len) };
        entries.iter().map(move |e| (stem, e))
    })
}

pub fn find(name: &str) -> Option<&'static KernelEntry> {
    all().map(|(_, e)| e).find(|e| e.name() == name)
}
