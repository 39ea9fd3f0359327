//! numpy's side of the restricted pickle reader ([`super::Globals::Numpy`]): arrays rebuilt from
//! `_reconstruct` + `BUILD` (protocols 0-4) or `_frombuffer` (protocol 5), dtypes with their byte
//! order, scalars, and protocol 2's bytes (`_codecs.encode(text, 'latin1')`). Each callable builds
//! the value numpy would from plain data; nothing is imported or run.

use std::sync::Arc;

use super::{usizes, Value};

/// A numpy array as pickled: C or Fortran order, raw bytes in the dtype's byte order.
#[derive(Clone, Debug, PartialEq)]
pub struct NdArray {
    /// numpy's type string with byte order, e.g. `|u1`, `<i8`, `<f4`.
    pub dtype: String,
    pub shape: Vec<usize>,
    pub fortran_order: bool,
    pub data: Arc<[u8]>,
}

impl NdArray {
    /// Elements as i64, for an integer or bool dtype.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        let (kind, size, big) = dtype_parts(&self.dtype)?;
        if !matches!(kind, 'i' | 'u' | 'b') {
            return None;
        }
        Some(
            self.data
                .chunks_exact(size)
                .map(|c| int_from(c, kind != 'u' && kind != 'b', big))
                .collect(),
        )
    }
}

/// (kind, item size, big endian) of a numpy type string such as `<i8`, `|u1`, `b1`.
fn dtype_parts(dtype: &str) -> Option<(char, usize, bool)> {
    let big = dtype.starts_with('>');
    let t = dtype.trim_start_matches(['<', '>', '|', '=']);
    let kind = t.chars().next()?;
    let size: usize = t[kind.len_utf8()..].parse().ok()?;
    (matches!(kind, 'i' | 'u' | 'b' | 'f') && matches!(size, 1 | 2 | 4 | 8))
        .then_some((kind, size, big))
}

fn int_from(bytes: &[u8], signed: bool, big: bool) -> i64 {
    let mut v: u64 = 0;
    for i in 0..bytes.len() {
        let b = if big {
            bytes[i]
        } else {
            bytes[bytes.len() - 1 - i]
        };
        v = (v << 8) | b as u64;
    }
    let bits = 8 * bytes.len() as u32;
    if signed && bits < 64 && v >> (bits - 1) & 1 == 1 {
        (v as i64) - (1i64 << bits)
    } else {
        v as i64
    }
}

/// The bytes of a value standing for a byte string: bytes, or text of code points below 256
/// (numpy accepts Python 2 strings decoded as latin-1).
fn latin1(v: &Value) -> Option<Arc<[u8]>> {
    match v {
        Value::Bytes(b) => Some(b.clone()),
        Value::Str(s) => s
            .chars()
            .map(|c| u8::try_from(c as u32).ok())
            .collect::<Option<Vec<u8>>>()
            .map(Into::into),
        _ => None,
    }
}

pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.clone()),
        Value::Bytes(b) => std::str::from_utf8(b).ok().map(str::to_string),
        _ => None,
    }
}

/// An array of `shape` and `dtype` over `data`, checked for size.
fn array(dtype: &Value, shape: &Value, fortran_order: bool, data: &Value) -> Value {
    let Value::Dtype(dtype) = dtype else {
        return Value::Opaque("array without a numpy dtype".into());
    };
    let Some((_, size, _)) = dtype_parts(dtype) else {
        return Value::Opaque(format!("array of unsupported dtype `{dtype}`"));
    };
    let (Some(shape), Some(data)) = (usizes(shape), latin1(data)) else {
        return Value::Opaque("malformed array state".into());
    };
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if numel.and_then(|n| n.checked_mul(size)) != Some(data.len()) {
        return Value::Opaque(format!(
            "array of shape {shape:?} and dtype {dtype} with {} data bytes",
            data.len()
        ));
    }
    Value::Array(NdArray {
        dtype: dtype.clone(),
        shape,
        fortran_order,
        data,
    })
}

/// numpy's callables (nothing is imported: each builds the value numpy would).
pub(super) fn call_numpy(module: &str, name: &str, args: &[Value]) -> Option<Value> {
    let core = matches!(
        module,
        "numpy.core.multiarray"
            | "numpy._core.multiarray"
            | "numpy.core.numeric"
            | "numpy._core.numeric"
    );
    Some(match (module, name) {
        // Protocol 2 pickles Python 3 bytes as `_codecs.encode(text, 'latin1')`.
        ("_codecs", "encode") => match args.get(1).and_then(text).as_deref() {
            Some("latin1" | "latin-1") => Value::Bytes(latin1(args.first()?)?),
            _ => return None,
        },
        ("__builtin__" | "builtins", "bytes") if args.is_empty() => {
            Value::Bytes(Arc::from(&[][..]))
        }
        // dtype(type_string, align, copy); BUILD sets the byte order.
        ("numpy", "dtype") => Value::Dtype(text(args.first()?)?),
        // _reconstruct(ndarray, (0,), b'b'): an empty array that BUILD fills.
        (_, "_reconstruct") if core => match args.first()? {
            Value::Global(m, n) if m == "numpy" && n == "ndarray" => Value::Array(NdArray {
                dtype: "|u1".into(),
                shape: vec![0],
                fortran_order: false,
                data: Arc::from(&[][..]),
            }),
            _ => return None,
        },
        // _frombuffer(buffer, dtype, shape, order): protocol 5's arrays.
        (_, "_frombuffer") if core => {
            let order = text(args.get(3)?)?;
            array(args.get(1)?, args.get(2)?, order == "F", args.first()?)
        }
        // scalar(dtype, bytes): a numpy integer or float.
        (_, "scalar") if core => {
            let Value::Dtype(d) = args.first()? else {
                return None;
            };
            let (kind, size, big) = dtype_parts(d)?;
            let b = latin1(args.get(1)?)?;
            if b.len() != size {
                return None;
            }
            match kind {
                'f' if size == 8 => Value::Float(f64::from_bits(int_from(&b, false, big) as u64)),
                'f' if size == 4 => {
                    Value::Float(f32::from_bits(int_from(&b, false, big) as u32) as f64)
                }
                'f' => return None,
                _ => Value::Int(int_from(&b, kind == 'i', big)),
            }
        }
        _ => return None,
    })
}

/// `BUILD` of numpy's objects: the byte order of a dtype, the shape and data of an array.
pub(super) fn build_numpy(obj: &mut Value, state: Value) {
    let Value::Tuple(st) = state else { return };
    match obj {
        // (version, byte order, subarray, names, fields, elsize, alignment, flags)
        Value::Dtype(d) => {
            if let Some(order) = st.get(1).and_then(text) {
                let bare = d.trim_start_matches(['<', '>', '|', '=']).to_string();
                let order = if order == "=" { "<".to_string() } else { order };
                *d = order + &bare;
            }
        }
        // ([version,] shape, dtype, is_fortran, data)
        Value::Array(_) => {
            let st = if st.len() == 5 { &st[1..] } else { &st[..] };
            *obj = match st {
                [shape, dtype, Value::Bool(f), data] => array(dtype, shape, *f, data),
                [shape, dtype, Value::Int(f), data] => array(dtype, shape, *f != 0, data),
                _ => Value::Opaque("array state not understood".into()),
            };
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::super::{load, load_allowing, Globals, Value};

    const DTYPE_I4_BE: &[u8] = b"cnumpy\ndtype\nU\x02i4K\x00K\x01\x87R\
        (K\x03U\x01>NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb";

    #[test]
    fn numpy_globals_only_where_allowed() {
        let p = b"\x80\x02cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R.";
        assert!(matches!(load(p).ok(), Some(Value::Opaque(_))));
        assert_eq!(
            load_allowing(p, Globals::Numpy).ok(),
            Some(Value::Dtype("u1".into()))
        );
        // Anything else stays a name: nothing is looked up or called.
        let p = b"\x80\x02cos\nsystem\nU\x02ls\x85R.";
        assert_eq!(
            load_allowing(p, Globals::Numpy).ok(),
            Some(Value::Opaque("os.system".into()))
        );
    }

    #[test]
    fn frombuffer_and_scalar_build_values() {
        let mut p =
            b"\x80\x02cnumpy.core.numeric\n_frombuffer\n(C\x08\x00\x00\x00\x01\xff\xff\xff\xfe"
                .to_vec();
        p.extend_from_slice(DTYPE_I4_BE);
        p.extend_from_slice(b"K\x02\x85U\x01CtR.");
        let Ok(Value::Array(a)) = load_allowing(&p, Globals::Numpy) else {
            panic!("not an array")
        };
        assert_eq!((a.dtype.as_str(), &a.shape[..]), (">i4", &[2usize][..]));
        assert_eq!(a.to_i64(), Some(vec![1, -2]));

        let mut p = b"\x80\x02cnumpy._core.multiarray\nscalar\n".to_vec();
        p.extend_from_slice(DTYPE_I4_BE);
        p.extend_from_slice(b"C\x04\xff\xff\xff\xfd\x86R.");
        assert_eq!(load_allowing(&p, Globals::Numpy).ok(), Some(Value::Int(-3)));

        // Data that does not fill the shape is refused, not read past.
        let mut p = b"\x80\x02cnumpy.core.numeric\n_frombuffer\n(C\x04\x00\x00\x00\x01".to_vec();
        p.extend_from_slice(DTYPE_I4_BE);
        p.extend_from_slice(b"K\x02\x85U\x01CtR.");
        assert!(matches!(
            load_allowing(&p, Globals::Numpy).ok(),
            Some(Value::Opaque(m)) if m.contains("4 data bytes")
        ));
    }
}
