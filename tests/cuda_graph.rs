//! CUDA graphs (src/backend/cuda/graph.rs) and the graphed forward (src/model/cuda_model.rs):
//!   - capture semantics, which the CPU stand-in for CUDA keeps as the driver does: a kernel or a
//!     cuBLAS product queued while the stream captures does not run until the graph is launched;
//!     each launch reads the buffers' contents as they are then (new input, new output); memory
//!     allocated inside the capture is the graph's and is reused by every launch; a host-to-device
//!     copy or a synchronisation during capture fails the capture (and the stream works after);
//!   - the graphed forward of the tiny BEiT and ViT (timm fixtures) at f32 and bf16 equals the
//!     eager forward bit for bit (the same kernels on the same values), over two different batches
//!     replayed through one graph, in both orders, so a graph that read stale input would fail; a
//!     final batch of another shape runs eagerly and equals the eager forward too.
//!
//! Without a usable GPU they run on the CPU stand-in (tests/common/cuda.rs).

#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;

use common::fixture;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use mood::backend::cuda::graph::DeviceGraph;
use mood::backend::cuda::CudaDevice;
use mood::model::cuda_attention::Compute;
use mood::model::cuda_model::CudaModel;
use mood::model::{Output, VisionTransformer, VitConfig};
use mood::weights::WeightStore;
use mood::Tensor;

const ROWS: i32 = 4;
const COLS: i32 = 64;

fn softmax_kernel(dev: &CudaDevice) -> CudaFunction {
    dev.function("softmax", "softmax_rows_f32").unwrap()
}

/// Queues y = softmax_rows(x) (4 rows of 64) on the device's stream.
fn softmax(dev: &CudaDevice, f: &CudaFunction, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) {
    let (m, n, scale) = (ROWS, COLS, 1.0f32);
    let cfg = LaunchConfig {
        grid_dim: ((ROWS as u32).div_ceil(4), 1, 1), // one warp a row, 4 a block
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x and y hold ROWS·COLS values each.
    unsafe {
        dev.stream()
            .launch_builder(f)
            .arg(x)
            .arg(y)
            .arg(&m)
            .arg(&n)
            .arg(&scale)
            .launch(cfg)
    }
    .unwrap();
}

fn values(seed: u32) -> Vec<f32> {
    (0..ROWS * COLS)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
        .collect()
}

/// softmax_rows of `x` run eagerly: the reference for the graph's launches.
fn eager_softmax(dev: &CudaDevice, f: &CudaFunction, x: &[f32]) -> Vec<f32> {
    let xd = dev.upload(x).unwrap();
    let mut yd = dev.zeros::<f32>(x.len()).unwrap();
    softmax(dev, f, &xd, &mut yd);
    dev.download(&yd).unwrap()
}

#[test]
fn a_recorded_kernel_runs_at_each_launch_on_the_inputs_then() {
    let Some(dev) =
        common::cuda::device("a_recorded_kernel_runs_at_each_launch_on_the_inputs_then")
    else {
        return;
    };
    let dev = Arc::new(dev);
    let f = softmax_kernel(&dev);
    let (x1, x2) = (values(1), values(2));
    let mut x = dev.upload(&x1).unwrap();
    let mut y = dev.zeros::<f32>(x1.len()).unwrap();
    let graph = DeviceGraph::capture(&dev, || {
        softmax(&dev, &f, &x, &mut y);
        Ok(())
    })
    .unwrap();
    assert!(
        dev.download(&y).unwrap().iter().all(|&v| v == 0.0),
        "the kernel ran during capture"
    );
    graph.launch().unwrap();
    let first = dev.download(&y).unwrap();
    assert_eq!(first, eager_softmax(&dev, &f, &x1), "launch 1 vs eager");
    // The second launch reads what x holds now.
    dev.stream().memcpy_htod(&x2, &mut x).unwrap();
    graph.launch().unwrap();
    let second = dev.download(&y).unwrap();
    assert_eq!(second, eager_softmax(&dev, &f, &x2), "launch 2 vs eager");
    assert_ne!(first, second);
}

#[test]
fn graph_memory_is_reused_and_a_cublas_product_is_recorded() {
    let Some(dev) = common::cuda::device("graph_memory_is_reused_and_a_cublas_product_is_recorded")
    else {
        return;
    };
    let dev = Arc::new(dev);
    let f = softmax_kernel(&dev);
    let n = (ROWS * COLS) as usize;
    let mut x = dev.upload(&values(3)).unwrap();
    let ones = dev.upload(&vec![1.0f32; COLS as usize]).unwrap();
    let mut sums = dev.zeros::<f32>(ROWS as usize).unwrap();
    // sums = softmax(x) · 1 (each row's sum), through a temporary the graph allocates and frees.
    let gemv = GemmConfig {
        transa: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
        transb: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        m: ROWS,
        n: 1,
        k: COLS,
        alpha: 1.0f32,
        lda: COLS,
        ldb: COLS,
        beta: 0.0f32,
        ldc: ROWS,
    };
    let graph = DeviceGraph::capture(&dev, || {
        let mut tmp = dev.empty::<f32>(n)?;
        softmax(&dev, &f, &x, &mut tmp);
        // SAFETY: tmp is [ROWS, COLS] row-major (COLS x ROWS column-major), ones COLS, sums ROWS.
        unsafe { <CudaBlas as Gemm<f32>>::gemm(dev.blas(), gemv, &tmp, &ones, &mut sums) }
            .map_err(|e| mood::Error::Cuda(format!("{e:?}")))?;
        Ok(())
    })
    .unwrap();
    assert_eq!(dev.download(&sums).unwrap(), vec![0.0; ROWS as usize]);
    for seed in [3, 4] {
        dev.stream().memcpy_htod(&values(seed), &mut x).unwrap();
        graph.launch().unwrap();
        let got = dev.download(&sums).unwrap();
        // Each row of a softmax sums to 1 (to f32 rounding over 64 terms).
        for s in &got {
            assert!(
                (s - 1.0).abs() < 1e-5,
                "launch with seed {seed}: row sums {got:?}"
            );
        }
    }
}

#[test]
fn what_a_capture_cannot_hold_fails_it_and_the_stream_works_after() {
    let Some(dev) =
        common::cuda::device("what_a_capture_cannot_hold_fails_it_and_the_stream_works_after")
    else {
        return;
    };
    let dev = Arc::new(dev);
    let f = softmax_kernel(&dev);
    let x = dev.upload(&values(5)).unwrap();
    let mut y = dev.zeros::<f32>(x.len()).unwrap();
    let upload = DeviceGraph::capture(&dev, || {
        softmax(&dev, &f, &x, &mut y);
        dev.upload(&[1.0f32; 16]).map(drop)
    });
    let e = upload
        .err()
        .expect("an upload during capture must fail it")
        .to_string();
    assert!(e.contains("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    let sync = DeviceGraph::capture(&dev, || dev.sync());
    let e = sync
        .err()
        .expect("a sync during capture must fail it")
        .to_string();
    assert!(e.contains("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"), "{e}");
    let download = DeviceGraph::capture(&dev, || dev.download(&x).map(drop));
    assert!(download.is_err(), "a download during capture must fail it");
    // Nothing of the failed captures ran, and the stream is back to eager work.
    assert!(dev.download(&y).unwrap().iter().all(|&v| v == 0.0));
    softmax(&dev, &f, &x, &mut y);
    assert_eq!(
        dev.download(&y).unwrap(),
        eager_softmax(&dev, &f, &values(5))
    );
    if mood::cuda_stand_in::is_stand_in_device(dev.name()) {
        // Freeing inside a graph a buffer made outside it would free it at every launch.
        let outside = dev.zeros::<f32>(8).unwrap();
        let e = DeviceGraph::capture(&dev, || {
            drop(outside);
            Ok(())
        })
        .err()
        .expect("freeing an outside buffer in a capture")
        .to_string();
        assert!(e.contains("CUDA_ERROR_STREAM_CAPTURE"), "{e}");
        softmax(&dev, &f, &x, &mut y);
        dev.sync().unwrap();
    }
}

fn tiny(name: &str, arch: &str) -> (VisionTransformer, Tensor) {
    let cfg = VitConfig::preset(arch).unwrap();
    let store = WeightStore::open(&fixture(&format!("timm/{name}.safetensors"))).unwrap();
    let model = VisionTransformer::load(&cfg, &store).unwrap();
    let (shape, x) = mood::npy::read_f32(&fixture(&format!("timm/{name}_input.npy"))).unwrap();
    (model, Tensor::from_vec(&shape, x).unwrap())
}

fn bits(o: &Output) -> (Vec<u32>, Vec<u32>) {
    let b = |t: &Tensor| t.as_slice().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    (b(&o.features), o.logits.as_ref().map(b).unwrap_or_default())
}

/// Eager forwards of `batches`, then the same batches through a model with graphs on; the graphed
/// outputs must equal the eager ones bit for bit. Returns how many batches ran as graph launches.
fn graphed_equals_eager<T: Compute>(
    dev: &Arc<CudaDevice>,
    model: &VisionTransformer,
    batches: &[&Tensor],
    what: &str,
) -> usize
where
    CudaBlas: Gemm<T>,
{
    let mut eager = CudaModel::<T>::new(Arc::clone(dev), model);
    let want: Vec<Output> = batches.iter().map(|x| eager.forward(x).unwrap()).collect();
    let mut graphed = CudaModel::<T>::new(Arc::clone(dev), model);
    graphed.set_graphs(true);
    for (i, (x, w)) in batches.iter().zip(&want).enumerate() {
        let got = graphed.forward(x).unwrap();
        assert_eq!(got.features.shape(), w.features.shape());
        assert!(
            bits(&got) == bits(w),
            "{what} {}: batch {i} (graph launches so far: {}) differs from the eager forward",
            T::NAME,
            graphed.graph_launches()
        );
    }
    graphed.graph_launches()
}

#[test]
fn graphed_forward_equals_eager_bit_for_bit() {
    let Some(dev) = common::cuda::device("graphed_forward_equals_eager_bit_for_bit") else {
        return;
    };
    let dev = Arc::new(dev);
    for (name, arch) in [
        ("tiny_beit", "test_tiny_beit"),
        ("tiny_vit", "test_tiny_vit"),
    ] {
        let (model, x1) = tiny(name, arch);
        // A second batch of the same shape: the images in another order, one negated.
        let b = x1.shape()[0];
        let per = x1.as_slice().len() / b;
        let src = x1.as_slice();
        let mut v = Vec::with_capacity(x1.as_slice().len());
        for i in (0..b).rev() {
            v.extend_from_slice(&src[i * per..(i + 1) * per]);
        }
        v[..per].iter_mut().for_each(|p| *p = -*p);
        let x2 = Tensor::from_vec(x1.shape(), v).unwrap();
        // A final, partial batch: the first two images.
        let mut tail_shape = x1.shape().to_vec();
        tail_shape[0] = 2;
        let tail = Tensor::from_vec(&tail_shape, src[..2 * per].to_vec()).unwrap();
        // Batch 1 runs eagerly, batch 2 is captured and launched, then the graph replays batch 1
        // and batch 2 again, and the partial batch runs eagerly.
        let batches = [&x1, &x2, &x1, &x2, &tail];
        let f32_launches = graphed_equals_eager::<f32>(&dev, &model, &batches, arch);
        let bf16_launches = graphed_equals_eager::<half::bf16>(&dev, &model, &batches, arch);
        println!("PASS {arch}: f32 and bf16 graphed forwards equal the eager ones bit for bit ({f32_launches} and {bf16_launches} graph launches)");
        assert_eq!(
            (f32_launches, bf16_launches),
            (3, 3),
            "{arch}: graph launches"
        );
        // The two batches really differ, so a graph replaying stale input would have failed.
        let mut eager = CudaModel::<f32>::new(Arc::clone(&dev), &model);
        let (a, c) = (eager.forward(&x1).unwrap(), eager.forward(&x2).unwrap());
        assert!(
            bits(&a) != bits(&c),
            "{arch}: the two batches give the same outputs"
        );
    }
}

/// `mood extract --device cuda` replays the graph by default (`MOOD_CUDA_GRAPH=0` turns it off):
/// several full batches and a partial last one give the same store, byte for byte, either way,
/// and no capture fell back to the eager forward.
#[test]
fn extraction_with_graphs_writes_the_eager_store() {
    let (env, _) = common::cuda::cli_env();
    let tmp = tempfile::tempdir().unwrap();
    let extract = |name: &str, graph: &str| {
        let out = tmp.path().join(name);
        let mut env: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        env.push(("MOOD_CUDA_GRAPH", graph));
        for precision in ["f32", "bf16"] {
            let dir = out.join(precision);
            let args = [
                "--batch",
                "64",
                "--device",
                "cuda",
                "--precision",
                precision,
            ];
            let (code, _, err) = common::extract_tiny_env("digits:0-4@test", &dir, &args, &env);
            assert_eq!(code, 0, "extract {name} {precision}: {err}");
            assert!(!err.contains("CUDA graph"), "a capture fell back: {err}");
        }
        out
    };
    let (graphed, eager) = (extract("graphed", "1"), extract("eager", "0"));
    for precision in ["f32", "bf16"] {
        for file in ["features.npy", "logits.npy"] {
            let (shape, g) = mood::npy::read_f32(&graphed.join(precision).join(file)).unwrap();
            let (_, e) = mood::npy::read_f32(&eager.join(precision).join(file)).unwrap();
            println!("{precision} {file} {shape:?}: graphed and eager stores compared");
            assert!(
                shape[0] > 4 * 64,
                "{file}: {shape:?}: more than four batches"
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(&g) == bits(&e),
                "{precision} {file}: graphed differs from eager"
            );
        }
    }
}
