//! Test clips without ffmpeg: a YUV4MPEG2 stream's frames resized, each repeated, and set side
//! by side (every second copy mirrored, so a one-face clip becomes an N-face one). The
//! `upscale_y4m` example and the pipeline benchmarks use it to measure the daemon at webcam
//! sizes from the small clip in `../shared/media`.

use std::io::{Read, Write};

use image::imageops::{self, FilterType};
use image::GrayImage;

use super::{FrameSource, SourceEvent, Y4mSource};
use crate::error::{Error, Result};

/// How to remake a clip.
#[derive(Debug, Clone, Copy)]
pub struct ClipLayout {
    /// Size of one copy of the frame.
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// Times each source frame is written (a 2-fps clip repeated 15 times plays at 30 fps).
    pub repeat: u32,
    /// Copies side by side: the output is `copies × width` wide.
    pub copies: u32,
}

/// Reads the y4m stream `src` and writes it remade as `layout` (`C420jpeg`, flat gray chroma)
/// to `out`; returns the frames written.
pub fn remake_y4m(
    src: impl Read,
    name: &str,
    layout: ClipLayout,
    out: &mut impl Write,
) -> Result<u64> {
    let ClipLayout {
        width: w,
        height: h,
        fps,
        repeat,
        copies,
    } = layout;
    if w == 0 || h == 0 || fps == 0 || copies == 0 || w.saturating_mul(copies) > 16384 {
        return Err(Error::Config(format!("clip layout {layout:?}")));
    }
    let io = |e: std::io::Error| Error::Msg(format!("writing the clip: {e}"));
    let ow = w * copies;
    writeln!(out, "YUV4MPEG2 W{ow} H{h} F{fps}:1 Ip A1:1 C420jpeg").map_err(io)?;
    let chroma = vec![128u8; 2 * (ow as usize).div_ceil(2) * (h as usize).div_ceil(2)];
    let mut src = Y4mSource::new(src, name)?;
    let mut written = 0;
    while let SourceEvent::Frame(f) = src.next_event()? {
        let img = GrayImage::from_raw(f.width, f.height, f.gray)
            .ok_or_else(|| Error::Msg("frame size".into()))?;
        let one = imageops::resize(&img, w, h, FilterType::Triangle);
        let mirrored = imageops::flip_horizontal(&one);
        let mut frame = GrayImage::new(ow, h);
        for i in 0..copies {
            let copy = if i % 2 == 0 { &one } else { &mirrored };
            imageops::replace(&mut frame, copy, i64::from(i * w), 0);
        }
        for _ in 0..repeat {
            out.write_all(b"FRAME\n").map_err(io)?;
            out.write_all(frame.as_raw()).map_err(io)?;
            out.write_all(&chroma).map_err(io)?;
            written += 1;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clip_is_resized_repeated_and_mirrored_side_by_side() {
        // Two 4x2 frames whose left half is dark and right half bright.
        let mut src = b"YUV4MPEG2 W4 H2 F2:1 C420jpeg\n".to_vec();
        for _ in 0..2 {
            src.extend_from_slice(b"FRAME\n");
            src.extend_from_slice(&[0, 0, 200, 200, 0, 0, 200, 200]);
            src.extend_from_slice(&[128; 4]);
        }
        let layout = ClipLayout {
            width: 4,
            height: 2,
            fps: 30,
            repeat: 3,
            copies: 2,
        };
        let mut out = Vec::new();
        assert_eq!(remake_y4m(&src[..], "t", layout, &mut out).unwrap(), 6);
        let mut again = Y4mSource::new(&out[..], "out").unwrap();
        assert_eq!(again.size(), (8, 2));
        let SourceEvent::Frame(f) = again.next_event().unwrap() else {
            panic!("no frame")
        };
        // The copy, then its mirror image.
        assert_eq!(&f.gray[..8], &[0, 0, 200, 200, 200, 200, 0, 0]);
        let mut n = 1;
        while let SourceEvent::Frame(_) = again.next_event().unwrap() {
            n += 1;
        }
        assert_eq!(n, 6);
    }
}
