//! Makes a larger test clip from a YUV4MPEG2 stream: every frame's luma resized to W×H (chroma
//! flat gray), written as `C420jpeg` YUV4MPEG2 at the given frame rate, each frame repeated R
//! times. Used to measure the daemon at webcam sizes without ffmpeg:
//! `cargo run --release --example upscale_y4m -- IN.y4m OUT.y4m 640 480 30 15`

use std::io::Write;

use fer_cam::capture::{FrameSource, SourceEvent, Y4mSource};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 7 {
        return Err("usage: upscale_y4m IN OUT WIDTH HEIGHT FPS REPEAT".into());
    }
    let (w, h, fps, rep): (u32, u32, u32, u32) =
        (a[3].parse()?, a[4].parse()?, a[5].parse()?, a[6].parse()?);
    let mut src = Y4mSource::new(std::fs::File::open(&a[1])?, a[1].clone())?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(&a[2])?);
    writeln!(out, "YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg")?;
    let chroma = vec![128u8; 2 * (w as usize).div_ceil(2) * (h as usize).div_ceil(2)];
    while let SourceEvent::Frame(f) = src.next_event()? {
        let img = image::GrayImage::from_raw(f.width, f.height, f.gray).ok_or("bad frame")?;
        let big = image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle);
        for _ in 0..rep {
            out.write_all(b"FRAME\n")?;
            out.write_all(big.as_raw())?;
            out.write_all(&chroma)?;
        }
    }
    Ok(())
}
