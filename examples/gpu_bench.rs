//! CPU vs GPU timings of the inference and training hot paths, one table on stdout:
//! the CARD sampler with its per-face summary (1/8/32 faces, the shipped model's views and
//! samples), the encoder + f_φ (batch 1/8/64), the crops (1/8/32 boxes of a 640x360 frame) and
//! one training step of encoder + f_φ (forward, backward, AdamW; batch 64). GPU clocks stop
//! after the device is synchronised (or after the copy back that the caller needs).
//!
//! `cargo run --release --features cuda --example gpu_bench [-- ITERS]`

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use fer_cam::cuda::{crop_faces, GpuCard};
use fer_cam::face::{crop_face, FaceBox};
use fer_cam::infer::Classifier;
use fer_cam::model::{init_model, sample_probs_rows};
use fer_cam::train::optim::AdamW;
use rand::{Rng, SeedableRng};

/// Median milliseconds of `iters` calls after two warm-ups.
fn time(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    f()?;
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn row(what: &str, cpu: f64, gpu: f64) {
    println!("| {what} | {cpu:.3} | {gpu:.3} | {:.1}x |", cpu / gpu);
}

fn rngs(n: usize) -> Vec<rand::rngs::StdRng> {
    (0..n as u64)
        .map(|i| fer_cam::rngs::keyed_rng(&[0, i]))
        .collect()
}

fn main() -> Result<()> {
    let iters: usize = std::env::args().nth(1).map_or(Ok(20), |s| s.parse())?;
    let gpu = fer_cam::cuda::open_device(0)?;
    let cpu = Device::Cpu;
    let clf = Classifier::load_embedded(&cpu)?;
    let model = clf.model();
    let mut g = rand::rngs::StdRng::seed_from_u64(1);
    println!(
        "median ms of {iters} runs (CPU: {} threads)\n",
        rayon::current_num_threads()
    );
    println!("| step | CPU ms | GPU ms | CPU/GPU |\n|---|---|---|---|");

    // The sampler and summary, as the shipped model runs them: V views per face, S/V samples
    // per view, the summary over S.
    let fused = std::sync::Arc::new(model.card.fused(model.schedule())?);
    let card = GpuCard::new(fused.clone(), &gpu)?;
    let (views, s, steps) = (
        clf.tta().views(),
        clf.samples_per_face(),
        clf.sampler().steps,
    );
    let (c, fd) = (fused.classes, fused.feat_dim);
    let temp = clf.temperatures().sample;
    for faces in [1usize, 8, 32] {
        let rows = faces * views;
        let feats: Vec<f32> = (0..rows * fd).map(|_| g.random::<f32>()).collect();
        let ft = Tensor::from_vec(feats.clone(), (rows, fd), &cpu)?;
        let f = candle_nn::ops::softmax(&model.head_logits(&ft)?, D::Minus1)?;
        let f_flat = f.flatten_all()?.to_vec1::<f32>()?;
        let t_cpu = time(iters, || {
            let y0 = fused.sample(&feats, &f_flat, s / views, steps, &mut rngs(rows));
            let p = sample_probs_rows(&y0, c, temp);
            let st: Vec<_> = p
                .chunks_exact(s * c)
                .map(|x| fer_cam::metrics::sample_stats(x, c))
                .collect();
            assert_eq!(st.len(), faces);
            Ok(())
        })?;
        let (ftg, fg) = (ft.to_device(&gpu)?, f.to_device(&gpu)?);
        let t_gpu = time(iters, || {
            let d = card.draw(&ftg, &fg, s / views, steps, &mut rngs(rows))?;
            let st = card.summarise(&d, s, temp)?; // copies the stats back: synchronised
            assert_eq!(st.len(), faces);
            Ok(())
        })?;
        row(
            &format!("CARD sampler + summary, {faces} faces x {s} samples, {steps} steps"),
            t_cpu,
            t_gpu,
        );
    }

    // Encoder + f_φ, the inference path (BN folded, our CPU kernels vs candle's CUDA ops).
    let gclf = Classifier::load_embedded(&gpu)?;
    for b in [1usize, 8, 64] {
        let crops: Vec<u8> = (0..b * 48 * 48).map(|_| g.random::<u8>()).collect();
        let x_cpu = clf.preprocess(&crops)?;
        let t_cpu = time(iters, || {
            let feats = model.features(&x_cpu, false)?;
            model.head_logits(&feats)?;
            Ok(())
        })?;
        let x_gpu = gclf.preprocess(&crops)?;
        let gm = gclf.model();
        let t_gpu = time(iters, || {
            let feats = gm.features(&x_gpu, false)?;
            gm.head_logits(&feats)?;
            gpu.synchronize()?;
            Ok(())
        })?;
        row(&format!("encoder + f_φ, batch {b}"), t_cpu, t_gpu);
    }

    // Crops of a 640x360 frame.
    let (w, h) = (640u32, 360u32);
    let frame: Vec<u8> = (0..w * h).map(|_| g.random::<u8>()).collect();
    let cfg = clf.config().input.clone();
    for n in [1usize, 8, 32] {
        let boxes: Vec<FaceBox> = (0..n)
            .map(|i| FaceBox {
                x: (i * 17 % 500) as f32,
                y: (i * 29 % 240) as f32,
                w: 90.0,
                h: 100.0,
                score: 1.0,
                roll: None,
            })
            .collect();
        let t_cpu = time(iters, || {
            let crops: Vec<u8> = boxes
                .iter()
                .flat_map(|b| crop_face(&frame, w, h, b, 0.1, 48))
                .collect();
            clf.preprocess(&crops)?;
            Ok(())
        })?;
        let t_gpu = time(iters, || {
            crop_faces(&gpu, &frame, w, h, &boxes, 0.1, 48, cfg.mean, cfg.std)?;
            gpu.synchronize()?;
            Ok(())
        })?;
        row(&format!("crop + normalise, {n} boxes"), t_cpu, t_gpu);
    }

    // One training step of encoder + f_φ: forward (train mode), loss, backward, AdamW.
    let mut step_ms = Vec::new();
    for dev in [&cpu, &gpu] {
        let (vm, m) = init_model(clf.config(), dev, 0)?;
        let vars = vm
            .data()
            .lock()
            .expect("varmap")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut opt = AdamW::new(vars, 1e-4)?;
        let b = 64;
        let x = Tensor::randn(0f32, 1.0, (b, 1, 48, 48), dev)?;
        let labels: Vec<u32> = (0..b as u32).map(|i| i % 7).collect();
        let n = if dev.is_cpu() { iters.min(5) } else { iters };
        step_ms.push(time(n, || {
            let logits = m.head_logits(&m.features(&x, true)?)?;
            let loss = fer_cam::train::smoothed_cross_entropy(&logits, &labels, 0.1)?;
            opt.step(&loss.backward()?, 1e-4)?;
            dev.synchronize()?;
            Ok(())
        })?);
    }
    row(
        "training step (encoder + f_φ, batch 64)",
        step_ms[0],
        step_ms[1],
    );
    Ok(())
}
