//! The decoder as a whole. Expected values come from Hugging Face transformers (fixtures written
//! by `scripts/make_fixtures.py`: tiny random-weight models with their logits and greedy
//! generations) or from properties any correct causal decoder has.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::Optimizer;
use serde::Deserialize;

use super::sample::{generate, Sampling, SamplingParams};
use super::*;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// The largest absolute elementwise difference (shared by the numeric tests of the crate).
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[derive(Deserialize)]
struct Generated {
    prompt: Vec<u32>,
    new: Vec<u32>,
}

#[derive(Deserialize)]
struct Batch {
    prompts: Vec<Vec<u32>>,
    new: Vec<Vec<u32>>,
}

#[derive(Deserialize)]
struct Expected {
    single: Option<Generated>,
    batch: Option<Batch>,
    crossing: Option<Generated>,
}

const CASES: [&str; 6] = [
    "phi",
    "phi_qk_layernorm",
    "phi3_gqa_longrope",
    "llama_tied",
    "phi3_seqcls",
    "qwen2",
];

/// Logits of every fixture within 1e-4 of transformers (f32), in inference mode (fused kernels)
/// and in training mode (composed ops; the fixtures have no dropout).
#[test]
fn logits_match_transformers() {
    check_logits(&Device::Cpu, DType::F32, 1e-4);
}

/// The fixtures' logits on `device` in `dtype` within `tol` of transformers' f32 logits (scaled
/// by the largest expected magnitude when that is above 1), in both modes.
fn check_logits(device: &Device, dtype: DType, tol: f32) {
    for case in CASES {
        let dir = fixture(case);
        let (cfg, weights) = checkpoint::load_weights(&dir, dtype, device).unwrap();
        let mut model = Decoder::new(&cfg, &weights).unwrap();
        let expected =
            candle_core::safetensors::load(dir.join("expected.safetensors"), device).unwrap();
        let mut checked = 0;
        for training in [false, true] {
            model.set_training(training);
            for i in 0.. {
                let Some(ids) = expected.get(&format!("ids_{i}")) else {
                    break;
                };
                let ids = ids.to_dtype(DType::U32).unwrap();
                let want = &expected[&format!("logits_{i}")];
                let got = match model.head_kind() {
                    HeadKind::SequenceClassification { .. } => model.sequence_logits(&ids).unwrap(),
                    _ => model.forward(&ids, None).unwrap(),
                };
                assert_eq!(got.dims(), want.dims(), "{case}");
                let got = got.to_dtype(DType::F32).unwrap();
                let scale = max_abs(want).max(1.0);
                let diff = max_abs_diff(&got, want);
                assert!(
                    diff < tol * scale,
                    "{case} {dtype:?} on {device:?} input {i} training={training}: max |Δ| = {diff} (scale {scale})"
                );
                checked += 1;
            }
        }
        assert!(checked >= 2, "{case}: no inputs in the fixture");
    }
}

/// On the GPU: the same fixtures within 1e-4 in f32 and 2e-2 in bf16 (bf16 keeps 8 bits of
/// mantissa: 2^-8 ≈ 4e-3 per rounding, a few roundings deep).
#[cfg(feature = "cuda")]
#[test]
fn cuda_logits_match_transformers() {
    let gpu = Device::new_cuda(0).unwrap();
    check_logits(&gpu, DType::F32, 1e-4);
    check_logits(&gpu, DType::BF16, 2e-2);
}

/// On the GPU: greedy generation (KV cache, fused inference kernels) gives transformers' ids.
#[cfg(feature = "cuda")]
#[test]
fn cuda_greedy_generation_matches_transformers() {
    check_greedy(&Device::new_cuda(0).unwrap());
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        ..SamplingParams::default()
    }
}

/// Greedy ids identical to transformers' `generate` (KV cache, EOS id 2): one prompt, a
/// left-padded batch of two lengths, and for LongRoPE a run that crosses
/// `original_max_position_embeddings` (transformers switches to the long factors mid-run).
#[test]
fn greedy_generation_matches_transformers() {
    check_greedy(&Device::Cpu);
}

fn check_greedy(device: &Device) {
    for case in [
        "phi",
        "phi_qk_layernorm",
        "phi3_gqa_longrope",
        "llama_tied",
        "qwen2",
    ] {
        let dir = fixture(case);
        let model = checkpoint::load(&dir, DType::F32, device).unwrap();
        let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
        let expected: Expected = serde_json::from_str(&text).unwrap();
        let single = expected.single.unwrap();
        let out = generate(&model, &[single.prompt], &greedy(12), &[2], |_, _| true).unwrap();
        assert_eq!(out.ids[0], single.new, "{case} single");
        let batch = expected.batch.unwrap();
        let out = generate(&model, &batch.prompts, &greedy(12), &[2], |_, _| true).unwrap();
        assert_eq!(out.ids, batch.new, "{case} batch");
        if let Some(crossing) = expected.crossing {
            let out = generate(&model, &[crossing.prompt], &greedy(10), &[2], |_, _| true).unwrap();
            assert_eq!(out.ids[0], crossing.new, "{case} crossing");
        }
    }
}

fn tiny(preset: Preset) -> (PhiConfig, Weights) {
    let mut cfg = PhiConfig::preset(preset);
    if preset == Preset::TinyPhi3 {
        cfg.sliding_window = Some(5);
    }
    let w = Decoder::init_weights(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
    (cfg, w)
}

fn ids(values: &[u32]) -> Tensor {
    Tensor::new(values, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

const PRESETS: [Preset; 3] = [Preset::TinyPhi, Preset::TinyPhi3, Preset::TinyLlama];

/// Changing token t+1 leaves the logits at positions ≤ t unchanged and changes position t+1.
#[test]
fn causality() {
    for preset in PRESETS {
        let (cfg, w) = tiny(preset);
        let model = Decoder::new(&cfg, &w).unwrap();
        let a: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 512).collect();
        let mut b = a.clone();
        b[8] = 499;
        let la = model.forward(&ids(&a), None).unwrap();
        let lb = model.forward(&ids(&b), None).unwrap();
        let before = max_abs_diff(&la.narrow(1, 0, 8).unwrap(), &lb.narrow(1, 0, 8).unwrap());
        let at = max_abs_diff(&la.narrow(1, 8, 1).unwrap(), &lb.narrow(1, 8, 1).unwrap());
        assert_eq!(before, 0.0, "{preset}: earlier positions moved");
        assert!(at > 1e-3, "{preset}: the changed position did not move");
    }
}

/// Feeding a prompt then one token at a time through the cache gives the logits of one uncached
/// forward over the whole sequence (here past the sliding window of 5 for phi-3), and cached
/// greedy decoding equals re-running the full sequence at every step.
#[test]
fn cached_equals_uncached() {
    for preset in PRESETS {
        let (cfg, w) = tiny(preset);
        let model = Decoder::new(&cfg, &w).unwrap();
        let seq: Vec<u32> = (0..11).map(|i| (i * 53 + 3) % 512).collect();
        let full = model.forward(&ids(&seq), None).unwrap();
        let mut cache = KvCache::new(&cfg);
        let mut parts = vec![model.forward(&ids(&seq[..4]), Some(&mut cache)).unwrap()];
        for &t in &seq[4..] {
            parts.push(model.forward(&ids(&[t]), Some(&mut cache)).unwrap());
        }
        let stepped = Tensor::cat(&parts, 1).unwrap();
        let diff = max_abs_diff(&full, &stepped);
        assert!(diff < 1e-4, "{preset}: cached differs by {diff}");
        assert_eq!(cache.len(), seq.len());

        let out = generate(&model, &[seq[..3].to_vec()], &greedy(8), &[], |_, _| true).unwrap();
        let mut context = seq[..3].to_vec();
        for _ in 0..8 {
            let logits = model.forward(&ids(&context), None).unwrap();
            let last = logits.squeeze(0).unwrap().get(context.len() - 1).unwrap();
            context.push(last.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap());
        }
        assert_eq!(out.ids[0], context[3..], "{preset}");
    }
}

/// save → load gives identical logits in f32, and a bf16 save loads back within bf16 precision.
#[test]
fn save_then_load_is_identical() {
    for preset in PRESETS {
        let (cfg, w) = tiny(preset);
        let model = Decoder::new(&cfg, &w).unwrap();
        let dir = tempfile::tempdir().unwrap();
        checkpoint::save(dir.path(), &cfg, &w, DType::F32).unwrap();
        let loaded = checkpoint::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
        let x = ids(&[1, 2, 3, 4, 5, 6]);
        let diff = max_abs_diff(
            &model.forward(&x, None).unwrap(),
            &loaded.forward(&x, None).unwrap(),
        );
        assert_eq!(diff, 0.0, "{preset}");
        assert_eq!(loaded.config().rotary().unwrap(), cfg.rotary().unwrap());

        let dir16 = tempfile::tempdir().unwrap();
        checkpoint::save(dir16.path(), &cfg, &w, DType::BF16).unwrap();
        let half = checkpoint::load(dir16.path(), DType::F32, &Device::Cpu).unwrap();
        let diff = max_abs_diff(
            &model.forward(&x, None).unwrap(),
            &half.forward(&x, None).unwrap(),
        );
        assert!(diff < 0.05, "{preset} bf16: {diff}");
    }
}

/// Trainable variables for every parameter and a decoder reading them.
fn trainable(cfg: &PhiConfig, w: &Weights) -> (Vec<(String, Var)>, Decoder) {
    let vars: Vec<(String, Var)> = w
        .iter()
        .map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let shared: Weights = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let mut model = Decoder::new(cfg, &shared).unwrap();
    model.set_training(true);
    (vars, model)
}

fn lm_loss(model: &Decoder, batch: &Tensor) -> Tensor {
    let (b, t) = batch.dims2().unwrap();
    let logits = model
        .forward(&batch.narrow(1, 0, t - 1).unwrap(), None)
        .unwrap();
    let v = logits.dim(2).unwrap();
    let logits = logits.to_dtype(DType::F32).unwrap();
    let targets = batch.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    candle_nn::loss::cross_entropy(&logits.reshape((b * (t - 1), v)).unwrap(), &targets).unwrap()
}

/// Every parameter receives a non-zero gradient (candle's fused kernels would silently give
/// none), in all layouts, with qk-layernorm and tied embeddings included.
#[test]
fn every_parameter_gets_a_gradient() {
    check_gradients(&Device::Cpu, DType::F32);
}

/// The same on the GPU, in f32 and in bf16.
#[cfg(feature = "cuda")]
#[test]
fn cuda_every_parameter_gets_a_gradient() {
    let gpu = Device::new_cuda(0).unwrap();
    check_gradients(&gpu, DType::F32);
    check_gradients(&gpu, DType::BF16);
}

fn check_gradients(device: &Device, dtype: DType) {
    let mut qk = PhiConfig::preset(Preset::TinyPhi);
    qk.qk_layernorm = true;
    qk.num_key_value_heads = Some(2);
    let cases: Vec<(String, PhiConfig)> = PRESETS
        .iter()
        .map(|&p| (p.to_string(), tiny(p).0))
        .chain([("tiny-phi+qk".to_string(), qk)])
        .collect();
    for (name, cfg) in cases {
        let w = Decoder::init_weights(&cfg, 3, dtype, device).unwrap();
        let (vars, model) = trainable(&cfg, &w);
        let batch = Tensor::new(
            &[[5u32, 9, 200, 31, 7, 64, 2, 11], [1, 2, 3, 4, 5, 6, 7, 8]],
            device,
        )
        .unwrap();
        let grads = lm_loss(&model, &batch).backward().unwrap();
        assert_eq!(vars.len(), names::parameter_table(&cfg).unwrap().len());
        for (pname, var) in &vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            let norm: f32 = g
                .to_dtype(DType::F32)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(
                norm > 0.0,
                "{name} {dtype:?} on {device:?}: zero gradient for {pname}"
            );
        }
    }
}

/// A tiny model memorises one batch: cross-entropy falls from ≈ ln 512 to under 0.5.
#[test]
fn a_tiny_model_overfits_one_batch() {
    let (cfg, w) = tiny(Preset::TinyPhi3);
    let (vars, model) = trainable(&cfg, &w);
    let batch = Tensor::new(
        &[
            [5u32, 9, 200, 31, 7, 64, 2, 11, 90, 17],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let params = candle_nn::ParamsAdamW {
        lr: 1e-2,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt =
        candle_nn::AdamW::new(vars.into_iter().map(|(_, v)| v).collect(), params).unwrap();
    let first: f32 = lm_loss(&model, &batch).to_scalar().unwrap();
    let mut last = first;
    for _ in 0..60 {
        let loss = lm_loss(&model, &batch);
        last = loss.to_scalar().unwrap();
        opt.backward_step(&loss).unwrap();
    }
    assert!(first > 5.5, "initial loss {first}");
    assert!(last < 0.5, "loss after 60 steps: {last}");
}

/// A checkpoint whose tensors do not fit its config is refused with the tensor's name and both
/// shapes; a missing tensor is named.
#[test]
fn bad_checkpoints_are_explained() {
    let (cfg, mut w) = tiny(Preset::TinyPhi);
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(dir.path(), &cfg, &w, DType::F32).unwrap();
    let mut wrong = cfg.clone();
    wrong.intermediate_size = 128;
    let config = wrong.to_hf_json().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    let err = checkpoint::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.layers.0.mlp.fc1.weight")
            && err.contains("[256, 64]")
            && err.contains("[128, 64]"),
        "{err}"
    );

    w.remove("lm_head.bias");
    let err = checkpoint::save(dir.path(), &cfg, &w, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("lm_head.bias"), "{err}");

    let llama_dir = fixture("llama_tied");
    let text = std::fs::read_to_string(llama_dir.join("config.json")).unwrap();
    let untied = text.replace(
        "\"tie_word_embeddings\": true",
        "\"tie_word_embeddings\": false",
    );
    let copy = tempfile::tempdir().unwrap();
    std::fs::write(copy.path().join("config.json"), untied).unwrap();
    std::fs::copy(
        llama_dir.join("model.safetensors"),
        copy.path().join("model.safetensors"),
    )
    .unwrap();
    let err = checkpoint::load(copy.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`lm_head.weight` is missing"), "{err}");

    std::fs::write(
        copy.path().join("config.json"),
        text.replace("\"llama\"", "\"gpt2\""),
    )
    .unwrap();
    let err = checkpoint::load(copy.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json") && err.contains("gpt2"), "{err}");
}

/// Dropout masks come from the seed the trainer sets (not candle's unseeded thread RNG): with
/// dropout 0.1 at every site, the same seed gives identical logits, another seed other logits,
/// and inference ignores dropout altogether.
#[test]
fn dropout_is_a_function_of_the_seed() {
    for preset in PRESETS {
        let (mut cfg, w) = tiny(preset);
        cfg.embd_pdrop = 0.1;
        cfg.resid_pdrop = 0.1;
        cfg.attention_dropout = 0.1;
        let mut model = Decoder::new(&cfg, &w).unwrap();
        let x = ids(&(0..12).map(|i| (i * 37 + 5) % 512).collect::<Vec<u32>>());
        let eval = model.forward(&x, None).unwrap();
        model.set_training(true);
        let pass = |model: &mut Decoder, seed| {
            model.set_dropout_seed(seed);
            model.forward(&x, None).unwrap()
        };
        let (a, b, c) = (
            pass(&mut model, 1),
            pass(&mut model, 1),
            pass(&mut model, 2),
        );
        assert_eq!(
            max_abs_diff(&a, &b),
            0.0,
            "{preset}: same seed, other masks"
        );
        assert!(
            max_abs_diff(&a, &c) > 1e-4,
            "{preset}: the seed changed nothing"
        );
        assert!(
            max_abs_diff(&a, &eval) > 1e-4,
            "{preset}: dropout did nothing"
        );
        model.set_training(false);
        assert_eq!(max_abs_diff(&model.forward(&x, None).unwrap(), &eval), 0.0);
    }
}

/// The 8-bit copies the local teacher decodes with ([`checkpoint::load_quantized`]) on the
/// llama and Qwen2 fixtures: the projections whose rows are whole Q8_0 blocks (32 values; not
/// `down_proj`, rows of 48) are quantized, so the logits move, but stay within 15% of their scale
/// of transformers' float32 logits (measured: 7% llama, 13% Qwen2 — these fixtures' weights are
/// drawn 10× wider than a trained model's, and activations are quantized to 8 bits too; their
/// greedy ids part from transformers' after 6). The real model: a Qwen2.5-Coder checkpoint run
/// this way wrote the same 120 greedy tokens as its GGUF file (README, issue 25).
#[test]
fn quantized_checkpoints_stay_close_to_float32() {
    for case in ["llama_tied", "qwen2"] {
        let dir = fixture(case);
        let q = checkpoint::load_quantized(&dir, &Device::Cpu).unwrap();
        let expected =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let ids = expected["ids_0"].to_dtype(DType::U32).unwrap();
        let want = &expected["logits_0"];
        let got = q.forward(&ids, None).unwrap();
        let diff = max_abs_diff(&got, want);
        let scale = max_abs(want);
        assert!(diff > 1e-6, "{case}: nothing was quantized");
        assert!(
            diff < 0.15 * scale,
            "{case}: max |Δ| = {diff} (scale {scale})"
        );
    }
}
