//! The CARD noise network ε_θ(x, y_t, f_φ(x), t) for classification (Han et al. 2022, Appendix
//! B.2, the "ConditionalModel" of the classification experiments), written for our encoder.
//!
//! The image branch takes the frozen encoder's feature vector (as in CARD's ImageNet setting), so
//! one encoder pass serves f_φ and every diffusion sample. The label branch takes `[y_t, f_φ(x)]`
//! through time-conditioned linear layers (each output scaled by a learned per-timestep vector),
//! batch-norm and softplus; the image embedding multiplies in after the first layer.
//!
//! Shapes: `features (n, F)`, `y_t (n, C)`, `f (n, C)`, `t` u32 `(n,)` → `ε̂ (n, C)`.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{batch_norm, linear, BatchNorm, Embedding, Init, Linear, VarBuilder};

use super::diffusion::Schedule;
use crate::kernels::sampler::{FoldedLayer, FusedCard};

/// `softplus(x) = max(x, 0) + ln(1 + e^{−|x|})`, stable for large |x|.
pub fn softplus(xs: &Tensor) -> Result<Tensor> {
    xs.relu()? + (xs.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// A linear layer whose output is scaled element-wise by a learned vector per timestep.
#[derive(Debug, Clone)]
pub struct ConditionalLinear {
    lin: Linear,
    gain: Embedding,
}

impl ConditionalLinear {
    pub fn new(d_in: usize, d_out: usize, timesteps: usize, vb: VarBuilder) -> Result<Self> {
        let gain = vb.get_with_hints(
            (timesteps, d_out),
            "gain.embeddings",
            Init::Uniform { lo: 0.0, up: 1.0 },
        )?;
        Ok(Self {
            lin: linear(d_in, d_out, vb.pp("lin"))?,
            gain: Embedding::new(gain, d_out),
        })
    }

    pub fn forward(&self, xs: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.lin.forward(xs)? * self.gain.forward(t)?
    }
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// A linear layer's row-major weight `(d_out, d_in)` and bias (zeros when it has none).
fn linear_parts(lin: &Linear) -> Result<(Vec<f32>, Vec<f32>)> {
    let (d_out, _) = lin.weight().dims2()?;
    let bias = match lin.bias() {
        Some(b) => values(b)?,
        None => vec![0.0; d_out],
    };
    Ok((values(lin.weight())?, bias))
}

/// Folds a linear layer, its per-timestep gains (none: one step of gain 1) and the batch norm
/// that follows it into a [`FoldedLayer`].
fn fold(lin: &Linear, gain: Option<&Embedding>, bn: &BatchNorm) -> Result<FoldedLayer> {
    let (weight, bias) = linear_parts(lin)?;
    let d_out = bias.len();
    let gains = match gain {
        Some(g) => values(g.embeddings())?,
        None => vec![1.0; d_out],
    };
    let (gamma, beta) = match bn.weight_and_bias() {
        Some((w, b)) => (values(w)?, values(b)?),
        None => (vec![1.0; d_out], vec![0.0; d_out]),
    };
    Ok(FoldedLayer::fold(
        weight,
        &bias,
        &gains,
        &gamma,
        &beta,
        &values(bn.running_mean())?,
        &values(bn.running_var())?,
        bn.eps(),
    ))
}

/// ε_θ for CARD classification.
#[derive(Debug, Clone)]
pub struct CardNet {
    image_proj: Linear,
    image_bn: BatchNorm,
    lin1: ConditionalLinear,
    bn1: BatchNorm,
    lin2: ConditionalLinear,
    bn2: BatchNorm,
    lin3: ConditionalLinear,
    bn3: BatchNorm,
    out: Linear,
}

impl CardNet {
    /// `feat_dim` encoder features, `classes` C, `hidden` width, `timesteps` T.
    pub fn new(
        feat_dim: usize,
        classes: usize,
        hidden: usize,
        timesteps: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            image_proj: linear(feat_dim, hidden, vb.pp("image_proj"))?,
            image_bn: batch_norm(hidden, 1e-5, vb.pp("image_bn"))?,
            lin1: ConditionalLinear::new(2 * classes, hidden, timesteps, vb.pp("lin1"))?,
            bn1: batch_norm(hidden, 1e-5, vb.pp("bn1"))?,
            lin2: ConditionalLinear::new(hidden, hidden, timesteps, vb.pp("lin2"))?,
            bn2: batch_norm(hidden, 1e-5, vb.pp("bn2"))?,
            lin3: ConditionalLinear::new(hidden, hidden, timesteps, vb.pp("lin3"))?,
            bn3: batch_norm(hidden, 1e-5, vb.pp("bn3"))?,
            out: linear(hidden, classes, vb.pp("out"))?,
        })
    }

    /// The image embedding `(n, hidden)`; computed once per image and reused by every sample.
    pub fn embed_image(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        self.image_bn
            .forward_t(&self.image_proj.forward(features)?, train)
    }

    /// ε̂ from a precomputed image embedding (see [`CardNet::embed_image`]).
    pub fn forward_embedded(
        &self,
        image_emb: &Tensor,
        y_t: &Tensor,
        f: &Tensor,
        t: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let ys = Tensor::cat(&[y_t, f], 1)?;
        let ys = softplus(&self.bn1.forward_t(&self.lin1.forward(&ys, t)?, train)?)?;
        let ys = (image_emb * ys)?;
        let ys = softplus(&self.bn2.forward_t(&self.lin2.forward(&ys, t)?, train)?)?;
        let ys = softplus(&self.bn3.forward_t(&self.lin3.forward(&ys, t)?, train)?)?;
        self.out.forward(&ys)
    }

    /// The weights of ε_θ folded for the fused CPU sampler ([`FusedCard`]), inference mode.
    pub fn fused(&self, schedule: &Schedule) -> Result<FusedCard> {
        let (out_weight, out_bias) = linear_parts(&self.out)?;
        Ok(FusedCard::new(
            fold(&self.image_proj, None, &self.image_bn)?,
            fold(&self.lin1.lin, Some(&self.lin1.gain), &self.bn1)?,
            fold(&self.lin2.lin, Some(&self.lin2.gain), &self.bn2)?,
            fold(&self.lin3.lin, Some(&self.lin3.gain), &self.bn3)?,
            &out_weight,
            out_bias,
            schedule.clone(),
        ))
    }

    /// ε̂ from encoder features.
    pub fn forward(
        &self,
        features: &Tensor,
        y_t: &Tensor,
        f: &Tensor,
        t: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let emb = self.embed_image(features, train)?;
        self.forward_embedded(&emb, y_t, f, t, train)
    }
}
