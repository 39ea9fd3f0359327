//! Vectorisable f32 `exp` and `erf`, the transcendental functions of softmax and exact GELU.
//!
//! libm's scalar calls would cost more than the GEMMs around them (a BEiT-B forward at batch 8 needs
//! 58M erf and 45M exp), so these are branch-free polynomials that LLVM turns into AVX2 code. The
//! binary targets baseline x86-64, so each slice routine is compiled twice and picked at run time.
//!
//! exp: Cody-Waite range reduction x = n·ln2 + r, |r| <= ln2/2, then a degree-6 polynomial; max
//! relative error about 2e-7 on [-87, 88]. erf: the rational approximation x·P(x²)/Q(x²) on
//! [-4, 4] (the form used by Eigen and XLA), max absolute error about 1e-7; |erf| = 1 beyond.
//! Both are checked against f64 references in the tests below.

#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2^n: the integer sits in the low bits of t's mantissa; move it into the exponent field.
    let bits = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let scale = f32::from_bits(((bits + 127) << 23) as u32);
    p * scale
}

#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = -2.726_142_3e-10_f32;
    let p = p * x2 + 2.770_681_4e-8;
    let p = p * x2 + -2.101_024e-6;
    let p = p * x2 + -5.692_506_4e-5;
    let p = p * x2 + -7.349_906e-4;
    let p = p * x2 + -2.954_600e-3;
    let p = p * x2 + -1.609_603_3e-2;
    let q = -1.456_607_2e-5_f32;
    let q = q * x2 + -2.133_740_6e-4;
    let q = q * x2 + -1.682_827e-3;
    let q = q * x2 + -7.373_329e-3;
    let q = q * x2 + -1.426_474e-2;
    x * p / q
}

/// Exact (erf) GELU as torch.nn.GELU(): 0.5·x·(1 + erf(x/√2)).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Declares `pub fn $name(args)` whose body is compiled once for AVX2+FMA and once for baseline
/// x86-64, with the choice made per call from the cached CPU feature check.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            fn generic($($arg: $ty),*) $body
            generic($($arg),*)
        }
    };
}

multiversion! {
    pub fn gelu_slice(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = gelu(*v);
        }
    }
}

multiversion! {
    pub fn bias_gelu_rows(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v = gelu(*v + *b);
            }
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

multiversion! {
    /// Row-wise softmax in place, max-subtracted; rows of length `n`.
    pub fn softmax_rows(x: &mut [f32], n: usize) {
        for row in x.chunks_exact_mut(n) {
            let mut m = f32::NEG_INFINITY;
            for v in row.iter() {
                m = m.max(*v);
            }
            let mut s = 0.0f32;
            for v in row.iter_mut() {
                *v = exp(*v - m);
                s += *v;
            }
            let inv = 1.0 / s;
            for v in row.iter_mut() {
                *v *= inv;
            }
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
        assert_eq!(exp(-1000.0), exp(-87.3));
        assert!(exp(-87.3) > 0.0 && exp(-87.3) < 1e-37);
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
        assert!(worst < 3e-7, "erf worst absolute error {worst}");
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
