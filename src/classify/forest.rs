//! A random forest for a binary label (Breiman 2001, as scikit-learn's `RandomForestClassifier`):
//! bootstrap samples, a random subset of `max_features` features tried at each split, Gini
//! impurity, leaves that hold the weighted share of positives, and a score that is the mean of the
//! leaves a sample reaches.
//!
//! Two engines grow the trees. `hist` (the default) bins every feature once into at most 255
//! quantile bins and finds splits from per-node histograms, as LightGBM and scikit-learn's
//! `HistGradientBoosting` do: O(samples × max_features) per tree level instead of a sort, and
//! trees grown in parallel. `linfa` grows each tree with linfa-trees' exact CART (every feature at
//! every split; its leaves predict a class, so its scores are vote shares) on a per-tree random
//! feature subspace; it is slower and kept as the reference implementation. Both produce the same
//! flat [`Tree`]s, so scoring and the model file do not depend on the engine.

use rand::seq::index::sample as sample_indices;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How the trees are grown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    Hist,
    Linfa,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct ForestParams {
    pub trees: usize,
    /// Deepest level a tree grows to (`None`: until leaves are pure or too small).
    pub max_depth: Option<usize>,
    /// Fewest distinct samples in a leaf.
    pub min_samples_leaf: usize,
    /// Features tried at each split (hist) or in each tree's subspace (linfa); 0 means √features.
    pub max_features: usize,
    /// Weight classes inversely to their frequency (scikit-learn's `class_weight="balanced"`).
    pub balanced: bool,
    /// Grow each tree on a bootstrap sample (else on every sample).
    pub bootstrap: bool,
    pub seed: u64,
    pub engine: Engine,
}

impl Default for ForestParams {
    fn default() -> Self {
        ForestParams {
            trees: 100,
            max_depth: None,
            min_samples_leaf: 1,
            max_features: 0,
            balanced: true,
            bootstrap: true,
            seed: 0,
            engine: Engine::Hist,
        }
    }
}

/// One tree as flat arrays; node 0 is the root. An inner node sends `x[feature] <= threshold` to
/// `left`, else to `right`; a leaf (`left == LEAF`) scores `value`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Tree {
    pub feature: Vec<u32>,
    pub threshold: Vec<f32>,
    pub left: Vec<u32>,
    pub right: Vec<u32>,
    pub value: Vec<f32>,
}

pub const LEAF: u32 = u32::MAX;

impl Tree {
    fn push_leaf(&mut self, value: f32) -> u32 {
        self.push(0, 0.0, LEAF, LEAF, value)
    }

    fn push(&mut self, feature: u32, threshold: f32, left: u32, right: u32, value: f32) -> u32 {
        self.feature.push(feature);
        self.threshold.push(threshold);
        self.left.push(left);
        self.right.push(right);
        self.value.push(value);
        (self.value.len() - 1) as u32
    }

    pub fn score(&self, x: &[f32]) -> f32 {
        let mut n = 0usize;
        while self.left[n] != LEAF {
            n = if x[self.feature[n] as usize] <= self.threshold[n] {
                self.left[n]
            } else {
                self.right[n]
            } as usize;
        }
        self.value[n]
    }

    pub fn nodes(&self) -> usize {
        self.value.len()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Forest {
    pub features: usize,
    pub trees: Vec<Tree>,
}

#[derive(Debug, thiserror::Error)]
pub enum ForestError {
    #[error("no training samples")]
    Empty,
    #[error("every label is {0}: the forest needs both positive and negative examples (label more files, or lower --positive-at)")]
    OneClass(bool),
    #[error("sample {row} has {found} features, expected {expected}")]
    Width {
        row: usize,
        found: usize,
        expected: usize,
    },
    #[error("linfa-trees: {0}")]
    Linfa(String),
}

/// Row-major samples: `rows.len() / features` samples of `features` values each.
pub struct Samples<'a> {
    pub rows: &'a [f32],
    pub features: usize,
}

impl Samples<'_> {
    pub fn len(&self) -> usize {
        self.rows.len() / self.features.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.rows[i * self.features..(i + 1) * self.features]
    }
}

impl Forest {
    pub fn fit(x: &Samples, y: &[bool], p: &ForestParams) -> Result<Forest, ForestError> {
        let n = x.len();
        if n == 0 || y.len() != n {
            return Err(ForestError::Empty);
        }
        if y.iter().all(|&v| v == y[0]) {
            return Err(ForestError::OneClass(y[0]));
        }
        let f = x.features;
        let mtry = if p.max_features == 0 {
            ((f as f64).sqrt().round() as usize).max(1)
        } else {
            p.max_features.min(f)
        };
        let positives = y.iter().filter(|&&v| v).count() as f64;
        let class_weight = |label: bool| -> f64 {
            if !p.balanced {
                return 1.0;
            }
            let count = if label {
                positives
            } else {
                n as f64 - positives
            };
            n as f64 / (2.0 * count)
        };
        let (wpos, wneg) = (class_weight(true), class_weight(false));
        let tree_rng = |t: usize| {
            ChaCha8Rng::seed_from_u64(p.seed ^ (t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        };
        let trees = match p.engine {
            Engine::Hist => {
                let binned = Binned::new(x);
                (0..p.trees)
                    .into_par_iter()
                    .map(|t| {
                        let mut rng = tree_rng(t);
                        let weights =
                            bootstrap(n, p.bootstrap, &mut rng, |i| if y[i] { wpos } else { wneg });
                        grow_hist(&binned, y, &weights, mtry, p, &mut rng)
                    })
                    .collect()
            }
            Engine::Linfa => (0..p.trees)
                .into_par_iter()
                .map(|t| {
                    let mut rng = tree_rng(t);
                    let weights =
                        bootstrap(n, p.bootstrap, &mut rng, |i| if y[i] { wpos } else { wneg });
                    grow_linfa(x, y, &weights, mtry, p, &mut rng)
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(Forest { features: f, trees })
    }

    /// The mean leaf value over the trees: the estimated probability that `x` is positive.
    pub fn score(&self, x: &[f32]) -> f32 {
        let sum: f32 = self.trees.iter().map(|t| t.score(x)).sum();
        sum / self.trees.len().max(1) as f32
    }

    pub fn score_all(&self, x: &Samples) -> Result<Vec<f32>, ForestError> {
        if x.features != self.features {
            return Err(ForestError::Width {
                row: 0,
                found: x.features,
                expected: self.features,
            });
        }
        // Tree by tree over a block of rows, so that each tree's nodes stay in cache.
        const BLOCK: usize = 256;
        let mut scores = vec![0f32; x.len()];
        scores
            .par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(b, out)| {
                for tree in &self.trees {
                    for (k, o) in out.iter_mut().enumerate() {
                        *o += tree.score(x.row(b * BLOCK + k));
                    }
                }
                let n = self.trees.len().max(1) as f32;
                out.iter_mut().for_each(|o| *o /= n);
            });
        Ok(scores)
    }
}

/// Bootstrap multiplicities times the class weight, one per sample.
fn bootstrap(
    n: usize,
    draw: bool,
    rng: &mut ChaCha8Rng,
    class_weight: impl Fn(usize) -> f64,
) -> Vec<f64> {
    let mut counts = vec![u32::from(!draw); n];
    if draw {
        for _ in 0..n {
            counts[rng.random_range(0..n)] += 1;
        }
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, &c)| c as f64 * class_weight(i))
        .collect()
}

/// Every feature cut into at most 255 bins at midpoints between distinct sorted values
/// (quantiles when there are more): `bins[i * features + f]` and the upper `edges[f][b]` of bin b.
struct Binned {
    features: usize,
    bins: Vec<u8>,
    edges: Vec<Vec<f32>>,
}

const MAX_BINS: usize = 255;

impl Binned {
    fn new(x: &Samples) -> Binned {
        let (n, f) = (x.len(), x.features);
        let edges: Vec<Vec<f32>> = (0..f)
            .into_par_iter()
            .map(|j| {
                let mut col: Vec<f32> = (0..n).map(|i| x.rows[i * f + j]).collect();
                col.sort_by(f32::total_cmp);
                col.dedup();
                let cuts: Vec<f32> = col.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
                if cuts.len() < MAX_BINS {
                    cuts
                } else {
                    let step = cuts.len() as f64 / (MAX_BINS - 1) as f64;
                    let mut q: Vec<f32> = (1..MAX_BINS)
                        .map(|k| cuts[((k as f64 * step) as usize).min(cuts.len() - 1)])
                        .collect();
                    q.dedup();
                    q
                }
            })
            .collect();
        let mut bins = vec![0u8; n * f];
        bins.par_chunks_mut(f).enumerate().for_each(|(i, row)| {
            for (j, b) in row.iter_mut().enumerate() {
                *b = edges[j].partition_point(|&e| e < x.rows[i * f + j]) as u8;
            }
        });
        Binned {
            features: f,
            bins,
            edges,
        }
    }
}

/// The best split of one node: feature, last bin that goes left, proxy score.
struct Split {
    feature: usize,
    bin: usize,
    gain: f64,
}

fn grow_hist(
    data: &Binned,
    y: &[bool],
    weights: &[f64],
    mtry: usize,
    p: &ForestParams,
    rng: &mut ChaCha8Rng,
) -> Tree {
    let f = data.features;
    let mut idx: Vec<u32> = (0..y.len() as u32)
        .filter(|&i| weights[i as usize] > 0.0)
        .collect();
    let mut tree = Tree::default();
    // (range in idx, depth, parent node and side to link, or none for the root)
    let mut stack = vec![(0usize, idx.len(), 0usize, None::<(u32, bool)>)];
    let mut pos = vec![0f64; MAX_BINS + 1];
    let mut tot = vec![0f64; MAX_BINS + 1];
    let mut counts = vec![0u32; MAX_BINS + 1];
    while let Some((lo, hi, depth, parent)) = stack.pop() {
        let node = &idx[lo..hi];
        let (mut wp, mut wt) = (0.0, 0.0);
        for &i in node {
            let w = weights[i as usize];
            wt += w;
            if y[i as usize] {
                wp += w;
            }
        }
        let value = (wp / wt) as f32;
        let splittable = node.len() >= 2 * p.min_samples_leaf
            && p.max_depth.is_none_or(|d| depth < d)
            && wp > 0.0
            && wp < wt;
        let mut best: Option<Split> = None;
        if splittable {
            let parent_proxy = (wp * wp + (wt - wp) * (wt - wp)) / wt;
            for feature in sample_indices(rng, f, mtry) {
                pos.iter_mut().for_each(|v| *v = 0.0);
                tot.iter_mut().for_each(|v| *v = 0.0);
                counts.iter_mut().for_each(|v| *v = 0);
                for &i in node {
                    let b = data.bins[i as usize * f + feature] as usize;
                    let w = weights[i as usize];
                    tot[b] += w;
                    counts[b] += 1;
                    if y[i as usize] {
                        pos[b] += w;
                    }
                }
                let (mut lp, mut lt, mut lc) = (0.0, 0.0, 0usize);
                for b in 0..data.edges[feature].len() {
                    lp += pos[b];
                    lt += tot[b];
                    lc += counts[b] as usize;
                    let rc = node.len() - lc;
                    if lc < p.min_samples_leaf || rc < p.min_samples_leaf || lt <= 0.0 {
                        continue;
                    }
                    if rc == 0 || lc == node.len() {
                        break;
                    }
                    let (rp, rt) = (wp - lp, wt - lt);
                    if rt <= 1e-12 {
                        break;
                    }
                    let proxy = (lp * lp + (lt - lp) * (lt - lp)) / lt
                        + (rp * rp + (rt - rp) * (rt - rp)) / rt;
                    let gain = proxy - parent_proxy;
                    if gain > 1e-12 && best.as_ref().is_none_or(|s| gain > s.gain) {
                        best = Some(Split {
                            feature,
                            bin: b,
                            gain,
                        });
                    }
                }
            }
        }
        let id = match best {
            None => tree.push_leaf(value),
            Some(s) => {
                let node = &mut idx[lo..hi];
                let mut mid = 0;
                for k in 0..node.len() {
                    if (data.bins[node[k] as usize * f + s.feature] as usize) <= s.bin {
                        node.swap(k, mid);
                        mid += 1;
                    }
                }
                let id = tree.push(
                    s.feature as u32,
                    data.edges[s.feature][s.bin],
                    LEAF,
                    LEAF,
                    value,
                );
                stack.push((lo + mid, hi, depth + 1, Some((id, false))));
                stack.push((lo, lo + mid, depth + 1, Some((id, true))));
                id
            }
        };
        if let Some((parent, is_left)) = parent {
            let link = if is_left {
                &mut tree.left
            } else {
                &mut tree.right
            };
            link[parent as usize] = id;
        }
    }
    tree
}

/// One tree by linfa-trees on the bootstrap rows (repeated as drawn) and a random subspace of
/// `mtry` features, converted to a flat [`Tree`] over the full feature vector.
fn grow_linfa(
    x: &Samples,
    y: &[bool],
    weights: &[f64],
    mtry: usize,
    p: &ForestParams,
    rng: &mut ChaCha8Rng,
) -> Result<Tree, ForestError> {
    use linfa::prelude::*;
    use linfa_trees::{DecisionTree, TreeNode};
    use ndarray::{Array1, Array2};

    let subspace = sample_indices(rng, x.features, mtry).into_vec();
    let rows: Vec<usize> = (0..y.len()).filter(|&i| weights[i] > 0.0).collect();
    let records = Array2::from_shape_fn((rows.len(), subspace.len()), |(r, c)| {
        x.rows[rows[r] * x.features + subspace[c]]
    });
    let targets: Array1<bool> = rows.iter().map(|&i| y[i]).collect();
    let sample_weights: Array1<f32> = rows.iter().map(|&i| weights[i] as f32).collect();
    let data = Dataset::new(records, targets).with_weights(sample_weights);
    let model = DecisionTree::params()
        .max_depth(p.max_depth)
        .min_weight_leaf(p.min_samples_leaf as f32)
        .fit(&data)
        .map_err(|e| ForestError::Linfa(e.to_string()))?;

    fn convert(node: &TreeNode<f32, bool>, subspace: &[usize], out: &mut Tree) -> u32 {
        if node.is_leaf() {
            let value = if node.prediction() == Some(true) {
                1.0
            } else {
                0.0
            };
            return out.push_leaf(value);
        }
        let (feature, threshold, _) = node.split();
        let id = out.push(subspace[feature] as u32, threshold, LEAF, LEAF, 0.0);
        let children = node.children();
        let (Some(l), Some(r)) = (children[0].as_deref(), children[1].as_deref()) else {
            unreachable!("linfa-trees marks a node with a missing child as a leaf")
        };
        let left = convert(l, subspace, out);
        let right = convert(r, subspace, out);
        out.left[id as usize] = left;
        out.right[id as usize] = right;
        id
    }
    let mut tree = Tree::default();
    convert(model.root_node(), &subspace, &mut tree);
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two features; the label is `x0 + x1 > 1` on a grid, a boundary no single split finds.
    fn diagonal(n: usize) -> (Vec<f32>, Vec<bool>) {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut rows = Vec::new();
        let mut y = Vec::new();
        for _ in 0..n {
            let a: f32 = rng.random();
            let b: f32 = rng.random();
            rows.extend([a, b, rng.random::<f32>()]);
            y.push(a + b > 1.0);
        }
        (rows, y)
    }

    fn accuracy(forest: &Forest, rows: &[f32], y: &[bool]) -> f64 {
        let x = Samples { rows, features: 3 };
        let s = forest.score_all(&x).unwrap();
        s.iter().zip(y).filter(|(s, &y)| (**s > 0.5) == y).count() as f64 / y.len() as f64
    }

    /// Both engines learn a diagonal boundary from 2,000 points to ≥ 90% accuracy on 2,000 fresh
    /// ones (axis-aligned trees approximate it with a staircase; a single stump would get ~75%).
    #[test]
    fn both_engines_learn_a_diagonal_boundary() {
        let (train, ytrain) = diagonal(4000);
        let (test, ytest) = (&train[6000..], &ytrain[2000..]);
        let (train, ytrain) = (&train[..6000], &ytrain[..2000]);
        for engine in [Engine::Hist, Engine::Linfa] {
            let p = ForestParams {
                trees: 30,
                max_features: 2,
                engine,
                ..ForestParams::default()
            };
            let forest = Forest::fit(
                &Samples {
                    rows: train,
                    features: 3,
                },
                ytrain,
                &p,
            )
            .unwrap();
            let acc = accuracy(&forest, test, ytest);
            assert!(acc >= 0.9, "{engine:?}: accuracy {acc}");
        }
    }

    /// The same seed grows the same forest whatever the thread count.
    #[test]
    fn fitting_is_deterministic() {
        let (rows, y) = diagonal(500);
        let x = Samples {
            rows: &rows,
            features: 3,
        };
        let p = ForestParams {
            trees: 8,
            ..ForestParams::default()
        };
        let a = Forest::fit(&x, &y, &p).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = pool.install(|| Forest::fit(&x, &y, &p).unwrap());
        assert_eq!(a, b);
    }

    /// A single feature that separates the classes exactly: one split at the midpoint between the
    /// largest negative (0.4) and smallest positive (0.6) value, pure leaves.
    #[test]
    fn separable_data_splits_at_the_midpoint() {
        let rows = [0.1f32, 0.2, 0.4, 0.6, 0.9];
        let y = [false, false, false, true, true];
        let p = ForestParams {
            trees: 1,
            max_features: 1,
            balanced: false,
            bootstrap: false,
            ..ForestParams::default()
        };
        let f = Forest::fit(
            &Samples {
                rows: &rows,
                features: 1,
            },
            &y,
            &p,
        )
        .unwrap();
        let t = &f.trees[0];
        assert_eq!(t.nodes(), 3);
        assert_eq!(t.threshold[0], 0.5);
        assert_eq!(f.score(&[0.0]), 0.0);
        assert_eq!(f.score(&[1.0]), 1.0);
        assert!(matches!(
            Forest::fit(
                &Samples {
                    rows: &rows,
                    features: 1
                },
                &[true; 5],
                &p
            ),
            Err(ForestError::OneClass(true))
        ));
    }
}
