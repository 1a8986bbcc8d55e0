//! AdamW (Loshchilov & Hutter, 2019) with decoupled weight decay, and a linear warm-up + cosine
//! learning-rate schedule. Its moments are saved with each checkpoint so a resumed run continues
//! exactly.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

/// AdamW over named variables.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    /// Optimises `vars` (name, variable). Weight decay skips 1-D tensors (biases, norms).
    pub fn new(vars: Vec<(String, Var)>, weight_decay: f64) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            vars,
            m,
            v,
            step: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    /// Updates done so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One update with learning rate `lr`. Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: a gradient built by candle's own backward ops (the path on GPUs and
            // with the reference kernels) can carry its graph, and the moments below keep it
            // from step to step, holding every step's activations (300+ MB a step at batch 32).
            let g = g.detach();
            let g = &g;
            let m = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.eps)?)?;
            let mut w = var.as_tensor().detach();
            if self.weight_decay > 0.0 && var.rank() > 1 {
                w = (&w * (1.0 - lr * self.weight_decay))?;
            }
            var.set(&(w - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Saves the moments (`m.NAME`, `v.NAME`) to a safetensors file; the step count goes in the
    /// checkpoint's state.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            map.insert(format!("m.{name}"), self.m[i].clone());
            map.insert(format!("v.{name}"), self.v[i].clone());
        }
        candle_core::safetensors::save(&map, path).map_err(|e| Error::model(path, e.to_string()))
    }

    /// Restores moments saved by [`AdamW::save`] and the step count.
    pub fn load(&mut self, path: &Path, step: usize) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let dev = self
            .vars
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let map = candle_core::safetensors::load_buffer(&bytes, &dev)
            .map_err(|e| Error::model(path, format!("corrupt optimizer state: {e}")))?;
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (moment, store) in [("m", &mut self.m), ("v", &mut self.v)] {
                let t = map.get(&format!("{moment}.{name}")).ok_or_else(|| {
                    Error::model(path, format!("optimizer state lacks {moment}.{name}"))
                })?;
                if t.dims() != var.dims() {
                    return Err(Error::model(
                        path,
                        format!("optimizer state {moment}.{name} has the wrong shape"),
                    ));
                }
                store[i] = t.clone();
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warm-up over `warmup` steps, then cosine decay to `min_ratio·base` at `total` steps.
pub fn warmup_cosine(step: usize, total: usize, warmup: usize, base: f64, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup.min(step)) as f64 / span as f64).min(1.0);
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    base * (min_ratio + (1.0 - min_ratio) * cos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_shape() {
        assert!((warmup_cosine(0, 100, 10, 1.0, 0.0) - 0.1).abs() < 1e-12);
        assert!((warmup_cosine(9, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((warmup_cosine(10, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((warmup_cosine(55, 100, 10, 1.0, 0.0) - 0.5).abs() < 1e-12);
        // The end of the schedule is exactly the floor (min_ratio × base), never below it.
        assert!((warmup_cosine(100, 100, 10, 1.0, 0.01) - 0.01).abs() < 1e-12);
        assert!((warmup_cosine(500, 100, 10, 2.0, 0.01) - 0.02).abs() < 1e-12);
        assert!((0..200).all(|s| warmup_cosine(s, 100, 10, 1.0, 0.01) >= 0.01 - 1e-12));
    }

    #[test]
    fn adamw_minimises_a_quadratic() -> Result<()> {
        let w = Var::new(&[3.0f32, -2.0], &Device::Cpu)?;
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], 0.0)?;
        for _ in 0..300 {
            let loss = w.as_tensor().sqr()?.sum_all()?;
            opt.step(&loss.backward()?, 0.05)?;
        }
        let v = w.as_tensor().to_vec1::<f32>()?;
        assert!(v.iter().all(|x| x.abs() < 0.05), "{v:?}");
        // The first step of Adam moves each weight by about lr, whatever the gradient scale.
        let w = Var::new(&[1000.0f32], &Device::Cpu)?;
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], 0.0)?;
        opt.step(&(w.as_tensor() * 1e6)?.sum_all()?.backward()?, 0.1)?;
        assert!((w.as_tensor().to_vec1::<f32>()?[0] - 999.9).abs() < 1e-3);
        Ok(())
    }

    /// The moments hold values, not graphs: a gradient that carries the ops it was computed
    /// with must not keep them (and the activations they hold) alive from step to step.
    #[test]
    fn moments_do_not_keep_the_gradient_graph() -> Result<()> {
        let w = Var::new(&[0.5f32, -1.0, 2.0], &Device::Cpu)?;
        let x = Var::new(&[1.0f32, 2.0, 3.0], &Device::Cpu)?;
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], 0.0)?;
        for _ in 0..3 {
            // d/dw of Σ (w·x)² is 2·w·x²: built from both variables, so it tracks them.
            let loss = (w.as_tensor() * x.as_tensor())?.sqr()?.sum_all()?;
            let grads = loss.backward()?;
            opt.step(&grads, 0.01)?;
        }
        assert!(opt.m.iter().chain(&opt.v).all(|t| !t.track_op()));
        Ok(())
    }
}
