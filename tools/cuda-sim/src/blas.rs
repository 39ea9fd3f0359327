//! The cuBLAS (libcublas.so.13) entry points mood uses (and cuBLASLt's handle; `lt` has its
//! matmul), with cuBLAS's semantics: column-major matrices, op(A) and op(B) by the transpose flags, leading
//! dimensions, batch strides, C = alpha·op(A)·op(B) + beta·C where beta = 0 never reads C, bf16 and
//! f16 inputs multiplied in f32 and the output rounded (to nearest even) to its declared type.
//! Arguments are checked as cuBLAS checks them (CUBLAS_STATUS_INVALID_VALUE), and every matrix's
//! extent against its device allocation. The products run on the `gemm` crate.
//!
//! This file is the GEMM engine (types, argument and extent checks, the products, their recording
//! on a capturing stream); `api` the exported entry points.

use std::ffi::{c_int, c_longlong, c_void};

use half::{bf16, f16};
use rayon::prelude::*;

use crate::lt::Operand;
use crate::memory;
use crate::{drop_handle, handle};

mod api;

const SUCCESS: u32 = 0;
const NOT_INITIALIZED: u32 = 1;
const INVALID_VALUE: u32 = 7;
const EXECUTION_FAILED: u32 = 13;
const NOT_SUPPORTED: u32 = 15;

struct Handle {
    pointer_mode_device: bool,
    math_mode: c_int,
    /// The stream set by cublasSetStream: while it captures, products are recorded (`graph`).
    stream: usize,
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Ty {
    F32,
    F16,
    Bf16,
}

impl Ty {
    pub(crate) fn of(cuda_data_type: c_int) -> Option<Ty> {
        match cuda_data_type {
            0 => Some(Ty::F32),
            2 => Some(Ty::F16),
            14 => Some(Ty::Bf16),
            _ => None,
        }
    }
    pub(crate) fn size(self) -> usize {
        match self {
            Ty::F32 => 4,
            _ => 2,
        }
    }
    /// # Safety
    /// `p` points at element `i` of a buffer of this type.
    pub(crate) unsafe fn load(self, p: u64, i: usize) -> f32 {
        match self {
            Ty::F32 => *(p as *const f32).add(i),
            Ty::F16 => (*(p as *const f16).add(i)).to_f32(),
            Ty::Bf16 => (*(p as *const bf16).add(i)).to_f32(),
        }
    }
    pub(crate) unsafe fn store(self, p: u64, i: usize, v: f32) {
        match self {
            Ty::F32 => *(p as *mut f32).add(i) = v,
            Ty::F16 => *(p as *mut f16).add(i) = f16::from_f32(v),
            Ty::Bf16 => *(p as *mut bf16).add(i) = bf16::from_f32(v),
        }
    }
}

/// One GEMM's shape: op flags, sizes and leading dimensions, as cuBLAS takes them.
#[derive(Clone, Copy)]
struct Shape {
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
}

fn op(v: c_int) -> Option<bool> {
    match v {
        0 => Some(false),
        1 | 2 => Some(true), // C (conjugate transpose) is T for real types
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)] // cuBLAS's own argument list
fn shape(
    ta: c_int,
    tb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    lda: c_int,
    ldb: c_int,
    ldc: c_int,
) -> Result<Shape, String> {
    let (Some(ta), Some(tb)) = (op(ta), op(tb)) else {
        return Err(format!("transpose flags {ta}, {tb} (0 = N, 1 = T, 2 = C)"));
    };
    if m < 0 || n < 0 || k < 0 {
        return Err(format!("negative size m={m} n={n} k={k}"));
    }
    let (m, n, k) = (m as usize, n as usize, k as usize);
    let rows_a = if ta { k } else { m };
    let rows_b = if tb { n } else { k };
    let need = |ld: c_int, rows: usize, what: &str| {
        if (ld as i64) < rows.max(1) as i64 {
            Err(format!("{what} = {ld} < {} rows", rows.max(1)))
        } else {
            Ok(ld as usize)
        }
    };
    Ok(Shape {
        ta,
        tb,
        m,
        n,
        k,
        lda: need(lda, rows_a, "lda")?,
        ldb: need(ldb, rows_b, "ldb")?,
        ldc: need(ldc, m, "ldc")?,
    })
}

impl Shape {
    /// Elements spanned by A, B and C.
    fn extents(&self) -> [usize; 3] {
        let span = |rows: usize, cols: usize, ld: usize| {
            if rows == 0 || cols == 0 {
                0
            } else {
                (cols - 1) * ld + rows
            }
        };
        let (ra, ca) = if self.ta {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let (rb, cb) = if self.tb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        [
            span(ra, ca, self.lda),
            span(rb, cb, self.ldb),
            span(self.m, self.n, self.ldc),
        ]
    }
}

/// Checks that `batches` matrices of `extent` elements at stride `stride` lie in one allocation.
pub(crate) fn check_batched(
    p: u64,
    extent: usize,
    stride: i64,
    batches: usize,
    ty: Ty,
    what: &str,
) -> Result<(), String> {
    if extent == 0 || batches == 0 {
        return Ok(());
    }
    let last = stride
        .checked_mul(batches as i64 - 1)
        .ok_or("batch stride overflows")?;
    let lo = last.min(0);
    let bytes = ((last - lo) as usize + extent) * ty.size();
    memory::check(p.wrapping_add_signed(lo * ty.size() as i64), bytes, what)
}

/// C = alpha·op(A)·op(B) + beta·C for one matrix of each, in f32.
///
/// # Safety
/// The buffers were checked to hold the shape's extents.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_one(
    s: Shape,
    alpha: f32,
    a: u64,
    at: Ty,
    b: u64,
    bt: Ty,
    beta: f32,
    c: u64,
    ct: Ty,
    threads: usize,
) {
    let (m, n, k) = (s.m, s.n, s.k);
    if m == 0 || n == 0 {
        return;
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // Column-major op(A)[i, p]: A stored [rows, cols] with leading dimension lda.
    let (a_rs, a_cs) = if s.ta { (s.lda, 1) } else { (1, s.lda) };
    let (b_rs, b_cs) = if s.tb { (s.ldb, 1) } else { (1, s.ldb) };
    if at == Ty::F32 && bt == Ty::F32 && ct == Ty::F32 && k > 0 {
        gemm::gemm(
            m,
            n,
            k,
            c as *mut f32,
            s.ldc as isize,
            1,
            beta != 0.0,
            a as *const f32,
            a_cs as isize,
            a_rs as isize,
            b as *const f32,
            b_cs as isize,
            b_rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
        return;
    }
    // Mixed or reduced precision: widen to dense f32 column-major copies, multiply, round once.
    let mut la = vec![0f32; m * k];
    for p in 0..k {
        for i in 0..m {
            la[i + p * m] = at.load(a, i * a_rs + p * a_cs);
        }
    }
    let mut lb = vec![0f32; k * n];
    for j in 0..n {
        for p in 0..k {
            lb[p + j * k] = bt.load(b, p * b_rs + j * b_cs);
        }
    }
    let mut lc = vec![0f32; m * n];
    if beta != 0.0 {
        for j in 0..n {
            for i in 0..m {
                lc[i + j * m] = ct.load(c, i + j * s.ldc);
            }
        }
    }
    if k > 0 {
        gemm::gemm(
            m,
            n,
            k,
            lc.as_mut_ptr(),
            m as isize,
            1,
            beta != 0.0,
            la.as_ptr(),
            m as isize,
            1,
            lb.as_ptr(),
            k as isize,
            1,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    } else {
        lc.iter_mut().for_each(|v| *v *= beta);
    }
    for j in 0..n {
        for i in 0..m {
            ct.store(c, i + j * s.ldc, lc[i + j * m]);
        }
    }
}

/// alpha·op(A)·op(B) [m, n] as a dense column-major f32 matrix: each operand widened to f32
/// (whatever its type and strides), multiplied in f32 by the `gemm` crate. cuBLASLt's matmul
/// (`crate::lt`) applies its epilogue to this before the one rounding to D's type.
///
/// # Safety
/// Both operands were checked to hold op(A) [m, k] and op(B) [k, n] at their strides.
pub(crate) unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: Operand,
    b: Operand,
    threads: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    // op(X)[r, c] of a stored X: X[c, r] when transposed.
    let widen = |x: &Operand, rows: usize, cols: usize| {
        let mut dense = vec![0f32; rows * cols];
        for c in 0..cols {
            for r in 0..rows {
                let at = if x.trans {
                    c * x.rs + r * x.cs
                } else {
                    r * x.rs + c * x.cs
                };
                dense[r + c * rows] = x.ty.load(x.ptr, at);
            }
        }
        dense
    };
    let (la, lb) = (widen(&a, m, k), widen(&b, k, n));
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        out.as_mut_ptr(),
        m as isize,
        1,
        false,
        la.as_ptr(),
        m as isize,
        1,
        lb.as_ptr(),
        k as isize,
        1,
        0.0,
        alpha,
        false,
        false,
        false,
        par,
    );
    out
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_batched(
    h: *mut c_void,
    s: Result<Shape, String>,
    scalars: (*const c_void, *const c_void),
    (a, at, sa): (u64, Ty, i64),
    (b, bt, sb): (u64, Ty, i64),
    (c, ct, sc): (u64, Ty, i64),
    batches: c_int,
    what: &str,
) -> u32 {
    if h.is_null() {
        return NOT_INITIALIZED;
    }
    let stream = (*h.cast::<Handle>()).stream as *mut c_void;
    if crate::graph::capturing(stream) {
        return record_gemm(
            h,
            s,
            scalars,
            (a, at, sa),
            (b, bt, sb),
            (c, ct, sc),
            batches,
            what,
        );
    }
    if crate::sticky() != crate::CUDA_SUCCESS {
        return EXECUTION_FAILED;
    }
    let s = match s {
        Ok(s) if batches >= 0 => s,
        Ok(_) => return INVALID_VALUE,
        Err(_) => return INVALID_VALUE,
    };
    let batches = batches as usize;
    let handle = &*h.cast::<Handle>();
    // Scalars are f32 for f32 compute; with the device pointer mode they live in device memory,
    // which on the stand-in is host memory too.
    let scalar = |p: *const c_void| -> Result<f32, String> {
        if p.is_null() {
            return Err("null alpha or beta".into());
        }
        if handle.pointer_mode_device {
            memory::check(p as u64, 4, "alpha/beta")?;
        }
        Ok(*p.cast::<f32>())
    };
    let (alpha, beta) = match (scalar(scalars.0), scalar(scalars.1)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            crate::fail(crate::CUDA_ERROR_ILLEGAL_ADDRESS, format!("{what}: {e}"));
            return EXECUTION_FAILED;
        }
    };
    let [ea, eb, ec] = s.extents();
    let checks = [
        check_batched(
            a,
            if alpha != 0.0 { ea } else { 0 },
            sa,
            batches,
            at,
            &format!("{what} A"),
        ),
        check_batched(
            b,
            if alpha != 0.0 { eb } else { 0 },
            sb,
            batches,
            bt,
            &format!("{what} B"),
        ),
        check_batched(c, ec, sc, batches, ct, &format!("{what} C")),
    ];
    if let Some(Err(e)) = checks.into_iter().find(|r| r.is_err()) {
        // A GPU would fault inside cuBLAS's kernel: the context is lost, as there.
        crate::fail(crate::CUDA_ERROR_ILLEGAL_ADDRESS, e);
        return EXECUTION_FAILED;
    }
    let at_batch = |p: u64, t: Ty, stride: i64, i: usize| {
        p.wrapping_add_signed(stride * i as i64 * t.size() as i64)
    };
    if batches == 1 {
        gemm_one(
            s,
            alpha,
            a,
            at,
            b,
            bt,
            beta,
            c,
            ct,
            rayon::current_num_threads(),
        );
    } else {
        (0..batches).into_par_iter().for_each(|i| {
            gemm_one(
                s,
                alpha,
                at_batch(a, at, sa, i),
                at,
                at_batch(b, bt, sb, i),
                bt,
                beta,
                at_batch(c, ct, sc, i),
                ct,
                1,
            )
        });
    }
    SUCCESS
}

/// `gemm_batched` on a capturing stream: the product runs at each launch of the graph, with
/// host-mode alpha and beta read now (cuBLAS reads host scalars when it is called).
#[allow(clippy::too_many_arguments)]
unsafe fn record_gemm(
    h: *mut c_void,
    s: Result<Shape, String>,
    scalars: (*const c_void, *const c_void),
    a: (u64, Ty, i64),
    b: (u64, Ty, i64),
    c: (u64, Ty, i64),
    batches: c_int,
    what: &str,
) -> u32 {
    let handle = &*h.cast::<Handle>();
    let read = |p: *const c_void| (!p.is_null()).then(|| *p.cast::<f32>());
    let host = match handle.pointer_mode_device {
        false => Some((read(scalars.0), read(scalars.1))),
        true => None,
    };
    let device = (scalars.0 as usize, scalars.1 as usize);
    let (h, name) = (h as usize, what.to_string());
    let step = move || {
        // Pointers into the closure's own copies, which live as long as the graph.
        let (alpha, beta) = match &host {
            Some((alpha, beta)) => (
                alpha.as_ref().map_or(std::ptr::null(), |v| v as *const f32),
                beta.as_ref().map_or(std::ptr::null(), |v| v as *const f32),
            ),
            None => (device.0 as *const f32, device.1 as *const f32),
        };
        let scalars = (alpha.cast(), beta.cast());
        // SAFETY: the handle and buffers outlive the graph (the caller's contract, as on a GPU).
        match unsafe {
            gemm_batched(
                h as *mut c_void,
                s.clone(),
                scalars,
                a,
                b,
                c,
                batches,
                &name,
            )
        } {
            SUCCESS => Ok(()),
            st => Err((
                crate::CUDA_ERROR_LAUNCH_FAILED,
                format!("{name}: cuBLAS status {st}"),
            )),
        }
    };
    match crate::graph::record(handle.stream as *mut c_void, what, step) {
        crate::CUDA_SUCCESS => SUCCESS,
        _ => EXECUTION_FAILED,
    }
}
