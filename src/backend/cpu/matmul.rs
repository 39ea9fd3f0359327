//! Matrix products through the `gemm` crate: C = A·B (+ C), with arbitrary strides, so transposed
//! weights ([N, K] as PyTorch stores Linear weights) are read in place, never copied.

/// A strided view of a row-major-or-not f32 matrix: element (i, j) is at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub struct MatRef {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

#[derive(Clone, Copy)]
pub struct MatMut {
    pub ptr: *mut f32,
    pub rs: isize,
    pub cs: isize,
}

impl MatRef {
    /// Row-major [rows, cols] matrix stored contiguously.
    pub fn row_major(data: &[f32], cols: usize) -> MatRef {
        MatRef {
            ptr: data.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose of a contiguous row-major [rows, cols] matrix, i.e. a [cols, rows] view.
    pub fn transposed(data: &[f32], cols: usize) -> MatRef {
        MatRef {
            ptr: data.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }
}

impl MatMut {
    pub fn row_major(data: &mut [f32], cols: usize) -> MatMut {
        MatMut::row_major_at(data.as_mut_ptr(), cols)
    }

    /// A contiguous row-major matrix of `cols` columns starting at `ptr` (e.g. a buffer not yet
    /// initialised, see `filled_by`).
    pub fn row_major_at(ptr: *mut f32, cols: usize) -> MatMut {
        MatMut {
            ptr,
            rs: cols as isize,
            cs: 1,
        }
    }
}

/// dst[m, n] = (accumulate ? dst : 0) + scale · a[m, k] · b[k, n].
///
/// # Safety
/// Every view must be valid for its extent (m×k, k×n, m×n) and `dst` must not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    a: MatRef,
    b: MatRef,
    scale: f32,
    parallel: bool,
) {
    let par = if parallel && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded from the caller's contract. gemm's argument order is dst, lhs, rhs, each as
    // (ptr, column stride, row stride); alpha multiplies the old dst, beta the product.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.cs,
            dst.rs,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

/// out[M, N] = x[M, K] · w[N, K]ᵀ, the matrix part of `nn.Linear` (no bias).
pub fn linear_nobias(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
    assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n);
    // SAFETY: the assertions above bound every view; `out` is a distinct &mut.
    unsafe {
        gemm_strided(
            m,
            n,
            k,
            MatMut::row_major(out, n),
            false,
            MatRef::row_major(x, k),
            MatRef::transposed(w, k),
            1.0,
            true,
        )
    }
}

/// A new `len`-value buffer filled by `fill`, which gets its start as a raw pointer and must
/// write every element (a `gemm` that does not read its destination does: with beta = 0 it
/// stores its first k-block's products, and zeros when k = 0). Skipping the zero fill matters
/// in training, where every step allocates a few hundred MB of such outputs.
///
/// # Safety
/// `fill` must initialise all `len` values through the pointer and read none of them.
pub unsafe fn filled_by(len: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    // SAFETY: the caller's contract is vec_written_by's, through a raw pointer.
    unsafe { super::vecmath::vec_written_by(len, |out| fill(out.as_mut_ptr().cast())) }
}

/// x[M, K] · w[N, K]ᵀ into a new buffer (see `linear_nobias`).
pub fn linear_new(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == n * k);
    // SAFETY: the assertion bounds the inputs; the gemm writes all m×n outputs without reading.
    unsafe {
        filled_by(m * n, |out| {
            gemm_strided(
                m,
                n,
                k,
                MatMut::row_major_at(out, n),
                false,
                MatRef::row_major(x, k),
                MatRef::transposed(w, k),
                1.0,
                true,
            )
        })
    }
}

/// Plain triple-loop reference for tests (f64 accumulation).
pub fn linear_reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                s += x[i * k + p] as f64 * w[j * k + p] as f64;
            }
            out[i * n + j] = s as f32;
        }
    }
    out
}

/// Gradients of y[M, N] = x[M, K]·w[N, K]ᵀ + b given dy[M, N]:
/// dx = dy·w [M, K], dw = dyᵀ·x [N, K], db = Σ_rows dy [N].
pub fn linear_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(x.len() == m * k && w.len() == n * k && dy.len() == m * n);
    // SAFETY: the assertion above bounds every input view; each gemm writes all of its fresh
    // output without reading it (filled_by's contract).
    let (dx, dw) = unsafe {
        let dx = filled_by(m * k, |dx| {
            gemm_strided(
                m,
                k,
                n,
                MatMut::row_major_at(dx, k),
                false,
                MatRef::row_major(dy, n),
                MatRef::row_major(w, k),
                1.0,
                true,
            )
        });
        let dw = filled_by(n * k, |dw| {
            gemm_strided(
                n,
                k,
                m,
                MatMut::row_major_at(dw, k),
                false,
                MatRef::transposed(dy, n),
                MatRef::row_major(x, k),
                1.0,
                true,
            )
        });
        (dx, dw)
    };
    (dx, dw, super::reduce::column_sums(dy, n))
}
