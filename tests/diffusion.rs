//! CARD's reverse process against independent numbers: `tests/fixtures/card_reverse.py` derives
//! one reverse step and a whole few-step chain in the centred variable `y − f` from the DDPM
//! posterior (no fer-cam code), and `card_reverse.json` is its output. fer-cam computes the same
//! in CARD's γ form; both are compared at 1e-6, in f64.

use candle_core::{DType, Device, Result, Tensor};
use fer_cam::model::diffusion::{reverse_chain, reverse_step, Schedule};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/card_reverse.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn vec_of(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn row(v: &[f64]) -> Tensor {
    Tensor::from_vec(v.to_vec(), (1, v.len()), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-6, "{what}[{i}]: {g} against {w}");
    }
}

fn schedule(fx: &Value) -> Schedule {
    let s = &fx["schedule"];
    Schedule::linear(
        s["t"].as_u64().unwrap() as usize,
        s["beta_start"].as_f64().unwrap(),
        s["beta_end"].as_f64().unwrap(),
    )
}

#[test]
fn one_reverse_step_matches_the_posterior() {
    let fx = fixture();
    let st = &fx["step"];
    let s = schedule(&fx);
    let (t, prev) = (
        st["t"].as_u64().unwrap() as usize,
        st["s"].as_u64().unwrap() as usize,
    );
    let coeffs = s.step_coeffs(t, Some(prev));
    let want_var = st["variance"].as_f64().unwrap();
    assert!(
        (coeffs.variance - want_var).abs() <= 1e-6,
        "{}",
        coeffs.variance
    );
    let (y_t, f, eps) = (
        row(&vec_of(&st["y_t"])),
        row(&vec_of(&st["f"])),
        row(&vec_of(&st["eps_hat"])),
    );
    let zero = y_t.zeros_like().unwrap();
    let mean = reverse_step(&y_t, &f, &eps, &zero, &coeffs).unwrap();
    assert_close(&values(&mean), &vec_of(&st["mean"]), "mean");
    let z = row(&vec_of(&st["z"]));
    let y_s = reverse_step(&y_t, &f, &eps, &z, &coeffs).unwrap();
    assert_close(&values(&y_s), &vec_of(&st["y_s"]), "y_s");
}

#[test]
fn a_few_step_chain_with_fixed_noise_matches() -> Result<()> {
    let fx = fixture();
    let ch = &fx["chain"];
    let s = schedule(&fx);
    let f = row(&vec_of(&ch["f"]));
    let n = f.dim(1)?;
    // The fixture's noise draws and stand-in noise network (card_reverse.py: noise, eps_net).
    let mut k = 0usize;
    let noise = || {
        let v: Vec<f64> = (0..n)
            .map(|i| (1.7 * k as f64 + 0.9 * i as f64 + 0.3).sin())
            .collect();
        k += 1;
        Tensor::from_vec(v, (1, n), &Device::Cpu)
    };
    let eps = |y: &Tensor, t: usize| {
        let v: Vec<f64> = values(y)
            .iter()
            .enumerate()
            .map(|(i, v)| 0.5 * v.tanh() + 0.05 * (t + 1) as f64 * (i as f64 - 1.0))
            .collect();
        Tensor::from_vec(v, (1, n), &Device::Cpu)
    };
    let steps = ch["steps"].as_u64().unwrap() as usize;
    let y0 = reverse_chain(&s, &f, steps, noise, eps)?;
    assert_close(&values(&y0), &vec_of(&ch["y0"]), "chain y0");
    Ok(())
}
