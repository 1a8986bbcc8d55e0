//! The fer-cam network: ResNet18+CBAM encoder, supervised head f_φ, CARD noise network; and the
//! model directory format (`config.json` + `model.safetensors`).

pub mod average;
pub mod barlow;
pub mod card;
pub mod cbam;
pub mod conv_bn;
pub mod diffusion;
pub mod embedded;
pub mod export;
pub mod resnet;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, ModuleT, Tensor, D};
use candle_nn::{linear, Linear, VarBuilder, VarMap};
use rand::Rng;
use rand_distr::StandardNormal;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use card::CardNet;
use diffusion::{reverse_chain, Schedule};
use resnet::ResNet;

/// File names inside a model directory.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Encoder + f_φ head + CARD ε_θ, all built from one [`ModelConfig`].
#[derive(Debug, Clone)]
pub struct FerModel {
    pub encoder: ResNet,
    pub head: Linear,
    pub card: CardNet,
    schedule: Schedule,
}

impl FerModel {
    /// Builds (or, with a loaded `VarBuilder`, restores) the model. Weight names are prefixed
    /// `encoder.`, `head.`, `card.`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let encoder = ResNet::new(&cfg.encoder, vb.pp("encoder"))?;
        let feat = encoder.out_dim();
        let classes = cfg.num_classes();
        let head = linear(feat, classes, vb.pp("head"))?;
        let c = &cfg.card;
        let card = CardNet::new(feat, classes, c.hidden, c.timesteps, vb.pp("card"))?;
        Ok(Self {
            encoder,
            head,
            card,
            schedule: Schedule::linear(c.timesteps, c.beta_start, c.beta_end),
        })
    }

    /// The diffusion schedule the CARD head was built for.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Encoder features `(b, F)` of normalised crops `(b, 1, H, W)`.
    pub fn features(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.encoder.forward_t(xs, train)
    }

    /// f_φ logits `(b, C)` from features.
    pub fn head_logits(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.head.forward(features)
    }

    /// Draws `samples` CARD samples of ŷ_0 per image: returns `(b, samples, C)`.
    ///
    /// `f` is f_φ's softmax `(b, C)`; `steps` picks a strided subset of the T training steps.
    /// Image `i`'s noise comes from `rngs[i]` alone, so a seeded result is reproducible on any
    /// device and does not depend on which images share the batch.
    pub fn sample<R: Rng>(
        &self,
        features: &Tensor,
        f: &Tensor,
        samples: usize,
        steps: usize,
        rngs: &mut [R],
    ) -> candle_core::Result<Tensor> {
        let (b, c) = f.dims2()?;
        if rngs.len() != b {
            candle_core::bail!("{} noise generators for {b} images", rngs.len());
        }
        let n = b * samples;
        let dev = f.device();
        let repeat = |xs: &Tensor| -> candle_core::Result<Tensor> {
            let d = xs.dim(1)?;
            xs.unsqueeze(1)?
                .broadcast_as((b, samples, d))?
                .reshape((n, d))
        };
        // Sampling never needs gradients; detaching keeps a model whose weights are training
        // variables from holding every step's activations in the autograd graph.
        let emb = repeat(&self.card.embed_image(&features.detach(), false)?.detach())?;
        let f_rep = repeat(&f.detach())?;
        let noise = || -> candle_core::Result<Tensor> {
            let v: Vec<f32> = rngs
                .iter_mut()
                .flat_map(|r| (0..samples * c).map(|_| r.sample::<f32, _>(StandardNormal)))
                .collect();
            Tensor::from_vec(v, (n, c), dev)
        };
        // Prior y_T ~ N(f_φ(x), I), then the reverse chain with ε_θ.
        let y = reverse_chain(&self.schedule, &f_rep, steps, noise, |y, t| {
            let t_idx = Tensor::full(t as u32, n, dev)?;
            Ok(self
                .card
                .forward_embedded(&emb, y, &f_rep, &t_idx, false)?
                .detach())
        })?;
        y.reshape((b, samples, c))
    }
}

/// Per-sample class probabilities from ŷ_0 samples: `softmax(−(ŷ_0 − 1)²/τ)` over the last dim.
pub fn sample_probs(y0: &Tensor, temperature: f64) -> candle_core::Result<Tensor> {
    let scores = ((y0 - 1.0)?.sqr()?.neg()? / temperature)?;
    candle_nn::ops::softmax(&scores, D::Minus1)
}

/// [`sample_probs`] on plain rows: `y0` holds rows of `classes` values; returns the per-row
/// probabilities, same layout.
pub fn sample_probs_rows(y0: &[f32], classes: usize, temperature: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(y0.len());
    for row in y0.chunks_exact(classes.max(1)) {
        let scores: Vec<f64> = row
            .iter()
            .map(|&y| -((y as f64 - 1.0).powi(2)) / temperature)
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = scores.iter().map(|v| (v - max).exp()).sum();
        out.extend(scores.iter().map(|v| ((v - max).exp() / z) as f32));
    }
    out
}

/// Largest `config.json` read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A model directory loaded into memory: its config and the weights as a `VarBuilder`.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub model: FerModel,
    pub dir: PathBuf,
    /// Hex sha256 of the weights file's bytes: which model produced an output.
    pub weights_sha256: String,
}

fn first_line(e: impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or("").to_string()
}

/// Reads and validates `DIR/config.json`.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    let bytes = crate::fsutil::read_regular(&path, MAX_CONFIG_BYTES)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::model(&path, "not a valid model config: not UTF-8 text"))?;
    let cfg: ModelConfig = serde_json::from_str(&text)
        .map_err(|e| Error::model(&path, format!("not a valid model config: {e}")))?;
    cfg.validate()
        .map_err(|e| Error::model(&path, first_line(e)))?;
    Ok(cfg)
}

/// Loads a model directory onto `device`. Any problem — missing file, bad JSON, truncated or
/// corrupt safetensors, a tensor missing or of the wrong shape, an unexpected tensor — is an
/// [`Error::Model`] naming the file.
pub fn load_model_dir(dir: &Path, device: &Device) -> Result<LoadedModel> {
    let config = read_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    // The config is valid, so it bounds the weights' size (f32, plus the header's slack).
    let cap = (config.parameter_bound() * 4.0) as u64 + (16 << 20);
    let bytes = crate::fsutil::read_regular(&path, cap)?;
    let model = build_model(&config, &bytes, &path, device)?;
    Ok(LoadedModel {
        config,
        model,
        dir: dir.to_path_buf(),
        weights_sha256: crate::data::ferplus::sha256_hex(&bytes),
    })
}

/// Loads a model from the text of its `config.json` and the bytes of its `model.safetensors`
/// (the embedded default model); `origin` names it in errors.
pub fn load_model_bytes(
    config_json: &str,
    weights: &[u8],
    origin: &Path,
    device: &Device,
) -> Result<LoadedModel> {
    let config: ModelConfig = serde_json::from_str(config_json)
        .map_err(|e| Error::model(origin, format!("not a valid model config: {e}")))?;
    config
        .validate()
        .map_err(|e| Error::model(origin, first_line(e)))?;
    let model = build_model(&config, weights, origin, device)?;
    Ok(LoadedModel {
        config,
        model,
        dir: origin.to_path_buf(),
        weights_sha256: crate::data::ferplus::sha256_hex(weights),
    })
}

/// Builds the network from safetensors bytes. Tensors stored as f16 (see [`StoredWeights`]) are
/// widened to f32; any other dtype is refused.
fn build_model(
    config: &ModelConfig,
    bytes: &[u8],
    path: &Path,
    device: &Device,
) -> Result<FerModel> {
    let mut tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| {
        Error::model(
            path,
            format!("not a valid safetensors file: {}", first_line(e)),
        )
    })?;
    for (name, t) in tensors.iter_mut() {
        match t.dtype() {
            DType::F32 => {}
            DType::F16 => *t = t.to_dtype(DType::F32)?,
            other => {
                return Err(Error::model(
                    path,
                    format!("tensor {name} has dtype {other:?}, expected F32 or F16"),
                ))
            }
        }
        // A NaN or infinity spreads through every prediction (or panics the t-test); a
        // negative variance makes batch norm's square root NaN.
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::model(
                path,
                format!("tensor {name} holds {} at index {i}", values[i]),
            ));
        }
        if name.ends_with("running_var") && values.iter().any(|&v| v < 0.0) {
            return Err(Error::model(
                path,
                format!("tensor {name} holds a negative variance"),
            ));
        }
    }
    let expected = expected_tensor_names(config)?;
    if let Some(extra) = tensors.keys().find(|k| !expected.contains_key(*k)) {
        return Err(Error::model(
            path,
            format!("unexpected tensor {extra} (weights do not match {CONFIG_FILE})"),
        ));
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    FerModel::new(config, vb).map_err(|e| {
        Error::model(
            path,
            format!("weights do not match {CONFIG_FILE}: {}", first_line(e)),
        )
    })
}

/// Names and shapes of every tensor a model with this config has.
pub fn expected_tensor_names(cfg: &ModelConfig) -> Result<HashMap<String, Vec<usize>>> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    FerModel::new(cfg, vb)?;
    let data = vm
        .data()
        .lock()
        .map_err(|_| Error::Msg("poisoned var map".into()))?;
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect())
}

/// A freshly initialised model (random weights) and its variables.
pub fn init_model(cfg: &ModelConfig, device: &Device, seed: u64) -> Result<(VarMap, FerModel)> {
    cfg.validate()?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, device);
    let model = FerModel::new(cfg, vb)?;
    seeded_init(&vm, seed)?;
    Ok((vm, model))
}

/// Re-draws every randomly initialised variable from a generator seeded with `seed`, with the
/// distributions candle's initialisers use, so that a seed fixes the initial weights (candle's
/// own initialisers draw from an unseeded thread RNG). Constant-initialised variables (batch-norm
/// scales and statistics) are left as they are.
///
/// - `*.gain.embeddings` (CARD's per-timestep gains): U(0, 1)
/// - weights of rank ≥ 2: Kaiming normal, N(0, 2/fan_in), fan_in = product of the trailing dims
/// - biases with a sibling `weight`: U(±1/√fan_in)
pub fn seeded_init(vm: &VarMap, seed: u64) -> Result<()> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal, Uniform};
    let data = vm
        .data()
        .lock()
        .map_err(|_| Error::Msg("poisoned var map".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let is_const = name.ends_with("running_mean")
            || name.ends_with("running_var")
            || (name.contains("bn") && (name.ends_with(".weight") || name.ends_with(".bias")));
        if is_const {
            continue;
        }
        let values: Vec<f32> = if name.ends_with("gain.embeddings") {
            (0..n).map(|_| rng.random::<f32>()).collect()
        } else if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let normal = Normal::new(0.0f32, (2.0 / fan_in.max(1) as f32).sqrt())
                .map_err(|e| Error::Msg(e.to_string()))?;
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        } else if let Some(w) = name
            .strip_suffix("bias")
            .and_then(|p| data.get(&format!("{p}weight")))
        {
            let fan_in: usize = w.dims()[1..].iter().product();
            let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
            let uni =
                Uniform::new_inclusive(-bound, bound).map_err(|e| Error::Msg(e.to_string()))?;
            (0..n).map(|_| uni.sample(&mut rng)).collect()
        } else {
            continue;
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}

/// Writes `config.json` and `model.safetensors` into `dir` so that a reader never sees a half
/// written directory (see [`crate::fsutil::write_dir_atomically`]).
pub fn save_model_dir(dir: &Path, cfg: &ModelConfig, vars: &VarMap) -> Result<()> {
    cfg.validate()?;
    crate::fsutil::write_dir_atomically(dir, |tmp| write_model_files(tmp, cfg, vars))
}

/// Writes a new model directory `out` (atomically, [`crate::fsutil::create_dir_atomically`]:
/// never over an existing path, also one made meanwhile by another writer) from a config and
/// named tensors (of any dtype the loader widens); returns the weights file's size.
pub fn write_model_tensors(
    out: &Path,
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<u64> {
    let json = config_json(cfg)?;
    crate::fsutil::create_dir_atomically(out, |tmp| {
        let cfg_path = tmp.join(CONFIG_FILE);
        std::fs::write(&cfg_path, json + "\n").map_err(|e| Error::io(&cfg_path, e))?;
        let w = tmp.join(WEIGHTS_FILE);
        candle_core::safetensors::save(tensors, &w).map_err(|e| Error::model(&w, e.to_string()))
    })?;
    let w = out.join(WEIGHTS_FILE);
    Ok(std::fs::metadata(&w).map_err(|e| Error::io(&w, e))?.len())
}

/// A model's `config.json` text, its `arch` naming what the encoder holds (with or without CBAM,
/// [`crate::config::arch_name`]) whatever the config it was built from said.
fn config_json(cfg: &ModelConfig) -> Result<String> {
    let cfg = ModelConfig {
        arch: crate::config::arch_name(cfg.encoder.cbam).to_string(),
        ..cfg.clone()
    };
    serde_json::to_string_pretty(&cfg).map_err(|e| Error::Msg(e.to_string()))
}

/// Writes the two files of a model directory into `dir` (not atomically on its own).
pub fn write_model_files(dir: &Path, cfg: &ModelConfig, vars: &VarMap) -> Result<()> {
    let json = config_json(cfg)?;
    let cfg_path = dir.join(CONFIG_FILE);
    std::fs::write(&cfg_path, json + "\n").map_err(|e| Error::io(&cfg_path, e))?;
    let w_path = dir.join(WEIGHTS_FILE);
    vars.save(&w_path)
        .map_err(|e| Error::model(&w_path, first_line(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Stem;
    use rand::SeedableRng;

    fn small_cfg(stem: Stem, cbam: bool) -> ModelConfig {
        let mut cfg = ModelConfig::default();
        cfg.encoder.stem = stem;
        cfg.encoder.cbam = cbam;
        cfg.encoder.widths = [8, 16, 16, 32];
        cfg.encoder.blocks = [1, 1, 1, 1];
        cfg.encoder.cbam_reduction = 4;
        cfg.card.hidden = 16;
        cfg
    }

    #[test]
    fn shapes_for_batch_and_samples() -> Result<()> {
        for (stem, cbam) in [(Stem::Conv3x3, true), (Stem::Conv7x7Pool, false)] {
            let cfg = small_cfg(stem, cbam);
            let (_vm, m) = init_model(&cfg, &Device::Cpu, 1)?;
            let xs = Tensor::randn(0f32, 1., (3, 1, 48, 48), &Device::Cpu)?;
            let feats = m.features(&xs, false)?;
            assert_eq!(feats.dims(), &[3, 32]);
            let f = candle_nn::ops::softmax(&m.head_logits(&feats)?, D::Minus1)?;
            assert_eq!(f.dims(), &[3, 7]);
            let mut rngs = vec![rand::rngs::StdRng::seed_from_u64(0); 3];
            let ys = m.sample(&feats, &f, 5, 4, &mut rngs)?;
            assert_eq!(ys.dims(), &[3, 5, 7]);
            // The weights are training variables here; samples must not keep their graph.
            assert!(!ys.track_op());
            let p = sample_probs(&ys, 1.0)?;
            let sums = p.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
            // Train mode works too (batch statistics), with CBAM on odd spatial sizes.
            let xs = Tensor::randn(0f32, 1., (2, 1, 45, 45), &Device::Cpu)?;
            assert_eq!(m.features(&xs, true)?.dims(), &[2, 32]);
        }
        Ok(())
    }

    /// A saved model's `arch` names its encoder, whatever the config it was built from said.
    #[test]
    fn saved_arch_follows_the_encoder() -> Result<()> {
        let tmp = tempfile::tempdir().unwrap();
        for cbam in [true, false] {
            let mut cfg = small_cfg(Stem::Conv3x3, cbam);
            cfg.arch = crate::config::ARCH.into();
            let (vm, _) = init_model(&cfg, &Device::Cpu, 1)?;
            let dir = tmp.path().join(format!("cbam-{cbam}"));
            save_model_dir(&dir, &cfg, &vm)?;
            let loaded = load_model_dir(&dir, &Device::Cpu)?;
            assert_eq!(loaded.config.arch, crate::config::arch_name(cbam));
        }
        Ok(())
    }

    #[test]
    fn sample_probs_known_values() -> Result<()> {
        // ŷ0 = [1, 0, 2]: scores −(ŷ0−1)² = [0, −1, −1]; the class at 1 wins.
        let y0 = Tensor::new(&[[[1f32, 0.0, 2.0]]], &Device::Cpu)?;
        let p = sample_probs(&y0, 1.0)?.flatten_all()?.to_vec1::<f32>()?;
        let e = (-1f32).exp();
        let want = [
            1.0 / (1.0 + 2.0 * e),
            e / (1.0 + 2.0 * e),
            e / (1.0 + 2.0 * e),
        ];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{p:?}");
        }
        // A lower temperature sharpens: scores [0, −2, −2].
        let p = sample_probs(&y0, 0.5)?.flatten_all()?.to_vec1::<f32>()?;
        let e2 = (-2f32).exp();
        assert!((p[0] - 1.0 / (1.0 + 2.0 * e2)).abs() < 1e-6, "{p:?}");
        // The plain-slice twin agrees with the tensor version, row by row.
        let rows = [1f32, 0.0, 2.0, -0.3, 0.9, 0.2];
        let t = Tensor::from_slice(&rows, (1, 2, 3), &Device::Cpu)?;
        let want = sample_probs(&t, 0.7)?.flatten_all()?.to_vec1::<f32>()?;
        let got = sample_probs_rows(&rows, 3, 0.7);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        Ok(())
    }

    #[test]
    fn seeded_sampling_is_repeatable() -> Result<()> {
        let cfg = small_cfg(Stem::Conv7x7Pool, true);
        let (_vm, m) = init_model(&cfg, &Device::Cpu, 1)?;
        let feats = Tensor::randn(0f32, 1., (2, 32), &Device::Cpu)?;
        let f = candle_nn::ops::softmax(&m.head_logits(&feats)?, D::Minus1)?;
        let draw = |seed: u64, feats: &Tensor, f: &Tensor| -> Result<Vec<f32>> {
            let mut rngs: Vec<_> = (0..f.dim(0)?)
                .map(|i| crate::rngs::keyed_rng(&[seed, i as u64]))
                .collect();
            Ok(m.sample(feats, f, 3, 10, &mut rngs)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let both = draw(7, &feats, &f)?;
        assert_eq!(both, draw(7, &feats, &f)?);
        assert_ne!(both, draw(8, &feats, &f)?);
        // Image 0 alone gets the same samples as in the batch (its own generator).
        let alone = draw(7, &feats.narrow(0, 0, 1)?, &f.narrow(0, 0, 1)?)?;
        assert_eq!(alone[..], both[..alone.len()]);
        assert!(m
            .sample(&feats, &f, 3, 10, &mut [crate::rngs::keyed_rng(&[0])])
            .is_err());
        Ok(())
    }
}
