//! The built-in models, compiled into the binary so that an installed `fer-cam` (which has no
//! `models/` folder beside it) recognises emotions with no `--model`:
//! - `fer2013`: the paper's reproduction on FER2013's labels (`models/fer2013/`, the default);
//! - `ferplus`: the same method on the FER+ crowd's votes, eight classes (`models/ferplus/`).
//!
//! Each is described with its licence terms in its `MODEL_CARD.md`. `build.rs` embeds those the
//! checkout has.

use std::path::Path;

use candle_core::Device;

use super::{load_model_bytes, LoadedModel};
use crate::error::{Error, Result};

/// The built-in model used when no `--model` is given.
pub const DEFAULT: &str = "fer2013";

/// Every built-in model's name, whether or not this build has it.
pub const NAMES: [&str; 2] = ["fer2013", "ferplus"];

/// The prefix that names a built-in model unambiguously (`builtin:ferplus`).
pub const PREFIX: &str = "builtin:";

/// How reports name built-in model `name`.
pub fn display_name(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// The text of `models/NAME/config.json` and the bytes of its `model.safetensors`, or `None`
/// for a name this build does not have.
pub fn files(name: &str) -> Option<(&'static str, &'static [u8])> {
    match name {
        #[cfg(fer_cam_builtin_fer2013)]
        "fer2013" => Some((
            include_str!("../../models/fer2013/config.json"),
            include_bytes!("../../models/fer2013/model.safetensors"),
        )),
        #[cfg(fer_cam_builtin_ferplus)]
        "ferplus" => Some((
            include_str!("../../models/ferplus/config.json"),
            include_bytes!("../../models/ferplus/model.safetensors"),
        )),
        _ => None,
    }
}

/// The built-in model a `--model` argument names: `builtin:NAME`, or a bare built-in name
/// when no file or directory of that name exists (a directory always wins, so an existing
/// `--model fer2013/` folder keeps working).
/// Any `builtin:` name is returned (an unknown one then fails to load with the list of names).
pub fn named(arg: &Path) -> Option<String> {
    named_if(arg, |p| p.symlink_metadata().is_ok())
}

fn named_if(arg: &Path, exists: impl Fn(&Path) -> bool) -> Option<String> {
    let text = arg.to_str()?;
    if let Some(name) = text.strip_prefix(PREFIX) {
        return Some(name.to_string());
    }
    (NAMES.contains(&text) && !exists(arg)).then(|| text.to_string())
}

/// Loads built-in model `name` onto `device`.
pub fn load(name: &str, device: &Device) -> Result<LoadedModel> {
    let (config, weights) = files(name).ok_or_else(|| {
        let have: Vec<&str> = NAMES
            .iter()
            .copied()
            .filter(|n| files(n).is_some())
            .collect();
        Error::Config(if NAMES.contains(&name) {
            format!(
                "this fer-cam was built without models/{name} (built in: {}): pass --model DIR",
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )
        } else {
            format!(
                "no built-in model {:?} (built-in names: {})",
                crate::log::escape(name),
                NAMES.join(", ")
            )
        })
    })?;
    load_model_bytes(config, weights, Path::new(&display_name(name)), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_pick_built_ins_unless_a_directory_is_meant() {
        let some = |s: &str| Some(s.to_string());
        assert_eq!(named(Path::new("ferplus")), some("ferplus"));
        assert_eq!(named(Path::new("builtin:fer2013")), some("fer2013"));
        assert_eq!(named(Path::new("builtin:nope")), some("nope"));
        assert_eq!(named(Path::new("nope")), None);
        assert_eq!(named(Path::new("models/ferplus")), None);
        // An existing file or directory of that name is meant, unless the prefix says otherwise.
        assert_eq!(named_if(Path::new("ferplus"), |_| true), None);
        assert_eq!(
            named_if(Path::new("builtin:ferplus"), |_| true),
            some("ferplus")
        );
        assert_eq!(named_if(Path::new("ferplus"), |_| false), some("ferplus"));
        let e = load("nope", &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("built-in names: fer2013, ferplus"), "{e}");
    }
}
