//! Writing a model directory for shipping: the weights of convolutions and linear layers stored
//! as IEEE half (half the size; every value is widened back to f32 when loaded), and the
//! sampler's calibrated temperatures in its config.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{read_config, WEIGHTS_FILE};
use crate::config::{Calibration, Temperatures, Tta};
use crate::error::{Error, Result};

/// Largest finite half-precision value.
const F16_MAX: f32 = 65504.0;

/// How `export` stores the weights (`"f32"` or `"f16"` in a recipe's `ship` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredWeights {
    F32,
    /// Tensors of rank ≥ 2 (convolution and linear weights, nearly all the bytes) as f16 when
    /// every value is finite and within half's range; vectors (biases, batch-norm statistics,
    /// timestep gains) stay f32, since a running variance may lie below half's normal range.
    #[default]
    F16,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    pub tensors: usize,
    pub tensors_f16: usize,
    pub bytes: u64,
    pub temperatures: Temperatures,
    pub tta: Tta,
}

/// Copies the model in `src` to the new directory `out` (an existing `out` is refused), with
/// the weights stored as `weights` and, when calibrations are given, the sampler temperatures
/// replaced: the first calibration's become the default ones and its test-time views the
/// model's default views; the others are kept under their views (`card.calibrated`), one per
/// set of views.
pub fn export_model(
    src: &Path,
    out: &Path,
    weights: StoredWeights,
    calibrations: &[Calibration],
) -> Result<ExportSummary> {
    if out.exists() {
        return Err(Error::file(
            out,
            "already exists; export writes a new directory only",
        ));
    }
    let mut cfg = read_config(src)?;
    if let Some((first, others)) = calibrations.split_first() {
        cfg.card.calibrated.clear();
        for (i, c) in calibrations.iter().enumerate() {
            let t = c.temperatures;
            if !t.is_valid() {
                return Err(Error::Config(format!(
                    "temperatures τ {} and T {} (allowed {:?} and {:?})",
                    t.sample,
                    t.output,
                    crate::config::TAU_RANGE,
                    crate::config::OUTPUT_RANGE
                )));
            }
            if calibrations[..i].iter().any(|e| e.tta == c.tta) {
                return Err(Error::Config(format!(
                    "two calibrations under test-time views {}",
                    c.tta.name()
                )));
            }
        }
        cfg.card.set_temperatures(first.temperatures);
        cfg.input.tta = first.tta;
        cfg.card
            .calibrated
            .extend(others.iter().map(|c| (c.tta, c.temperatures)));
    }
    // Loading checks every tensor against the config before anything is written.
    super::load_model_dir(src, &Device::Cpu)?;
    let path = src.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::model(&path, e.to_string()))?;
    let mut stored: HashMap<String, Tensor> = HashMap::new();
    let mut tensors_f16 = 0;
    for (name, t) in tensors {
        let t = t.to_dtype(DType::F32)?;
        let half = weights == StoredWeights::F16 && t.rank() >= 2 && fits_f16(&t)?;
        if half {
            tensors_f16 += 1;
        }
        stored.insert(name, if half { t.to_dtype(DType::F16)? } else { t });
    }
    let tensors = stored.len();
    let bytes = super::write_model_tensors(out, &cfg, &stored)?;
    Ok(ExportSummary {
        tensors,
        tensors_f16,
        bytes,
        temperatures: cfg.card.temperatures(),
        tta: cfg.input.tta,
    })
}

fn fits_f16(t: &Tensor) -> Result<bool> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().all(|x| x.is_finite() && x.abs() <= F16_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, Stem};
    use crate::model::{init_model, load_model_dir, save_model_dir};

    #[test]
    fn f16_export_loads_and_stays_within_half_rounding() {
        let mut cfg = ModelConfig::default();
        cfg.encoder.stem = Stem::Conv3x3S2;
        cfg.encoder.widths = [8, 8, 16, 16];
        cfg.encoder.blocks = [1, 1, 1, 1];
        cfg.encoder.cbam_reduction = 4;
        cfg.card.hidden = 16;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let (vars, _) = init_model(&cfg, &Device::Cpu, 3).unwrap();
        save_model_dir(&src, &cfg, &vars).unwrap();
        let out = dir.path().join("out");
        let t = Temperatures {
            sample: 1.7,
            output: 0.8,
        };
        let calibration = Calibration {
            temperatures: t,
            tta: Tta::Flip,
        };
        let ten = Calibration {
            temperatures: Temperatures {
                sample: 0.5,
                output: 1.5,
            },
            tta: Tta::TenCrop,
        };
        let s = export_model(&src, &out, StoredWeights::F16, &[calibration, ten]).unwrap();
        assert!(s.tensors_f16 > 0 && s.tensors_f16 < s.tensors);
        let a = load_model_dir(&src, &Device::Cpu).unwrap();
        let b = load_model_dir(&out, &Device::Cpu).unwrap();
        assert_eq!(b.config.card.temperatures(), t);
        assert_eq!(s.temperatures, t);
        assert_eq!((s.tta, b.config.input.tta), (Tta::Flip, Tta::Flip));
        // Every calibration is kept under its views; others fall back to the default.
        let c = &b.config;
        assert_eq!(c.temperatures_for(Tta::TenCrop), ten.temperatures);
        assert_eq!(c.temperatures_for(Tta::Flip), t);
        assert_eq!(c.temperatures_for(Tta::None), t);
        // The default views' temperatures are stored once, as the default ones.
        assert!(!c.card.calibrated.contains_key(&Tta::Flip));
        let mut twice = c.clone();
        twice.card.calibrated.insert(Tta::Flip, t);
        assert!(twice.validate().is_err());
        // Two calibrations under the same views: refused.
        let twice = dir.path().join("twice");
        assert!(export_model(&src, &twice, StoredWeights::F16, &[ten, ten]).is_err());
        assert!(!twice.exists());
        let xs = Tensor::randn(0f32, 1.0, (2, 1, 48, 48), &Device::Cpu).unwrap();
        let fa = a.model.features(&xs, false).unwrap();
        let fb = b.model.features(&xs, false).unwrap();
        let scale = fa
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (fa - fb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff > 0.0 && diff < 5e-3 * scale,
            "diff {diff}, scale {scale}"
        );
        // The output directory is never replaced.
        assert!(export_model(&src, &out, StoredWeights::F32, &[]).is_err());
    }
}
