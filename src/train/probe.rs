//! A k-nearest-neighbour probe of the encoder's features: how well the features alone separate
//! the classes, with nothing trained on top. The Barlow Twins stage reports it after every epoch
//! (it learns without labels, so its loss says nothing about the classes), which is how long a
//! self-supervised stage keeps paying can be read off one run.
//!
//! The classic weighted vote of instance-discrimination work (Wu et al. 2018): each PublicTest
//! image's `k` most cosine-similar training images vote for their labels with weight
//! `exp(similarity / τ)`.

use candle_core::{Device, Tensor, D};

use super::stages::features;
use crate::config::ModelConfig;
use crate::data::Dataset;
use crate::error::Result;
use crate::model::FerModel;

/// Neighbours that vote.
pub const K: usize = 20;
/// Temperature of the votes' weights.
pub const TAU: f32 = 0.07;
/// PublicTest rows compared at once (a block of `ROWS × references` similarities).
const ROWS: usize = 512;

/// Accuracy on `val` of the `K`-nearest-neighbour vote among `references` training images
/// (evenly spaced over `train`, all of it when it has fewer), on the encoder's L2-normalised
/// features in eval mode. `None` when either set is empty or `references` is 0.
pub fn knn_accuracy(
    model: &FerModel,
    train: &Dataset,
    val: &Dataset,
    references: usize,
    cfg: &ModelConfig,
    dev: &Device,
) -> Result<Option<f64>> {
    let n = references.min(train.len());
    if n == 0 || val.is_empty() {
        return Ok(None);
    }
    let rows: Vec<usize> = (0..n).map(|i| i * train.len() / n).collect();
    let refs = train.select(|i| rows.binary_search(&i).is_ok());
    let unit = |t: Tensor| -> Result<Tensor> {
        let norm = t
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(t.broadcast_div(&norm)?)
    };
    let ref_feats = unit(features(model, &refs, cfg, dev)?)?.t()?.contiguous()?;
    let val_feats = unit(features(model, val, cfg, dev)?)?;
    let classes = train.class_names.len();
    let mut right = 0usize;
    for start in (0..val.len()).step_by(ROWS) {
        let len = ROWS.min(val.len() - start);
        let sims = val_feats.narrow(0, start, len)?.matmul(&ref_feats)?;
        for (i, row) in sims.to_vec2::<f32>()?.iter().enumerate() {
            let pred = vote(row, &refs.labels, classes);
            right += usize::from(pred == val.labels[start + i] as usize);
        }
    }
    Ok(Some(right as f64 / val.len() as f64))
}

/// The class the `K` most similar references vote for (ties: the lower class).
fn vote(sims: &[f32], labels: &[u8], classes: usize) -> usize {
    let mut order: Vec<usize> = (0..sims.len()).collect();
    let k = K.min(order.len());
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, |&a, &b| sims[b].total_cmp(&sims[a]));
    }
    let mut score = vec![0f64; classes];
    for &j in &order[..k] {
        if let Some(s) = score.get_mut(labels[j] as usize) {
            *s += f64::from((sims[j] / TAU).exp());
        }
    }
    (0..classes)
        .max_by(|&a, &b| score[a].total_cmp(&score[b]).then(b.cmp(&a)))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_neighbours_vote_with_their_weights() {
        // Two references of class 1 at 0.9 outweigh one of class 0 at 0.93
        // (2·exp(0.9/τ) > exp(0.93/τ)), but not one at 0.95 (exp(0.05/τ) > 2).
        let labels = [0u8, 1, 1, 2];
        assert_eq!(vote(&[0.93, 0.9, 0.9, -1.0], &labels, 3), 1);
        assert_eq!(vote(&[0.95, 0.9, 0.9, -1.0], &labels, 3), 0);
        // One reference alone decides.
        assert_eq!(vote(&[0.1], &[2], 3), 2);
        // A tie goes to the lower class.
        assert_eq!(vote(&[0.5, 0.5], &[1, 0], 2), 0);
        // Only the K nearest vote: 10 references of class 1 at 0.8 and 20 of class 0 at 0.79;
        // the K = 20 nearest are the ten of class 1 and ten of class 0, so class 1 wins, where
        // all 30 voting would give class 0.
        let mut sims = vec![0.79f32; 30];
        let mut labels = vec![0u8; 30];
        for (s, l) in sims.iter_mut().zip(labels.iter_mut()).take(10) {
            *s = 0.8;
            *l = 1;
        }
        assert_eq!(K, 20);
        assert_eq!(vote(&sims, &labels, 2), 1);
    }
}
