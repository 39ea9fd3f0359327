//! The one .npy header parser every reader uses. A header is untrusted input, so everything in it
//! is bounded before it is used: its length by the file and by [`MAX_HEADER`], the Python literal by
//! a flat scanner that accepts only the dict numpy writes (strings, True/False and one tuple of
//! integers; nothing nests, so there is no depth to exhaust), and the shape by checked products
//! that must match the bytes after the header exactly.

use std::path::Path;

use crate::error::{Error, Result};

/// numpy itself refuses headers over 10 000 bytes unless told otherwise; a few times that leaves
/// room for any real file while keeping a hostile length from reaching the allocator.
pub const MAX_HEADER: usize = 64 << 10;

/// What a .npy header says: the dtype string, the order and the shape, and where the data starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub descr: String,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
    /// Byte offset of the data.
    pub offset: usize,
}

impl Header {
    /// Elements of the shape; None when the product overflows.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
    }

    /// The data bytes for items of `item` bytes, which must be exactly what the shape needs.
    pub fn body<'a>(&self, path: &Path, bytes: &'a [u8], item: usize) -> Result<&'a [u8]> {
        let have = bytes.len().saturating_sub(self.offset);
        let need = self
            .numel()
            .and_then(|n| n.checked_mul(item))
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "shape {:?} is too large ({} bytes per value overflow the address space)",
                        self.shape, item
                    ),
                )
            })?;
        if need != have {
            let what = if need > have {
                "truncated"
            } else {
                "trailing bytes"
            };
            return Err(Error::format(
                path,
                format!(
                    "{what}: shape {:?} needs {need} data bytes, the file has {have}",
                    self.shape
                ),
            ));
        }
        Ok(&bytes[self.offset..])
    }
}

/// Parses and bounds the header of the .npy bytes `bytes` (format versions 1-3).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Header> {
    let bad = |m: &str| Error::format(path, format!("not a valid .npy file: {m}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("no NUMPY magic"));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        2 | 3 => return Err(bad("truncated header")),
        v => return Err(bad(&format!("unknown format version {v}"))),
    };
    if len > MAX_HEADER {
        return Err(bad(&format!(
            "header of {len} bytes (the limit is {MAX_HEADER})"
        )));
    }
    let text = bytes
        .get(start..start + len)
        .ok_or_else(|| {
            bad(&format!(
                "truncated header ({len} bytes announced, {} in the file)",
                bytes.len() - start
            ))
        })
        .and_then(|h| std::str::from_utf8(h).map_err(|_| bad("header is not text")))?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    let mut s = Scanner { text, pos: 0, path };
    s.expect('{')?;
    loop {
        if s.eat('}') {
            break;
        }
        let key = s.string()?;
        s.expect(':')?;
        match key {
            "descr" => descr = Some(s.string().map_err(|_| s.unsupported("descr"))?.to_string()),
            "fortran_order" => fortran = Some(s.boolean()?),
            "shape" => shape = Some(s.shape()?),
            other => return Err(bad(&format!("unknown header key '{other}'"))),
        }
        if !s.eat(',') {
            s.expect('}')?;
            break;
        }
    }
    if !s.rest().trim().is_empty() {
        return Err(bad("text after the header dict"));
    }
    let (Some(descr), Some(fortran_order), Some(shape)) = (descr, fortran, shape) else {
        return Err(bad("header lacks descr, fortran_order or shape"));
    };
    if fortran_order && shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err(Error::format(
            path,
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    Ok(Header {
        descr,
        fortran_order,
        shape,
        offset: start + len,
    })
}

/// A cursor over the header text; every method moves forward or fails, so parsing is linear.
struct Scanner<'a> {
    text: &'a str,
    pos: usize,
    path: &'a Path,
}

impl<'a> Scanner<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn fail(&self, what: &str) -> Error {
        Error::format(
            self.path,
            format!("not a valid .npy file: {what} at header byte {}", self.pos),
        )
    }

    fn unsupported(&self, key: &str) -> Error {
        Error::format(
            self.path,
            format!("not a valid .npy file: unsupported '{key}' (only plain dtypes such as '<f4')"),
        )
    }

    fn skip_ws(&mut self) {
        let r = self.rest();
        self.pos += r.len() - r.trim_start().len();
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        if self.rest().starts_with(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char) -> Result<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.fail(&format!("expected '{c}'")))
        }
    }

    /// A quoted string without escapes ('...' or "..."), as numpy writes keys and dtypes.
    fn string(&mut self) -> Result<&'a str> {
        self.skip_ws();
        let r = self.rest();
        let q = match r.chars().next() {
            Some(q @ ('\'' | '"')) => q,
            _ => return Err(self.fail("expected a quoted string")),
        };
        let Some(end) = r[1..].find(q) else {
            return Err(self.fail("unterminated string"));
        };
        let s = &r[1..1 + end];
        if s.contains('\\') {
            return Err(self.fail("escaped string"));
        }
        self.pos += end + 2;
        Ok(s)
    }

    fn boolean(&mut self) -> Result<bool> {
        self.skip_ws();
        for (word, v) in [("True", true), ("False", false)] {
            if self.rest().starts_with(word) {
                self.pos += word.len();
                return Ok(v);
            }
        }
        Err(self.fail("expected True or False"))
    }

    /// `(d0, d1, ...)` of non-negative integers (a trailing `L` from Python 2 allowed).
    fn shape(&mut self) -> Result<Vec<usize>> {
        self.expect('(')?;
        let mut dims = Vec::new();
        loop {
            if self.eat(')') {
                return Ok(dims);
            }
            self.skip_ws();
            let r = self.rest();
            let n = r.len() - r.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let d = r[..n]
                .parse::<usize>()
                .map_err(|_| self.fail("expected a dimension"))?;
            self.pos += n;
            self.eat('L');
            dims.push(d);
            // A shape has at most 64 dimensions in numpy; a longer one is not a numpy file.
            if dims.len() > 64 {
                return Err(self.fail("more than 64 dimensions"));
            }
            if !self.eat(',') {
                self.expect(')')?;
                return Ok(dims);
            }
        }
    }
}
