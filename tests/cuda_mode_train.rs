//! MODE's ResNet training on a CUDA device (model/cuda_conv_train.rs, train/mode_device.rs)
//! against the CPU executor, through the one forward/backward of resnet_train.rs:
//!   - one training forward and backward of two tiny ResNets (`test_tiny_resnet_bottleneck`:
//!     7×7/2 stem, max-pool, bottlenecks with downsample shortcuts; `test_tiny_resnet_basic_cifar`:
//!     CIFAR stem, basic blocks) from random ∂map and ∂features: the features, the map, every
//!     parameter's gradient, the input's gradient and every BatchNorm running statistic within
//!     1e-4 of the CPU's, each measured as max |cuda − cpu| / max |cpu| over the tensor;
//!   - two steps of MODE's training (SupCon + ALPA, SGD with momentum) on CPU and on CUDA: the
//!     losses within 1e-4 relative and every checkpoint tensor (weights, running statistics,
//!     heads, momentum buffers) within 1e-3 of the CPU's (SGD at lr 0.5 amplifies the 1e-5 level
//!     gradient differences); two CUDA runs write the same bytes;
//!   - `mood mode-train --device cuda` writes a checkpoint whose settings record the device;
//!   - a CPU run stopped after one of two epochs and resumed with `--device cuda` ends within
//!     1e-3 of two epochs on the CPU (momentum carried to the device), its record naming both;
//!   - a batch too large for the device (the stand-in's `MOOD_CUDA_SIM_MEMORY_MIB`) is refused
//!     in one line naming --batch.
//!
//! Without a usable GPU they run on the CPU stand-in for CUDA (tests/common/cuda.rs).

#![cfg(feature = "cuda")]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use mood::backend::cuda::CudaDevice;
use mood::backend::Precision;
use mood::model::conv_train_exec::{hwc_to_oihw, ConvTrainExec, CpuConvTrain};
use mood::model::cuda_conv_train::CudaConvTrain;
use mood::model::resnet::ResNetConfig;
use mood::model::resnet_train::{init_params, ResNetTrain};
use mood::rng::Rng;
use mood::train::device::TrainOn;
use mood::train::loops::Dataset;
use mood::train::mode::{self, ModeSettings};
use mood::weights::WeightStore;
use mood::Tensor;

/// max |got − want| / max |want|.
fn err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |a, b| a.max(b.abs()));
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

fn random(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

/// A fresh encoder with BatchNorm's γ, β and running statistics moved off their initial values.
fn params_for(cfg: &ResNetConfig) -> BTreeMap<String, Tensor> {
    let mut p = init_params(cfg, 7);
    let mut rng = Rng::new(11);
    for (name, t) in p.iter_mut() {
        let shift = |v: &mut f32, r: &mut Rng, s: f64| *v += (r.normal() * s) as f32;
        if name.ends_with("running_var") {
            t.as_mut_slice()
                .iter_mut()
                .for_each(|v| *v = 0.5 + rng.uniform() as f32);
        } else if t.shape().len() == 1 {
            t.as_mut_slice()
                .iter_mut()
                .for_each(|v| shift(v, &mut rng, 0.2));
        }
    }
    p
}

/// One forward and backward on `ex`, all brought to the host: (features, map, parameter
/// gradients as the executor lays them out, ∂ the NHWC input, the map's shape).
type Pass = (Vec<f32>, Vec<f32>, HashMap<String, Vec<f32>>, Vec<f32>);

fn pass<E: ConvTrainExec>(ex: &mut E, net: &ResNetTrain, images: &Tensor, d_map_seed: u64) -> Pass {
    let fw = net.forward_on(ex, images).unwrap();
    let d = fw.map_dims;
    let mut rng = Rng::new(d_map_seed);
    let d_map = ex.upload(&random(&mut rng, d.len(), 1e-2)).unwrap();
    let d_feat = ex.upload(&random(&mut rng, d.b * d.c, 1e-1)).unwrap();
    let bw = net
        .backward_on(ex, &fw.tape, d, Some(d_map), Some(&d_feat))
        .unwrap();
    let grads = bw
        .params
        .iter()
        .map(|(k, v)| (k.clone(), ex.download(v).unwrap()))
        .collect();
    (
        ex.download(&fw.features).unwrap(),
        ex.download(&fw.map).unwrap(),
        grads,
        ex.download(&bw.input).unwrap(),
    )
}

fn forward_backward_case(dev: &Arc<CudaDevice>, arch: &str, size: usize) {
    let cfg = ResNetConfig::preset(arch).unwrap();
    let net = ResNetTrain::new(&cfg);
    let params = params_for(&cfg);
    let mut rng = Rng::new(3);
    let images = Tensor::from_vec(
        &[4, 3, size, size],
        random(&mut rng, 4 * 3 * size * size, 1.0),
    )
    .unwrap();

    let mut cpu = CpuConvTrain::new(&params);
    let (f_cpu, m_cpu, g_cpu, x_cpu) = pass(&mut cpu, &net, &images, 5);
    let mut cuda = CudaConvTrain::new(dev.clone(), &net, &params, &BTreeMap::new()).unwrap();
    let (f_gpu, m_gpu, mut g_gpu, x_gpu) = pass(&mut cuda, &net, &images, 5);
    for u in net.units() {
        let name = format!("{}.weight", u.conv);
        let (cv, w) = (u.cv, g_gpu.remove(&name).unwrap());
        g_gpu.insert(name, hwc_to_oihw(&w, cv.cout, cv.cin, cv.k));
    }

    let tol = 1e-4;
    let e = [
        ("features", err(&f_gpu, &f_cpu)),
        ("map", err(&m_gpu, &m_cpu)),
        ("d input", err(&x_gpu, &x_cpu)),
    ];
    println!(
        "{arch}: features {:.2e}, map {:.2e}, d input {:.2e}",
        e[0].1, e[1].1, e[2].1
    );
    for (what, e) in e {
        assert!(e <= tol, "{arch}: {what} {e:.2e}");
    }
    assert_eq!(
        g_gpu.len(),
        g_cpu.len(),
        "{arch}: one gradient per parameter"
    );
    let mut worst = (0.0f32, String::new());
    for (name, want) in &g_cpu {
        let e = err(&g_gpu[name], want);
        assert!(e <= tol, "{arch}: gradient of {name} {e:.2e}");
        if e >= worst.0 {
            worst = (e, name.clone());
        }
    }
    println!(
        "{arch}: {} parameter gradients, worst {:.2e} ({})",
        g_cpu.len(),
        worst.0,
        worst.1
    );

    let (mut after, mut momentum) = (params.clone(), BTreeMap::new());
    cuda.download(&mut after, &mut momentum).unwrap();
    assert!(momentum.is_empty(), "no step, no momentum");
    let mut worst = 0.0f32;
    assert_eq!(cpu.running.len(), 2 * net.units().count());
    for (name, want) in &cpu.running {
        let e = err(after[name].as_slice(), want);
        assert!(e <= tol, "{arch}: {name} {e:.2e}");
        worst = worst.max(e);
    }
    println!(
        "{arch}: {} running statistics, worst {worst:.2e}",
        cpu.running.len()
    );
}

#[test]
fn resnet_training_pass_on_cuda_matches_the_cpu_executor() {
    let Some(dev) = common::cuda::device("resnet_training_pass_on_cuda_matches_the_cpu_executor")
    else {
        return;
    };
    let dev = Arc::new(dev);
    forward_backward_case(&dev, "test_tiny_resnet_bottleneck", 32);
    forward_backward_case(&dev, "test_tiny_resnet_basic_cifar", 16);
}

/// Eight digits of classes 0 and 1 at 16×16: one epoch of batch 4 is two steps.
fn eight_digits() -> Dataset {
    let all = mode::digits_data("digits:0-1", 16).unwrap();
    let zeros = (0..all.len()).filter(|&i| all.labels[i] == 0).take(4);
    let ones = (0..all.len()).filter(|&i| all.labels[i] == 1).take(4);
    let idx: Vec<usize> = zeros.chain(ones).collect();
    let (x, labels) = all.batch(&idx).unwrap();
    Dataset {
        images: x.as_slice().to_vec(),
        chw: all.chw,
        labels,
    }
}

/// Two steps of SupCon + ALPA on `on`: the losses of the epoch and every checkpoint tensor.
fn two_steps(on: &TrainOn, out: &std::path::Path) -> (mode::StepLoss, BTreeMap<String, Vec<f32>>) {
    let mut cfg = ResNetConfig::preset("test_tiny_resnet_basic_cifar").unwrap();
    cfg.img_size = 16;
    let mut s = ModeSettings::preset("mode-t").unwrap();
    (s.epochs, s.batch, s.alpa_dim, s.seed) = (1, 4, 8, 5);
    let data = eight_digits();
    let mut params = mode::initial_params(&cfg, &s);
    let run = mode::Run {
        on,
        checkpoint: Some(out),
        resume: None,
    };
    let h = mode::train_from(&cfg, &mut params, &data, &s, run, &mut |_, _| true).unwrap();
    let store = WeightStore::open(out).unwrap();
    let tensors = store
        .names()
        .map(|n| {
            let shape = store.shape_of(n).unwrap().to_vec();
            (n.clone(), store.get(n, &shape).unwrap().as_slice().to_vec())
        })
        .collect();
    (h[0], tensors)
}

#[test]
fn two_mode_train_steps_on_cuda_match_the_cpu_and_repeat() {
    let Some(dev) = common::cuda::device("two_mode_train_steps_on_cuda_match_the_cpu_and_repeat")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let on = TrainOn::Cuda {
        dev: Arc::new(dev),
        precision: Precision::F32,
    };
    let (cpu_path, a, b) = (
        tmp.path().join("cpu.st"),
        tmp.path().join("a.st"),
        tmp.path().join("b.st"),
    );
    let (l_cpu, t_cpu) = two_steps(&TrainOn::Cpu, &cpu_path);
    let (l_gpu, t_gpu) = two_steps(&on, &a);
    println!("losses (total, supcon, alpa): cpu {l_cpu:?}, cuda {l_gpu:?}");
    for (what, x, y) in [
        ("total", l_gpu.total, l_cpu.total),
        ("supcon", l_gpu.supcon, l_cpu.supcon),
        ("alpa", l_gpu.alpa, l_cpu.alpa),
    ] {
        let e = (x - y).abs() / y.abs().max(1e-6);
        assert!(e <= 1e-4, "{what} loss: cuda {x}, cpu {y} ({e:.2e})");
    }
    assert_eq!(
        t_gpu.keys().collect::<Vec<_>>(),
        t_cpu.keys().collect::<Vec<_>>(),
        "the same checkpoint tensors"
    );
    assert!(t_cpu.keys().any(|k| k.starts_with("optim.momentum.conv1")));
    let mut worst = (0.0f32, String::new());
    for (name, want) in &t_cpu {
        let e = err(&t_gpu[name], want);
        assert!(e <= 1e-3, "checkpoint tensor {name}: {e:.2e}");
        if e >= worst.0 {
            worst = (e, name.clone());
        }
    }
    println!(
        "checkpoint: {} tensors, worst {:.2e} ({})",
        t_cpu.len(),
        worst.0,
        worst.1
    );
    two_steps(&on, &b);
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "two CUDA runs write the same bytes"
    );
}

/// `mood mode-train --arch test_tiny_resnet_basic_cifar --data digits:0-1 -o OUT` plus `extra`,
/// on the CUDA stand-in with `env` added to its environment: (exit code, stderr).
fn mode_train_cli(out: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let (base, _stand_in) = common::cuda::cli_env();
    let mut all: Vec<(&str, &str)> = base.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(env);
    let mut args = vec![
        "mode-train",
        "--arch",
        "test_tiny_resnet_basic_cifar",
        "--data",
        "digits:0-1",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (rc, _, err) = common::run_mood_env(&args, &all);
    (rc, err)
}

#[test]
fn mode_train_cli_on_cuda_records_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cuda.st");
    let flags = [
        "--recipe",
        "mode-t",
        "--epochs",
        "1",
        "--batch",
        "64",
        "--alpa-dim",
        "8",
        "--device",
        "cuda",
    ];
    let (rc, err) = mode_train_cli(&out, &flags, &[]);
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("epoch 0: loss"), "{err}");
    let p = mood::train::checkpoint::read_progress(&out)
        .unwrap()
        .unwrap();
    let device = p.settings["device"].as_str().unwrap_or_default();
    println!("mode-train --device cuda: {device}");
    assert!(device.starts_with("cuda"), "settings record {}", p.settings);
    let store = WeightStore::open(&out).unwrap();
    assert!(store.names().any(|n| n == "optim.momentum.conv1.weight"));
}

#[test]
fn a_cpu_run_resumed_on_cuda_continues_it() {
    let tmp = tempfile::tempdir().unwrap();
    let arch = "test_tiny_resnet_basic_cifar";
    let mode_t = |out: &std::path::Path, device: &str, resume: bool| {
        let mut flags = vec![
            "--recipe",
            "mode-t",
            "--epochs",
            "2",
            "--batch",
            "64",
            "--alpa-dim",
            "8",
            "--device",
            device,
        ];
        if resume {
            flags.push("--resume");
        }
        let (rc, err) = mode_train_cli(out, &flags, &[]);
        assert_eq!(rc, 0, "{err}");
        err
    };
    let straight = tmp.path().join("straight.st");
    mode_t(&straight, "cpu", false);

    // The same run (the settings mode-train makes of those flags) stopped after its first epoch
    // on the CPU, then continued on CUDA.
    let cfg = ResNetConfig::preset(arch).unwrap();
    let mut s = ModeSettings::preset("mode-t").unwrap();
    (s.epochs, s.batch, s.alpa_dim) = (2, 64, 8);
    let data = mode::digits_data("digits:0-1", cfg.img_size).unwrap();
    let mut params = mode::initial_params(&cfg, &s);
    let broken = tmp.path().join("broken.st");
    let run = mode::Run {
        on: &TrainOn::Cpu,
        checkpoint: Some(&broken),
        resume: None,
    };
    mode::train_from(&cfg, &mut params, &data, &s, run, &mut |_, _| false).unwrap();
    let log = mode_t(&broken, "cuda", true);
    assert!(
        log.contains("epoch 1: loss") && !log.contains("epoch 0"),
        "{log}"
    );

    let p = mood::train::checkpoint::read_progress(&broken)
        .unwrap()
        .unwrap();
    let device = p.settings["device"].as_str().unwrap_or_default();
    println!("resumed on cuda, record: {device}");
    assert!(device.starts_with("cpu to epoch 1, then cuda"), "{device}");
    let (a, b) = (
        WeightStore::open(&broken).unwrap(),
        WeightStore::open(&straight).unwrap(),
    );
    let mut worst = 0.0f32;
    for n in b.names() {
        let shape = b.shape_of(n).unwrap().to_vec();
        let want = b.get(n, &shape).unwrap();
        let got = a.get(n, &shape).unwrap();
        let e = err(got.as_slice(), want.as_slice());
        assert!(e <= 1e-3, "{n}: {e:.2e}");
        worst = worst.max(e);
    }
    println!("1 epoch cpu + 1 resumed on cuda vs 2 on the cpu: worst {worst:.2e}");
}

#[test]
fn a_batch_too_large_for_the_device_names_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("oom.st");
    // A 40 MiB device: cuBLASLt's 32 MiB workspace and the tiny encoder fit, a step of 64
    // images (128 views at 32×32) does not.
    let flags = ["--epochs", "1", "--batch", "64", "--device", "cuda"];
    let (rc, err) = mode_train_cli(&out, &flags, &[("MOOD_CUDA_SIM_MEMORY_MIB", "40")]);
    println!("{err}");
    assert_ne!(rc, 0);
    // The device's description, then the error in one line.
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one line: {err}");
    assert!(
        errors[0].contains("out of GPU memory at --batch 64") && err.contains("smaller --batch"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "no checkpoint from a failed first epoch");
}
