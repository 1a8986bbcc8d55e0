//! Saves frames of a 4:2:0 YUV4MPEG2 file (such as `fer-cam run --annotate` writes) as one PNG,
//! side by side, for looking at annotated output without a video player:
//!
//! `cargo run --release --example y4m_to_png -- A.y4m 12,30 frames.png`

use std::io::{BufRead, BufReader, Read};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, index, output] = args.as_slice() else {
        anyhow::bail!("usage: y4m_to_png IN.y4m FRAME[,FRAME...] OUT.png");
    };
    let mut wanted: Vec<usize> = index
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    wanted.sort_unstable();
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
    let last = *wanted.last().unwrap_or(&0);
    let mut sheet = image::RgbImage::new((w * wanted.len()) as u32, h as u32);
    let mut slot = 0;
    for i in 0..=last {
        let mut marker = String::new();
        if r.read_line(&mut marker)? == 0 {
            anyhow::bail!("{input} has fewer than {} frames", last + 1);
        }
        r.read_exact(&mut frame)?;
        if !wanted.contains(&i) {
            continue;
        }
        let (y, uv) = frame.split_at(w * h);
        let (u, v) = uv.split_at(cw * ch);
        for yy in 0..h {
            for x in 0..w {
                let c = (yy / 2) * cw + x / 2;
                let (l, cb, cr) = (
                    y[yy * w + x] as f32,
                    u[c] as f32 - 128.0,
                    v[c] as f32 - 128.0,
                );
                let q = |v: f32| v.round().clamp(0.0, 255.0) as u8;
                let px = image::Rgb([
                    q(l + 1.402 * cr),
                    q(l - 0.344_136 * cb - 0.714_136 * cr),
                    q(l + 1.772 * cb),
                ]);
                sheet.put_pixel((slot * w + x) as u32, yy as u32, px);
            }
        }
        slot += 1;
    }
    let rgb = sheet;
    rgb.save(output)?;
    Ok(())
}
