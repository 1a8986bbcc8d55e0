//! Throughput of single convolutions of the encoder: forward (Winograd, direct kernel on AVX-512
//! or AVX2, GEMM path), then the weight gradients of the training step's 3x3 layers (Winograd vs GEMM path).
//! GFLOP/s count the direct convolution's multiply-adds.
//! Rows `wino4-bf16` and `wino-bf16` run the Winograd GEMMs in bf16 where the CPU has AVX512-BF16.
//! `cargo run --release --example conv_gflops [-- NAME]` (only the cases whose name contains NAME;
//! for the weight gradients the name is followed by the kernel, e.g. `"dW l1 64x48 b64 gemm"`)
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use fer_cam::kernels::{direct, geom::ConvGeom, isa, reference, wgrad, winograd};

fn main() {
    // As the fer-cam binary does: keep freed pages for reuse instead of faulting them in again.
    fer_cam::alloc::keep_freed_memory_ms(30_000);
    let cases = [
        ("stem 3x3 b1", 1, 1, 48, 64, 3, 1, 1),
        ("stem 7x7 b1", 1, 1, 48, 64, 7, 2, 3),
        ("l2.0 1x1 s2 b1", 1, 64, 48, 128, 1, 2, 0),
        ("l2.0 3x3 s2 b1", 1, 64, 48, 128, 3, 2, 1),
        ("l1 64x48 3x3", 1, 64, 48, 64, 3, 1, 1),
        ("l2 128x24 3x3", 1, 128, 24, 128, 3, 1, 1),
        ("l3 256x12 3x3", 1, 256, 12, 256, 3, 1, 1),
        ("l4 512x6 3x3", 1, 512, 6, 512, 3, 1, 1),
        ("l1 64x48 3x3 b8", 8, 64, 48, 64, 3, 1, 1),
        ("l3 256x12 b8", 8, 256, 12, 256, 3, 1, 1),
        ("l4 512x6 b8", 8, 512, 6, 512, 3, 1, 1),
        ("7x7: l1 64x12 b1", 1, 64, 12, 64, 3, 1, 1),
        ("7x7: l1 64x12 b8", 8, 64, 12, 64, 3, 1, 1),
        ("7x7: l2 128x6 b8", 8, 128, 6, 128, 3, 1, 1),
        ("7x7: l3 256x3 b8", 8, 256, 3, 256, 3, 1, 1),
        ("7x7: l4 512x2 b8", 8, 512, 2, 512, 3, 1, 1),
        ("train: l4.0 3x3 s2 b64", 64, 256, 12, 512, 3, 2, 1),
        ("train: l4.0 1x1 s2 b64", 64, 256, 12, 512, 1, 2, 0),
        // The paper's network (full width, 3x3 stride-2 stem) in training: its 3x3 stride-1
        // layers at batch 64 (forward, and as the input gradient).
        ("train: full l1 64x24 b64", 64, 64, 24, 64, 3, 1, 1),
        ("train: full l2 128x12 b64", 64, 128, 12, 128, 3, 1, 1),
        ("train: full l3 256x6 b64", 64, 256, 6, 256, 3, 1, 1),
        ("train: full l4 512x3 b64", 64, 512, 3, 512, 3, 1, 1),
    ];
    // Every layer shape of the shipped model (half width, 3x3 stride-2 stem) at batch 1, 2 (a
    // face and its mirror) and 64 (training).
    let half_layers = [
        ("stem s2", 1, 48, 32, 3, 2, 1),
        ("l1 32x24", 32, 24, 32, 3, 1, 1),
        ("l2.0 s2", 32, 24, 64, 3, 2, 1),
        ("l2.0 1x1 s2", 32, 24, 64, 1, 2, 0),
        ("l2 64x12", 64, 12, 64, 3, 1, 1),
        ("l3.0 s2", 64, 12, 128, 3, 2, 1),
        ("l3.0 1x1 s2", 64, 12, 128, 1, 2, 0),
        ("l3 128x6", 128, 6, 128, 3, 1, 1),
        ("l4.0 s2", 128, 6, 256, 3, 2, 1),
        ("l4.0 1x1 s2", 128, 6, 256, 1, 2, 0),
        ("l4 256x3", 256, 3, 256, 3, 1, 1),
    ];
    let half_cases = [1, 2, 64].into_iter().flat_map(|b| {
        half_layers
            .map(|(n, c, hw, k, kh, s, p)| (format!("half: {n} b{b}"), b, c, hw, k, kh, s, p))
    });
    let cases = cases
        .into_iter()
        .map(|(n, b, c, hw, k, kh, s, p)| (n.to_string(), b, c, hw, k, kh, s, p))
        .chain(half_cases);
    let isa = isa::direct();
    println!("direct kernel: {isa:?}");
    for (name, b, c, hw, k, kh, s, p) in cases {
        if !selected(&name) {
            continue;
        }
        let g = ConvGeom::new(b, c, hw, hw, k, kh, kh, s, p).unwrap();
        let x: Vec<f32> = (0..g.input_len()).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..g.weight_len()).map(|i| (i % 5) as f32 * 0.1).collect();
        let pw = direct::PackedWeights::pack(&w, k, c, kh, kh);
        let pwino = winograd::applicable(&g).then(|| winograd::PackedWinograd::pack(&w, k, c, 2));
        let pwino4 = winograd::applicable(&g).then(|| winograd::PackedWinograd::pack(&w, k, c, 4));
        // bf16 GEMMs (AVX512-BF16, even channel counts; what `"precision": "bf16"` trains with).
        let bf16 = winograd::applicable(&g) && isa::avx512_bf16() && c % 2 == 0;
        let pbf = |m| bf16.then(|| winograd::PackedWinograd::pack(&w, k, c, m).with_bf16());
        let (pbf2, pbf4) = (pbf(2), pbf(4));
        let flops = 2.0 * (g.b * g.k * g.ohw() * g.ckk()) as f64;
        let reps = (4e8 / flops).ceil() as usize;
        let labels = [
            "winograd4",
            "wino4-bf16",
            "winograd",
            "wino-bf16",
            "direct",
            "gemm",
        ];
        for label in labels {
            // Winograd runs on AVX-512 only; the direct kernel on AVX-512 or AVX2.
            if (label.starts_with("win") && (pwino.is_none() || !isa::avx512()))
                || (label.ends_with("bf16") && !bf16)
                || (label == "direct" && isa.is_none())
            {
                continue;
            }
            // Best of 5 rounds: this machine is shared, the minimum is the least disturbed.
            let mut dt = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..reps {
                    let y = match (label, &pwino) {
                        ("winograd4", _) => {
                            winograd::conv_forward(&g, &x, pwino4.as_ref().unwrap(), None, false)
                        }
                        ("winograd", Some(p)) => winograd::conv_forward(&g, &x, p, None, false),
                        ("wino4-bf16", _) => {
                            winograd::conv_forward(&g, &x, pbf4.as_ref().unwrap(), None, false)
                        }
                        ("wino-bf16", _) => {
                            winograd::conv_forward(&g, &x, pbf2.as_ref().unwrap(), None, false)
                        }
                        ("direct", _) => direct::conv_forward(&g, &x, &pw, None, false),
                        _ => reference::conv2d_forward_gemm(&g, &x, &w, None, false),
                    };
                    std::hint::black_box(y);
                }
                dt = dt.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            println!(
                "{name:26} {label:10} {:8.3} ms {:6.1} GFLOP/s",
                dt * 1e3,
                flops / dt / 1e9
            );
        }
    }
    weight_gradients();
}

/// Whether the case named `name` (for the weight gradients: name, space, kernel) runs: all of
/// them, or those containing the first argument.
fn selected(name: &str) -> bool {
    std::env::args().nth(1).is_none_or(|f| name.contains(&f))
}

/// Best of 5 rounds of `reps` calls, in seconds per call: this machine is shared, the minimum is
/// the least disturbed.
fn best_of_5(reps: usize, f: impl Fn()) -> f64 {
    let mut dt = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        dt = dt.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    dt
}

fn weight_gradients() {
    let cases = [
        ("dW l1 64x48 b64", 64, 64, 48, 64),
        ("dW l2 128x24 b64", 64, 128, 24, 128),
        ("dW l3 256x12 b64", 64, 256, 12, 256),
        ("dW l4 512x6 b64", 64, 512, 6, 512),
        ("dW full l1 64x24 b64", 64, 64, 24, 64),
        ("dW full l2 128x12 b64", 64, 128, 12, 128),
        ("dW full l3 256x6 b64", 64, 256, 6, 256),
        ("dW full l4 512x3 b64", 64, 512, 3, 512),
    ];
    for (name, b, c, hw, k) in cases {
        let g = ConvGeom::new(b, c, hw, hw, k, 3, 3, 1, 1).unwrap();
        let x: Vec<f32> = (0..g.input_len()).map(|i| (i % 7) as f32 * 0.1).collect();
        let dy: Vec<f32> = (0..g.output_len()).map(|i| (i % 5) as f32 * 0.1).collect();
        let flops = 2.0 * (g.b * g.k * g.ohw() * g.ckk()) as f64;
        let reps = (2e10 / flops).ceil() as usize;
        for label in ["winograd4", "wino4-bf16", "winograd", "wino-bf16", "gemm"] {
            if !selected(&format!("{name} {label}"))
                || (label.starts_with("win") && !wgrad::applicable(&g))
                || (label.ends_with("bf16") && !isa::avx512_bf16())
            {
                continue;
            }
            let dt = best_of_5(reps, || {
                let dw = match label {
                    "winograd4" => wgrad::conv_backward_weight(&g, &x, &dy, 4, false),
                    "winograd" => wgrad::conv_backward_weight(&g, &x, &dy, 2, false),
                    "wino4-bf16" => wgrad::conv_backward_weight(&g, &x, &dy, 4, true),
                    "wino-bf16" => wgrad::conv_backward_weight(&g, &x, &dy, 2, true),
                    _ => reference::conv2d_backward_weight_gemm(&g, &x, &dy),
                };
                std::hint::black_box(dw);
            });
            println!(
                "{name:26} {label:10} {:8.3} ms {:6.1} GFLOP/s",
                dt * 1e3,
                flops / dt / 1e9
            );
        }
    }
}
