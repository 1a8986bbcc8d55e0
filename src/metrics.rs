//! Classification and uncertainty metrics.
//!
//! PAvPU follows CARD's protocol (Han et al. 2022, §4.2 and their evaluation code's description):
//! for each image take the two classes with the most votes among the samples, run a paired
//! two-sided t-test between their per-sample probabilities; `p < α` means *certain*, and a NaN
//! p-value (e.g. every difference identical, or a single sample) means *uncertain*.
//! `PAvPU = (accurate ∧ certain + inaccurate ∧ uncertain) / N`. The paper's simpler variant, where
//! a prediction is certain when its confidence reaches a threshold, is [`pavpu_threshold`].

use serde::Serialize;
use statrs::distribution::{ContinuousCDF, StudentsT};

/// Two-sided p-value of the paired t-test between `a` and `b` (same length).
///
/// Returns NaN when the test is undefined: fewer than two pairs, or zero variance of the
/// differences with zero mean. Zero variance with a non-zero mean gives p = 0 (t = ±∞).
pub fn paired_t_test(a: &[f64], b: &[f64]) -> f64 {
    t_test_p_value(paired_t_statistic(a, b), a.len().min(b.len()))
}

/// The paired t statistic `mean(d) / (sd(d)/√n)` of `d = a − b`: NaN when undefined (a
/// non-finite value, fewer than two pairs, or no spread and a zero mean), ±∞ when the
/// differences have no spread but a non-zero mean.
pub fn paired_t_statistic(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if a[..n].iter().chain(&b[..n]).any(|v| !v.is_finite()) || n < 2 {
        return f64::NAN;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mean = d.iter().sum::<f64>() / n as f64;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let se = (var / n as f64).sqrt();
    if se == 0.0 {
        return if mean == 0.0 {
            f64::NAN
        } else {
            f64::INFINITY.copysign(mean)
        };
    }
    mean / se
}

/// Two-sided p-value of a t statistic from `n` pairs (`n − 1` degrees of freedom): NaN for a
/// NaN statistic or fewer than two pairs, 0 for ±∞.
pub fn t_test_p_value(t: f64, n: usize) -> f64 {
    if t.is_nan() || n < 2 {
        return f64::NAN;
    }
    if t.is_infinite() {
        return 0.0;
    }
    match StudentsT::new(0.0, 1.0, (n - 1) as f64) {
        Ok(dist) => 2.0 * (1.0 - dist.cdf(t.abs())),
        Err(_) => f64::NAN,
    }
}

/// The two classes with the most votes (ties broken by lower class index). With one class the
/// second is the same class.
pub fn top_two_by_votes(votes: &[usize]) -> (usize, usize) {
    let mut order: Vec<usize> = (0..votes.len()).collect();
    order.sort_by(|&i, &j| votes[j].cmp(&votes[i]).then(i.cmp(&j)));
    let first = order.first().copied().unwrap_or(0);
    (first, order.get(1).copied().unwrap_or(first))
}

/// What the samples of one image say, summarised (CARD §3.3 / DESIGN §3).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampleSummary {
    /// Mean over samples of the per-sample class probabilities.
    pub probs: Vec<f32>,
    /// Majority-vote class.
    pub label: usize,
    /// Share of samples whose argmax is each class.
    pub votes: Vec<f32>,
    /// Paired t-test p-value between the two most-voted classes (NaN when undefined).
    pub p_value: f64,
    /// `p_value < alpha` (NaN is uncertain).
    pub certain: bool,
    /// Entropy of `probs` in nats.
    pub entropy: f32,
}

/// [`summarize_samples`] for each of several faces: `probs` is `(faces, samples, classes)`
/// row-major.
pub fn summarize_faces(
    probs: &[f32],
    samples: usize,
    classes: usize,
    alpha: f64,
) -> Vec<SampleSummary> {
    probs
        .chunks_exact((samples * classes).max(1))
        .map(|face| summarize_samples(face, classes, alpha))
        .collect()
}

/// Summarises `samples × classes` per-sample probabilities (row-major).
pub fn summarize_samples(probs: &[f32], classes: usize, alpha: f64) -> SampleSummary {
    sample_stats(probs, classes).summary(alpha)
}

/// What [`SampleSummary`] is computed from: the sums over one face's samples. The GPU sampler's
/// summary kernel (`src/cuda/kernels.cu`, `card_summary`) is this function's twin.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleStats {
    /// Number of samples.
    pub samples: usize,
    /// Mean over samples of the per-sample class probabilities.
    pub mean: Vec<f32>,
    /// Samples whose argmax is each class.
    pub counts: Vec<usize>,
    /// The two most-voted classes ([`top_two_by_votes`]).
    pub top: (usize, usize),
    /// [`paired_t_statistic`] between their per-sample probabilities (NaN when both are one
    /// class).
    pub t: f64,
}

/// [`SampleStats`] of `samples × classes` per-sample probabilities (row-major).
pub fn sample_stats(probs: &[f32], classes: usize) -> SampleStats {
    let samples = probs.len() / classes.max(1);
    let mut mean = vec![0f32; classes];
    let mut counts = vec![0usize; classes];
    for row in probs.chunks_exact(classes) {
        for (m, p) in mean.iter_mut().zip(row) {
            *m += p;
        }
        counts[argmax(row)] += 1;
    }
    for m in &mut mean {
        *m /= samples.max(1) as f32;
    }
    let (a, b) = top_two_by_votes(&counts);
    let col = |k: usize| -> Vec<f64> { probs.chunks_exact(classes).map(|r| r[k] as f64).collect() };
    let t = if a == b {
        f64::NAN
    } else {
        paired_t_statistic(&col(a), &col(b))
    };
    SampleStats {
        samples,
        mean,
        counts,
        top: (a, b),
        t,
    }
}

impl SampleStats {
    /// The summary: votes as shares, the t-test's p-value and `certain = p < alpha`.
    pub fn summary(self, alpha: f64) -> SampleSummary {
        let p_value = t_test_p_value(self.t, self.samples);
        SampleSummary {
            label: self.top.0,
            votes: self
                .counts
                .iter()
                .map(|&c| c as f32 / self.samples.max(1) as f32)
                .collect(),
            certain: p_value < alpha,
            p_value,
            entropy: entropy(&self.mean),
            probs: self.mean,
        }
    }
}

impl SampleSummary {
    /// The summary with its mean probabilities tempered by `t` ([`temper`]) and their entropy
    /// recomputed; votes, label and t-test are unchanged.
    pub fn tempered(mut self, t: f64) -> Self {
        self.probs = temper(&self.probs, t);
        self.entropy = entropy(&self.probs);
        self
    }
}

/// `p^(1/t)`, renormalised: temperature scaling of a probability vector (t > 1 flattens it,
/// t < 1 sharpens it; the order of the classes never changes). `t = 1` returns `p` as it is.
pub fn temper(p: &[f32], t: f64) -> Vec<f32> {
    if t == 1.0 || p.is_empty() {
        return p.to_vec();
    }
    let logs: Vec<f64> = p
        .iter()
        .map(|&x| {
            if x > 0.0 {
                (x as f64).ln() / t
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return p.to_vec();
    }
    let z: f64 = logs.iter().map(|l| (l - max).exp()).sum();
    logs.iter().map(|l| ((l - max).exp() / z) as f32).collect()
}

/// Index of the largest value (first on ties; 0 for an empty slice).
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Shannon entropy in nats.
pub fn entropy(p: &[f32]) -> f32 {
    -p.iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| x * x.ln())
        .sum::<f32>()
}

/// Fraction of `pred == label`.
pub fn accuracy(pred: &[usize], labels: &[usize]) -> f64 {
    // A shorter list would silently score only its prefix.
    assert_eq!(
        pred.len(),
        labels.len(),
        "accuracy: predictions and labels differ in length"
    );
    if labels.is_empty() {
        return f64::NAN;
    }
    let hits = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
    hits as f64 / labels.len() as f64
}

/// `m[true][pred]` counts.
pub fn confusion_matrix(pred: &[usize], labels: &[usize], classes: usize) -> Vec<Vec<usize>> {
    assert_eq!(pred.len(), labels.len(), "confusion matrix: lengths differ");
    let mut m = vec![vec![0usize; classes]; classes];
    for (&p, &l) in pred.iter().zip(labels) {
        if p < classes && l < classes {
            m[l][p] += 1;
        }
    }
    m
}

/// Recall of each class from a confusion matrix (NaN for a class with no examples).
pub fn per_class_recall(confusion: &[Vec<usize>]) -> Vec<f64> {
    confusion
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let total: usize = row.iter().sum();
            if total == 0 {
                f64::NAN
            } else {
                row.get(i).copied().unwrap_or(0) as f64 / total as f64
            }
        })
        .collect()
}

/// PAvPU from per-image accuracy and certainty flags.
pub fn pavpu(accurate: &[bool], certain: &[bool]) -> f64 {
    assert_eq!(accurate.len(), certain.len(), "PAvPU: lengths differ");
    if accurate.is_empty() {
        return f64::NAN;
    }
    let good = accurate
        .iter()
        .zip(certain)
        .filter(|(a, c)| **a == **c)
        .count();
    good as f64 / accurate.len() as f64
}

/// CARD's PAvPU: certain ⇔ the t-test p-value is below `alpha` (NaN ⇒ uncertain).
pub fn pavpu_ttest(accurate: &[bool], p_values: &[f64], alpha: f64) -> f64 {
    let certain: Vec<bool> = p_values.iter().map(|&p| p < alpha).collect();
    pavpu(accurate, &certain)
}

/// The paper's threshold variant: certain ⇔ confidence ≥ `threshold`.
pub fn pavpu_threshold(accurate: &[bool], confidence: &[f32], threshold: f32) -> f64 {
    let certain: Vec<bool> = confidence.iter().map(|&c| c >= threshold).collect();
    pavpu(accurate, &certain)
}

/// One bin of a reliability diagram: the images whose top-class confidence lies in `[lo, hi)`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReliabilityBin {
    pub lo: f64,
    pub hi: f64,
    pub count: usize,
    /// Mean top-class confidence of the bin's images (NaN when empty).
    pub confidence: f64,
    /// Share of the bin's images whose top class is right (NaN when empty).
    pub accuracy: f64,
}

/// Top-class confidence against accuracy over `bins` equal-width bins (the last bin includes 1).
pub fn reliability(probs: &[Vec<f32>], labels: &[usize], bins: usize) -> Vec<ReliabilityBin> {
    reliability_by(probs, bins, |i, k| (labels.get(i) == Some(&k)) as u8 as f64)
}

/// [`reliability`] where image `i`'s top class `k` is right to the degree `hit(i, k)` in [0, 1].
fn reliability_by(
    probs: &[Vec<f32>],
    bins: usize,
    hit: impl Fn(usize, usize) -> f64,
) -> Vec<ReliabilityBin> {
    let mut count = vec![0usize; bins];
    let mut conf_sum = vec![0f64; bins];
    let mut acc_sum = vec![0f64; bins];
    for (i, p) in probs.iter().enumerate() {
        let k = argmax(p);
        let c = p.get(k).copied().unwrap_or(0.0) as f64;
        let bin = ((c * bins as f64) as usize).min(bins - 1);
        count[bin] += 1;
        conf_sum[bin] += c;
        acc_sum[bin] += hit(i, k);
    }
    (0..bins)
        .map(|b| {
            let n = count[b] as f64;
            ReliabilityBin {
                lo: b as f64 / bins as f64,
                hi: (b + 1) as f64 / bins as f64,
                count: count[b],
                confidence: conf_sum[b] / n,
                accuracy: acc_sum[b] / n,
            }
        })
        .collect()
}

/// Expected calibration error of the top-class confidence over `bins` equal-width bins.
pub fn ece(probs: &[Vec<f32>], labels: &[usize], bins: usize) -> f64 {
    if labels.is_empty() || bins == 0 {
        return f64::NAN;
    }
    let n = labels.len() as f64;
    reliability(probs, labels, bins)
        .iter()
        .filter(|b| b.count > 0)
        .map(|b| b.count as f64 * (b.accuracy - b.confidence).abs() / n)
        .sum()
}

/// ECE against label distributions (a crowd's votes): per confidence bin, the mean top-class
/// confidence against the mean share of the votes that the top class got.
pub fn soft_ece(probs: &[Vec<f32>], targets: &[Vec<f32>], bins: usize) -> f64 {
    assert_eq!(probs.len(), targets.len(), "one target row per image");
    if targets.is_empty() || bins == 0 {
        return f64::NAN;
    }
    let n = targets.len() as f64;
    reliability_by(probs, bins, |i, k| {
        targets[i].get(k).copied().unwrap_or(0.0) as f64
    })
    .iter()
    .filter(|b| b.count > 0)
    .map(|b| b.count as f64 * (b.accuracy - b.confidence).abs() / n)
    .sum()
}

/// Mean cross-entropy `−Σ_c q_c · ln p_c` against label distributions q (p clamped at 1e-12).
pub fn soft_nll(probs: &[Vec<f32>], targets: &[Vec<f32>]) -> f64 {
    assert_eq!(probs.len(), targets.len(), "one target row per image");
    if targets.is_empty() {
        return f64::NAN;
    }
    let total: f64 = probs
        .iter()
        .zip(targets)
        .map(|(p, q)| {
            q.iter()
                .enumerate()
                .filter(|(_, &qc)| qc > 0.0)
                .map(|(c, &qc)| {
                    -(qc as f64) * (p.get(c).copied().unwrap_or(0.0) as f64).max(1e-12).ln()
                })
                .sum::<f64>()
        })
        .sum();
    total / targets.len() as f64
}

/// Mean negative log-likelihood of the true class (probabilities clamped at 1e-12).
pub fn nll(probs: &[Vec<f32>], labels: &[usize]) -> f64 {
    if labels.is_empty() {
        return f64::NAN;
    }
    let total: f64 = probs
        .iter()
        .zip(labels)
        .map(|(p, &l)| -(p.get(l).copied().unwrap_or(0.0) as f64).max(1e-12).ln())
        .sum();
    total / labels.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_test_matches_reference_value() {
        // d = [1, 2, 3, 4]: mean 2.5, sd 1.2910, t = 3.873, df 3 → p = 0.030466 (scipy ttest_rel).
        let a = [2.0, 4.0, 6.0, 8.0];
        let b = [1.0, 2.0, 3.0, 4.0];
        let p = paired_t_test(&a, &b);
        assert!((p - 0.030466).abs() < 1e-5, "{p}");
        // Symmetric in its arguments.
        assert!((paired_t_test(&b, &a) - p).abs() < 1e-12);
    }

    #[test]
    fn t_test_degenerate_cases() {
        assert!(paired_t_test(&[1.0], &[0.0]).is_nan());
        assert!(paired_t_test(&[0.5, 0.5], &[0.5, 0.5]).is_nan());
        assert_eq!(paired_t_test(&[0.9, 0.9, 0.9], &[0.1, 0.1, 0.1]), 0.0);
        // Non-finite samples (a broken model) give an undefined test, not a panic in statrs.
        assert!(paired_t_test(&[f64::NAN, 0.2, 0.3], &[0.1, 0.1, 0.2]).is_nan());
        assert!(paired_t_test(&[f64::INFINITY, 0.2], &[0.1, 0.1]).is_nan());
        let s = summarize_samples(&[f32::NAN, 0.5, 0.3, 0.7, 0.2, 0.8], 2, 0.05);
        assert!(!s.certain);
    }

    #[test]
    fn summary_when_all_samples_vote_for_one_class() {
        // 4 samples, 3 classes, class 1 always wins with varying margins.
        let probs = [
            0.1, 0.8, 0.1, //
            0.2, 0.7, 0.1, //
            0.1, 0.85, 0.05, //
            0.15, 0.75, 0.1,
        ];
        let s = summarize_samples(&probs, 3, 0.05);
        assert_eq!(s.label, 1);
        assert_eq!(s.votes, vec![0.0, 1.0, 0.0]);
        // Runner-up by votes is a tie at 0; the lower index (0) is taken.
        // d = [0.7, 0.5, 0.75, 0.6]: t = 11.50 on 3 df, p = 0.00141.
        assert!(
            (s.p_value - 0.00141).abs() < 1e-4 && s.certain,
            "{}",
            s.p_value
        );
        assert!((s.probs[1] - 0.775).abs() < 1e-6);
        assert!(s.entropy > 0.0);
    }

    #[test]
    fn summary_nan_p_value_is_uncertain() {
        let s = summarize_samples(&[0.2, 0.8], 2, 0.05);
        assert!(s.p_value.is_nan());
        assert!(!s.certain);
        assert_eq!(s.label, 1);
    }

    #[test]
    fn temper_known_values() {
        // [0.2, 0.8] at t = 0.5 → [0.04, 0.64] / 0.68.
        let p = temper(&[0.2, 0.8], 0.5);
        assert!((p[0] - 0.04 / 0.68).abs() < 1e-6 && (p[1] - 0.64 / 0.68).abs() < 1e-6);
        // t = 2 flattens: √0.2, √0.8 normalised; zeros stay zero; t = 1 is the identity.
        let p = temper(&[0.2, 0.8, 0.0], 2.0);
        let z = 0.2f64.sqrt() + 0.8f64.sqrt();
        assert!((p[0] as f64 - 0.2f64.sqrt() / z).abs() < 1e-6 && p[2] == 0.0);
        assert_eq!(temper(&[0.3, 0.7], 1.0), vec![0.3, 0.7]);
        // A tempered summary keeps its votes and label, and its entropy follows the new probs.
        let s = summarize_samples(&[0.1, 0.9, 0.3, 0.7], 2, 0.05);
        let t = s.clone().tempered(3.0);
        assert_eq!((t.label, &t.votes), (s.label, &s.votes));
        assert!(t.probs[1] < s.probs[1] && t.entropy > s.entropy);
    }

    #[test]
    fn split_votes_are_uncertain() {
        let probs = [0.6, 0.4, 0.4, 0.6, 0.55, 0.45, 0.45, 0.55];
        let s = summarize_samples(&probs, 2, 0.05);
        assert_eq!(s.votes, vec![0.5, 0.5]);
        assert!(!s.certain);
        assert_eq!(s.label, 0);
    }

    #[test]
    fn pavpu_counts_the_right_cells() {
        let accurate = [true, true, false, false];
        let p = [0.01, 0.5, 0.01, f64::NAN];
        // certain: T F T F → (acc∧cert)=1, (inacc∧uncert)=1 → 2/4.
        assert_eq!(pavpu_ttest(&accurate, &p, 0.05), 0.5);
        assert_eq!(pavpu_threshold(&accurate, &[0.9, 0.4, 0.3, 0.2], 0.5), 0.75);
    }

    #[test]
    #[should_panic(expected = "differ in length")]
    fn accuracy_of_unequal_lists_is_a_bug_not_a_prefix_score() {
        accuracy(&[1, 2], &[1, 2, 3]);
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn pavpu_of_unequal_lists_is_a_bug_not_a_prefix_score() {
        pavpu(&[true], &[true, false]);
    }

    #[test]
    fn accuracy_confusion_recall() {
        let pred = [0, 1, 1, 2, 2, 2];
        let lab = [0, 1, 2, 2, 2, 0];
        assert!((accuracy(&pred, &lab) - 4.0 / 6.0).abs() < 1e-12);
        let m = confusion_matrix(&pred, &lab, 3);
        assert_eq!(m, vec![vec![1, 0, 1], vec![0, 1, 0], vec![0, 1, 2]]);
        let r = per_class_recall(&m);
        assert_eq!(r[0], 0.5);
        assert_eq!(r[1], 1.0);
        assert!((r[2] - 2.0 / 3.0).abs() < 1e-12);
        assert!(per_class_recall(&[vec![0, 0], vec![0, 1]])[0].is_nan());
    }

    #[test]
    fn soft_ece_and_nll_hand_values() {
        // Two images, two classes. Image 0: p = [0.8, 0.2], votes [0.6, 0.4]; image 1:
        // p = [0.3, 0.7], votes [0, 1]. Two bins: 0.8 and 0.7 both land in [0.5, 1].
        let p = vec![vec![0.8, 0.2], vec![0.3, 0.7]];
        let q = vec![vec![0.6, 0.4], vec![0.0, 1.0]];
        // Bin confidence (0.8 + 0.7)/2 = 0.75, bin "accuracy" (0.6 + 1.0)/2 = 0.8.
        assert!((soft_ece(&p, &q, 2) - 0.05).abs() < 1e-6);
        // −(0.6 ln 0.8 + 0.4 ln 0.2) and −ln 0.7, averaged.
        let want = (-(0.6 * 0.8f64.ln() + 0.4 * 0.2f64.ln()) - 0.7f64.ln()) / 2.0;
        assert!((soft_nll(&p, &q) - want).abs() < 1e-6);
        // One-hot votes give the hard-label numbers.
        let hard = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        assert!((soft_nll(&p, &hard) - nll(&p, &[0, 1])).abs() < 1e-9);
        assert!((soft_ece(&p, &hard, 15) - ece(&p, &[0, 1], 15)).abs() < 1e-9);
    }

    #[test]
    fn ece_and_nll_hand_values() {
        // Two predictions at confidence 0.8 in one bin, one right: |0.5 − 0.8| = 0.3.
        let probs = vec![vec![0.8, 0.2], vec![0.8, 0.2]];
        let labels = [0, 1];
        assert!((ece(&probs, &labels, 10) - 0.3).abs() < 1e-6);
        let expected = (-(0.8f64.ln()) - (0.2f64.ln())) / 2.0;
        assert!((nll(&probs, &labels) - expected).abs() < 1e-6);
        // Perfectly calibrated one-hot predictions.
        assert!(ece(&[vec![1.0, 0.0]], &[0], 10).abs() < 1e-12);
    }
}
