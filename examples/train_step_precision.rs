//! One training step (forward, cross-entropy, backward, SGD update; batch 64, the 3x3 stride-2
//! stem, CBAM in every block) in f32 and in bf16 (`"precision": "bf16"`), at half (32-256) and
//! full (64-512, the paper's network) width. The two precisions alternate step by step, so a
//! slow spell of a shared machine hits both; each row is the median of the rounds.
//!
//! `cargo run --release --example train_step_precision [-- ROUNDS]` (default 12). Where the CPU
//! has no AVX512-BF16 it says so and stops.
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{linear, Linear, Module, Optimizer, VarBuilder, VarMap, SGD};
use fer_cam::config::{EncoderConfig, Stem};
use fer_cam::kernels::precision::{self, Precision};
use fer_cam::model::resnet::ResNet;

fn main() -> anyhow::Result<()> {
    fer_cam::alloc::keep_freed_memory_ms(30_000);
    if !Precision::Bf16.available() {
        println!("no AVX512-BF16 on this CPU (or FER_CAM_NO_AVX512 is set): nothing to compare");
        return Ok(());
    }
    let rounds: usize = std::env::args().nth(1).map_or(Ok(12), |a| a.parse())?;
    let b = 64;
    let xs = Tensor::randn(0f32, 1.0, (b, 1, 48, 48), &Device::Cpu)?;
    let labels = Tensor::from_vec((0..b as u32).map(|i| i % 7).collect(), b, &Device::Cpu)?;
    println!("batch {b}, {rounds} rounds, median ms per step");
    for (width, widths) in [("half", [32, 64, 128, 256]), ("full", [64, 128, 256, 512])] {
        let cfg = EncoderConfig {
            stem: Stem::Conv3x3S2,
            cbam: true,
            cbam_reduction: 16,
            widths,
            ..Default::default()
        };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let net = ResNet::new(&cfg, vb.clone())?;
        let head: Linear = linear(widths[3], 7, vb.pp("head"))?;
        let mut opt = SGD::new(vm.all_vars(), 1e-4)?;
        let mut step = |p: Precision| -> anyhow::Result<f64> {
            let t = Instant::now();
            let in_precision = precision::scope(p);
            let logits = head.forward(&net.forward_t(&xs, true)?)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let grads = loss.backward()?;
            drop(in_precision);
            opt.step(&grads)?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        };
        // Warm-up: the allocator's pools and the scratch buffers of both paths.
        for _ in 0..2 {
            step(Precision::F32)?;
            step(Precision::Bf16)?;
        }
        let (mut f, mut h) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            f.push(step(Precision::F32)?);
            h.push(step(Precision::Bf16)?);
        }
        let (mf, mh) = (median(&mut f), median(&mut h));
        println!(
            "{width}/cbam  f32 {mf:7.1} ms  bf16 {mh:7.1} ms  f32/bf16 {:.3}",
            mf / mh
        );
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
