//! How much memory a training step needs, how much the device has, and the micro-batch that fits.
//!
//! The estimate counts what a step holds at its peak: fp32 masters, gradients and the two AdamW
//! moments (16 bytes a parameter), a compute copy of the weights when not fp32, the activations
//! the backward pass reads, one block's gradients in flight, and the logits. The activations of a
//! block follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
//! Models", 34·B·T·C bytes in 16 bits) for everything but the attention scores, which phigen
//! computes with composed candle ops (no fused kernel has a backward): each score element is held
//! as the product, the scaled and the masked scores, the f32 copy and three softmax temporaries
//! and probabilities, the probabilities in the compute dtype, and with dropout the mask and the
//! dropped probabilities — 4·s + 16 (+ 2·s) bytes for an s-byte dtype, against Megatron's 5.
//!
//! With `checkpoint = "blocks"` the forward pass keeps only each block's input (B·T·C) and one
//! block's activations exist at a time, while it is recomputed in the backward pass.
//!
//! The budget is what the device has free when the run starts: `MemAvailable` on the CPU, the
//! driver's free memory (`cuMemGetInfo`) on a CUDA GPU, or `--device-memory GB` given by the user.
//! A step may use [`HEADROOM`] of it: allocators fragment, and CUDA's own workspaces are not in
//! the estimate.

use candle_core::{DType, Device};

use super::recipe::{Recompute, Stage};
use crate::model::PhiConfig;

/// The share of the budget a step may use.
pub const HEADROOM: f64 = 0.9;

/// Bytes one training step of `stage` needs in `dtype` (see the module doc).
pub fn estimate(cfg: &PhiConfig, stage: &Stage, dtype: DType) -> f64 {
    let n = cfg.parameter_count() as f64;
    let s = dtype.size_in_bytes() as f64;
    let compute_copy = if dtype == DType::F32 { 0.0 } else { s };
    // Sequences per pass: a DPO micro-batch of pairs runs two each.
    let b = (stage.micro_batch * stage.objective.rows_per_item()) as f64;
    let t = stage.raw.seq_len as f64;
    let (c, h, l) = (
        cfg.hidden_size as f64,
        cfg.num_attention_heads as f64,
        cfg.num_hidden_layers as f64,
    );
    let dropout = if cfg.attention_dropout > 0.0 {
        2.0 * s
    } else {
        0.0
    };
    let score_bytes = 4.0 * s + 16.0 + dropout;
    let block = b * t * (34.0 * c * s / 2.0 + h * t * score_bytes);
    let kept = match stage.recompute() {
        Recompute::Off => l * block,
        Recompute::Blocks => l * b * t * c * s + block,
    };
    let in_flight = block;
    let logits = 3.0 * b * t * cfg.vocab_size as f64 * 4.0;
    n * (16.0 + compute_copy) + kept + in_flight + logits
}

/// Bytes of memory available now (Linux `MemAvailable`).
pub fn available_memory() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// Where a memory budget comes from (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetSource {
    /// `--device-memory GB`.
    Given,
    /// The CPU's `MemAvailable`.
    MemAvailable,
    /// CUDA device 0's free memory (`cuMemGetInfo`).
    CudaFree,
}

impl std::fmt::Display for BudgetSource {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            BudgetSource::Given => "--device-memory",
            BudgetSource::MemAvailable => "MemAvailable of the CPU",
            BudgetSource::CudaFree => "free memory of CUDA device 0",
        })
    }
}

/// The memory a run may plan with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub bytes: f64,
    pub source: BudgetSource,
}

impl Budget {
    /// Bytes a step may use: [`HEADROOM`] of the budget.
    pub fn usable(&self) -> f64 {
        HEADROOM * self.bytes
    }

    /// `given` (bytes, from `--device-memory`), else what `device` reports free now; `None` when
    /// neither is known (a CUDA build whose driver cannot be asked, another device).
    pub fn of(device: &Device, given: Option<f64>) -> Option<Budget> {
        if let Some(bytes) = given {
            return Some(Budget {
                bytes,
                source: BudgetSource::Given,
            });
        }
        let (bytes, source) = match device {
            Device::Cpu => (available_memory()?, BudgetSource::MemAvailable),
            Device::Cuda(_) => (cuda_free_memory()?, BudgetSource::CudaFree),
            _ => return None,
        };
        Some(Budget { bytes, source })
    }
}

/// `stage` as it runs under `budget`: `micro_batch = "auto"` becomes the largest divisor of the
/// global batch whose step fits (1 when none does or the budget is unknown, so the caller's
/// check reports the smallest step); a written micro_batch is kept.
pub fn fit(
    cfg: &PhiConfig,
    stage: &Stage,
    dtype: DType,
    budget: Option<Budget>,
    ranks: usize,
) -> Stage {
    let (Some(budget), true) = (budget, stage.is_auto()) else {
        return stage.clone();
    };
    let sequences = stage.sequences_per_step();
    // Each of `ranks` data parallel ranks computes whole micro-batches: sizes that give every rank
    // as many come first, then sizes that give every rank at least one.
    let sizes = |balanced: bool| {
        (1..=sequences).rev().filter(move |&m| {
            let micro_batches = sequences / m;
            sequences.is_multiple_of(m)
                && if balanced {
                    micro_batches.is_multiple_of(ranks)
                } else {
                    micro_batches >= ranks
                }
        })
    };
    sizes(true)
        .chain(sizes(false))
        .map(|m| stage.with_micro_batch(m))
        .find(|s| estimate(cfg, s, dtype) <= budget.usable())
        .unwrap_or_else(|| stage.with_micro_batch(1))
}

/// What to change when `stage` (as fitted) does not fit: the settings not yet at their
/// memory-saving value, most effective first.
pub fn advice(stage: &Stage, dtype: DType) -> String {
    let mut ways = Vec::new();
    if stage.recompute().is_off() {
        ways.push("set checkpoint = \"blocks\"".to_string());
    }
    if !stage.is_auto() && stage.micro_batch > 1 {
        ways.push(
            "set micro_batch = \"auto\" with batch = micro_batch × grad_accum (or lower micro_batch and raise grad_accum)"
                .to_string(),
        );
    }
    if dtype == DType::F32 {
        ways.push("train in bf16 (--dtype bf16, on a GPU)".into());
    }
    ways.push(format!("lower seq_len ({})", stage.raw.seq_len));
    ways.push("use a device with more memory".into());
    ways.join(", or ")
}

/// Free bytes of CUDA device 0 (the one `--device cuda` trains on), from the driver library
/// itself (`libcuda.so.1`, loaded at run time, so this builds without CUDA): the primary context
/// (the one candle's `cudarc` uses) is pushed around `cuMemGetInfo_v2`. `None` without a driver
/// or when any call fails.
pub fn cuda_free_memory() -> Option<f64> {
    type Init = unsafe extern "C" fn(u32) -> i32;
    type DeviceGet = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type Retain = unsafe extern "C" fn(*mut *mut libc::c_void, i32) -> i32;
    type Push = unsafe extern "C" fn(*mut libc::c_void) -> i32;
    type Pop = unsafe extern "C" fn(*mut *mut libc::c_void) -> i32;
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    type Release = unsafe extern "C" fn(i32) -> i32;
    // SAFETY: the symbols are looked up by their documented names in the CUDA driver API and
    // called with their documented signatures (CUresult = int, CUdevice = int, CUcontext = a
    // pointer); every out-pointer points at a live local. The library stays loaded (never
    // dlclosed) since candle's own handle to it outlives this call.
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY);
        if lib.is_null() {
            return None;
        }
        let sym = |name: &std::ffi::CStr| {
            let f = libc::dlsym(lib, name.as_ptr());
            (!f.is_null()).then_some(f)
        };
        let init: Init = std::mem::transmute(sym(c"cuInit")?);
        let device_get: DeviceGet = std::mem::transmute(sym(c"cuDeviceGet")?);
        let retain: Retain = std::mem::transmute(sym(c"cuDevicePrimaryCtxRetain")?);
        let push: Push = std::mem::transmute(sym(c"cuCtxPushCurrent_v2")?);
        let pop: Pop = std::mem::transmute(sym(c"cuCtxPopCurrent_v2")?);
        let mem_get_info: MemGetInfo = std::mem::transmute(sym(c"cuMemGetInfo_v2")?);
        let release: Release = std::mem::transmute(sym(c"cuDevicePrimaryCtxRelease_v2")?);
        let mut device = 0;
        if init(0) != 0 || device_get(&mut device, 0) != 0 {
            return None;
        }
        let mut ctx = std::ptr::null_mut();
        if retain(&mut ctx, device) != 0 {
            return None;
        }
        let (mut free, mut total) = (0usize, 0usize);
        let ok = push(ctx) == 0 && {
            let got = mem_get_info(&mut free, &mut total) == 0;
            let mut popped = std::ptr::null_mut();
            pop(&mut popped);
            got
        };
        release(device);
        ok.then_some(free as f64)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::train::recipe::Recipe;

    const GB: f64 = 1e9;

    /// The shipped phi-1 recipes train at the paper's global batch (1024 sequences of 2048
    /// tokens, read from the files) on one 80 GB GPU in bf16: `micro_batch = "auto"` finds a
    /// micro-batch whose step fits 90% of 80 GB by the estimate, larger than any that would fit
    /// without recompute (the reason the recipes set `checkpoint = "blocks"`).
    #[test]
    fn shipped_phi1_recipes_fit_one_80gb_gpu() {
        let budget = Budget {
            bytes: 80.0 * GB,
            source: BudgetSource::Given,
        };
        for file in ["recipes/phi-1.toml", "recipes/phi-1-small.toml"] {
            let p = crate::pipeline::Pipeline::load(Path::new(file), &[], None).unwrap();
            let (cfg, pretrain) = (&p.train.model, &p.train.stages[0]);
            assert_eq!(
                (pretrain.raw.seq_len, pretrain.sequences_per_step()),
                (2048, 1024),
                "{file}: phi-1's pretraining batch"
            );
            for stage in &p.train.stages {
                assert!(stage.is_auto(), "{file}: {}", stage.raw.name);
                let fitted = fit(cfg, stage, DType::BF16, Some(budget), 1);
                let need = estimate(cfg, &fitted, DType::BF16);
                assert!(
                    need <= budget.usable(),
                    "{file} {}: {:.1} GB at micro_batch {}",
                    stage.raw.name,
                    need / GB,
                    fitted.micro_batch
                );
                assert_eq!(
                    fitted.sequences_per_step(),
                    stage.sequences_per_step(),
                    "{file}: auto keeps the global batch"
                );
                // Recompute is what makes the batch fit: without it no micro-batch fits
                // (phi-1), or only a smaller one (phi-1-small).
                let mut off = stage.clone();
                off.raw.checkpoint = Recompute::Off;
                let off = fit(cfg, &off, DType::BF16, Some(budget), 1);
                let off_fits = estimate(cfg, &off, DType::BF16) <= budget.usable();
                assert!(
                    !off_fits || off.micro_batch < fitted.micro_batch,
                    "{file}: without recompute micro_batch {} fits too",
                    off.micro_batch
                );
            }
        }
    }

    /// A one-stage recipe with `micro_batch = "auto"` and a global batch of 48 sequences.
    const TINY_RECIPE: &str = r#"
name = "t"
[model]
preset = "tiny-phi"
vocab_size = 50304
[[stage]]
name = "pretrain"
data = [{ path = "tok" }]
seq_len = 256
micro_batch = "auto"
batch = 48
steps = 10
lr = 1e-3
"#;

    fn tiny_recipe(sets: &[&str]) -> Recipe {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Recipe::parse(TINY_RECIPE, Path::new("t.toml"), &sets).unwrap()
    }

    /// `micro_batch = "auto"` under a stated budget picks the largest divisor of the global
    /// batch (48) whose estimate fits 90% of it. The expected sizes come from the estimate
    /// itself at the neighbouring divisors: the pick fits, the next larger divisor does not.
    #[test]
    fn auto_picks_the_largest_divisor_that_fits() {
        let r = tiny_recipe(&[]);
        let stage = &r.stages[0];
        assert_eq!((stage.micro_batch, stage.grad_accum), (1, 48));
        let need = |m: usize| estimate(&r.model, &stage.with_micro_batch(m), DType::F32);
        // A budget that holds 12 sequences a pass but not 16.
        let bytes = (need(12) + need(16)) / 2.0 / HEADROOM;
        let budget = Budget {
            bytes,
            source: BudgetSource::Given,
        };
        let fitted = fit(&r.model, stage, DType::F32, Some(budget), 1);
        assert_eq!((fitted.micro_batch, fitted.grad_accum), (12, 4));
        assert_eq!(fitted.tokens_per_step(), stage.tokens_per_step());
        // Everything fits: one pass of the whole batch; nothing fits: 1, for the error.
        let all = Budget {
            bytes: 1e15,
            ..budget
        };
        assert_eq!(
            fit(&r.model, stage, DType::F32, Some(all), 1).micro_batch,
            48
        );
        let none = Budget {
            bytes: 1.0,
            ..budget
        };
        assert_eq!(
            fit(&r.model, stage, DType::F32, Some(none), 1).micro_batch,
            1
        );
        // A written micro_batch is never changed.
        let fixed = tiny_recipe(&["stage.0.micro_batch=8", "stage.0.grad_accum=6"]);
        let s = fit(&fixed.model, &fixed.stages[0], DType::F32, Some(none), 1);
        assert_eq!((s.micro_batch, s.grad_accum), (8, 6));
    }

    /// Recompute keeps L block inputs and one block instead of L blocks: for phi-1 (24
    /// layers) at 2048 tokens, one sequence a pass, the step's estimate falls by more than half
    /// (the activations dominate it; the weights, moments and logits stay).
    #[test]
    fn recompute_lowers_the_estimate() {
        let p =
            crate::pipeline::Pipeline::load(Path::new("recipes/phi-1.toml"), &[], None).unwrap();
        let mut stage = p.train.stages[0].with_micro_batch(1);
        let on = estimate(&p.train.model, &stage, DType::BF16);
        stage.raw.checkpoint = Recompute::Off;
        let off = estimate(&p.train.model, &stage, DType::BF16);
        assert!(on < 0.5 * off, "{on} vs {off}");
    }

    /// `micro_batch` reads a number or "auto"; anything else is refused naming both.
    #[test]
    fn micro_batch_is_a_number_or_auto() {
        let r = tiny_recipe(&[
            "stage.0.micro_batch=16",
            "stage.0.batch=48",
            "stage.0.grad_accum=3",
        ]);
        assert_eq!((r.stages[0].micro_batch, r.stages[0].grad_accum), (16, 3));
        for (sets, key, expected) in [
            (
                &["stage.0.micro_batch=big"][..],
                "micro_batch",
                "expected a number of sequences or \"auto\"",
            ),
            (
                &["stage.0.micro_batch=-2"][..],
                "micro_batch",
                "expected a number of sequences or \"auto\"",
            ),
            (
                &["stage.0.grad_accum=2"][..],
                "stage.0.grad_accum",
                "remove grad_accum",
            ),
            (
                &["stage.0.micro_batch=16"][..],
                "stage.0.batch",
                "micro_batch 16 × grad_accum 1 = 16",
            ),
            (&["stage.0.checkpoint=layers"][..], "checkpoint", "blocks"),
        ] {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            let err = Recipe::parse(TINY_RECIPE, Path::new("t.toml"), &sets)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("t.toml") && err.contains(key) && err.contains(expected),
                "{sets:?}: {err}"
            );
        }
        let err = Recipe::parse(
            &tiny_recipe(&[]).to_toml().replace("batch = 48\n", ""),
            Path::new("t.toml"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("stage.0.batch") && err.contains("is missing"),
            "{err}"
        );
    }
}
