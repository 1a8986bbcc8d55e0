//! `fer-cam init`: an untrained model directory.

use anyhow::{bail, Result};
use candle_core::Device;

use crate::cli::InitArgs;
use fer_cam::config::{ModelConfig, Stem};
use fer_cam::model::{init_model, read_config, save_model_dir};

pub fn init(a: InitArgs) -> Result<()> {
    if a.out.symlink_metadata().is_ok() {
        if !a.force {
            bail!(
                "{} already exists (pass --force to replace it)",
                a.out.display()
            );
        }
        // --force replaces a model directory, never a directory that merely has its place.
        if let Err(e) = read_config(&a.out) {
            bail!(
                "--force replaces only a model directory, and {} is not one ({e}); it is left alone",
                a.out.display()
            );
        }
    }
    let mut cfg = ModelConfig::default();
    cfg.encoder.stem = a.stem.parse::<Stem>()?;
    cfg.encoder.cbam = !a.no_cbam;
    if let Some(classes) = a.classes {
        cfg.classes = classes;
    }
    if let Some(t) = a.timesteps {
        cfg.card.timesteps = t;
        cfg.card.steps = cfg.card.steps.min(t);
    }
    cfg.validate()?;
    let (vars, _) = init_model(&cfg, &Device::Cpu, a.seed)?;
    save_model_dir(&a.out, &cfg, &vars)?;
    fer_cam::log!("wrote untrained model to {}", a.out.display());
    Ok(())
}
