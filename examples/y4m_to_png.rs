//! Saves one frame of a 4:2:0 YUV4MPEG2 file (such as `fer-cam run --annotate` writes) as a PNG,
//! for looking at annotated output without a video player:
//!
//! `cargo run --release --example y4m_to_png -- A.y4m 12 frame12.png`

use std::io::{BufRead, BufReader, Read};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, index, output] = args.as_slice() else {
        anyhow::bail!("usage: y4m_to_png IN.y4m FRAME_INDEX OUT.png");
    };
    let index: usize = index.parse()?;
    if std::path::Path::new(output).exists() {
        anyhow::bail!("{output} already exists");
    }
    let mut r = BufReader::new(std::fs::File::open(input)?);
    let mut header = String::new();
    r.read_line(&mut header)?;
    let tag = |t: char| -> anyhow::Result<usize> {
        let v = header
            .split_whitespace()
            .find_map(|p| p.strip_prefix(t))
            .ok_or_else(|| anyhow::anyhow!("no {t} in the header {header:?}"))?;
        Ok(v.parse()?)
    };
    let (w, h) = (tag('W')?, tag('H')?);
    if !header.contains("C420") && header.contains(" C") {
        anyhow::bail!("only 4:2:0 streams are read: {header:?}");
    }
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let mut frame = vec![0u8; w * h + 2 * cw * ch];
    for _ in 0..=index {
        let mut marker = String::new();
        if r.read_line(&mut marker)? == 0 {
            anyhow::bail!("{input} has fewer than {} frames", index + 1);
        }
        r.read_exact(&mut frame)?;
    }
    let (y, uv) = frame.split_at(w * h);
    let (u, v) = uv.split_at(cw * ch);
    let mut rgb = image::RgbImage::new(w as u32, h as u32);
    for (x, yy, px) in rgb.enumerate_pixels_mut() {
        let (x, yy) = (x as usize, yy as usize);
        let c = (yy / 2) * cw + x / 2;
        let (l, cb, cr) = (
            y[yy * w + x] as f32,
            u[c] as f32 - 128.0,
            v[c] as f32 - 128.0,
        );
        let q = |v: f32| v.round().clamp(0.0, 255.0) as u8;
        *px = image::Rgb([
            q(l + 1.402 * cr),
            q(l - 0.344_136 * cb - 0.714_136 * cr),
            q(l + 1.772 * cb),
        ]);
    }
    rgb.save(output)?;
    Ok(())
}
