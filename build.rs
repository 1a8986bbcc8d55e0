//! Compiles the trained models in `models/fer2013/` and `models/ferplus/` into the binary when
//! the checkout has them (every release does; a checkout without one builds a fer-cam that
//! lacks that built-in model).

use std::path::Path;

fn main() {
    for name in ["fer2013", "ferplus"] {
        println!("cargo::rerun-if-changed=models/{name}");
        println!("cargo::rustc-check-cfg=cfg(fer_cam_builtin_{name})");
        let dir = Path::new("models").join(name);
        if dir.join("config.json").is_file() && dir.join("model.safetensors").is_file() {
            println!("cargo::rustc-cfg=fer_cam_builtin_{name}");
        }
    }
}
