//! Vectorisable f32 `exp` and `erf`, the transcendental functions of softmax and exact GELU.
//!
//! libm's scalar calls would cost more than the GEMMs around them (a BEiT-B forward at batch 8 needs
//! 58M erf and 45M exp), so these are branch-free polynomials that LLVM turns into AVX-512 or AVX2
//! code. The binary targets baseline x86-64, so each slice routine is compiled three times (see
//! `multiversion!`) and picked at run time.
//!
//! exp: Cody-Waite range reduction x = n·ln2 + r, |r| <= ln2/2, then a degree-6 polynomial; max
//! relative error about 2e-7 on [-87, 88]. erf: the rational approximation x·P(x²)/Q(x²) on
//! [-4, 4] (the form used by Eigen and XLA), max absolute error about 4e-7 (3 ulp near 1); |erf| = 1 beyond.
//! Both are checked against f64 references in the tests below.

/// Multiply-add strategy: a fused instruction where the CPU has one (the AVX2+FMA build), separate
/// multiply and add otherwise (a software `fmaf` would be far slower than either).
pub trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

pub struct HwFma;
pub struct NoFma;

impl MulAdd for HwFma {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for NoFma {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_with::<NoFma>(x)
}

#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_with::<NoFma>(x)
}

#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    gelu_with::<NoFma>(x)
}

#[inline(always)]
pub fn exp_with<F: MulAdd>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    // Below −87 the result would be subnormal (slow on x86 and useless to softmax).
    let x = x.clamp(-87.0, 88.3);
    let t = F::mul_add(x, LOG2E, SHIFTER);
    let n = t - SHIFTER;
    let r = F::mul_add(-n, LN2_LO, F::mul_add(-n, LN2_HI, x));
    let p = 1.0 / 720.0;
    let p = F::mul_add(p, r, 1.0 / 120.0);
    let p = F::mul_add(p, r, 1.0 / 24.0);
    let p = F::mul_add(p, r, 1.0 / 6.0);
    let p = F::mul_add(p, r, 0.5);
    let p = F::mul_add(p, r, 1.0);
    let p = F::mul_add(p, r, 1.0);
    // 2^n: the integer sits in the low bits of t's mantissa; move it into the exponent field.
    let bits = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let scale = f32::from_bits(((bits + 127) << 23) as u32);
    p * scale
}

#[inline(always)]
pub fn erf_with<F: MulAdd>(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142_3e-10_f32;
    let p = F::mul_add(p, x2, 2.770_681_4e-8);
    let p = F::mul_add(p, x2, -2.101_024e-6);
    let p = F::mul_add(p, x2, -5.692_506_4e-5);
    let p = F::mul_add(p, x2, -7.349_906e-4);
    let p = F::mul_add(p, x2, -2.954_6e-3);
    let p = F::mul_add(p, x2, -1.609_603_3e-2);
    let q = -1.456_607_2e-5_f32;
    let q = F::mul_add(q, x2, -2.133_740_6e-4);
    let q = F::mul_add(q, x2, -1.682_827e-3);
    let q = F::mul_add(q, x2, -7.373_329e-3);
    let q = F::mul_add(q, x2, -1.426_474e-2);
    x * p / q
}

/// Exact (erf) GELU as torch.nn.GELU(): 0.5·x·(1 + erf(x/√2)).
#[inline(always)]
pub fn gelu_with<F: MulAdd>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_with::<F>(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// d GELU / dx = Φ(x) + x·φ(x), with Φ the standard normal CDF and φ its density.
#[inline(always)]
pub fn gelu_grad_with<F: MulAdd>(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf_with::<F>(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * INV_SQRT_2PI * exp_with::<F>(-0.5 * x * x)
}

/// The instruction sets `multiversion!` routines can run with, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Baseline = 0,
    Avx2 = 1,
    Avx512 = 2,
}

/// A cap on the level below the CPU's own (u8::MAX: none), so tests can run every version on one
/// machine.
static SIMD_CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// The level the routines below run at: what the CPU supports, lowered by `cap_simd_level`.
pub fn simd_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    let cpu = if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
    {
        SimdLevel::Avx512
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        SimdLevel::Avx2
    } else {
        SimdLevel::Baseline
    };
    #[cfg(not(target_arch = "x86_64"))]
    let cpu = SimdLevel::Baseline;
    match SIMD_CAP.load(std::sync::atomic::Ordering::Relaxed) {
        0 => SimdLevel::Baseline,
        1 => cpu.min(SimdLevel::Avx2),
        _ => cpu,
    }
}

/// Runs the routines below at most at `level` (None: the CPU's best) from now on, process-wide.
/// For tests that compare the versions; results agree to rounding, speed does not.
pub fn cap_simd_level(level: Option<SimdLevel>) {
    let v = level.map_or(u8::MAX, |l| l as u8);
    SIMD_CAP.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// Declares `pub fn $name(args)` whose body is compiled for AVX-512 (16 lanes), for AVX2+FMA and
/// for baseline x86-64, with the choice made per call by `simd_level`.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    #[allow(dead_code)]
                    type F = HwFma;
                    $body
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    #[allow(dead_code)]
                    type F = HwFma;
                    $body
                }
                match simd_level() {
                    // SAFETY: simd_level only reports what the CPU supports.
                    SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                    SimdLevel::Baseline => {}
                }
            }
            fn generic($($arg: $ty),*) {
                #[allow(dead_code)]
                type F = NoFma;
                $body
            }
            generic($($arg),*)
        }
    };
}

multiversion! {
    pub fn gelu_slice(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = gelu_with::<F>(*v);
        }
    }
}

multiversion! {
    pub fn bias_gelu_rows(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v = gelu_with::<F>(*v + *b);
            }
        }
    }
}

multiversion! {
    /// dst = GELU(src), elementwise.
    pub fn gelu_into(src: &[f32], dst: &mut [std::mem::MaybeUninit<f32>]) {
        for (o, v) in dst.iter_mut().zip(src) {
            o.write(gelu_with::<F>(*v));
        }
    }
}

multiversion! {
    /// dx = dy · GELU'(x), elementwise.
    pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((o, v), g) in dx.iter_mut().zip(x).zip(dy) {
            *o = *g * gelu_grad_with::<F>(*v);
        }
    }
}

multiversion! {
    /// dy ← dy · GELU'(x), elementwise, in place (the tape's backward owns dy).
    pub fn gelu_backward_inplace(x: &[f32], dy: &mut [f32]) {
        for (g, v) in dy.iter_mut().zip(x) {
            *g *= gelu_grad_with::<F>(*v);
        }
    }
}

multiversion! {
    pub fn bias_rows(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += *b;
            }
        }
    }
}

/// Lanes of the explicit accumulators below. Float reductions are not reassociated by the compiler,
/// so a plain `sum += x` loop stays scalar; sixteen independent partial sums vectorise (one
/// AVX-512 register, two AVX2 ones).
const LANES: usize = 16;

#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}

/// The same values seen as possibly-uninitialised storage, to hand an initialised buffer to a
/// routine that only writes its output.
///
/// # Safety
/// Whoever writes through the result must store initialised values only (`MaybeUninit::write`
/// of an f32), never `MaybeUninit::uninit()`, or `x` would hold uninitialised floats.
pub unsafe fn as_uninit(x: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: MaybeUninit<f32> has f32's layout; the caller keeps every value initialised.
    unsafe { &mut *(x as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}

/// A new `len`-value Vec whose values `fill` writes, skipping the zero fill a fresh output would
/// otherwise get (the training step allocates a few hundred MB of them per step, and on a
/// 2-core machine memory bandwidth is what the element-wise ops run out of).
///
/// # Safety
/// `fill` must write every one of the `len` values.
pub unsafe fn vec_written_by(
    len: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller's contract: all len values were written.
    unsafe { v.set_len(len) };
    v
}

/// x ← s·x.
#[inline(always)]
pub fn scale(x: &mut [f32], s: f32) {
    x.iter_mut().for_each(|v| *v *= s);
}

/// acc ← acc + x, elementwise.
#[inline(always)]
pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, v)| *a += v);
}

/// Σ a·b over LANES independent partial sums.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    acc.iter().fold(tail, |a, &b| a.max(b))
}

/// (Σ (x − m), Σ (x − m)²): the second pass of a corrected two-pass variance.
#[inline(always)]
pub fn sum_dev(x: &[f32], m: f32) -> (f32, f32) {
    let mut a1 = [0.0f32; LANES];
    let mut a2 = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let d = c[i] - m;
            a1[i] += d;
            a2[i] += d * d;
        }
    }
    let (mut t1, mut t2) = (0.0f32, 0.0f32);
    for v in chunks.remainder() {
        t1 += v - m;
        t2 += (v - m) * (v - m);
    }
    (a1.iter().sum::<f32>() + t1, a2.iter().sum::<f32>() + t2)
}

multiversion! {
    /// The un-normalised half of a row-wise softmax, in place, rows of length `n`:
    /// x ← exp(x + bias − max(x + bias)) and sums[r] ← Σ of row r. The caller divides by the sums
    /// where it is cheapest (attention scales its [N, Dh] output instead of the [N, N] scores).
    pub fn softmax_rows_unnormalised(x: &mut [f32], bias: Option<&[f32]>, n: usize, sums: &mut [f32]) {
        for (r, row) in x.chunks_exact_mut(n).enumerate() {
            if let Some(b) = bias {
                for (v, bv) in row.iter_mut().zip(&b[r * n..(r + 1) * n]) {
                    *v += *bv;
                }
            }
            let m = max(row);
            let mut acc = [0.0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for l in 0..LANES {
                    c[l] = exp_with::<F>(c[l] - m);
                    acc[l] += c[l];
                }
            }
            let mut tail = 0.0;
            for v in chunks.into_remainder() {
                *v = exp_with::<F>(*v - m);
                tail += *v;
            }
            sums[r] = acc.iter().sum::<f32>() + tail;
        }
    }
}

/// Row-wise softmax in place (see `softmax_rows_unnormalised`).
pub fn softmax_rows(x: &mut [f32], bias: Option<&[f32]>, n: usize) {
    let mut sums = vec![0.0f32; x.len() / n.max(1)];
    softmax_rows_unnormalised(x, bias, n, &mut sums);
    for (row, s) in x.chunks_exact_mut(n).zip(&sums) {
        let inv = 1.0 / s;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

multiversion! {
    /// LayerNorm of rows of length D = gamma.len(). Corrected two-pass statistics: a first mean m,
    /// then s1 = Σ(x − m) and s2 = Σ(x − m)² in one pass, mean = m + s1/D, var = (s2 − s1²/D)/D.
    /// The s1 terms remove the rounding error of m, which matters when |mean| ≫ std.
    pub fn layernorm_rows(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [std::mem::MaybeUninit<f32>]) {
        let d = gamma.len();
        let df = d as f32;
        for (xr, orow) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let m = sum(xr) / df;
            let (s1, s2) = sum_dev(xr, m);
            let mean = m + s1 / df;
            let var = ((s2 - s1 * s1 / df) / df).max(0.0);
            let inv = 1.0 / (var + eps).sqrt();
            for ((o, v), (g, b)) in orow.iter_mut().zip(xr).zip(gamma.iter().zip(beta)) {
                o.write(F::mul_add((v - mean) * inv, *g, *b));
            }
        }
    }
}

multiversion! {
    /// LayerNorm backward of rows of length D = gamma.len() (see `layernorm::backward` for the
    /// math): writes dx, adds the rows' dγ and dβ terms into dg and db.
    /// Every reduction runs over LANES partial sums so the whole row vectorises.
    pub fn layernorm_backward_rows(
        x: &[f32],
        dy: &[f32],
        gamma: &[f32],
        eps: f32,
        dx: &mut [std::mem::MaybeUninit<f32>],
        dg: &mut [f32],
        db: &mut [f32]
    ) {
        let d = gamma.len();
        let df = d as f32;
        let mut xhat = vec![0.0f32; d];
        for ((xr, dyr), dxr) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let m = sum(xr) / df;
            let (s1, s2) = sum_dev(xr, m);
            let mean = m + s1 / df;
            let var = ((s2 - s1 * s1 / df) / df).max(0.0);
            let r = 1.0 / (var + eps).sqrt();
            for (h, v) in xhat.iter_mut().zip(xr) {
                *h = (v - mean) * r;
            }
            for (((a, bacc), g), h) in dg.iter_mut().zip(db.iter_mut()).zip(dyr).zip(&xhat) {
                *a = F::mul_add(*g, *h, *a);
                *bacc += g;
            }
            // mean(dy ⊙ γ) and mean(dy ⊙ γ ⊙ x̂); dx holds dy ⊙ γ meanwhile.
            for ((o, g), w) in dxr.iter_mut().zip(dyr).zip(gamma) {
                o.write(g * w);
            }
            // SAFETY: every value of the row was written just above.
            let dxr = unsafe { &mut *(dxr as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            let mg = sum(dxr) / df;
            let mgx = dot(dxr, &xhat) / df;
            for (o, h) in dxr.iter_mut().zip(&xhat) {
                *o = r * F::mul_add(-*h, mgx, *o - mg);
            }
        }
    }
}

/// The per-tensor constants of one AdamW update (see `adamw_update`).
#[derive(Clone, Copy)]
pub struct AdamwCoefs {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1 − lr·weight_decay (decoupled weight decay).
    pub decay: f32,
    /// lr / (1 − β1ᵗ).
    pub step_size: f32,
    /// √(1 − β2ᵗ).
    pub sqrt_bc2: f32,
    /// Multiplies every gradient first (the clipping factor).
    pub grad_scale: f32,
}

multiversion! {
    /// One AdamW step of a tensor in torch.optim.AdamW's order: p ← p·decay; g ← g·grad_scale;
    /// m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²; p ← p − step_size·m / (√v / √(1−β2ᵗ) + eps).
    pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamwCoefs) {
        for (((x, gi), mi), vi) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let gi = gi * c.grad_scale;
            *x *= c.decay;
            *mi = c.beta1 * *mi + (1.0 - c.beta1) * gi;
            *vi = c.beta2 * *vi + (1.0 - c.beta2) * gi * gi;
            *x -= c.step_size * *mi / (vi.sqrt() / c.sqrt_bc2 + c.eps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_f64_reference() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let r = (x as f64).exp();
            let rel = ((exp(x) as f64 - r) / r).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "exp worst relative error {worst}");
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(-87.0) >= f32::MIN_POSITIVE && exp(-87.0) < 1e-37);
    }

    #[test]
    fn erf_matches_libm_reference() {
        let mut worst = 0.0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let r = libm::erf(x as f64);
            worst = worst.max((erf(x) as f64 - r).abs());
            x += 0.00731;
        }
        // 4e-7 is ~3 ulp of f32 near |erf| = 1.
        assert!(worst < 5e-7, "erf worst absolute error {worst}");
    }

    #[test]
    fn slice_versions_agree_with_scalar() {
        let mut v: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.013).collect();
        let want: Vec<f32> = v.iter().map(|&x| gelu(x)).collect();
        gelu_slice(&mut v);
        for (a, b) in v.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0));
        }
    }
}
