//! The roofline as people read it: the per-op table of `mood bench --roofline`, the one-line
//! prediction, their JSON, and the two profiles of `mood bench --device cuda --profile` set beside
//! it (each op inside a measured forward, and each op timed alone at the model's shapes).

use super::{precision_name, Gpu, Op, Precision, Prediction};

/// The per-op roofline table (no measurement) as text lines: op, calls per forward, GFLOP and MB
/// per forward, the bound, and the roofline time per forward with its share.
pub fn table(ops: &[Op], gpu: &'static Gpu) -> Vec<String> {
    let total: f64 = ops.iter().map(|o| o.calls as f64 * o.roofline_s(gpu)).sum();
    let mut lines = vec![format!(
        "    {:<18} {:>6} {:>12} {:>12} {:>8} {:>14} {:>6}",
        "op", "calls", "GFLOP", "MB moved", "bound", "roofline ms", "share"
    )];
    for o in ops {
        let k = o.calls as f64;
        let t = k * o.roofline_s(gpu);
        lines.push(format!(
            "    {:<18} {:>6} {:>12.2} {:>12.1} {:>8} {:>14.4} {:>5.1}%",
            o.name,
            o.calls,
            k * o.flops / 1e9,
            k * o.bytes / 1e6,
            o.bound(gpu),
            1e3 * t,
            100.0 * t / total
        ));
    }
    lines
}

/// "H200: 989 TFLOP/s bf16, 67 TFLOP/s f32, 4.8 TB/s (dense peaks, vendor datasheet)".
pub fn describe_gpu(g: &Gpu) -> String {
    format!(
        "{}: {} TFLOP/s bf16 tensor, {} TFLOP/s f32, {} TB/s (dense peaks, vendor datasheet)",
        g.name, g.bf16_tflops, g.f32_tflops, g.mem_tbs
    )
}

/// One line: the predicted images/s on the prediction's device, with what it rests on.
pub fn describe(pred: &Prediction, p: Precision) -> String {
    let b = pred.batch as f64;
    format!(
        "predicted on {}: {:.0} images/s, {:.3} ms per batch of {} ({:.2} GFLOP and {:.1} MB per image; {:.1} TFLOP/s, {:.1}% of the {} peak)",
        pred.gpu.name,
        pred.img_per_s(),
        1e3 * pred.seconds,
        pred.batch,
        pred.flops / b / 1e9,
        pred.bytes / b / 1e6,
        pred.tflops(),
        100.0 * pred.tflops() / pred.gpu.peak_tflops(p),
        precision_name(p)
    )
}

/// A prediction as JSON.
pub fn prediction_json(pred: &Prediction, p: Precision) -> serde_json::Value {
    serde_json::json!({
        "gpu": pred.gpu.name,
        "peak_tflop_per_s": pred.gpu.peak_tflops(p),
        "mem_tb_per_s": pred.gpu.mem_tbs,
        "img_per_s": pred.img_per_s(),
        "ms_per_batch": 1e3 * pred.seconds,
        "gflop_per_image": pred.flops / pred.batch as f64 / 1e9,
        "mb_per_image": pred.bytes / pred.batch as f64 / 1e6,
    })
}

/// The ops with their roofline on `gpu`, as JSON (per forward: all calls together).
pub fn ops_json(ops: &[Op], gpu: &Gpu) -> serde_json::Value {
    ops.iter()
        .map(|o| {
            let k = o.calls as f64;
            serde_json::json!({
                "op": o.name,
                "calls": o.calls,
                "gflop": k * o.flops / 1e9,
                "mb": k * o.bytes / 1e6,
                "bound": o.bound(gpu),
                "roofline_ms": 1e3 * k * o.roofline_s(gpu),
            })
        })
        .collect()
}

/// The measured time of one op over a forward: all its calls together, seconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    pub name: &'static str,
    pub calls: usize,
    pub seconds: f64,
}

/// The per-op profile of a measured forward beside the roofline: each measured op with its time,
/// FLOPs and bytes; with `gpu`, its roofline time there; and when the times were measured on that
/// GPU (`on_gpu`), its achieved TFLOP/s (ops with FLOPs) or GB/s (the others) and its fraction of
/// the roofline, roofline time / measured time. The CPU stand-in's times are CPU times: no rate
/// of them is quoted, nor held against a GPU's roofline. Returns the text lines and JSON rows.
pub fn profile(
    ops: &[Op],
    measured: &[Measured],
    gpu: Option<&Gpu>,
    on_gpu: bool,
) -> (Vec<String>, serde_json::Value) {
    let total: f64 = measured.iter().map(|m| m.seconds).sum();
    let mut lines = vec![format!(
        "    {:<18} {:>6} {:>11} {:>6} {:>10} {:>10} {:>12} {:>16} {:>9}",
        "op",
        "calls",
        "ms/forward",
        "share",
        "GFLOP",
        "MB moved",
        "roofline ms",
        "achieved",
        "of roof"
    )];
    let mut rows = Vec::new();
    for m in measured {
        let op = ops.iter().find(|o| o.name == m.name);
        let k = m.calls as f64;
        let (flops, bytes) = op.map_or((0.0, 0.0), |o| (k * o.flops, k * o.bytes));
        let t = m.seconds.max(1e-12);
        let roof = op.zip(gpu).map(|(o, g)| k * o.roofline_s(g));
        let achieved = on_gpu.then(|| {
            if flops > 0.0 {
                format!("{:.1} TFLOP/s", flops / t / 1e12)
            } else {
                format!("{:.1} GB/s", bytes / t / 1e9)
            }
        });
        let fraction = roof.filter(|_| on_gpu).map(|r| r / t);
        lines.push(format!(
            "    {:<18} {:>6} {:>11.3} {:>5.1}% {:>10.2} {:>10.1} {:>12} {:>16} {:>9}",
            m.name,
            m.calls,
            1e3 * m.seconds,
            100.0 * m.seconds / total.max(1e-12),
            flops / 1e9,
            bytes / 1e6,
            roof.map_or("-".into(), |r| format!("{:.4}", 1e3 * r)),
            achieved.unwrap_or_else(|| "-".into()),
            fraction.map_or("-".into(), |f| format!("{:.1}%", 100.0 * f)),
        ));
        rows.push(serde_json::json!({
            "op": m.name,
            "calls": m.calls,
            "ms_per_forward": 1e3 * m.seconds,
            "gflop": flops / 1e9,
            "mb": bytes / 1e6,
            "roofline_ms": roof.map(|r| 1e3 * r),
            "tflop_per_s": (on_gpu && flops > 0.0).then_some(flops / t / 1e12),
            "gb_per_s": on_gpu.then_some(bytes / t / 1e9),
            "fraction_of_roofline": fraction,
        }));
    }
    (lines, serde_json::Value::Array(rows))
}

/// One op of a transformer block timed alone at the model's shapes: which op of `forward_ops` it
/// is, what runs it (the kernel, or the library call and the pass after it), its shape, how many
/// times a forward calls it (0 for an attention path the forward does not take) and its seconds
/// per call.
#[derive(Clone, Debug, PartialEq)]
pub struct Alone {
    pub op: &'static str,
    pub runs: String,
    pub shape: String,
    pub calls: usize,
    pub seconds: f64,
}

/// The ops timed alone beside their roofline: per call, the time, FLOPs and bytes of the op's
/// `forward_ops` entry, with `gpu` its roofline time, and when measured on that GPU (`on_gpu`)
/// the achieved rate and fraction of the roofline; per forward, calls × time and its share of
/// the ops' sum. Returns the text lines and JSON rows.
pub fn profile_alone(
    ops: &[Op],
    rows: &[Alone],
    gpu: Option<&Gpu>,
    on_gpu: bool,
) -> (Vec<String>, serde_json::Value) {
    let total: f64 = rows.iter().map(|r| r.calls as f64 * r.seconds).sum();
    let mut lines = vec![format!(
        "    {:<18} {:<34} {:<20} {:>5} {:>10} {:>11} {:>6} {:>9} {:>12} {:>16} {:>8}",
        "op",
        "runs",
        "shape",
        "calls",
        "us/call",
        "ms/forward",
        "share",
        "MB/call",
        "roofline us",
        "achieved",
        "of roof"
    )];
    let mut json = Vec::new();
    for r in rows {
        let op = ops.iter().find(|o| o.name == r.op);
        let (flops, bytes) = op.map_or((0.0, 0.0), |o| (o.flops, o.bytes));
        let t = r.seconds.max(1e-12);
        let per_forward = r.calls as f64 * r.seconds;
        let roof = op.zip(gpu).map(|(o, g)| o.roofline_s(g));
        let achieved = on_gpu.then(|| {
            if flops > 0.0 {
                format!("{:.1} TFLOP/s", flops / t / 1e12)
            } else {
                format!("{:.1} GB/s", bytes / t / 1e9)
            }
        });
        let fraction = roof.filter(|_| on_gpu).map(|s| s / t);
        lines.push(format!(
            "    {:<18} {:<34} {:<20} {:>5} {:>10.1} {:>11.3} {:>5.1}% {:>9.2} {:>12} {:>16} {:>8}",
            r.op,
            r.runs,
            r.shape,
            r.calls,
            1e6 * r.seconds,
            1e3 * per_forward,
            100.0 * per_forward / total.max(1e-12),
            bytes / 1e6,
            roof.map_or("-".into(), |s| format!("{:.2}", 1e6 * s)),
            achieved.unwrap_or_else(|| "-".into()),
            fraction.map_or("-".into(), |f| format!("{:.1}%", 100.0 * f)),
        ));
        json.push(serde_json::json!({
            "op": r.op,
            "runs": r.runs,
            "shape": r.shape,
            "calls": r.calls,
            "us_per_call": 1e6 * r.seconds,
            "ms_per_forward": 1e3 * per_forward,
            "gflop_per_call": flops / 1e9,
            "mb_per_call": bytes / 1e6,
            "roofline_us": roof.map(|s| 1e6 * s),
            "tflop_per_s": (on_gpu && flops > 0.0).then_some(flops / t / 1e12),
            "gb_per_s": on_gpu.then_some(bytes / t / 1e9),
            "fraction_of_roofline": fraction,
        }));
    }
    (lines, serde_json::Value::Array(json))
}
