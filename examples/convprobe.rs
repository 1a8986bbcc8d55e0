use fer_cam::kernels::cpu::{conv2d_forward, ConvGeom};
use std::time::Instant;
fn main() {
    let b: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(8);
    let shapes = [
        (1, 48, 64, 3, 1, 1),
        (64, 48, 64, 3, 1, 1),
        (64, 48, 128, 3, 2, 1),
        (128, 24, 128, 3, 1, 1),
        (64, 48, 128, 1, 2, 0),
        (128, 24, 256, 3, 2, 1),
        (256, 12, 256, 3, 1, 1),
        (256, 12, 512, 3, 2, 1),
        (512, 6, 512, 3, 1, 1),
    ];
    for (c, h, k, ks, s, p) in shapes {
        let g = ConvGeom::new(b, c, h, h, k, ks, ks, s, p).unwrap();
        let x = vec![0.5f32; g.input_len()];
        let w = vec![0.1f32; g.weight_len()];
        for _ in 0..3 {
            conv2d_forward(&g, &x, &w, None, false);
        }
        let n = 20;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(conv2d_forward(&g, &x, &w, None, false));
        }
        let dt = t.elapsed().as_secs_f64() / n as f64;
        let flops = 2.0 * (g.b * g.k * g.ckk() * g.ohw()) as f64;
        println!(
            "c{c} h{h} k{k} {ks}x{ks}/s{s}: {:.3} ms  {:.0} GFLOP/s",
            dt * 1e3,
            flops / dt / 1e9
        );
    }
}
