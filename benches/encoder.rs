//! Encoder cost, candle's built-in ops against fer-cam's kernels in the same run:
//! forward at batch 1 and 8 for both stems (inference mode: BN folded on the fast path; `fer`
//! with f32 weights, `fer-f16` with half-precision weights on maps of at most 4x4, as `fer-cam
//! run` and `eval` default to), and one full training step (forward, cross-entropy, backward,
//! SGD update) at batch 64 with the 3x3 stem, and the same step with and without CBAM at half and
//! full width with the shipped 3x3 stride-2 stem (`-- cbam`). Bench ids name the device, the kernels, the stem
//! and the batch. With the 3x3 stem no layer has maps that small, so its `fer` and `fer-f16`
//! rows time the same computation: their gap is the run's noise.
//!
//! `cargo bench --bench encoder` (all), or e.g. `cargo bench --bench encoder -- forward`.

use candle_core::{DType, Device, ModuleT, Tensor};

// The same allocator as the fer-cam binary: it keeps freed pages instead of unmapping them,
// which matters for the large short-lived tensors of training.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_nn::{linear, Linear, Module, Optimizer, VarBuilder, VarMap, SGD};
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion};
use fer_cam::config::{EncoderConfig, Stem};
use fer_cam::kernels::{ConvKernels, WeightFormat};
use fer_cam::model::resnet::ResNet;

fn encoder(stem: Stem, kernels: ConvKernels) -> (VarMap, ResNet) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let cfg = EncoderConfig {
        stem,
        kernels,
        ..Default::default()
    };
    let net = ResNet::new(&cfg, vb).expect("encoder");
    (vm, net)
}

fn stem_name(stem: Stem) -> &'static str {
    stem.name()
}

fn kernels_name(k: ConvKernels) -> &'static str {
    match k {
        ConvKernels::Fast => "fer",
        ConvKernels::Candle => "candle",
    }
}

fn forward(c: &mut Criterion) {
    fer_cam::alloc::keep_freed_memory_ms(30_000);
    let mut group = c.benchmark_group("encoder_forward/cpu");
    group.sample_size(20);
    for stem in [Stem::Conv3x3, Stem::Conv7x7Pool] {
        for (kernels, format) in [
            (ConvKernels::Candle, WeightFormat::F32),
            (ConvKernels::Fast, WeightFormat::F32),
            (ConvKernels::Fast, WeightFormat::F16),
        ] {
            let (_vm, net) = encoder(stem, kernels);
            net.set_weight_format(format);
            let name = match format {
                WeightFormat::F32 => kernels_name(kernels).to_string(),
                WeightFormat::F16 => format!("{}-f16", kernels_name(kernels)),
            };
            for b in [1usize, 8] {
                let xs = Tensor::randn(0f32, 1.0, (b, 1, 48, 48), &Device::Cpu).expect("input");
                let id = BenchmarkId::new(format!("{name}/{}", stem_name(stem)), format!("b{b}"));
                group.bench_with_input(id, &xs, |bench, xs| {
                    bench.iter(|| net.forward_t(xs, false).expect("forward"))
                });
            }
        }
    }
    group.finish();
}

/// Benches one training step of `cfg`'s encoder with a linear head at batch 64: forward,
/// cross-entropy, backward and an SGD update.
fn bench_step(group: &mut BenchmarkGroup<'_, WallTime>, id: BenchmarkId, cfg: &EncoderConfig) {
    let b = 64;
    let xs = Tensor::randn(0f32, 1.0, (b, 1, 48, 48), &Device::Cpu).expect("input");
    let labels = Tensor::from_vec(
        (0..b as u32).map(|i| i % 7).collect::<Vec<u32>>(),
        b,
        &Device::Cpu,
    )
    .expect("labels");
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let net = ResNet::new(cfg, vb.clone()).expect("encoder");
    let head: Linear = linear(cfg.widths[3], 7, vb.pp("head")).expect("head");
    let mut opt = SGD::new(vm.all_vars(), 0.01).expect("sgd");
    group.bench_function(id, |bench| {
        bench.iter(|| {
            let feats = net.forward_t(&xs, true).expect("forward");
            let logits = head.forward(&feats).expect("head");
            let loss = candle_nn::loss::cross_entropy(&logits, &labels).expect("loss");
            opt.backward_step(&loss).expect("step");
            loss
        })
    });
}

fn train_step(c: &mut Criterion) {
    // As the fer-cam binary does: keep freed memory for reuse across steps (both kernel sets).
    fer_cam::alloc::keep_freed_memory_ms(30_000);
    let mut group = c.benchmark_group("encoder_train_step/cpu");
    group.sample_size(10);
    for kernels in [ConvKernels::Candle, ConvKernels::Fast] {
        let cfg = EncoderConfig {
            stem: Stem::Conv3x3,
            kernels,
            ..Default::default()
        };
        let id = BenchmarkId::new(format!("{}/conv3x3", kernels_name(kernels)), "b64");
        bench_step(&mut group, id, &cfg);
    }
    group.finish();
}

/// What CBAM costs a training step (it must stay nearly free): the shipped stem (3x3 stride 2)
/// at half width (32-256) and at full width (64-512), with and without CBAM in every block
/// (reduction 16), in one run with fer-cam's kernels: `cargo bench --bench encoder -- cbam`.
fn train_step_cbam(c: &mut Criterion) {
    fer_cam::alloc::keep_freed_memory_ms(30_000);
    let mut group = c.benchmark_group("encoder_train_step_cbam/cpu");
    group.sample_size(10);
    for (width, widths) in [("half", [32, 64, 128, 256]), ("full", [64, 128, 256, 512])] {
        for cbam in [false, true] {
            let cfg = EncoderConfig {
                stem: Stem::Conv3x3S2,
                cbam,
                cbam_reduction: 16,
                widths,
                ..Default::default()
            };
            let name = if cbam { "cbam" } else { "no-cbam" };
            bench_step(
                &mut group,
                BenchmarkId::new(format!("{width}/{name}"), "b64"),
                &cfg,
            );
        }
    }
    group.finish();
}

criterion_group!(benches, forward, train_step, train_step_cbam);
criterion_main!(benches);
