//! Weight averaging (a "model soup", Wortsman et al., ICML 2022): the element-wise mean of the
//! weights of models with one architecture that were fine-tuned one from another, so that they
//! lie in one basin of the loss and their mean is a model too (often a better one than each).
//! Models trained apart (different initialisations) do not average into anything useful; the
//! caller chooses the ingredients and checks the result on held-out data.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{expected_tensor_names, load_model_dir, read_config, CONFIG_FILE, WEIGHTS_FILE};
use crate::error::{Error, Result};

/// What [`average_models`] wrote.
#[derive(Debug, Clone)]
pub struct AverageSummary {
    pub models: usize,
    pub tensors: usize,
    pub bytes: u64,
}

/// Writes to the new directory `out` the model whose every tensor is the mean of that tensor over
/// the model directories `srcs` (at least two), in f32, with the first model's config.
///
/// Every model is loaded and checked first; they must have the same architecture (encoder,
/// classes, input size and CARD head: the same tensor names and shapes). `out` must not exist.
pub fn average_models(srcs: &[&Path], out: &Path) -> Result<AverageSummary> {
    if srcs.len() < 2 {
        return Err(Error::Config(format!(
            "averaging needs at least two models (got {})",
            srcs.len()
        )));
    }
    if out.symlink_metadata().is_ok() {
        return Err(Error::file(
            out,
            "already exists; average writes a new directory only",
        ));
    }
    let cfg = read_config(srcs[0])?;
    let shapes = expected_tensor_names(&cfg)?;
    let mut sum: HashMap<String, Tensor> = HashMap::new();
    for src in srcs {
        // Loading checks the file's tensors against the model's own config: with the same
        // names and shapes as the first's, every model holds the same tensors.
        let loaded = load_model_dir(src, &Device::Cpu)?;
        let c = &loaded.config;
        // (The architecture itself is the encoder config, which the tensor names and shapes
        // below follow; `arch` may be an older name for the same network.)
        let same = c.encoder.cbam == cfg.encoder.cbam
            && c.classes == cfg.classes
            && c.input.size == cfg.input.size
            && c.input.norm == cfg.input.norm
            && expected_tensor_names(c)? == shapes;
        if !same {
            return Err(Error::model(
                src.join(CONFIG_FILE),
                format!(
                    "its architecture differs from {}'s; only models of one architecture average",
                    srcs[0].display()
                ),
            ));
        }
        let path = src.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| Error::model(&path, e.to_string()))?;
        for (name, t) in tensors {
            let t = t.to_dtype(DType::F32)?;
            let acc = match sum.remove(&name) {
                Some(a) => (a + t)?,
                None => t,
            };
            sum.insert(name, acc);
        }
    }
    let n = srcs.len() as f64;
    let mean = sum
        .into_iter()
        .map(|(name, t)| Ok((name, (t / n)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let tensors = mean.len();
    let bytes = super::write_model_tensors(out, &cfg, &mean)?;
    Ok(AverageSummary {
        models: srcs.len(),
        tensors,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::{init_model, save_model_dir};

    fn small_cfg(width: usize) -> ModelConfig {
        let mut cfg = ModelConfig::default();
        cfg.encoder.widths = [8, 16, 16, width];
        cfg.encoder.blocks = [1, 1, 1, 1];
        cfg.encoder.cbam_reduction = 4;
        cfg.card.hidden = 16;
        cfg
    }

    fn weights(dir: &Path) -> HashMap<String, Tensor> {
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap()
    }

    /// Every tensor of the average is the mean of the models' (three models, so a sum without
    /// the division, or the first model copied, fails); the result loads as a model; an existing
    /// output, a single model and a model of another architecture are refused.
    #[test]
    fn averages_every_tensor_and_refuses_mismatches() -> Result<()> {
        let root = tempfile::tempdir().unwrap();
        let cfg = small_cfg(32);
        let dirs: Vec<_> = (0..3u64)
            .map(|seed| {
                let dir = root.path().join(format!("m{seed}"));
                let (vm, _) = init_model(&cfg, &Device::Cpu, seed + 1)?;
                save_model_dir(&dir, &cfg, &vm)?;
                Ok(dir)
            })
            .collect::<Result<_>>()?;
        let srcs: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
        let out = root.path().join("soup");
        let s = average_models(&srcs, &out)?;
        assert_eq!(s.models, 3);
        let got = weights(&out);
        let ins: Vec<_> = dirs.iter().map(|d| weights(d)).collect();
        assert_eq!(got.len(), ins[0].len());
        let mut differ = 0;
        for (name, t) in &got {
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let parts: Vec<Vec<f32>> = ins.iter().map(|m| v(&m[name])).collect();
            for (j, g) in v(t).iter().enumerate() {
                let want = (parts[0][j] + parts[1][j] + parts[2][j]) / 3.0;
                assert!(
                    (g - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{name}[{j}]"
                );
                differ += usize::from(parts[0][j] != parts[1][j]);
            }
        }
        assert!(differ > 1000, "the seeds gave different weights");
        load_model_dir(&out, &Device::Cpu)?;
        // Never into an existing path; never from one model; never across architectures.
        assert!(average_models(&srcs, &out).is_err());
        assert!(average_models(&srcs[..1], &root.path().join("one")).is_err());
        let other = root.path().join("wide");
        let (vm, _) = init_model(&small_cfg(64), &Device::Cpu, 9)?;
        save_model_dir(&other, &small_cfg(64), &vm)?;
        let err = average_models(&[srcs[0], &other], &root.path().join("mixed")).unwrap_err();
        assert!(err.to_string().contains("architecture"), "{err}");
        assert!(!root.path().join("mixed").exists());
        Ok(())
    }
}
