//! What f_φ and CARD learn from, per row: the (smoothed) one-hot label, or the crowd's vote
//! distribution mixed with a single annotator's label (see [`Targets`]).

use super::config::Targets;
use crate::data::Dataset;

/// Label-smoothed one-hot targets `(labels, C)` flat: `eps/C + (1 − eps) · onehot`.
pub fn smoothed_targets(labels: &[u32], c: usize, eps: f64) -> Vec<f32> {
    let mut t = vec![(eps / c as f64) as f32; labels.len() * c];
    for (i, &l) in labels.iter().enumerate() {
        if (l as usize) < c {
            t[i * c + l as usize] += (1.0 - eps) as f32;
        }
    }
    t
}

/// Row `r`'s vote target, unsmoothed: `(1 − w) · votes + w · onehot(single label)`; the row's
/// one-hot label where the data has no votes.
pub fn vote_target(data: &Dataset, r: usize, single_weight: f64) -> Vec<f32> {
    let c = data.class_names.len();
    let Some(votes) = data.soft_row(r) else {
        return smoothed_targets(&[data.labels[r] as u32], c, 0.0);
    };
    // Without a single label the votes take the whole target.
    let Some(&single) = data.single_labels.get(r) else {
        return votes.to_vec();
    };
    let mut t: Vec<f32> = votes
        .iter()
        .map(|&v| ((1.0 - single_weight) * v as f64) as f32)
        .collect();
    if let Some(x) = t.get_mut(single as usize) {
        *x += single_weight as f32;
    }
    t
}

/// f_φ's targets `(rows, C)` flat for a batch of dataset `rows` whose (possibly drawn) labels
/// are `labels`, smoothed by `eps`.
pub fn class_targets(
    kind: Targets,
    data: &Dataset,
    rows: &[usize],
    labels: &[u32],
    eps: f64,
    single_weight: f64,
) -> Vec<f32> {
    let c = data.class_names.len();
    match kind {
        Targets::Label | Targets::Draw => smoothed_targets(labels, c, eps),
        Targets::Votes => rows
            .iter()
            .flat_map(|&r| vote_target(data, r, single_weight))
            .map(|t| ((1.0 - eps) * t as f64 + eps / c as f64) as f32)
            .collect(),
    }
}

/// A label drawn from row `r`'s vote distribution with the uniform number `u` in [0, 1); the
/// row's label where the data has no votes.
pub fn draw_label(data: &Dataset, r: usize, u: f32) -> u32 {
    let Some(votes) = data.soft_row(r) else {
        return data.labels[r] as u32;
    };
    let mut acc = 0.0;
    for (c, &p) in votes.iter().enumerate() {
        acc += p;
        if u < acc && p > 0.0 {
            return c as u32;
        }
    }
    // Rounding left u above the last cumulative sum: the last class with votes.
    votes.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::FACE_PIXELS;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    fn voted() -> Dataset {
        // Two rows, three classes: votes [0.6, 0.4, 0] and [0, 0, 1]; single labels 1 and 2.
        Dataset {
            class_names: vec!["a".into(), "b".into(), "c".into()],
            split_names: vec!["Training".into()],
            pixels: vec![0; 2 * FACE_PIXELS],
            labels: vec![0, 2],
            splits: vec![0, 0],
            soft: vec![0.6, 0.4, 0.0, 0.0, 0.0, 1.0],
            single_labels: vec![1, 2],
            strict_majority: Vec::new(),
            seen_in_training: Vec::new(),
        }
    }

    #[test]
    fn vote_targets_mix_the_crowd_with_the_single_label_then_smooth() {
        let d = voted();
        // w = 0.25: 0.75·[0.6, 0.4, 0] + 0.25·[0, 1, 0] = [0.45, 0.55, 0].
        assert!(close(&vote_target(&d, 0, 0.25), &[0.45, 0.55, 0.0]));
        // Smoothing 0.3 over three classes: 0.7·t + 0.1.
        let t = class_targets(Targets::Votes, &d, &[0, 1], &[0, 2], 0.3, 0.25);
        assert!(close(&t, &[0.415, 0.485, 0.1, 0.1, 0.1, 0.8]), "{t:?}");
        // Label and draw targets are the smoothed one-hot of the labels given.
        let t = class_targets(Targets::Draw, &d, &[0], &[1], 0.3, 0.25);
        assert!(close(&t, &[0.1, 0.8, 0.1]));
        assert!(close(&smoothed_targets(&[5], 2, 0.2), &[0.1, 0.1]));
    }

    #[test]
    fn drawn_labels_follow_the_votes() {
        let d = voted();
        assert_eq!(draw_label(&d, 0, 0.0), 0);
        assert_eq!(draw_label(&d, 0, 0.59), 0);
        assert_eq!(draw_label(&d, 0, 0.61), 1);
        assert_eq!(draw_label(&d, 0, 0.999_999_9), 1);
        assert_eq!(draw_label(&d, 1, 0.1), 2);
        let plain = Dataset {
            soft: Vec::new(),
            ..voted()
        };
        assert_eq!(draw_label(&plain, 1, 0.1), 2);
        assert!(close(&vote_target(&plain, 0, 0.5), &[1.0, 0.0, 0.0]));
    }
}
