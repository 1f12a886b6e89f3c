//! How well scores separate held-out labels: the numbers of `metrics.json`.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Confusion {
    pub true_positive: u64,
    pub false_positive: u64,
    pub true_negative: u64,
    pub false_negative: u64,
}

impl Confusion {
    pub fn at(scores: &[f32], labels: &[bool], threshold: f32) -> Confusion {
        let mut c = Confusion::default();
        for (&s, &y) in scores.iter().zip(labels) {
            match (s >= threshold, y) {
                (true, true) => c.true_positive += 1,
                (true, false) => c.false_positive += 1,
                (false, false) => c.true_negative += 1,
                (false, true) => c.false_negative += 1,
            }
        }
        c
    }

    /// Of the files kept, the share that are positive (1 when nothing is kept).
    pub fn precision(&self) -> f64 {
        let kept = self.true_positive + self.false_positive;
        if kept == 0 {
            1.0
        } else {
            self.true_positive as f64 / kept as f64
        }
    }

    /// Of the positive files, the share kept.
    pub fn recall(&self) -> f64 {
        let pos = self.true_positive + self.false_negative;
        if pos == 0 {
            0.0
        } else {
            self.true_positive as f64 / pos as f64
        }
    }

    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }

    fn total(&self) -> u64 {
        self.true_positive + self.false_positive + self.true_negative + self.false_negative
    }

    pub fn kept_share(&self) -> f64 {
        (self.true_positive + self.false_positive) as f64 / self.total().max(1) as f64
    }

    pub fn accuracy(&self) -> f64 {
        (self.true_positive + self.true_negative) as f64 / self.total().max(1) as f64
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepRow {
    pub threshold: f32,
    pub kept_share: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metrics {
    pub samples: usize,
    pub positives: usize,
    pub threshold: f32,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub accuracy: f64,
    pub roc_auc: f64,
    pub confusion: Confusion,
    /// The threshold (of the sweep) with the highest F1.
    pub best_f1_threshold: f32,
    pub best_f1: f64,
    pub sweep: Vec<SweepRow>,
}

impl Metrics {
    pub fn new(scores: &[f32], labels: &[bool], threshold: f32) -> Metrics {
        let c = Confusion::at(scores, labels, threshold);
        let sweep: Vec<SweepRow> = (1..20)
            .map(|k| {
                let t = k as f32 / 20.0;
                let c = Confusion::at(scores, labels, t);
                SweepRow {
                    threshold: t,
                    kept_share: c.kept_share(),
                    precision: c.precision(),
                    recall: c.recall(),
                    f1: c.f1(),
                }
            })
            .collect();
        let best = sweep
            .iter()
            .fold(None::<&SweepRow>, |b, r| match b {
                Some(b) if b.f1 >= r.f1 => Some(b),
                _ => Some(r),
            })
            .expect("the sweep has rows");
        Metrics {
            samples: labels.len(),
            positives: labels.iter().filter(|&&y| y).count(),
            threshold,
            precision: c.precision(),
            recall: c.recall(),
            f1: c.f1(),
            accuracy: c.accuracy(),
            roc_auc: roc_auc(scores, labels),
            best_f1_threshold: best.threshold,
            best_f1: best.f1,
            confusion: c,
            sweep,
        }
    }
}

/// Area under the ROC curve: the probability that a random positive scores above a random
/// negative, ties counting half (the Mann–Whitney U statistic over both class sizes).
pub fn roc_auc(scores: &[f32], labels: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut i) = (0.0, 0);
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += mean_rank * order[i..=j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&y| y).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// scikit-learn's `roc_auc_score` documentation example: y = [0, 0, 1, 1],
    /// scores = [0.1, 0.4, 0.35, 0.8] → 0.75; and with every score tied, 0.5.
    #[test]
    fn roc_auc_matches_the_scikit_learn_example() {
        let y = [false, false, true, true];
        assert_eq!(roc_auc(&[0.1, 0.4, 0.35, 0.8], &y), 0.75);
        assert_eq!(roc_auc(&[0.5; 4], &y), 0.5);
    }

    /// At 0.5: kept 0.8 (TP), 0.6 (FP); missed 0.3 (FN); 0.1 TN → P 1/2, R 1/2, F1 1/2.
    #[test]
    fn confusion_counts_by_hand() {
        let scores = [0.8, 0.6, 0.3, 0.1];
        let y = [true, false, true, false];
        let m = Metrics::new(&scores, &y, 0.5);
        assert_eq!(
            m.confusion,
            Confusion {
                true_positive: 1,
                false_positive: 1,
                true_negative: 1,
                false_negative: 1
            }
        );
        assert_eq!((m.precision, m.recall, m.f1), (0.5, 0.5, 0.5));
        // From 0.15 to 0.3 both positives are kept with one false positive: P 2/3, R 1, F1 0.8,
        // the best; the lowest such threshold is reported.
        assert!((m.best_f1 - 0.8).abs() < 1e-12);
        assert_eq!(m.best_f1_threshold, 0.15);
        assert_eq!(m.sweep.len(), 19);
    }
}
