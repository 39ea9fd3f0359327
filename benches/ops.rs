//! Per-op CPU benchmarks on BEiT-B shapes at batch 8 (M = 8·197 = 1576 token rows), one group per op
//! family (the stems of src/backend/cpu). `cargo bench --bench ops`. For gemm and attention the
//! "elements" criterion counts are FLOPs, so its Gelem/s reads as GFLOP/s.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mood::backend::cpu::{attention, layernorm, matmul, vecmath};
use mood::model::init::Rng;
use std::hint::black_box;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() as f32).collect()
}

const M: usize = 1576;

fn gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10);
    for &(name, k, n) in &[
        ("qkv", 768, 2304),
        ("proj", 768, 768),
        ("fc1", 768, 3072),
        ("fc2", 3072, 768),
    ] {
        let x = randn(M * k, 1);
        let w = randn(n * k, 2);
        let mut out = vec![0.0; M * n];
        g.throughput(Throughput::Elements((2 * M * n * k) as u64));
        g.bench_function(BenchmarkId::new(name, format!("{M}x{k}x{n}")), |b| {
            b.iter(|| matmul::linear_nobias(black_box(&x), &w, M, k, n, &mut out))
        });
    }
}

fn attention_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    let (b, n, h, dh) = (8, 197, 12, 64);
    let qkv = randn(b * n * 3 * h * dh, 3);
    let bias = randn(h * n * n, 4);
    let mut out = vec![0.0; b * n * h * dh];
    let dims = attention::Dims { b, n, h, dh };
    g.throughput(Throughput::Elements((4 * b * h * n * n * dh) as u64));
    g.bench_function("relpos/b8_n197_h12_dh64", |bch| {
        bch.iter(|| attention::forward(black_box(&qkv), Some(&bias), &dims, &mut out))
    });
}

fn elementwise(c: &mut Criterion) {
    let mut g = c.benchmark_group("elementwise");
    g.sample_size(20);
    let d = 768;
    let x = randn(M * d, 5);
    let gamma = randn(d, 6);
    let beta = randn(d, 7);
    let mut out = vec![0.0; M * d];
    g.throughput(Throughput::Bytes((2 * 4 * M * d) as u64));
    g.bench_function("layernorm/1576x768", |b| {
        b.iter(|| layernorm::forward(black_box(&x), &gamma, &beta, 1e-6, &mut out))
    });
    let mut h = randn(M * 3072, 8);
    g.throughput(Throughput::Elements((M * 3072) as u64));
    g.bench_function("gelu/1576x3072", |b| {
        b.iter(|| vecmath::gelu_slice(black_box(&mut h[..])))
    });
    let mut s = randn(197 * 197, 9);
    let mut sums = vec![0.0; 197];
    g.throughput(Throughput::Elements((197 * 197) as u64));
    g.bench_function("softmax/197x197", |b| {
        b.iter(|| vecmath::softmax_rows_unnormalised(black_box(&mut s[..]), None, 197, &mut sums))
    });
}

criterion_group!(benches, gemm, attention_bench, elementwise);
criterion_main!(benches);
