//! The default model, compiled into the binary so that an installed `fer-cam` (which has no
//! `models/` folder beside it) recognises emotions with no `--model`: `models/fer2013/`, described
//! with its licence terms in `models/fer2013/MODEL_CARD.md`. `build.rs` embeds it when the
//! checkout has it.

use std::path::Path;

use candle_core::Device;

use super::{load_model_bytes, LoadedModel};
use crate::error::{Error, Result};

/// How the embedded model is named in reports and errors.
pub const NAME: &str = "embedded:models/fer2013";

/// The text of `models/fer2013/config.json` and the bytes of its `model.safetensors`, or `None`
/// in a build from a checkout without them.
pub fn files() -> Option<(&'static str, &'static [u8])> {
    #[cfg(fer_cam_builtin_model)]
    return Some((
        include_str!("../../models/fer2013/config.json"),
        include_bytes!("../../models/fer2013/model.safetensors"),
    ));
    #[cfg(not(fer_cam_builtin_model))]
    None
}

/// Loads the embedded model onto `device`.
pub fn load(device: &Device) -> Result<LoadedModel> {
    let (config, weights) = files().ok_or_else(|| {
        Error::Config(
            "this fer-cam was built without models/fer2013 (no built-in model): pass --model DIR"
                .into(),
        )
    })?;
    load_model_bytes(config, weights, Path::new(NAME), device)
}
