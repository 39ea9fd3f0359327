//! Named parameters and the layer structs the model is built from. Each parameter keeps the
//! checkpoint's own name, so gradients (training) and errors speak the checkpoint's language.

use std::sync::Arc;

use crate::error::Result;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub value: Tensor,
}

impl Param {
    pub fn load(store: &WeightStore, name: &str, shape: &[usize]) -> Result<Param> {
        Ok(Param {
            name: name.to_string(),
            value: store.get(name, shape)?,
        })
    }
}

#[derive(Clone)]
pub struct Norm {
    pub w: Param,
    pub b: Param,
}

impl Norm {
    pub fn load(store: &WeightStore, prefix: &str, d: usize) -> Result<Norm> {
        Ok(Norm {
            w: Param::load(store, &format!("{prefix}.weight"), &[d])?,
            b: Param::load(store, &format!("{prefix}.bias"), &[d])?,
        })
    }

    /// Weight 1, bias 0 under `prefix` (a norm the checkpoint does not have yet).
    pub fn identity(prefix: &str, d: usize) -> Norm {
        Norm {
            w: Param {
                name: format!("{prefix}.weight"),
                value: Tensor::from_vec(&[d], vec![1.0; d]).expect("shape matches"),
            },
            b: Param {
                name: format!("{prefix}.bias"),
                value: Tensor::zeros(&[d]),
            },
        }
    }
}

/// The bias of a linear layer.
#[derive(Clone)]
pub enum LinearBias {
    None,
    Full(Param),
    /// BEiT's qkv: `q_bias` and `v_bias`, with the k part zero; `joined` = [q; 0; v].
    QV {
        q: Param,
        v: Param,
        joined: Tensor,
    },
}

impl LinearBias {
    pub fn tensor(&self) -> Option<&Tensor> {
        match self {
            LinearBias::None => None,
            LinearBias::Full(p) => Some(&p.value),
            LinearBias::QV { joined, .. } => Some(joined),
        }
    }
}

#[derive(Clone)]
pub struct Linear {
    /// [N, K] (nn.Linear layout)
    pub w: Param,
    pub bias: LinearBias,
}

impl Linear {
    pub fn load(store: &WeightStore, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        Ok(Linear {
            w: Param::load(store, &format!("{prefix}.weight"), &[out, inp])?,
            bias: LinearBias::Full(Param::load(store, &format!("{prefix}.bias"), &[out])?),
        })
    }
}

/// A relative-position bias table and its dense expansion [H, N, N] (built once at load).
pub struct RelBias {
    pub table: Param,
    pub dense: Tensor,
    /// The (N)×(N) index used to expand the table; its adjoint routes gradients back.
    pub index: Vec<usize>,
}

pub type SharedRelBias = Arc<RelBias>;
