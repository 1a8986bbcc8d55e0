//! Makes a larger test clip from a YUV4MPEG2 stream ([`fer_cam::capture::clip`]): every frame's
//! luma resized to W×H (chroma flat gray), written as `C420jpeg` at the given frame rate, each
//! frame repeated R times; with a last argument N, N such frames side by side (every second one
//! mirrored), so a one-face clip becomes an N-face one. Used to measure the daemon at webcam
//! sizes without ffmpeg: `cargo run --release --example upscale_y4m -- IN.y4m OUT.y4m 640 480
//! 30 15`, or `... 640 360 30 15 2` for 1280x360 with two faces.

use fer_cam::capture::clip::{remake_y4m, ClipLayout};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if !(7..=8).contains(&a.len()) {
        return Err("usage: upscale_y4m IN OUT WIDTH HEIGHT FPS REPEAT [SIDE_BY_SIDE]".into());
    }
    let layout = ClipLayout {
        width: a[3].parse()?,
        height: a[4].parse()?,
        fps: a[5].parse()?,
        repeat: a[6].parse()?,
        copies: a.get(7).map_or(Ok(1), |s| s.parse())?,
    };
    let src = std::fs::File::open(&a[1])?;
    // A new file only: never replaces one.
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&a[2])?;
    let mut out = std::io::BufWriter::new(out);
    let n = remake_y4m(src, &a[1], layout, &mut out)?;
    eprintln!("wrote {n} frames to {}", a[2]);
    Ok(())
}
