//! Compiles the trained models in `models/fer2013/` and `models/ferplus/` into the binary when
//! the checkout has them (every release does; a checkout without one builds a fer-cam that
//! lacks that built-in model), and marks the tests that need `../shared` as ignored when it is
//! absent.

use std::path::Path;

fn main() {
    // Tests that need ../shared (FER2013, the shared clips) are marked ignored, with the reason,
    // when this checkout has none beside it: `cargo test` then lists them as ignored instead of
    // passing them without checking anything.
    println!("cargo::rustc-check-cfg=cfg(fer_cam_no_shared)");
    println!("cargo::rerun-if-changed=../shared");
    if !Path::new("../shared/data/fer2013").is_dir() || !Path::new("../shared/media").is_dir() {
        println!("cargo::rustc-cfg=fer_cam_no_shared");
    }
    for name in ["fer2013", "ferplus"] {
        println!("cargo::rerun-if-changed=models/{name}");
        println!("cargo::rustc-check-cfg=cfg(fer_cam_builtin_{name})");
        let dir = Path::new("models").join(name);
        if dir.join("config.json").is_file() && dir.join("model.safetensors").is_file() {
            println!("cargo::rustc-cfg=fer_cam_builtin_{name}");
        }
    }
}
