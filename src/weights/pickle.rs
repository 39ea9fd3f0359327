//! A restricted pickle reader: a stack machine over the opcodes `torch.save` emits that builds
//! plain values and never executes anything. `GLOBAL` yields a symbolic name; `REDUCE` of the few
//! callables a state dict needs (`OrderedDict`, `_rebuild_tensor_v2`, `_rebuild_parameter`, ...)
//! builds the value, and of any other callable an opaque placeholder, so a checkpoint that also
//! pickles training arguments or optimizer state still yields its tensors.
//!
//! [`load_allowing`] with [`Globals::Numpy`] builds numpy arrays instead (CIFAR's python batches):
//! `_reconstruct` + `BUILD`, `dtype`, `scalar`, `_frombuffer` and protocol 2's bytes
//! (`_codecs.encode`) become values. Nothing is imported or called; other globals stay opaque.

use std::collections::HashMap;
use std::sync::Arc;

mod bounds;
mod numpy;

use bounds::{join, pairs, Machine, NODE};
pub use bounds::{MAX_BUILT, MAX_DEPTH};
pub use numpy::NdArray;
use numpy::{build_numpy, call_numpy};

/// A tensor as pickled by torch: a view (offset, size, stride, in elements) into a storage.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub storage_key: String,
    /// Storage class name, e.g. `FloatStorage`.
    pub storage_type: String,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// Shared so that memoizing a large byte string (an array's data) does not copy it.
    Bytes(Arc<[u8]>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    /// ('storage', type, key, location, numel) from a persistent id.
    Storage {
        storage_type: String,
        key: String,
    },
    Tensor(TensorRef),
    /// A numpy array ([`Globals::Numpy`] only).
    Array(NdArray),
    /// A numpy dtype: its type string, with the byte order (`|u1`, `<i8`) once `BUILD` gave it.
    Dtype(String),
    /// The result of calling something we do not model (kept so the stack stays consistent).
    Opaque(String),
    Mark,
}

/// Which callables `REDUCE` builds values for; any other global gives an opaque placeholder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Globals {
    /// `torch.save`'s: `OrderedDict`, tensors rebuilt from storages, parameters.
    Torch,
    /// numpy arrays, dtypes and scalars, and protocol 2's bytes (`_codecs.encode`), as in CIFAR's
    /// python batches. Python 2 strings (`U`/`T`) are bytes here, as with
    /// `pickle.load(f, encoding='bytes')`.
    Numpy,
}

pub struct Error {
    pub offset: usize,
    pub msg: String,
}

type R<T> = Result<T, Error>;

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> R<T> {
        Err(Error {
            offset: self.pos,
            msg: msg.into(),
        })
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if self.b.len() - self.pos < n {
            return self.err("unexpected end of pickle data (truncated file?)");
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn line(&mut self) -> R<String> {
        let rest = &self.b[self.pos..];
        let Some(n) = rest.iter().position(|&c| c == b'\n') else {
            return self.err("unterminated text argument");
        };
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> R<String> {
        let bytes = self.take(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => self.err("string is not UTF-8"),
        }
    }
}

fn storage_of(v: &Value) -> Option<(String, String)> {
    match v {
        Value::Storage { storage_type, key } => Some((storage_type.clone(), key.clone())),
        _ => None,
    }
}

fn usizes(v: &Value) -> Option<Vec<usize>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Some(*i as usize),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// What calling `module.name(args)` gives, for the callables a state dict uses.
fn call(module: &str, name: &str, args: Vec<Value>, globals: Globals) -> Value {
    if globals == Globals::Numpy {
        return call_numpy(module, name, &args).unwrap_or_else(|| match (module, name) {
            ("collections", "OrderedDict") | ("builtins" | "__builtin__", "dict") => {
                Value::Dict(Vec::new())
            }
            _ => Value::Opaque(format!("{module}.{name}")),
        });
    }
    match (module, name) {
        ("collections", "OrderedDict") | ("builtins", "dict") => Value::Dict(Vec::new()),
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let built = (|| {
                let (storage_type, key) = storage_of(args.first()?)?;
                let offset = match args.get(1)? {
                    Value::Int(i) if *i >= 0 => *i as usize,
                    _ => return None,
                };
                Some(Value::Tensor(TensorRef {
                    storage_key: key,
                    storage_type,
                    offset,
                    size: usizes(args.get(2)?)?,
                    stride: usizes(args.get(3)?)?,
                }))
            })();
            built.unwrap_or_else(|| Value::Opaque(format!("malformed {name} call")))
        }
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => {
            args.into_iter().next().unwrap_or(Value::None)
        }
        // _rebuild_from_type_v2(func, type, args, state): a tensor subclass; rebuild with func(args).
        ("torch._tensor", "_rebuild_from_type_v2") => {
            let mut it = args.into_iter();
            match (it.next(), it.next(), it.next()) {
                (Some(Value::Global(m, n)), _, Some(Value::Tuple(a))) => {
                    call(&m, &n, a, Globals::Torch)
                }
                _ => Value::Opaque("tensor subclass".into()),
            }
        }
        _ => Value::Opaque(format!("{module}.{name}")),
    }
}

/// REDUCE / NEWOBJ: `f(*args)` for a global `f`, an opaque value otherwise.
fn apply(f: Value, args: Value, globals: Globals) -> Value {
    let args = match args {
        Value::Tuple(a) => a,
        other => vec![other],
    };
    match f {
        Value::Global(m, n) => call(&m, &n, args, globals),
        _ => Value::Opaque("call of a non-global".into()),
    }
}

/// Runs the pickle program in `data` (a `torch.save` one) and returns the object it builds.
pub fn load(data: &[u8]) -> R<Value> {
    load_allowing(data, Globals::Torch)
}

/// Runs the pickle program in `data`, building the values of `globals`' callables. Memory and
/// time are bounded: values nest at most [`MAX_DEPTH`] levels and at most [`MAX_BUILT`] bytes of
/// them are built, copies included.
pub fn load_allowing(data: &[u8], globals: Globals) -> R<Value> {
    let mut r = Reader { b: data, pos: 0 };
    let mut m = Machine {
        stack: Vec::new(),
        memo: HashMap::new(),
        built: 0,
    };
    loop {
        let at = r.pos;
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            0x95 => {
                r.u64()?; // FRAME
            }
            b'.' => return Ok(m.pop(&r)?.0),
            b'}' => m.push(&r, Value::Dict(Vec::new()))?,
            b']' => m.push(&r, Value::List(Vec::new()))?,
            b')' => m.push(&r, Value::Tuple(Vec::new()))?,
            b'(' => m.push(&r, Value::Mark)?,
            b'N' => m.push(&r, Value::None)?,
            0x88 => m.push(&r, Value::Bool(true))?,
            0x89 => m.push(&r, Value::Bool(false))?,
            b'J' => {
                let v = Value::Int(r.u32()? as i32 as i64);
                m.push(&r, v)?
            }
            b'K' => {
                let v = Value::Int(r.u8()? as i64);
                m.push(&r, v)?
            }
            b'M' => {
                let v = Value::Int(r.u16()? as i64);
                m.push(&r, v)?
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    r.u8()? as usize
                } else {
                    r.u32()? as usize
                };
                let bytes = r.take(n)?;
                if n > 8 {
                    m.push(&r, Value::Opaque("big integer".into()))?;
                } else {
                    let mut v: i64 = 0;
                    for (i, b) in bytes.iter().enumerate() {
                        v |= (*b as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n); // sign-extend
                    }
                    m.push(&r, Value::Int(v))?;
                }
            }
            b'G' => {
                let v = Value::Float(f64::from_be_bytes(r.take(8)?.try_into().expect("8")));
                m.push(&r, v)?
            }
            b'I' | b'L' => {
                let s = r.line()?;
                let s = s.trim_end_matches('L');
                let v = match s {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    _ => Value::Int(s.parse().map_err(|_| Error {
                        offset: at,
                        msg: format!("bad integer {s:?}"),
                    })?),
                };
                m.push(&r, v)?;
            }
            b'F' => {
                let s = r.line()?;
                let v = Value::Float(s.parse().map_err(|_| Error {
                    offset: at,
                    msg: format!("bad float {s:?}"),
                })?);
                m.push(&r, v)?;
            }
            b'X' => {
                let n = r.u32()? as usize;
                let v = Value::Str(r.string(n)?);
                m.push(&r, v)?;
            }
            0x8c => {
                let n = r.u8()? as usize;
                let v = Value::Str(r.string(n)?);
                m.push(&r, v)?;
            }
            0x8d => {
                let n = usize::try_from(r.u64()?).unwrap_or(usize::MAX);
                let v = Value::Str(r.string(n)?);
                m.push(&r, v)?;
            }
            // Python 2 strings: bytes for numpy pickles (an array's data is one), text otherwise.
            b'U' | b'T' => {
                let n = if op == b'U' {
                    r.u8()? as usize
                } else {
                    r.u32()? as usize
                };
                let raw = r.take(n)?;
                // The bytes are copied once out of the file: count them.
                m.charge(&r, n)?;
                let v = match globals {
                    Globals::Numpy => Value::Bytes(raw.into()),
                    Globals::Torch => Value::Str(String::from_utf8_lossy(raw).into_owned()),
                };
                m.push(&r, v)?;
            }
            b'C' | b'B' | 0x8e | 0x96 => {
                // SHORT_BINBYTES, BINBYTES, BINBYTES8, and BYTEARRAY8 (protocol 5's in-band
                // array buffers), all read as bytes.
                let n = match op {
                    b'C' => r.u8()? as usize,
                    b'B' => r.u32()? as usize,
                    _ => usize::try_from(r.u64()?).unwrap_or(usize::MAX),
                };
                let raw = r.take(n)?;
                m.charge(&r, n)?;
                m.push(&r, Value::Bytes(raw.into()))?;
            }
            b'q' | b'r' | 0x94 => {
                let idx = match op {
                    b'q' => r.u8()? as u32,
                    b'r' => r.u32()?,
                    _ => m.memo.len() as u32,
                };
                let top = m.copy_top(&r, "MEMOIZE")?;
                m.memo.insert(idx, top);
            }
            b'h' | b'j' => {
                let idx = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                let Some(&(_, vm)) = m.memo.get(&idx) else {
                    return r.err(format!("memo {idx} unset"));
                };
                m.charge(&r, vm.bytes)?;
                let v = m.memo[&idx].0.clone();
                m.put(&r, v, vm)?;
            }
            b't' => {
                let (items, jm) = m.pop_mark(&r)?;
                m.charge(&r, NODE)?;
                m.put(&r, Value::Tuple(items), jm)?;
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if m.stack.len() < n {
                    return r.err("stack underflow");
                }
                let items = m.stack.split_off(m.stack.len() - n);
                let jm = join(items.iter().map(|(_, im)| *im));
                m.charge(&r, NODE)?;
                m.put(
                    &r,
                    Value::Tuple(items.into_iter().map(|(v, _)| v).collect()),
                    jm,
                )?;
            }
            b'l' => {
                let (items, jm) = m.pop_mark(&r)?;
                m.charge(&r, NODE)?;
                m.put(&r, Value::List(items), jm)?;
            }
            b'd' => {
                let (items, jm) = m.pop_mark(&r)?;
                m.charge(&r, NODE)?;
                m.put(&r, Value::Dict(pairs(items)), jm)?;
            }
            b'a' | b'e' => {
                let (items, jm) = if op == b'a' {
                    let (v, vm) = m.pop(&r)?;
                    (vec![v], join([vm]))
                } else {
                    m.pop_mark(&r)?
                };
                m.extend_top(&r, items, jm, "APPEND")?;
            }
            b's' | b'u' => {
                let (items, jm) = if op == b's' {
                    let (v, vm) = m.pop(&r)?;
                    let (k, km) = m.pop(&r)?;
                    (vec![k, v], join([km, vm]))
                } else {
                    m.pop_mark(&r)?
                };
                m.extend_top(&r, items, jm, "SETITEM")?;
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                m.push(&r, Value::Global(module, name))?;
            }
            0x93 => {
                let (name, nm) = m.pop(&r)?;
                let (module, mm) = m.pop(&r)?;
                match (module, name) {
                    (Value::Str(a), Value::Str(b)) => {
                        m.put(&r, Value::Global(a, b), join([mm, nm]))?
                    }
                    _ => return r.err("STACK_GLOBAL needs two strings"),
                }
            }
            b'R' | 0x81 | 0x92 => {
                if op == 0x92 {
                    m.pop(&r)?; // NEWOBJ_EX's keyword arguments: unused
                }
                let (args, am) = m.pop(&r)?;
                let (f, fm) = m.pop(&r)?;
                // A call copies at most what its arguments hold (sizes, names, array bytes).
                let cost = join([am, fm]);
                m.charge(&r, cost.bytes)?;
                m.put(&r, apply(f, args, globals), cost)?;
            }
            b'b' => {
                // BUILD: setstate. numpy arrays and dtypes take theirs; dicts and opaque objects
                // keep what they are.
                let (state, sm) = m.pop(&r)?;
                m.charge(&r, sm.bytes)?;
                let Some((obj, om)) = m.stack.last_mut() else {
                    return r.err("BUILD on an empty stack");
                };
                if globals == Globals::Numpy {
                    build_numpy(obj, state);
                    *om = join([*om, sm]);
                    if om.depth > MAX_DEPTH {
                        return r.err(format!("values nested more than {MAX_DEPTH} levels deep"));
                    }
                }
            }
            b'Q' => {
                let (pid, pm) = m.pop(&r)?;
                let v = match pid {
                    Value::Tuple(items) if matches!(items.first(), Some(Value::Str(s)) if s == "storage") => {
                        match (items.get(1), items.get(2)) {
                            (Some(Value::Global(_, t)), Some(Value::Str(key))) => Value::Storage {
                                storage_type: t.clone(),
                                key: key.clone(),
                            },
                            _ => {
                                return Err(Error {
                                    offset: at,
                                    msg: "malformed storage record".into(),
                                })
                            }
                        }
                    }
                    _ => Value::Opaque("persistent id".into()),
                };
                m.charge(&r, pm.bytes)?;
                m.put(&r, v, pm)?;
            }
            b'0' => {
                m.pop(&r)?;
            }
            b'1' => {
                m.pop_mark(&r)?;
            }
            b'2' => {
                let (v, vm) = m.copy_top(&r, "DUP")?;
                m.put(&r, v, vm)?;
            }
            other => {
                return Err(Error {
                    offset: at,
                    msg: format!("unsupported pickle opcode 0x{other:02x}"),
                });
            }
        }
    }
}
