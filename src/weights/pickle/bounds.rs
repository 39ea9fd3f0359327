//! Bounds of the pickle machine: each value on the stack and in the memo carries its nesting
//! depth and about how many bytes a copy of it allocates, so that a copy (MEMOIZE, GET, DUP) is
//! charged without walking the value, and a hostile pickle is refused once it nests too deep or
//! builds too much.

use std::collections::HashMap;

use super::{Reader, Value, R};

/// How deep values may nest. torch's and numpy's pickles nest a few levels (a state dict of
/// tensors of size tuples); the bound keeps recursive drops, clones and comparisons of hostile
/// values far from the stack's end.
pub const MAX_DEPTH: u32 = 100;

/// Bytes of values a pickle may build, copies from the memo and `DUP` included. A real state
/// dict's pickle builds a few MB; without a bound, a few hundred bytes that memoize and fetch a
/// list repeatedly double it with each round.
pub const MAX_BUILT: usize = 256 << 20;

/// What a value on the stack or in the memo costs: its nesting depth and about how many bytes a
/// copy of it allocates. Kept beside each value so that bounding a copy never walks the value.
#[derive(Clone, Copy, Debug)]
pub(super) struct Meta {
    pub(super) depth: u32,
    pub(super) bytes: usize,
}

pub(super) const NODE: usize = std::mem::size_of::<Value>();

/// A value without children: its own node and the text it holds.
pub(super) fn leaf(v: &Value) -> Meta {
    let heap = match v {
        Value::Str(s) | Value::Dtype(s) | Value::Opaque(s) => s.len(),
        Value::Global(m, n) => m.len() + n.len(),
        Value::Storage { storage_type, key } => storage_type.len() + key.len(),
        Value::Tensor(t) => {
            t.storage_key.len() + t.storage_type.len() + 8 * (t.size.len() + t.stride.len())
        }
        Value::Array(a) => a.dtype.len() + 8 * a.shape.len(),
        _ => 0,
    };
    Meta {
        depth: 1,
        bytes: NODE + heap,
    }
}

/// The combined cost of values moved into one new value.
pub(super) fn join(metas: impl IntoIterator<Item = Meta>) -> Meta {
    metas.into_iter().fold(
        Meta {
            depth: 1,
            bytes: NODE,
        },
        |a, m| Meta {
            depth: a.depth.max(m.depth.saturating_add(1)),
            bytes: a.bytes.saturating_add(m.bytes),
        },
    )
}

/// The stack machine's state, with every value's [`Meta`] and the bytes built so far.
pub(super) struct Machine {
    pub(super) stack: Vec<(Value, Meta)>,
    pub(super) memo: HashMap<u32, (Value, Meta)>,
    pub(super) built: usize,
}

impl Machine {
    /// Counts `bytes` more built, refusing the pickle past [`MAX_BUILT`].
    pub(super) fn charge(&mut self, r: &Reader, bytes: usize) -> R<()> {
        self.built = self.built.saturating_add(bytes);
        if self.built > MAX_BUILT {
            return r.err(format!(
                "the pickle builds more than {} MB of values (memo or DUP copies?)",
                MAX_BUILT >> 20
            ));
        }
        Ok(())
    }

    /// Pushes a value of cost `m` (already charged, or moved in from values that were).
    pub(super) fn put(&mut self, r: &Reader, v: Value, m: Meta) -> R<()> {
        if m.depth > MAX_DEPTH {
            return r.err(format!("values nested more than {MAX_DEPTH} levels deep"));
        }
        self.stack.push((v, m));
        Ok(())
    }

    /// Pushes a new value without children.
    pub(super) fn push(&mut self, r: &Reader, v: Value) -> R<()> {
        let m = leaf(&v);
        self.charge(r, m.bytes)?;
        self.put(r, v, m)
    }

    pub(super) fn pop(&mut self, r: &Reader) -> R<(Value, Meta)> {
        self.stack
            .pop()
            .map_or_else(|| r.err("stack underflow"), Ok)
    }

    /// The items above the topmost MARK, and their joint cost; the MARK is removed.
    pub(super) fn pop_mark(&mut self, r: &Reader) -> R<(Vec<Value>, Meta)> {
        let Some(i) = self
            .stack
            .iter()
            .rposition(|(v, _)| matches!(v, Value::Mark))
        else {
            return r.err("MARK not found");
        };
        let items = self.stack.split_off(i + 1);
        self.stack.pop();
        let m = join(items.iter().map(|(_, m)| *m));
        Ok((items.into_iter().map(|(v, _)| v).collect(), m))
    }

    /// A copy of the top of the stack, charged in full.
    pub(super) fn copy_top(&mut self, r: &Reader, what: &str) -> R<(Value, Meta)> {
        let Some((_, m)) = self.stack.last() else {
            return r.err(format!("{what} on an empty stack"));
        };
        let m = *m;
        self.charge(r, m.bytes)?;
        Ok(self.stack.last().cloned().expect("checked above"))
    }

    /// Moves `items` into the container on top of the stack (APPEND(S) / SETITEM(S)).
    pub(super) fn extend_top(
        &mut self,
        r: &Reader,
        items: Vec<Value>,
        m: Meta,
        what: &str,
    ) -> R<()> {
        let Some((top, tm)) = self.stack.last_mut() else {
            return r.err(format!("{what} on an empty stack"));
        };
        match top {
            Value::List(l) => l.extend(items),
            Value::Dict(d) => d.extend(pairs(items)),
            _ => return Ok(()),
        }
        tm.depth = tm.depth.max(m.depth);
        tm.bytes = tm.bytes.saturating_add(m.bytes - NODE);
        if tm.depth > MAX_DEPTH {
            return r.err(format!("values nested more than {MAX_DEPTH} levels deep"));
        }
        Ok(())
    }
}

/// Alternating keys and values as pairs (an odd last item is dropped, as before).
pub(super) fn pairs(items: Vec<Value>) -> Vec<(Value, Value)> {
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    out
}
