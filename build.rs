//! Compiles the trained model in `models/fer2013/` into the binary when it is there (it is in
//! every release; a checkout without it builds a fer-cam that needs `--model`).

use std::path::Path;

fn main() {
    println!("cargo::rerun-if-changed=models/fer2013");
    println!("cargo::rustc-check-cfg=cfg(fer_cam_builtin_model)");
    let dir = Path::new("models/fer2013");
    if dir.join("config.json").is_file() && dir.join("model.safetensors").is_file() {
        println!("cargo::rustc-cfg=fer_cam_builtin_model");
    }
}
