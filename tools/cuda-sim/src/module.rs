//! What cuModuleLoadData is handed: a CUBIN (an ELF file; each kernel has a `.text.NAME` section
//! and its static shared memory a `.nv.shared.NAME` section) or PTX text (`.entry NAME(`). The
//! stand-in runs the host-compiled kernels of the same sources, so from the image it needs only
//! which kernels the module defines and how much static shared memory each declares.

use std::collections::HashMap;

pub struct Image {
    /// Kernel name -> static shared memory in bytes (0 where the image does not say).
    pub kernels: HashMap<String, u32>,
}

/// Reads the kernel list of a CUBIN or a PTX image; an error says why the image is refused.
///
/// # Safety
/// `image` must point at a CUBIN (whose ELF header gives its extent) or a NUL-terminated PTX text.
pub unsafe fn parse(image: *const u8) -> Result<Image, String> {
    // SAFETY: every image is at least 4 bytes (an ELF magic, or PTX text plus NUL).
    let magic = unsafe { std::slice::from_raw_parts(image, 4) };
    if magic == b"\x7fELF" {
        // SAFETY: an ELF header is 64 bytes; the section table follows from it.
        unsafe { parse_cubin(image) }
    } else {
        // SAFETY: PTX is NUL-terminated (the caller's contract).
        let text = unsafe { std::ffi::CStr::from_ptr(image.cast()) };
        parse_ptx(&text.to_string_lossy())
    }
}

fn parse_ptx(text: &str) -> Result<Image, String> {
    if !text.contains(".version") || !text.contains(".target") {
        return Err("the image is neither a CUBIN nor PTX text".into());
    }
    let mut kernels = HashMap::new();
    for line in text.lines() {
        if let Some(i) = line.find(".entry ") {
            let rest = line[i + 7..].trim_start();
            let end = rest
                .find(|c: char| c == '(' || c.is_whitespace())
                .unwrap_or(rest.len());
            kernels.insert(rest[..end].to_string(), 0);
        }
    }
    Ok(Image { kernels })
}

fn u16_at(b: &[u8], o: usize) -> usize {
    u16::from_le_bytes([b[o], b[o + 1]]) as usize
}
fn u32_at(b: &[u8], o: usize) -> usize {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize
}
fn u64_at(b: &[u8], o: usize) -> usize {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize
}

/// # Safety
/// `image` points at a complete ELF64 file.
unsafe fn parse_cubin(image: *const u8) -> Result<Image, String> {
    // SAFETY: the ELF64 header is 64 bytes.
    let head = unsafe { std::slice::from_raw_parts(image, 64) };
    if head[4] != 2 || head[5] != 1 {
        return Err("the CUBIN is not a little-endian ELF64 file".into());
    }
    let (shoff, shentsize, shnum, shstrndx) = (
        u64_at(head, 0x28),
        u16_at(head, 0x3a),
        u16_at(head, 0x3c),
        u16_at(head, 0x3e),
    );
    if shentsize < 64 || shstrndx >= shnum {
        return Err("the CUBIN's section table is malformed".into());
    }
    let table_end = shoff + shnum * shentsize;
    // SAFETY: the section header table is part of the file.
    let table = unsafe { std::slice::from_raw_parts(image.add(shoff), shnum * shentsize) };
    // The file's extent: the table's end or the furthest section with contents (not NOBITS).
    let len = (0..shnum)
        .map(|i| &table[i * shentsize..])
        .filter(|s| u32_at(s, 4) != 8)
        .map(|s| u64_at(s, 0x18) + u64_at(s, 0x20))
        .fold(table_end, usize::max);
    // SAFETY: every byte up to `len` belongs to the file by its own section table.
    let file = unsafe { std::slice::from_raw_parts(image, len) };
    let section = |i: usize| -> (usize, usize, usize, usize) {
        let s = &file[shoff + i * shentsize..];
        (u32_at(s, 0), u32_at(s, 4), u64_at(s, 0x18), u64_at(s, 0x20))
    };
    let (_, _, str_off, str_size) = section(shstrndx);
    if str_off + str_size > len {
        return Err("the CUBIN's section names lie outside the file".into());
    }
    let names = &file[str_off..str_off + str_size];
    let name_at = |o: usize| -> &str {
        let tail = names.get(o..).unwrap_or(&[]);
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).unwrap_or("")
    };
    let mut kernels = HashMap::new();
    let mut shared = HashMap::new();
    for i in 0..shnum {
        let (name, _, _, size) = section(i);
        let name = name_at(name);
        if let Some(k) = name.strip_prefix(".text.") {
            kernels.entry(k.to_string()).or_insert(0);
        } else if let Some(k) = name.strip_prefix(".nv.shared.") {
            shared.insert(k.to_string(), size as u32);
        }
    }
    for (k, bytes) in shared {
        if let Some(v) = kernels.get_mut(&k) {
            *v = bytes;
        }
    }
    if kernels.is_empty() {
        return Err("the CUBIN defines no kernel".into());
    }
    Ok(Image { kernels })
}
