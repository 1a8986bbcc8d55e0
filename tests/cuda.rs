//! Parity of fer-cam's GPU kernels (`src/cuda`) with their CPU twins, which are the reference,
//! and of the whole classifier on a GPU with the CPU one. Tolerances:
//! - sampler (`card_embed` + `card_chain`) vs `FusedCard::sample`: the same votes, ŷ_0 within
//!   1e-3 (sums in other orders, and libm's exp/log1p against the CPU's polynomials, through
//!   ten reverse steps; the same bound as the CPU sampler against candle in tests/sampler.rs);
//! - summary (`card_summary`) vs `sample_probs_rows` + `sample_stats` on the same ŷ_0: equal
//!   votes and top two, mean probabilities within 1e-6, t within 1e-9 relative;
//! - crops (`crop_faces`) vs `crop_face` + `Classifier::preprocess`: within 1e-6 (the same
//!   f32 operations in the same order, no fused multiply-adds: in practice equal);
//! - the classifier on the GPU (candle's CUDA encoder, our sampler) vs on the CPU (our CPU
//!   kernels): f_φ probabilities within 1e-3, the same label for at least 90% of faces.
//!
//! They need a build with `--features cuda` and a CUDA GPU. Without the feature the suite is one
//! ignored test that says so in `cargo test`'s output; with it but without a GPU, each test
//! prints SKIPPED (and fails under `FER_CAM_REQUIRE_GPU=1`).

#[cfg(feature = "cuda")]
mod common;

#[cfg(not(feature = "cuda"))]
#[test]
#[ignore = "built without the `cuda` feature: no GPU kernels to test (cargo test --features cuda, on a machine with a GPU)"]
fn gpu_parity() {}

#[cfg(feature = "cuda")]
mod gpu {
    use super::common::max_diff;
    use candle_core::{Device, Tensor, D};
    use fer_cam::cuda::{crop_faces, DeviceSamples, GpuCard};
    use fer_cam::face::{crop_face, FaceBox};
    use fer_cam::infer::Classifier;
    use fer_cam::metrics::{argmax, sample_stats};
    use fer_cam::model::sample_probs_rows;
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;

    /// GPU 0, or None after a SKIPPED notice.
    fn gpu() -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                let first = e.to_string().lines().next().unwrap_or("").to_string();
                eprintln!("SKIPPED: tests/cuda.rs: no CUDA GPU ({first})");
                None
            }
        }
    }

    fn rngs(n: usize, seed: u64) -> Vec<rand::rngs::StdRng> {
        (0..n as u64)
            .map(|i| fer_cam::rngs::keyed_rng(&[seed, i]))
            .collect()
    }

    #[test]
    fn sampler_and_summary_match_their_cpu_twins() {
        let Some(gpu) = gpu() else { return };
        let clf = Classifier::load_embedded(&Device::Cpu).expect("embedded model");
        let model = clf.model();
        let fused = Arc::new(model.card.fused(model.schedule()).expect("fold"));
        let card = GpuCard::new(fused.clone(), &gpu).expect("upload");
        let c = fused.classes;
        for (faces, samples, steps, seed) in [
            (1, 32, 10, 0),
            (8, 32, 10, 1),
            (3, 5, 4, 2),
            (2, 7, 1, 3),
            (40, 16, 10, 4),
        ] {
            let mut g = rand::rngs::StdRng::seed_from_u64(seed);
            let feats: Vec<f32> = (0..faces * fused.feat_dim)
                .map(|_| g.random::<f32>() * 2.0)
                .collect();
            let feats_t =
                Tensor::from_vec(feats.clone(), (faces, fused.feat_dim), &Device::Cpu).unwrap();
            let f =
                candle_nn::ops::softmax(&model.head_logits(&feats_t).unwrap(), D::Minus1).unwrap();
            let f_flat = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = fused.sample(&feats, &f_flat, samples, steps, &mut rngs(faces, seed));
            let drawn = card
                .draw(
                    &feats_t.to_device(&gpu).unwrap(),
                    &f.to_device(&gpu).unwrap(),
                    samples,
                    steps,
                    &mut rngs(faces, seed),
                )
                .expect("GPU draw");
            let got = card.to_host(&drawn).unwrap();
            let what = format!("{faces} faces x {samples} samples, {steps} steps");
            let votes = |y: &[f32]| y.chunks_exact(c).map(argmax).collect::<Vec<_>>();
            assert_eq!(votes(&got), votes(&want), "{what}: votes differ");
            let d = max_diff(&got, &want);
            assert!(d < 1e-3, "{what}: max |ŷ_0 difference| {d}");
            assert!(
                got.chunks_exact(c).any(|r| r != &got[..c]),
                "{what}: no spread"
            );

            // The summary on the same ŷ_0 (the CPU's, uploaded).
            let temp = 0.1171;
            let same = DeviceSamples::from_host(&gpu, &want, c).unwrap();
            let stats = card.summarise(&same, samples, temp).unwrap();
            let probs = sample_probs_rows(&want, c, temp);
            for (i, (g, face)) in stats
                .iter()
                .zip(probs.chunks_exact(samples * c))
                .enumerate()
            {
                let w = sample_stats(face, c);
                assert_eq!(
                    (g.counts.clone(), g.top),
                    (w.counts.clone(), w.top),
                    "{what} {i}"
                );
                assert!(max_diff(&g.mean, &w.mean) <= 1e-6, "{what} {i}: mean");
                let t_ok = (g.t.is_nan() && w.t.is_nan())
                    || g.t == w.t
                    || (g.t - w.t).abs() <= 1e-9 * w.t.abs();
                assert!(t_ok, "{what} {i}: t {} vs {}", g.t, w.t);
            }
            assert_eq!(stats.len(), faces);
        }
    }

    #[test]
    fn crops_match_the_cpu_crop_and_normalisation() {
        let Some(gpu) = gpu() else { return };
        let (w, h) = (321u32, 187u32);
        let mut g = rand::rngs::StdRng::seed_from_u64(7);
        let gray: Vec<u8> = (0..w * h).map(|_| g.random::<u8>()).collect();
        let bx = |x: f32, y: f32, s: f32| FaceBox {
            x,
            y,
            w: s,
            h: s * 1.1,
            score: 1.0,
            roll: None,
        };
        // Shrunk, enlarged, at scale one, over every edge, and one pixel.
        let boxes = [
            bx(40.3, 20.2, 120.0),
            bx(-30.0, -20.0, 70.0),
            bx(300.0, 170.0, 25.0),
            bx(100.0, 80.0, 10.0),
            bx(150.0, 60.0, 48.0 / 1.1 / 1.2),
            bx(5.0, 5.0, 0.5),
        ];
        let (mean, std) = (0.5f32, 0.25f32);
        let got = crop_faces(&gpu, &gray, w, h, &boxes, 0.1, 48, mean, std).expect("GPU crops");
        assert_eq!(got.dims(), [boxes.len(), 1, 48, 48]);
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = boxes
            .iter()
            .flat_map(|b| crop_face(&gray, w, h, b, 0.1, 48))
            .map(|p| (p as f32 / 255.0 - mean) / std)
            .collect();
        let d = max_diff(&got, &want);
        assert!(d <= 1e-6, "max crop difference {d}");
        // No boxes: an empty batch; a frame of the wrong size: an error, not a panic.
        let none = crop_faces(&gpu, &gray, w, h, &[], 0.1, 48, mean, std).unwrap();
        assert_eq!(none.dims(), [0, 1, 48, 48]);
        assert!(crop_faces(&gpu, &gray[1..], w, h, &boxes, 0.1, 48, mean, std).is_err());
    }

    #[test]
    fn classifier_on_the_gpu_matches_the_cpu() {
        let Some(gpu) = gpu() else { return };
        let mut cpu = Classifier::load_embedded(&Device::Cpu).expect("CPU model");
        let mut on_gpu = Classifier::load_embedded(&gpu).expect("GPU model");
        let mut g = rand::rngs::StdRng::seed_from_u64(3);
        // Smooth random "faces": noise would put every class near a tie.
        let n = 24;
        let crops: Vec<u8> = (0..n * 48 * 48)
            .map(|i| {
                let (k, p) = (i / 2304, i % 2304);
                let (x, y) = ((p % 48) as f32, (p / 48) as f32);
                let v = 128.0 + 90.0 * ((x * (0.05 + 0.01 * k as f32)) + y * 0.13).sin();
                (v + g.random::<f32>() * 10.0) as u8
            })
            .collect();
        let a = cpu.predict(&crops).expect("CPU predict");
        let b = on_gpu.predict(&crops).expect("GPU predict");
        let mut same = 0;
        for (x, y) in a.iter().zip(&b) {
            let d = max_diff(&x.fphi_probs, &y.fphi_probs);
            assert!(d < 1e-3, "f_φ probabilities differ by {d}");
            same += usize::from(x.card.label == y.card.label);
        }
        assert!(same * 10 >= n * 9, "{same}/{n} labels agree");
        // The candle reference sampler also runs on the GPU (a fresh classifier: faces 0..n
        // draw the same noise as on the CPU).
        let mut reference = Classifier::load_embedded(&gpu).expect("GPU model");
        reference
            .set_sampler_kernel(fer_cam::infer::SamplerKernel::Candle)
            .unwrap();
        let r = reference
            .predict(&crops)
            .expect("GPU predict, candle sampler");
        let same = a
            .iter()
            .zip(&r)
            .filter(|(x, y)| x.card.label == y.card.label)
            .count();
        assert!(
            same * 10 >= n * 9,
            "candle sampler on the GPU: {same}/{n} labels agree"
        );
    }
}
