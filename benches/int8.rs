//! The packed VNNI kernel (`src/model/int8.rs`) against candle's quantized product on the same
//! GGUF blocks, at the batch sizes of the local teacher's decoding.
//!
//! `cargo bench --bench int8 [-- ROUNDS [TYPE]]` (or the dev build: `cargo build --bench int8`,
//! then run the `int8-*` binary in target/debug/deps): quantizes random weights to TYPE (q8_0,
//! the default: what phigen runs Qwen2.5's Q4_K_M/Q5_0 projections in, re-fitted by the kernel
//! to blocks of 128; or q4_0, q4_1, read as stored) with candle's quantizer, in the shapes of one decoding step of Qwen2.5-Coder-0.5B (24 layers of
//! q/k/v 896→1152, o 896→896, gate/up 896→9728, down 4864→896, and the head 896→151,936), then,
//! ROUNDS times (default 3) for 1, 8 and 32 rows: every projection once with the packed kernel
//! and once with candle's `QMatMul` (its own Q8_1 activations and vector dot products), same
//! input, interleaved. Prints, as JSON per row count, the best time of each, multiply-adds per
//! second, and candle's time over the kernel's. Threads: `RAYON_NUM_THREADS` (default: every
//! core).

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use phigen::model::int8::PackedWeight;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let rounds: usize = args
        .first()
        .map_or(3, |a| a.parse().expect("ROUNDS is a number"));
    let dtype = match args.get(1).map_or("q8_0", String::as_str) {
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        other => panic!("TYPE is q8_0, q4_0 or q4_1, not {other}"),
    };
    if !phigen::model::int8::supported() {
        eprintln!("this CPU has no AVX-512 VNNI: the packed kernel does not run here");
        std::process::exit(1);
    }
    let (hidden, kv, ffn, vocab) = (896, 1152, 4864, 151_936);
    let mut shapes = Vec::new();
    for _ in 0..24 {
        shapes.extend([
            (kv, hidden),
            (hidden, hidden),
            (2 * ffn, hidden),
            (hidden, ffn),
        ]);
    }
    shapes.push((vocab, hidden));
    let dev = Device::Cpu;
    let mut state = 1u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
    };
    let weights: Vec<(PackedWeight, QMatMul)> = shapes
        .iter()
        .map(|&(out, inp)| {
            let w: Vec<f32> = (0..out * inp).map(|_| next()).collect();
            let t = Tensor::from_vec(w, (out, inp), &dev).unwrap();
            let q = QTensor::quantize(&t, dtype).unwrap();
            let packed = PackedWeight::from_gguf(dtype, &q.data().unwrap(), out, inp).unwrap();
            (packed, QMatMul::from_qtensor(q).unwrap())
        })
        .collect();
    let macs_per_row: usize = shapes.iter().map(|(o, i)| o * i).sum();
    let mut results = Vec::new();
    for rows in [1usize, 8, 32] {
        let x: Vec<f32> = (0..rows * ffn).map(|_| next() * 50.0).collect();
        let (mut kernel, mut candle) = (f64::MAX, f64::MAX);
        for _ in 0..rounds {
            let t = Instant::now();
            let mut check = 0f32;
            for (p, _) in &weights {
                let inp = p.inp();
                check += p.matmul(&x[..rows * inp], rows)[0];
            }
            kernel = kernel.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for (p, q) in &weights {
                let inp = p.inp();
                let xt = Tensor::from_slice(&x[..rows * inp], (rows, inp), &dev).unwrap();
                let y = q.forward(&xt).unwrap();
                check += y
                    .flatten_all()
                    .unwrap()
                    .get(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
            }
            candle = candle.min(t.elapsed().as_secs_f64());
            std::hint::black_box(check);
        }
        let macs = (macs_per_row * rows) as f64;
        results.push(serde_json::json!({
            "rows": rows,
            "kernel_ms": kernel * 1e3,
            "candle_ms": candle * 1e3,
            "kernel_gmac_s": macs / kernel / 1e9,
            "candle_gmac_s": macs / candle / 1e9,
            "candle_over_kernel": candle / kernel,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "type": format!("{dtype:?}"),
            "threads": rayon::current_num_threads(),
            "macs_per_row": macs_per_row,
            "results": results,
        })
    );
}
