//! The face stage's framing on PublicTest renders, face by face: a model (the built-in `fer2013`
//! unless MODEL_DIR is given) on each found face's own FER2013 crop, on the crop at the true
//! square, at the box the whole-frame search found (as `run` crops it), and at a refined box
//! (BlazeFace run again on the region around the found face, as the search around a track
//! does), and the face's own image cut at the box's scale and offset, over the same faces: the
//! CARD vote (flip views, averaged over sampler seeds 0..SAMPLER_SEEDS, every crop drawing with
//! the same keys) and f_φ alone. docs/pipeline.md ("Through the pipeline") has the numbers.
//!
//! `cargo run --release --example framing -- fer2013.csv.gz [FACES [RENDER_SEED [SAMPLER_SEEDS
//! [MODEL_DIR]]]]`
use candle_core::Device;
use fer_cam::config::Tta;
use fer_cam::data::{load, LoadOptions};
use fer_cam::face::blazeface::{BlazeFace, INPUT};
use fer_cam::face::{
    crop_box, crop_face, sample_square, DetectConfig, FaceBox, FaceDetector, ROLL_LEFT_UPRIGHT,
};
use fer_cam::harness::render::{render, RenderConfig};
use fer_cam::metrics;
use fer_cam::Classifier;

/// BlazeFace's best box in the square twice `d`'s side around it, mapped to a face square as
/// the face stage maps BlazeFace's boxes (`BLAZE_SIDE` 0.95, `BLAZE_DROP` 0.075 in
/// `src/face/detect.rs`).
fn refine(net: &BlazeFace, gray: &[u8], w: u32, h: u32, d: &FaceBox) -> Option<FaceBox> {
    let region = 2.0 * d.w.max(d.h);
    let (cx, cy) = d.centre();
    let (x0, y0) = (cx - region / 2.0, cy - region / 2.0);
    let img = sample_square(gray, w, h, x0, y0, region, INPUT as u32);
    let s = region / INPUT as f32;
    net.detect(&img, 0.5)
        .ok()?
        .into_iter()
        .map(|b| {
            let side = b.w.max(b.h) / 0.95;
            let (bx, by) = b.centre();
            FaceBox {
                x: (bx - side / 2.0) * s + x0,
                y: (by - 0.075 * side - side / 2.0) * s + y0,
                w: side * s,
                h: side * s,
                ..b
            }
        })
        .max_by(|a, b| a.iou(d).total_cmp(&b.iou(d)))
        .filter(|b| b.iou(d) >= 0.3)
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let data = a.get(1).ok_or_else(|| {
        anyhow::anyhow!(
            "usage: framing fer2013.csv.gz [FACES [RENDER_SEED [SAMPLER_SEEDS [MODEL_DIR]]]]"
        )
    })?;
    let n: usize = a.get(2).map_or(Ok(usize::MAX), |s| s.parse())?;
    let (ds, _) = load(
        std::path::Path::new(data),
        &LoadOptions::with_default_cache(),
    )?;
    let ds = ds.select_split("PublicTest")?;
    let net = BlazeFace::embedded()?;
    let mut det = FaceDetector::new(DetectConfig::default())?;
    let cfg = RenderConfig {
        seed: a.get(3).map_or(Ok(0), |s| s.parse())?,
        ..RenderConfig::default()
    };
    let margin = 0.02;
    let names = [
        "own FER2013 crop",
        "truth",
        "pipeline box",
        "refined box",
        "refined, roll from refined",
        "truth, render's turn undone",
        "pipeline box, never turned",
        "pipeline box, turned by all its roll",
        "own crop at the box's scale and offset",
    ];
    let v_count = names.len();
    let mut crops: Vec<Vec<u8>> = vec![Vec::new(); v_count];
    let mut stats: Vec<Vec<(f32, f32, f32)>> = vec![Vec::new(); v_count];
    let mut labels = Vec::new();
    let (mut missed, mut unrefined) = (0, 0);
    for i in 0..n.min(ds.len()) {
        let (frame, p) = render(&cfg, i, ds.image(i))?;
        let (g, w, h) = (frame.as_raw(), frame.width(), frame.height());
        let truth = p.square();
        let Some(d) = det
            .detect_full(g, w, h)
            .into_iter()
            .max_by(|x, y| {
                crop_box(x, margin)
                    .iou(&truth)
                    .total_cmp(&crop_box(y, margin).iou(&truth))
            })
            .filter(|x| crop_box(x, margin).iou(&truth) >= 0.3)
        else {
            missed += 1;
            continue;
        };
        let r = refine(&net, g, w, h, &d).unwrap_or_else(|| {
            unrefined += 1;
            d
        });
        let r_keep_roll = FaceBox { roll: d.roll, ..r };
        // `crop_face` turns by the part of the roll beyond ROLL_LEFT_UPRIGHT: a roll pushed out
        // by that much turns the crop by all of the given one.
        let whole = |roll: f32| roll + ROLL_LEFT_UPRIGHT.copysign(roll);
        let upright = FaceBox {
            roll: Some(whole(p.angle_deg.to_radians())),
            ..truth
        };
        let unturned = FaceBox { roll: None, ..d };
        let all_turned = FaceBox {
            roll: d.roll.map(whole),
            ..d
        };
        crops[0].extend_from_slice(ds.image(i));
        stats[0].push((1.0, 0.0, 0.0));
        for (v, (b, m)) in [
            (truth, 0.0),
            (d, margin),
            (r_keep_roll, margin),
            (r, margin),
            (upright, 0.0),
            (unturned, margin),
            (all_turned, margin),
        ]
        .iter()
        .enumerate()
        {
            crops[v + 1].extend(crop_face(g, w, h, b, *m, 48));
            let cb = crop_box(b, *m);
            let (cx, cy) = cb.centre();
            stats[v + 1].push((cb.w / p.side, (cx - p.cx) / p.side, (cy - p.cy) / p.side));
        }
        // The face's own 48x48 image cut at the box's scale and centre offset (edge pixels
        // repeat): the box's framing without the render's background, turn or camera.
        let (sc, dx, dy) = *stats[2].last().expect("the pipeline box's, pushed above");
        let side = 48.0 * sc;
        let (ox, oy) = (24.0 + dx * 48.0 - side / 2.0, 24.0 + dy * 48.0 - side / 2.0);
        crops[v_count - 1].extend(sample_square(ds.image(i), 48, 48, ox, oy, side, 48));
        stats[v_count - 1].push((sc, dx, dy));
        labels.push(ds.labels[i] as usize);
    }
    let sampler_seeds: u64 = a.get(4).map_or(Ok(1), |s| s.parse())?;
    let mut clf = match a.get(5) {
        Some(dir) => Classifier::load(std::path::Path::new(dir), &Device::Cpu)?,
        None => Classifier::load_builtin("fer2013", &Device::Cpu)?,
    };
    clf.set_tta(Tta::Flip)?;
    println!(
        "faces {} found {} missed {missed} unrefined {unrefined}; CARD vote over sampler seeds 0..{sampler_seeds}",
        n.min(ds.len()),
        labels.len()
    );
    let box_v = 2;
    let mut right: Vec<Vec<bool>> = Vec::new();
    for v in 0..v_count {
        let (mut votes, mut fphi_hits) = (0usize, 0usize);
        let mut r = Vec::new();
        for seed in 0..sampler_seeds {
            let mut sampler = clf.sampler();
            sampler.seed = seed;
            clf.set_sampler(sampler)?;
            for (ch, lb) in crops[v].chunks(48 * 48 * 64).zip(labels.chunks(64)) {
                for (pr, l) in clf.predict(ch)?.iter().zip(lb) {
                    votes += usize::from(pr.card.label == *l);
                    if seed == 0 {
                        r.push(pr.card.label == *l);
                        fphi_hits += usize::from(metrics::argmax(&pr.fphi_probs) == *l);
                    }
                }
            }
        }
        if v > box_v {
            let (b, c) = r.iter().zip(&right[box_v]).fold((0, 0), |(b, c), (x, y)| {
                (b + usize::from(*x && !*y), c + usize::from(!*x && *y))
            });
            println!("  vs pipeline box (seed 0): {b} right only here, {c} right only there");
        }
        right.push(r);
        let st = &stats[v];
        let k = st.len() as f32;
        let ms = |f: fn(&(f32, f32, f32)) -> f32| {
            let m = st.iter().map(f).sum::<f32>() / k;
            let sd = (st.iter().map(|x| (f(x) - m).powi(2)).sum::<f32>() / k).sqrt();
            format!("{m:+.3}±{sd:.3}")
        };
        let k_faces = labels.len() as f64;
        println!(
            "{:36} CARD {:.2}%  f_phi {:.2}%  scale {} dx {} dy {}",
            names[v],
            100.0 * votes as f64 / (k_faces * sampler_seeds as f64),
            100.0 * fphi_hits as f64 / k_faces,
            ms(|x| x.0),
            ms(|x| x.1),
            ms(|x| x.2)
        );
    }
    Ok(())
}
