//! Random-forest fit and predict time on a feature matrix written by `benches/filter_bench.py`
//! (which times scikit-learn on the same matrix and prints the ratios).
//!
//! `cargo bench --bench forest -- X.f32 Y.u8 FEATURES TRAIN_ROWS TREES`: X is row-major
//! little-endian f32, Y one byte per row (0/1). The first TRAIN_ROWS rows train, the rest are
//! scored. Prints one JSON object.

use std::time::Instant;

use phigen::classify::forest::{Engine, Forest, ForestParams, Samples};
use phigen::classify::metrics::roc_auc;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [x, y, features, train_rows, trees] = &args[..] else {
        eprintln!("usage: forest X.f32 Y.u8 FEATURES TRAIN_ROWS TREES");
        std::process::exit(2);
    };
    let x: Vec<f32> = std::fs::read(x)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let y: Vec<bool> = std::fs::read(y).unwrap().iter().map(|&b| b != 0).collect();
    let f: usize = features.parse().unwrap();
    let n: usize = train_rows.parse().unwrap();
    let trees: usize = trees.parse().unwrap();
    let train = Samples {
        rows: &x[..n * f],
        features: f,
    };
    let test = Samples {
        rows: &x[n * f..],
        features: f,
    };
    let mut out = serde_json::Map::new();
    for (name, engine, threads, trees) in [
        ("hist_1_thread", Engine::Hist, 1, trees),
        ("hist_all_threads", Engine::Hist, 0, trees),
        ("linfa_all_threads", Engine::Linfa, 0, trees),
    ] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let params = ForestParams {
            trees,
            engine,
            ..ForestParams::default()
        };
        let (fit, forest) = pool.install(|| {
            let t = Instant::now();
            let forest = Forest::fit(&train, &y[..n], &params).unwrap();
            (t.elapsed().as_secs_f64(), forest)
        });
        let (predict, scores) = pool.install(|| {
            let t = Instant::now();
            let s = forest.score_all(&test).unwrap();
            (t.elapsed().as_secs_f64(), s)
        });
        let nodes: usize = forest.trees.iter().map(|t| t.nodes()).sum();
        out.insert(
            name.into(),
            serde_json::json!({
                "fit_s": fit, "predict_s": predict, "trees": trees,
                "roc_auc": roc_auc(&scores, &y[n..]), "nodes": nodes,
            }),
        );
    }
    println!("{}", serde_json::Value::Object(out));
}
