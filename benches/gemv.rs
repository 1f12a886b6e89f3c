//! The f32 product of decoding (`src/model/gemv.rs`) against the memory's read bandwidth,
//! measured in the same process, on the same bytes, interleaved.
//!
//! `cargo bench --bench gemv [-- ROUNDS]` (or the dev build: `cargo build --bench gemv`, then run
//! the `gemv-*` binary in target/debug/deps): packs the projections of phi-1-small (20 layers of
//! qkv 1024→3072, dense 1024→1024, fc1 1024→4096, fc2 4096→1024, and the head 1024→51200: the
//! 1.22 GB that one decoded token reads), then, ROUNDS times (default 5): one product of one
//! row with every projection in turn (one token's products), and a plain sum over the same
//! packed bytes with as many threads (the read roofline; AVX-512 loads where the CPU has them). Prints each round and the best of
//! each as JSON: GB/s of both and the product's share of the sum's bandwidth. Threads:
//! `RAYON_NUM_THREADS` (default: every core).

use std::time::Instant;

use phigen::model::gemv::PanelWeight;
use rayon::prelude::*;

/// Σ over `v`, read once with the widest vector loads the CPU has (intrinsics, so that the dev
/// profile, which does not auto-vectorize, reads as fast as a release build), eight
/// independent sums so that no load waits on an add.
fn read_sum(v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the loads stay inside `v` (whole chunks of 128).
        return unsafe { read_sum_avx512(v) };
    }
    v.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_sum_avx512(v: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 8];
    let chunks = v.chunks_exact(128);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm512_add_ps(*a, _mm512_loadu_ps(c.as_ptr().add(16 * k)));
        }
    }
    acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum::<f32>() + tail
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find(|a| a != "--bench")
        .map_or(5, |a| a.parse().expect("ROUNDS is a number"));
    let (d, f, v) = (1024, 4096, 51200);
    let mut shapes = Vec::new();
    for _ in 0..20 {
        shapes.extend([(3 * d, d), (d, d), (f, d), (d, f)]);
    }
    shapes.push((v, d));
    let mut state = 1u64;
    let weights: Vec<PanelWeight> = shapes
        .iter()
        .map(|&(out, inp)| {
            let w: Vec<f32> = (0..out * inp)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
                })
                .collect();
            PanelWeight::new(&w, None, out, inp)
        })
        .collect();
    let bytes: usize = weights.iter().map(|w| w.values().len() * 4).sum();
    let x: Vec<f32> = (0..f).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
    let (mut best_product, mut best_sum) = (f64::MAX, f64::MAX);
    let mut each = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let mut check = 0f32;
        for w in &weights {
            check += w.matmul(&x[..w.inp()], 1)[0];
        }
        let product = t.elapsed().as_secs_f64();
        std::hint::black_box(check);
        let t = Instant::now();
        let total: f32 = weights
            .iter()
            .map(|w| w.values().par_chunks(1 << 16).map(read_sum).sum::<f32>())
            .sum();
        let sum = t.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best_product = best_product.min(product);
        best_sum = best_sum.min(sum);
        each.push(serde_json::json!({
            "product_gb_s": bytes as f64 / product / 1e9,
            "sum_gb_s": bytes as f64 / sum / 1e9,
            "share": sum / product,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "bytes": bytes,
            "threads": rayon::current_num_threads(),
            "product_ms": best_product * 1e3,
            "product_gb_s": bytes as f64 / best_product / 1e9,
            "sum_gb_s": bytes as f64 / best_sum / 1e9,
            "share_of_read_bandwidth": best_sum / best_product,
            "rounds": each,
        })
    );
}
