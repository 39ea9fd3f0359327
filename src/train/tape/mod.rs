//! Reverse-mode autodiff for the model's op set: `Tape` is an `Exec` that runs each op on a
//! training executor (`model::train_exec::TrainExec`: the CPU, or a CUDA device) and records what
//! backward needs (shared values, no copies). `backward` walks the records in reverse,
//! accumulating parameter gradients by the checkpoint's names; each record, and the activations
//! only it held, is dropped as soon as its backward has run. The recording half (the `Exec` impl)
//! is in record.rs, the backward here. Written once: every executor trains through this file.

use std::collections::HashMap;

use crate::backend::Pool;
use crate::error::{Error, Result};
use crate::model::cpu_train::CpuTrain;
use crate::model::init::Rng;
use crate::model::layers::{Linear, LinearBias, Norm, Param};
use crate::model::train_exec::{AttnDims, TableRef, TrainExec};
use crate::tensor::Tensor;

mod record;

/// An activation on the tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

enum Record<E: TrainExec> {
    PatchEmbed {
        cols: E::Buf,
        w: Param,
        b: Param,
        dims: [usize; 4],
        img: Var,
        out: Var,
    },
    Assemble {
        patches: Var,
        cls: Param,
        pos: Option<Param>,
        b: usize,
        out: Var,
    },
    LayerNorm {
        x: Var,
        xv: E::Buf,
        saved: E::NormSaved,
        norm: Norm,
        eps: f32,
        out: Var,
    },
    Linear {
        x: Var,
        xv: E::Buf,
        l: Linear,
        pre_gelu: Option<E::Buf>,
        out: Var,
    },
    Attention {
        qkv: Var,
        qkvv: E::Buf,
        saved: E::AttnSaved,
        /// The relative-position table and its index into the dense [H, N, N] bias.
        table: Option<(Param, Vec<usize>)>,
        dims: AttnDims,
        out: Var,
    },
    Residual {
        x: Var,
        y: Var,
        /// The branch as added (after drop-path scaling).
        yv: E::Buf,
        gamma: Option<Param>,
        /// Drop-path factors per image and tokens per image, when drop-path was applied.
        row_scale: Option<(Vec<f32>, usize)>,
        out: Var,
    },
    Pool {
        x: Var,
        b: usize,
        n: usize,
        how: Pool,
        out: Var,
    },
    MaskRows {
        x: Var,
        mask: Vec<bool>,
        token: Param,
        out: Var,
    },
    GatherRows {
        x: Var,
        rows: Vec<usize>,
        m: usize,
        out: Var,
    },
}

impl<E: TrainExec> Record<E> {
    fn profile_name(&self) -> &'static str {
        match self {
            Record::PatchEmbed { .. } => "patch_embed_bwd",
            Record::Assemble { .. } => "tokens_bwd",
            Record::LayerNorm { .. } => "layernorm_bwd",
            Record::Linear { .. } => "linear_bwd",
            Record::Attention { .. } => "attention_bwd",
            Record::Residual { .. } => "residual_bwd",
            Record::Pool { .. } => "pool_bwd",
            Record::MaskRows { .. } => "mask_bwd",
            Record::GatherRows { .. } => "gather_bwd",
        }
    }
}

pub struct Tape<E: TrainExec = CpuTrain> {
    exec: E,
    values: Vec<Option<E::Buf>>,
    records: Vec<Record<E>>,
    /// Also compute the gradient with respect to the input images (ODIN, input saliency).
    pub want_input_grad: bool,
    /// Drop-path rate of each block (empty: none), as timm's linspace(0, rate, depth).
    pub drop_path: Vec<f32>,
    /// Gradients of parameters computed outside the records (ALPA's MLPs), added to the
    /// backward's by name.
    param_seeds: Vec<(String, E::Grad)>,
    batch: usize,
    rng: Rng,
}

/// Gradients by parameter name (values laid out as the parameter's tensor), plus the images'.
pub struct Grads<G = Vec<f32>> {
    pub params: HashMap<String, G>,
    pub input: Option<G>,
}

impl<G> Default for Grads<G> {
    fn default() -> Grads<G> {
        Grads {
            params: HashMap::new(),
            input: None,
        }
    }
}

impl Default for Tape {
    fn default() -> Tape {
        Tape::on(CpuTrain)
    }
}

impl Tape {
    /// A tape on the CPU.
    pub fn new() -> Tape {
        Tape::default()
    }

    /// A CPU tape that applies drop-path with rates linspace(0, `rate`, depth), seeded by `seed`.
    pub fn with_drop_path(rate: f32, depth: usize, seed: u64) -> Tape {
        let mut t = Tape::new();
        t.set_drop_path(rate, depth, seed);
        t
    }

    /// A recorded activation's value (on the host: this tape runs on the CPU).
    pub fn value(&self, v: &Var) -> &Tensor {
        self.get(*v)
    }
}

impl<E: TrainExec> Tape<E> {
    /// A tape whose ops run on `exec`.
    pub fn on(exec: E) -> Tape<E> {
        Tape {
            exec,
            values: Vec::new(),
            records: Vec::new(),
            want_input_grad: false,
            param_seeds: Vec::new(),
            drop_path: Vec::new(),
            batch: 1,
            rng: Rng::new(0),
        }
    }

    /// Drop-path with rates linspace(0, `rate`, depth) over the blocks, drawn from `seed`.
    pub fn set_drop_path(&mut self, rate: f32, depth: usize, seed: u64) {
        self.drop_path = (0..depth)
            .map(|i| {
                if depth > 1 {
                    rate * i as f32 / (depth - 1) as f32
                } else {
                    0.0
                }
            })
            .collect();
        self.rng = Rng::new(seed);
    }

    pub fn exec(&mut self) -> &mut E {
        &mut self.exec
    }

    /// The executor back, the records dropped (a forward whose gradients are not wanted).
    pub fn into_exec(self) -> E {
        self.exec
    }

    fn push(&mut self, t: E::Buf) -> Var {
        self.values.push(Some(t));
        Var(self.values.len() - 1)
    }

    fn get(&self, v: Var) -> &E::Buf {
        self.values[v.0]
            .as_ref()
            .expect("tape value read after backward freed it")
    }

    /// Runs backward from `out` with upstream gradient `dout` (same layout as `out`'s value).
    pub fn backward(self, out: Var, dout: Vec<f32>) -> Result<Grads<E::Grad>> {
        self.backward_many(vec![(out, dout)])
    }

    /// Backward from several outputs at once (a loss over logits plus one over patch tokens):
    /// each seed's gradient enters at its output and they add up where the graph joins.
    pub fn backward_many(self, seeds: Vec<(Var, Vec<f32>)>) -> Result<Grads<E::Grad>> {
        self.backward_keep(seeds).map(|(g, _)| g)
    }

    /// `backward_many`, handing the executor back (it holds the parameters on a device).
    pub fn backward_keep(mut self, seeds: Vec<(Var, Vec<f32>)>) -> Result<(Grads<E::Grad>, E)> {
        let seeds = seeds
            .into_iter()
            .map(|(v, g)| Ok((v, self.exec.grad_from_host(&g)?)))
            .collect::<Result<Vec<_>>>()?;
        self.backward_from(seeds)
    }

    /// Cross-entropy with label smoothing of the logits `v` [B, C], on the executor (only the
    /// loss comes back): (loss, dlogits, the seed of `backward_from`).
    pub fn cross_entropy(
        &mut self,
        v: &Var,
        labels: &[usize],
        smoothing: f32,
    ) -> Result<(f32, E::Grad)> {
        let z = self.get(*v).clone();
        self.exec.cross_entropy(&z, labels, smoothing)
    }

    /// MOS's group-softmax loss of the logits `v` for class `labels`, on the executor (only the
    /// loss comes back): (loss, dlogits).
    pub fn group_softmax(
        &mut self,
        v: &Var,
        groups: &[usize],
        labels: &[usize],
    ) -> Result<(f32, E::Grad)> {
        let z = self.get(*v).clone();
        self.exec.group_softmax(&z, groups, labels)
    }

    /// A recorded activation as the executor holds it (a shared handle; cheap to clone).
    pub fn buf(&self, v: &Var) -> E::Buf {
        self.get(*v).clone()
    }

    /// Adds `g` to parameter `name`'s gradient at the end of the next backward (a loss whose
    /// own parameters are differentiated outside the tape, as ALPA's MLPs).
    pub fn seed_param(&mut self, name: &str, g: E::Grad) {
        self.param_seeds.push((name.to_string(), g));
    }

    /// Mean squared error of `v` against `target`, on the executor: (loss, dv).
    pub fn mse(&mut self, v: &Var, target: &[f32]) -> Result<(f32, E::Grad)> {
        let p = self.get(*v).clone();
        self.exec.mse(&p, target)
    }

    /// Backward from gradients already on the executor (a loss computed there), handing the
    /// executor back.
    pub fn backward_from(mut self, seeds: Vec<(Var, E::Grad)>) -> Result<(Grads<E::Grad>, E)> {
        let mut vg: Vec<Option<E::Grad>> = (0..self.values.len()).map(|_| None).collect();
        for (out, g) in seeds {
            let have: usize = E::shape(self.get(out)).iter().product();
            if E::grad_len(&g) != have {
                return Err(Error::Data(format!(
                    "backward: gradient has {} values, output has {have}",
                    E::grad_len(&g),
                )));
            }
            accumulate(&mut self.exec, &mut vg, out, g)?;
        }
        // Forward values are no longer needed: records hold what backward reads.
        self.values.clear();
        let mut grads = Grads::default();
        while let Some(rec) = self.records.pop() {
            let _t = crate::profile::scope(rec.profile_name());
            self.backward_record(rec, &mut vg, &mut grads)?;
        }
        for (name, g) in std::mem::take(&mut self.param_seeds) {
            add_param(&mut self.exec, &mut grads.params, &name, g)?;
        }
        if self.want_input_grad {
            grads.input = vg.first_mut().and_then(|g| g.take());
        }
        Ok((grads, self.exec))
    }

    fn backward_record(
        &mut self,
        rec: Record<E>,
        vg: &mut [Option<E::Grad>],
        grads: &mut Grads<E::Grad>,
    ) -> Result<()> {
        let ex = &mut self.exec;
        let params = &mut grads.params;
        match rec {
            Record::Pool { x, b, n, how, out } => {
                let Some(dy) = vg[out.0].take() else {
                    return Ok(());
                };
                let dx = ex.pool_backward(dy, b, n, how)?;
                accumulate(ex, vg, x, dx)?;
            }
            Record::MaskRows {
                x,
                mask,
                token,
                out,
            } => {
                let Some(dy) = vg[out.0].take() else {
                    return Ok(());
                };
                let (dx, dt) = ex.mask_rows_backward(dy, &mask, token.value.numel())?;
                add_param(ex, params, &token.name, dt)?;
                accumulate(ex, vg, x, dx)?;
            }
            Record::GatherRows { x, rows, m, out } => {
                let Some(dy) = vg[out.0].take() else {
                    return Ok(());
                };
                let dx = ex.gather_rows_backward(dy, &rows, m)?;
                accumulate(ex, vg, x, dx)?;
            }
            Record::Residual {
                x,
                y,
                yv,
                gamma,
                row_scale,
                out,
            } => {
                let Some(dy) = vg[out.0].take() else {
                    return Ok(());
                };
                let rs = row_scale.as_ref().map(|(k, n)| (&k[..], *n));
                let (dbranch, dgamma) = ex.residual_backward(&yv, gamma.as_ref(), rs, &dy)?;
                if let (Some(g), Some(dg)) = (&gamma, dgamma) {
                    add_param(ex, params, &g.name, dg)?;
                }
                accumulate(ex, vg, y, dbranch)?;
                accumulate(ex, vg, x, dy)?;
            }
            Record::Linear {
                x,
                xv,
                l,
                pre_gelu,
                out,
            } => {
                let Some(dy) = vg[out.0].take() else {
                    return Ok(());
                };
                let (dx, dw, db) = ex.linear_backward(&xv, &l, pre_gelu.as_ref(), dy)?;
                add_param(ex, params, &l.w.name, dw)?;
                match (&l.bias, db) {
                    (LinearBias::Full(p), Some(db)) => add_param(ex, params, &p.name, db)?,
                    (LinearBias::QV { q, v, .. }, Some(db)) => {
                        let d = E::grad_len(&db) / 3;
                        let dq = ex.grad_range(&db, 0, d)?;
                        let dv = ex.grad_range(&db, 2 * d, 3 * d)?;
                        add_param(ex, params, &q.name, dq)?;
                        add_param(ex, params, &v.name, dv)?;
                    }
                    _ => {}
                }
                accumulate(ex, vg, x, dx)?;
            }
            Record::Attention {
                qkv,
                qkvv,
                saved,
                table,
                dims,
                out,
            } => {
                let Some(dy) = vg[out.0].take() else {
                    return Ok(());
                };
                let tref = table
                    .as_ref()
                    .map(|(p, index)| TableRef { table: p, index });
                let (dqkv, dtable) = ex.attention_backward(&qkvv, saved, tref, dims, dy)?;
                if let (Some((param, _)), Some(dt)) = (&table, dtable) {
                    add_param(ex, params, &param.name, dt)?;
                }
                accumulate(ex, vg, qkv, dqkv)?;
            }
            Record::LayerNorm {
                x,
                xv,
                saved,
                norm,
                eps,
                out,
            } => {
                let Some(dy) = vg[out.0].take() else {
                    return Ok(());
                };
                let (dx, dg, db) = ex.layernorm_backward(&xv, &saved, &norm, eps, dy)?;
                add_param(ex, params, &norm.w.name, dg)?;
                add_param(ex, params, &norm.b.name, db)?;
                accumulate(ex, vg, x, dx)?;
            }
            Record::Assemble {
                patches,
                cls,
                pos,
                b,
                out,
            } => {
                let Some(dy) = vg[out.0].take() else {
                    return Ok(());
                };
                let d = cls.value.numel();
                let (dpatch, dcls, dpos) = ex.assemble_backward(dy, b, d, pos.is_some())?;
                add_param(ex, params, &cls.name, dcls)?;
                if let (Some(p), Some(dp)) = (&pos, dpos) {
                    add_param(ex, params, &p.name, dp)?;
                }
                accumulate(ex, vg, patches, dpatch)?;
            }
            Record::PatchEmbed {
                cols,
                w,
                b,
                dims,
                img,
                out,
            } => {
                let Some(dy) = vg[out.0].take() else {
                    return Ok(());
                };
                let want = self.want_input_grad;
                let (dw, db, dimg) = ex.patch_embed_backward(&cols, &w, dims, dy, want)?;
                add_param(ex, params, &w.name, dw)?;
                add_param(ex, params, &b.name, db)?;
                if let Some(di) = dimg {
                    accumulate(ex, vg, img, di)?;
                }
            }
        }
        Ok(())
    }
}

/// Adds `g` to the gradient flowing into `v`, taking it as is when it is the first.
fn accumulate<E: TrainExec>(
    ex: &mut E,
    vg: &mut [Option<E::Grad>],
    v: Var,
    g: E::Grad,
) -> Result<()> {
    match &mut vg[v.0] {
        Some(a) => ex.add_grad(a, &g),
        slot @ None => {
            *slot = Some(g);
            Ok(())
        }
    }
}

/// Adds `g` to the gradient of parameter `name`, taking ownership of it when it is the first.
fn add_param<E: TrainExec>(
    ex: &mut E,
    map: &mut HashMap<String, E::Grad>,
    name: &str,
    g: E::Grad,
) -> Result<()> {
    match map.get_mut(name) {
        Some(acc) => ex.add_grad(acc, &g),
        None => {
            map.insert(name.to_string(), g);
            Ok(())
        }
    }
}
