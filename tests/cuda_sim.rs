//! What a GPU refuses, the CUDA path refuses too, as one error and never a crash: too many
//! threads a block, a block over the kernel's __launch_bounds__, shared memory over sm_90's limits
//! without the opt-in attribute, an unknown kernel name, a launcher passing the wrong number of
//! arguments, a pointer outside every allocation, a write past the end of a buffer, a copy larger
//! than its buffer. Each test runs in its own process (tests/common/cuda.rs): on a real GPU, on
//! the CPU stand-in otherwise, where a fault leaves the context unusable as a GPU's does.

#![cfg(feature = "cuda")]

mod common;

use cudarc::driver::{sys, CudaFunction, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use mood::backend::cuda::CudaDevice;

fn cfg(grid: u32, block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// softmax_rows_f32(x, y, M, N, scale) over buffers of `len_x` and `len_y` elements.
fn softmax(dev: &CudaDevice, (m, n): (i32, i32), len_y: usize, c: LaunchConfig) -> String {
    let f = dev.function("softmax", "softmax_rows_f32").unwrap();
    let x = dev.upload(&vec![1.0f32; (m * n) as usize]).unwrap();
    let mut y = dev.zeros::<f32>(len_y).unwrap();
    let scale = 1.0f32;
    // SAFETY: the point of these tests is launches the driver must refuse or catch.
    let r = unsafe {
        dev.stream()
            .launch_builder(&f)
            .arg(&x)
            .arg(&mut y)
            .arg(&m)
            .arg(&n)
            .arg(&scale)
            .launch(c)
    };
    match r.and_then(|_| dev.stream().synchronize()) {
        Ok(()) => "ok".into(),
        Err(e) => format!("{e:?}"),
    }
}

fn stand_in(dev: &CudaDevice) -> bool {
    mood::cuda_stand_in::is_stand_in_device(dev.name())
}

fn assert_refused(got: &str, want: &[&str]) {
    for w in want {
        assert!(got.contains(w), "expected `{w}` in: {got}");
    }
    assert_eq!(got.lines().count(), 1, "one line: {got}");
}

#[test]
fn more_than_1024_threads_a_block_are_refused() {
    let Some(dev) = common::cuda::device("more_than_1024_threads_a_block_are_refused") else {
        return;
    };
    let got = softmax(&dev, (4, 64), 256, cfg(1, 1056, 0));
    assert_refused(&got, &["CUDA_ERROR_INVALID_VALUE"]);
    assert_eq!(softmax(&dev, (4, 64), 256, cfg(1, 128, 0)), "ok");
}

#[test]
fn a_block_over_the_launch_bounds_is_refused() {
    let Some(dev) = common::cuda::device("a_block_over_the_launch_bounds_is_refused") else {
        return;
    };
    // bias_add_f32 is __launch_bounds__(256).
    let f = dev.function("elementwise", "bias_add_f32").unwrap();
    let mut y = dev.zeros::<f32>(1024).unwrap();
    let b = dev.zeros::<f32>(8).unwrap();
    let (n, d) = (1024i64, 8i32);
    let launch = |block: u32, y: &mut cudarc::driver::CudaSlice<f32>| {
        // SAFETY: y holds n elements, b holds d.
        unsafe {
            dev.stream()
                .launch_builder(&f)
                .arg(y)
                .arg(&b)
                .arg(&n)
                .arg(&d)
                .launch(cfg(1, block, 0))
        }
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
    };
    let err = launch(512, &mut y).unwrap_err();
    assert_refused(&err, &["CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"]);
    launch(256, &mut y).unwrap();
}

fn set_max_dynamic_smem(f: &CudaFunction, bytes: i32) -> Result<(), String> {
    f.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes,
    )
    .map_err(|e| format!("{e:?}"))
}

#[test]
fn shared_memory_over_the_limits_is_refused_without_opt_in() {
    let Some(dev) = common::cuda::device("shared_memory_over_the_limits_is_refused_without_opt_in")
    else {
        return;
    };
    // layernorm_bwd_f32 takes W·2·D·4 bytes of dynamic shared memory: D = 2048 and 4 warps need
    // 64 KiB, over the 48 KiB a block gets unless it opts in.
    let (m, d) = (8i32, 2048i32);
    let f = dev.function("layernorm", "layernorm_bwd_f32").unwrap();
    let x = dev.upload(&vec![0.5f32; (m * d) as usize]).unwrap();
    let g = dev.upload(&vec![1.0f32; d as usize]).unwrap();
    let stats = dev.upload(&vec![0.0f32; m as usize]).unwrap();
    let mut dx = dev.zeros::<f32>((m * d) as usize).unwrap();
    let mut parts = dev.zeros::<f32>(2 * d as usize).unwrap();
    let mut parts2 = dev.zeros::<f32>(2 * d as usize).unwrap();
    let mut launch = |smem: u32| {
        // SAFETY: every buffer holds what the kernel reads or writes for M, D and 2 blocks.
        unsafe {
            dev.stream()
                .launch_builder(&f)
                .arg(&x)
                .arg(&g)
                .arg(&stats)
                .arg(&stats)
                .arg(&x)
                .arg(&mut dx)
                .arg(&mut parts)
                .arg(&mut parts2)
                .arg(&m)
                .arg(&d)
                .launch(cfg(2, 128, smem))
        }
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
    };
    let err = launch(65536).unwrap_err();
    assert_refused(&err, &["CUDA_ERROR_INVALID_VALUE"]);
    set_max_dynamic_smem(&f, 65536).unwrap();
    launch(65536).unwrap();
    // Past sm_90's 227 KB even with the opt-in.
    let err = set_max_dynamic_smem(&f, 240 * 1024).unwrap_err();
    assert_refused(&err, &["CUDA_ERROR_INVALID_VALUE"]);
}

#[test]
fn an_unknown_kernel_name_is_refused() {
    let Some(dev) = common::cuda::device("an_unknown_kernel_name_is_refused") else {
        return;
    };
    let err = dev
        .function("softmax", "softmax_rows_f64")
        .unwrap_err()
        .to_string();
    assert_refused(&err, &["softmax_rows_f64", "CUDA_ERROR_NOT_FOUND"]);
}

#[test]
fn a_launcher_with_the_wrong_argument_count_is_refused() {
    let Some(dev) = common::cuda::device("a_launcher_with_the_wrong_argument_count_is_refused")
    else {
        return;
    };
    let f = dev.function("softmax", "softmax_rows_f32").unwrap();
    // The first check asks the driver; the later ones use the count it gave.
    for wrong in [4, 6] {
        let err = dev
            .check_arity(&f, "softmax_rows_f32", wrong)
            .unwrap_err()
            .to_string();
        assert_refused(&err, &["softmax_rows_f32 takes 5 parameters", "passes"]);
    }
    dev.check_arity(&f, "softmax_rows_f32", 5).unwrap();
}

#[test]
fn a_pointer_outside_every_allocation_is_refused() {
    let Some(dev) = common::cuda::device("a_pointer_outside_every_allocation_is_refused") else {
        return;
    };
    let f = dev.function("softmax", "softmax_rows_f32").unwrap();
    let mut y = dev.zeros::<f32>(64).unwrap();
    let bogus: u64 = 0x10;
    let (m, n, scale) = (1i32, 64i32, 1.0f32);
    // SAFETY: deliberately wrong: the driver must refuse, not run.
    let r = unsafe {
        dev.stream()
            .launch_builder(&f)
            .arg(&bogus)
            .arg(&mut y)
            .arg(&m)
            .arg(&n)
            .arg(&scale)
            .launch(cfg(1, 32, 0))
    };
    let err = r.and_then(|_| dev.stream().synchronize()).unwrap_err();
    let err = format!("{err:?}");
    assert_refused(&err, &["CUDA_ERROR_ILLEGAL_ADDRESS"]);
    if stand_in(&dev) {
        assert!(err.contains("pointer argument 0"), "{err}");
    }
}

#[test]
fn a_write_past_the_end_of_a_buffer_is_caught() {
    let Some(dev) = common::cuda::device("a_write_past_the_end_of_a_buffer_is_caught") else {
        return;
    };
    // 4 rows of 1000 into a buffer 3 short: the last row's last elements fall past its end.
    let got = softmax(&dev, (4, 1000), 3997, cfg(1, 128, 0));
    assert_refused(&got, &["CUDA_ERROR_ILLEGAL_ADDRESS"]);
    if stand_in(&dev) {
        assert!(
            got.contains("softmax_rows_f32") && got.contains("past the end"),
            "{got}"
        );
    }
}

#[test]
fn copies_are_checked_and_new_memory_is_not_zero() {
    let Some(dev) = common::cuda::device("copies_are_checked_and_new_memory_is_not_zero") else {
        return;
    };
    let s = dev.stream();
    let buf = dev.upload(&[1.0f32; 16]).unwrap();
    let mut host = vec![0f32; 32];
    let (ptr, _guard) = buf.device_ptr(s);
    // SAFETY: the host buffer has room for 32 floats; the device one has 16, which is the point.
    let r = unsafe { sys::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), ptr, 32 * 4) };
    assert_ne!(
        r,
        sys::CUresult::CUDA_SUCCESS,
        "a 128-byte copy from a 64-byte buffer"
    );
    // SAFETY: an uninitialised allocation, only read back.
    let mut fresh = unsafe { s.alloc::<f32>(8) }.unwrap();
    let v = dev.download(&fresh).unwrap();
    let _ = fresh.device_ptr_mut(s);
    if stand_in(&dev) {
        assert!(
            v.iter().all(|x| x.is_nan()),
            "new memory reads as NaN: {v:?}"
        );
    }
}

#[test]
fn flash_attention_refuses_head_dims_it_does_not_take() {
    use mood::backend::cuda::{attention::Dims, flash_attention};
    let Some(dev) = common::cuda::device("flash_attention_refuses_head_dims_it_does_not_take")
    else {
        return;
    };
    // Head dim 80 (Large-style heads at patch 14): the kernel is written for 64 only. The caller
    // is told why (the note for its fallback to the cuBLAS path); nothing is launched.
    let dims = Dims {
        b: 1,
        n: 5,
        h: 2,
        dh: 80,
    };
    let why = flash_attention::unsupported(&dims).expect("head dim 80 is not taken");
    assert!(why.contains("head dim 64, not 80"), "{why}");
    let qkv = dev.zeros::<half::bf16>(5 * 3 * 160).unwrap();
    let mut out = dev.zeros::<half::bf16>(5 * 160).unwrap();
    let err = flash_attention::forward(&dev, &qkv, None, &mut out, None, &dims, 0.1).unwrap_err();
    assert_refused(&err.to_string(), &["head dim 64, not 80", "cuBLAS"]);
    let ok = Dims { dh: 64, ..dims };
    assert!(flash_attention::unsupported(&ok).is_none());
}
