//! The cuBLASLt (libcublasLt.so.13) entry points mood uses, with cuBLASLt's documented semantics:
//!
//!   D = alpha·op(A)·op(B) + beta·C (+ bias[i] on row i of D with CUBLASLT_EPILOGUE_BIAS)
//!
//! computed in f32 (CUBLAS_COMPUTE_32F and its variants, f32 scale type) and rounded once to D's
//! type, after the bias. Every matrix is described by a layout (element type, rows, cols, leading
//! dimension, CUBLASLT_ORDER_COL or CUBLASLT_ORDER_ROW, batch count and strided batch offset);
//! the layouts of A and B are those of the stored matrices, before op(). m and n are D's rows
//! and cols, k the inner size; C must have D's shape, type and order; all four share the batch
//! count. The bias is a vector of D's rows, f32 or D's type (CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
//! default D's type), the same for every batch (no bias batch stride). beta = 0 never reads C.
//!
//! Supported, as on the GPU: A and B f32 with C/D f32; A and B bf16 or f16 with C/D of the same
//! type or f32; epilogues DEFAULT and BIAS. What the stand-in does not model (other compute
//! types, FP8 scales, activation epilogues, aux outputs, orders other than row and column) is
//! CUBLAS_STATUS_NOT_SUPPORTED from the heuristic query, where a GPU might find an algorithm:
//! mood never asks for them. The heuristic returns one algorithm needing no workspace; the
//! workspace given to cublasLtMatmul must still lie inside an allocation.

use std::ffi::{c_int, c_void};

use crate::blas::{check_batched, gemm_f32, Ty};
use crate::memory;
use crate::{drop_handle, handle};

const SUCCESS: u32 = 0;
const NOT_INITIALIZED: u32 = 1;
const INVALID_VALUE: u32 = 7;
const EXECUTION_FAILED: u32 = 13;
const NOT_SUPPORTED: u32 = 15;

// cublasLtMatmulDescAttributes_t
const DESC_COMPUTE_TYPE: c_int = 0;
const DESC_SCALE_TYPE: c_int = 1;
const DESC_POINTER_MODE: c_int = 2;
const DESC_TRANSA: c_int = 3;
const DESC_TRANSB: c_int = 4;
const DESC_TRANSC: c_int = 5;
const DESC_EPILOGUE: c_int = 7;
const DESC_BIAS_POINTER: c_int = 8;
const DESC_BIAS_BATCH_STRIDE: c_int = 10;
const DESC_BIAS_DATA_TYPE: c_int = 26;
// cublasLtEpilogue_t
const EPILOGUE_DEFAULT: u32 = 1;
const EPILOGUE_BIAS: u32 = 4;
// cublasLtMatrixLayoutAttribute_t
const LAYOUT_TYPE: c_int = 0;
const LAYOUT_ORDER: c_int = 1;
const LAYOUT_ROWS: c_int = 2;
const LAYOUT_COLS: c_int = 3;
const LAYOUT_LD: c_int = 4;
const LAYOUT_BATCH_COUNT: c_int = 5;
const LAYOUT_STRIDED_BATCH_OFFSET: c_int = 6;
// cublasLtOrder_t
const ORDER_COL: i32 = 0;
const ORDER_ROW: i32 = 1;
// cublasLtMatmulPreferenceAttributes_t
const PREF_SEARCH_MODE: c_int = 0;
const PREF_MAX_WORKSPACE_BYTES: c_int = 1;
/// Marks the algorithm the heuristic returns (cublasLtMatmulAlgo_t is 8 opaque u64).
const ALGO_TAG: u64 = 0x4c74_5369_6d00_0001;

/// cublasComputeType_t values that compute in f32 (32F, 32F_PEDANTIC, and the fast modes, which
/// the stand-in also runs in full f32).
fn compute_is_f32(compute: c_int) -> bool {
    matches!(compute, 68 | 69 | 74 | 75 | 77)
}

#[derive(Clone, Copy)]
struct Desc {
    compute: c_int,
    scale: c_int,
    pointer_mode: i32,
    ta: bool,
    tb: bool,
    tc: bool,
    epilogue: u32,
    bias: u64,
    bias_stride: i64,
    /// -1: D's type (cuBLASLt's default).
    bias_type: c_int,
}

#[derive(Clone, Copy)]
struct Layout {
    ty: c_int,
    rows: u64,
    cols: u64,
    ld: i64,
    order: i32,
    batch: i32,
    stride: i64,
}

impl Layout {
    /// (row stride, column stride) in elements.
    fn strides(&self) -> (usize, usize) {
        if self.order == ORDER_ROW {
            (self.ld as usize, 1)
        } else {
            (1, self.ld as usize)
        }
    }

    /// Elements spanned by one matrix.
    fn extent(&self) -> usize {
        let (r, c) = (self.rows as usize, self.cols as usize);
        if r == 0 || c == 0 {
            return 0;
        }
        let (rs, cs) = self.strides();
        (r - 1) * rs + (c - 1) * cs + 1
    }

    /// The layout's own consistency, as cublasLtMatrixLayoutCreate and cublasLtMatmul check it.
    fn check(&self, what: &str) -> Result<(), String> {
        if Ty::of(self.ty).is_none() {
            return Err(format!("{what}: data type {} not modelled", self.ty));
        }
        if self.order != ORDER_COL && self.order != ORDER_ROW {
            return Err(format!("{what}: order {} not modelled", self.order));
        }
        let need = if self.order == ORDER_ROW {
            self.cols
        } else {
            self.rows
        };
        if self.ld < need.max(1) as i64 {
            return Err(format!("{what}: ld {} < {}", self.ld, need.max(1)));
        }
        if self.batch < 1 {
            return Err(format!("{what}: batch count {}", self.batch));
        }
        Ok(())
    }
}

struct Pref {
    max_workspace: u64,
}

/// Reads an attribute value of exactly `size_of::<V>()` bytes, or INVALID_VALUE.
///
/// # Safety
/// `buf` points at `size` readable bytes.
unsafe fn read<V: Copy>(buf: *const c_void, size: usize) -> Result<V, u32> {
    if buf.is_null() || size != std::mem::size_of::<V>() {
        return Err(INVALID_VALUE);
    }
    Ok(std::ptr::read_unaligned(buf.cast::<V>()))
}

fn status(r: Result<(), u32>) -> u32 {
    r.err().unwrap_or(SUCCESS)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescCreate(
    desc: *mut *mut c_void,
    compute: c_int,
    scale: c_int,
) -> u32 {
    if desc.is_null() {
        return INVALID_VALUE;
    }
    *desc = handle(Desc {
        compute,
        scale,
        pointer_mode: 0,
        ta: false,
        tb: false,
        tc: false,
        epilogue: EPILOGUE_DEFAULT,
        bias: 0,
        bias_stride: 0,
        bias_type: -1,
    });
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescDestroy(desc: *mut c_void) -> u32 {
    drop_handle::<Desc>(desc);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescSetAttribute(
    desc: *mut c_void,
    attr: c_int,
    buf: *const c_void,
    size: usize,
) -> u32 {
    if desc.is_null() {
        return INVALID_VALUE;
    }
    let d = &mut *desc.cast::<Desc>();
    let op = |v: i32| match v {
        0 => Ok(false),
        1 | 2 => Ok(true),
        _ => Err(INVALID_VALUE),
    };
    status((|| {
        match attr {
            DESC_COMPUTE_TYPE => d.compute = read::<i32>(buf, size)?,
            DESC_SCALE_TYPE => d.scale = read::<i32>(buf, size)?,
            DESC_POINTER_MODE => d.pointer_mode = read::<i32>(buf, size)?,
            DESC_TRANSA => d.ta = op(read::<i32>(buf, size)?)?,
            DESC_TRANSB => d.tb = op(read::<i32>(buf, size)?)?,
            DESC_TRANSC => d.tc = op(read::<i32>(buf, size)?)?,
            DESC_EPILOGUE => d.epilogue = read::<u32>(buf, size)?,
            DESC_BIAS_POINTER => d.bias = read::<u64>(buf, size)?,
            DESC_BIAS_BATCH_STRIDE => d.bias_stride = read::<i64>(buf, size)?,
            DESC_BIAS_DATA_TYPE => d.bias_type = read::<i32>(buf, size)?,
            _ => return Err(NOT_SUPPORTED),
        }
        Ok(())
    })())
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutCreate(
    layout: *mut *mut c_void,
    ty: c_int,
    rows: u64,
    cols: u64,
    ld: i64,
) -> u32 {
    if layout.is_null() {
        return INVALID_VALUE;
    }
    *layout = handle(Layout {
        ty,
        rows,
        cols,
        ld,
        order: ORDER_COL,
        batch: 1,
        stride: 0,
    });
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutDestroy(layout: *mut c_void) -> u32 {
    drop_handle::<Layout>(layout);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutSetAttribute(
    layout: *mut c_void,
    attr: c_int,
    buf: *const c_void,
    size: usize,
) -> u32 {
    if layout.is_null() {
        return INVALID_VALUE;
    }
    let l = &mut *layout.cast::<Layout>();
    status((|| {
        match attr {
            LAYOUT_TYPE => l.ty = read::<i32>(buf, size)?,
            LAYOUT_ORDER => l.order = read::<i32>(buf, size)?,
            LAYOUT_ROWS => l.rows = read::<u64>(buf, size)?,
            LAYOUT_COLS => l.cols = read::<u64>(buf, size)?,
            LAYOUT_LD => l.ld = read::<i64>(buf, size)?,
            LAYOUT_BATCH_COUNT => l.batch = read::<i32>(buf, size)?,
            LAYOUT_STRIDED_BATCH_OFFSET => l.stride = read::<i64>(buf, size)?,
            _ => return Err(NOT_SUPPORTED),
        }
        Ok(())
    })())
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceCreate(pref: *mut *mut c_void) -> u32 {
    if pref.is_null() {
        return INVALID_VALUE;
    }
    *pref = handle(Pref { max_workspace: 0 });
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceDestroy(pref: *mut c_void) -> u32 {
    drop_handle::<Pref>(pref);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceSetAttribute(
    pref: *mut c_void,
    attr: c_int,
    buf: *const c_void,
    size: usize,
) -> u32 {
    if pref.is_null() {
        return INVALID_VALUE;
    }
    let p = &mut *pref.cast::<Pref>();
    status((|| {
        match attr {
            PREF_SEARCH_MODE => {
                read::<u32>(buf, size)?;
            }
            PREF_MAX_WORKSPACE_BYTES => p.max_workspace = read::<u64>(buf, size)?,
            _ => return Err(NOT_SUPPORTED),
        }
        Ok(())
    })())
}

/// A checked problem: D [m, n] = op(A) [m, k] · op(B) [k, n], over `batch` matrices.
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    bias_ty: Option<Ty>,
}

/// Checks the descriptor and layouts against each other as cuBLASLt does: Err(INVALID_VALUE)
/// for shapes in conflict, Err(NOT_SUPPORTED) for what has no algorithm here.
fn problem(d: &Desc, a: &Layout, b: &Layout, c: &Layout, dl: &Layout) -> Result<Problem, u32> {
    for (l, what) in [(a, "A"), (b, "B"), (c, "C"), (dl, "D")] {
        if l.check(what).is_err() {
            return Err(
                if Ty::of(l.ty).is_none() || !matches!(l.order, ORDER_COL | ORDER_ROW) {
                    NOT_SUPPORTED
                } else {
                    INVALID_VALUE
                },
            );
        }
    }
    let (m, n) = (dl.rows as usize, dl.cols as usize);
    let (ar, ac) = (a.rows as usize, a.cols as usize);
    let (br, bc) = (b.rows as usize, b.cols as usize);
    let (am, k) = if d.ta { (ac, ar) } else { (ar, ac) };
    let (bk, bn) = if d.tb { (bc, br) } else { (br, bc) };
    if am != m || bn != n || bk != k || (c.rows, c.cols) != (dl.rows, dl.cols) {
        return Err(INVALID_VALUE);
    }
    if d.tc || c.ty != dl.ty || c.order != dl.order {
        return Err(NOT_SUPPORTED);
    }
    let batch = dl.batch;
    if [a.batch, b.batch, c.batch].iter().any(|&x| x != batch) {
        return Err(INVALID_VALUE);
    }
    if !compute_is_f32(d.compute) || d.scale != 0 || d.pointer_mode != 0 {
        return Err(NOT_SUPPORTED);
    }
    let (at, bt, dt) = (
        Ty::of(a.ty).ok_or(NOT_SUPPORTED)?,
        Ty::of(b.ty).ok_or(NOT_SUPPORTED)?,
        Ty::of(dl.ty).ok_or(NOT_SUPPORTED)?,
    );
    let types_ok = at == bt && (at == dt || dt == Ty::F32);
    if !types_ok {
        return Err(NOT_SUPPORTED);
    }
    let bias_ty = match d.epilogue {
        EPILOGUE_DEFAULT => None,
        EPILOGUE_BIAS => {
            let t = if d.bias_type == -1 {
                dt
            } else {
                Ty::of(d.bias_type).ok_or(NOT_SUPPORTED)?
            };
            if t != dt && t != Ty::F32 {
                return Err(NOT_SUPPORTED);
            }
            if d.bias_stride != 0 {
                return Err(NOT_SUPPORTED);
            }
            Some(t)
        }
        _ => return Err(NOT_SUPPORTED),
    };
    Ok(Problem {
        m,
        n,
        k,
        batch: batch as usize,
        bias_ty,
    })
}

/// cublasLtMatmulHeuristicResult_t
#[repr(C)]
pub struct HeuristicResult {
    algo: [u64; 8],
    workspace_size: usize,
    state: u32,
    waves_count: f32,
    reserved: [c_int; 4],
}

#[no_mangle]
#[allow(clippy::too_many_arguments)] // cuBLASLt's own argument list
pub unsafe extern "C" fn cublasLtMatmulAlgoGetHeuristic(
    h: *mut c_void,
    desc: *mut c_void,
    a: *mut c_void,
    b: *mut c_void,
    c: *mut c_void,
    d: *mut c_void,
    pref: *mut c_void,
    requested: c_int,
    results: *mut HeuristicResult,
    count: *mut c_int,
) -> u32 {
    if h.is_null() {
        return NOT_INITIALIZED;
    }
    if [desc, a, b, c, d, pref].iter().any(|p| p.is_null()) || results.is_null() || count.is_null()
    {
        return INVALID_VALUE;
    }
    if requested <= 0 {
        return INVALID_VALUE;
    }
    let desc = &*desc.cast::<Desc>();
    let [a, b, c, d] = [a, b, c, d].map(|p| *p.cast::<Layout>());
    if let Err(s) = problem(desc, &a, &b, &c, &d) {
        // No algorithm: cuBLASLt answers NOT_SUPPORTED with a count of 0.
        *count = 0;
        return if s == NOT_SUPPORTED { NOT_SUPPORTED } else { s };
    }
    results.write(HeuristicResult {
        algo: [ALGO_TAG, 0, 0, 0, 0, 0, 0, 0],
        workspace_size: 0,
        state: SUCCESS,
        waves_count: 1.0,
        reserved: [0; 4],
    });
    *count = 1;
    SUCCESS
}

#[no_mangle]
#[allow(clippy::too_many_arguments)] // cuBLASLt's own argument list
pub unsafe extern "C" fn cublasLtMatmul(
    h: *mut c_void,
    desc: *mut c_void,
    alpha: *const c_void,
    a: u64,
    a_layout: *mut c_void,
    b: u64,
    b_layout: *mut c_void,
    beta: *const c_void,
    c: u64,
    c_layout: *mut c_void,
    d: u64,
    d_layout: *mut c_void,
    algo: *const [u64; 8],
    workspace: u64,
    workspace_bytes: usize,
    stream: *mut c_void,
) -> u32 {
    if h.is_null() {
        return NOT_INITIALIZED;
    }
    if crate::graph::capturing(stream)
        && ![
            desc,
            a_layout,
            b_layout,
            c_layout,
            d_layout,
            alpha as *mut c_void,
            beta as *mut c_void,
        ]
        .iter()
        .any(|p| p.is_null())
    {
        // On a capturing stream the product runs at each launch of the graph, with the
        // descriptors and host-mode scalars as they are now (cuBLASLt reads them when called).
        let desc = *desc.cast::<Desc>();
        let [al, bl, cl, dl] =
            [a_layout, b_layout, c_layout, d_layout].map(|p| *p.cast::<Layout>());
        let (alpha, beta) = (*alpha.cast::<f32>(), *beta.cast::<f32>());
        let algo = (!algo.is_null()).then(|| *algo);
        let h = h as usize;
        let step = move || {
            let (mut desc, [mut al, mut bl, mut cl, mut dl]) = (desc, [al, bl, cl, dl]);
            let ptr = |l: &mut Layout| (l as *mut Layout).cast::<c_void>();
            // SAFETY: the handle and buffers outlive the graph (the caller's contract, as on a
            // GPU); the descriptors are this closure's copies. The null stream is not capturing.
            let st = unsafe {
                cublasLtMatmul(
                    h as *mut c_void,
                    (&mut desc as *mut Desc).cast(),
                    (&alpha as *const f32).cast(),
                    a,
                    ptr(&mut al),
                    b,
                    ptr(&mut bl),
                    (&beta as *const f32).cast(),
                    c,
                    ptr(&mut cl),
                    d,
                    ptr(&mut dl),
                    algo.as_ref()
                        .map_or(std::ptr::null(), |a| a as *const [u64; 8]),
                    workspace,
                    workspace_bytes,
                    std::ptr::null_mut(),
                )
            };
            match st {
                SUCCESS => Ok(()),
                st => Err((
                    crate::CUDA_ERROR_LAUNCH_FAILED,
                    format!("cublasLtMatmul: status {st}"),
                )),
            }
        };
        return match crate::graph::record(stream, "cublasLtMatmul", step) {
            crate::CUDA_SUCCESS => SUCCESS,
            _ => EXECUTION_FAILED,
        };
    }
    if crate::sticky() != crate::CUDA_SUCCESS {
        return EXECUTION_FAILED;
    }
    if [desc, a_layout, b_layout, c_layout, d_layout]
        .iter()
        .any(|p| p.is_null())
        || alpha.is_null()
        || beta.is_null()
    {
        return INVALID_VALUE;
    }
    if !algo.is_null() && (*algo)[0] != ALGO_TAG {
        return INVALID_VALUE;
    }
    let desc = &*desc.cast::<Desc>();
    let [al, bl, cl, dl] = [a_layout, b_layout, c_layout, d_layout].map(|p| *p.cast::<Layout>());
    let p = match problem(desc, &al, &bl, &cl, &dl) {
        Ok(p) => p,
        Err(s) => return s,
    };
    if p.bias_ty.is_some() && desc.bias == 0 {
        return INVALID_VALUE;
    }
    if workspace_bytes > 0 && workspace == 0 {
        return INVALID_VALUE;
    }
    // Host pointer mode: the scalars are f32 on the host.
    let (alpha, beta) = (*alpha.cast::<f32>(), *beta.cast::<f32>());
    let ty = |l: &Layout| Ty::of(l.ty).expect("checked by problem");
    let mut checks = vec![
        check_batched(
            a,
            if alpha != 0.0 { al.extent() } else { 0 },
            al.stride,
            p.batch,
            ty(&al),
            "cublasLtMatmul A",
        ),
        check_batched(
            b,
            if alpha != 0.0 { bl.extent() } else { 0 },
            bl.stride,
            p.batch,
            ty(&bl),
            "cublasLtMatmul B",
        ),
        check_batched(
            c,
            if beta != 0.0 { cl.extent() } else { 0 },
            cl.stride,
            p.batch,
            ty(&cl),
            "cublasLtMatmul C",
        ),
        check_batched(
            d,
            dl.extent(),
            dl.stride,
            p.batch,
            ty(&dl),
            "cublasLtMatmul D",
        ),
    ];
    if let Some(bt) = p.bias_ty {
        checks.push(memory::check(
            desc.bias,
            p.m * bt.size(),
            "cublasLtMatmul bias",
        ));
    }
    if workspace_bytes > 0 {
        checks.push(memory::check(
            workspace,
            workspace_bytes,
            "cublasLtMatmul workspace",
        ));
    }
    if let Some(Err(e)) = checks.into_iter().find(|r| r.is_err()) {
        // A GPU would fault inside cuBLASLt's kernel: the context is lost, as there.
        crate::fail(crate::CUDA_ERROR_ILLEGAL_ADDRESS, e);
        return EXECUTION_FAILED;
    }
    let at = |base: u64, l: &Layout, i: usize| {
        base.wrapping_add_signed(l.stride * i as i64 * ty(l).size() as i64)
    };
    let threads = if p.batch == 1 {
        rayon::current_num_threads()
    } else {
        1
    };
    let one = |i: usize| {
        let acc = gemm_f32(
            (p.m, p.n, p.k),
            alpha,
            Operand::new(at(a, &al, i), &al, desc.ta),
            Operand::new(at(b, &bl, i), &bl, desc.tb),
            threads,
        );
        let (crs, ccs) = cl.strides();
        let (drs, dcs) = dl.strides();
        let (cb, db) = (at(c, &cl, i), at(d, &dl, i));
        for j in 0..p.n {
            for r in 0..p.m {
                let mut v = acc[r + j * p.m];
                if beta != 0.0 {
                    v += beta * ty(&cl).load(cb, r * crs + j * ccs);
                }
                if let Some(bt) = p.bias_ty {
                    v += bt.load(desc.bias, r);
                }
                ty(&dl).store(db, r * drs + j * dcs, v);
            }
        }
    };
    if p.batch == 1 {
        one(0);
    } else {
        use rayon::prelude::*;
        (0..p.batch).into_par_iter().for_each(one);
    }
    SUCCESS
}

/// One operand of `gemm_f32`: its address, element type, row and column strides, and whether
/// it is used transposed.
pub(crate) struct Operand {
    pub ptr: u64,
    pub ty: Ty,
    pub rs: usize,
    pub cs: usize,
    pub trans: bool,
}

impl Operand {
    fn new(ptr: u64, l: &Layout, trans: bool) -> Operand {
        let (rs, cs) = l.strides();
        Operand {
            ptr,
            ty: Ty::of(l.ty).expect("checked by problem"),
            rs,
            cs,
            trans,
        }
    }
}
