//! End-to-end trainer tests on a small synthetic corpus: learning, kill + resume equality, and
//! stage chaining.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device};
use rand::{Rng, SeedableRng};

use super::recipe::Recipe;
use super::*;
use crate::model::tokenizer::{Encoding, TokenizerSpec};
use crate::tokenize::{self, TokenizeOptions};

/// Stories from a small grammar: predictable given context, far from predictable by frequency.
fn corpus(dir: &Path, docs: usize) {
    let names = ["Tom", "Lily", "Ben", "Sue", "Max"];
    let things = ["ball", "cat", "kite", "box", "tree", "boat"];
    let colors = ["red", "blue", "big", "small"];
    let verbs = ["saw", "liked", "found", "lost"];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut lines = String::new();
    for i in 0..docs {
        let mut story = String::new();
        let who = names[rng.random_range(0..names.len())];
        for _ in 0..rng.random_range(2..5) {
            let (v, c, t) = (
                verbs[rng.random_range(0..verbs.len())],
                colors[rng.random_range(0..colors.len())],
                things[rng.random_range(0..things.len())],
            );
            story.push_str(&format!("{who} {v} a {c} {t}. The {t} was {c}. "));
        }
        lines.push_str(
            &serde_json::json!({"id": format!("s{i}"), "text": story.trim()}).to_string(),
        );
        lines.push('\n');
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("stories.jsonl"), lines).unwrap();
}

fn tokens(root: &Path) -> std::path::PathBuf {
    let input = root.join("corpus");
    corpus(&input, 600);
    let out = root.join("tok");
    let opts = TokenizeOptions {
        inputs: vec![input],
        out: out.clone(),
        tokenizer: TokenizerSpec::Tiktoken(Encoding::Gpt2),
        eos_token: None,
        val_fraction: 0.1,
        shard_tokens: 1 << 20,
        force: false,
        follow_symlinks: false,
        order: tokenize::Order::Input,
    };
    tokenize::run(&opts, |_| {}).unwrap();
    out
}

fn recipe(tok: &Path, extra: &str, sets: &[&str]) -> Recipe {
    let text = format!(
        r#"
name = "test"
seed = 1
[model]
preset = "tiny-phi"
vocab_size = 50304
max_position_embeddings = 64
[[stage]]
name = "pretrain"
data = [{{ path = "{}" }}]
seq_len = 32
micro_batch = 4
grad_accum = 2
steps = 60
lr = 1e-2
min_lr = 1e-3
warmup = 5
weight_decay = 0.1
eval_every = 20
eval_batches = 4
checkpoint_every = 20
{extra}
"#,
        tok.display()
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Recipe::parse(&text, Path::new("test.toml"), &sets).unwrap()
}

fn options(recipe: Recipe, out: &Path) -> TrainOptions {
    TrainOptions {
        recipe,
        out: out.to_path_buf(),
        resume: false,
        device: Device::Cpu,
        dtype: DType::F32,
        peak_tflops: None,
        stop: Arc::new(AtomicBool::new(false)),
        max_steps_this_run: None,
        device_memory: None,
        world: super::dist::World::single(),
    }
}

fn metrics(out: &Path) -> Vec<Metrics> {
    std::fs::read_to_string(out.join(METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Entropy (nats) of the training tokens' unigram distribution: the loss of a model that
/// learned token frequencies only.
fn unigram_entropy(tok: &Path) -> f64 {
    let dir = TokenDir::open(tok, None).unwrap();
    let mut counts = std::collections::HashMap::<u32, f64>::new();
    for s in &dir.train {
        for id in s.slice(0, s.tokens) {
            *counts.entry(id).or_default() += 1.0;
        }
    }
    let n: f64 = counts.values().sum();
    counts.values().map(|c| -(c / n) * (c / n).ln()).sum()
}

use crate::tokenize::TokenDir;

/// A tiny model learns the grammar: validation loss ends well below the unigram entropy of
/// the data; the run directory holds metrics, a loss curve and loadable checkpoints.
#[test]
fn loss_falls_well_below_the_unigram_entropy() {
    let root = tempfile::tempdir().unwrap();
    let tok = tokens(root.path());
    let out = root.path().join("run");
    assert_eq!(
        run(&options(recipe(&tok, "", &[]), &out), |_| {}).unwrap(),
        Outcome::Finished
    );
    let m = metrics(&out);
    let h = unigram_entropy(&tok);
    let last_val = m.iter().rev().find_map(|m| m.val_loss).unwrap();
    // The grammar itself has about 0.45 nats per token (verb, colour and thing choices only);
    // word frequencies alone give h ≈ 3.05. Measured: 0.90 after 60 steps.
    assert!(
        last_val < 0.4 * h,
        "val loss {last_val} vs unigram entropy {h}"
    );
    assert!(out.join("loss.png").is_file());
    let ckpts = checkpoints(&out, "pretrain").unwrap();
    assert_eq!(ckpts.last().unwrap().0, 60);
    assert!(ckpts.len() <= 3, "keep_last 2 + best: {ckpts:?}");
    let model =
        crate::model::checkpoint::load(&ckpts.last().unwrap().1, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.config().vocab_size, 50304);
    // `phigen eval loss` on the saved checkpoint reads the same validation windows (4 batches of
    // 4 rows of 32 + 1 tokens) and gets the loss the trainer logged at that step.
    let r = crate::eval::validation_loss(&ckpts.last().unwrap().1, &tok, 32, 4, 4).unwrap();
    assert_eq!((r.rows, r.tokens), (16, 512));
    assert!(
        (r.loss - last_val).abs() < 1e-4 * last_val.max(1.0),
        "{} vs {last_val}",
        r.loss
    );
    assert!((r.perplexity - r.loss.exp()).abs() < 1e-9);
}

/// Stopping after 13 steps and resuming gives the same curve as one uninterrupted run: same
/// batches, same weights and moments, same dropout masks (dropout 0.1, the phi-1 setting: candle's
/// own dropout drew from an unseeded RNG and two runs differed from step 1), same numbers.
#[test]
fn kill_and_resume_equals_the_uninterrupted_run() {
    let root = tempfile::tempdir().unwrap();
    let tok = tokens(root.path());
    let sets = [
        "stage.0.steps=30",
        "stage.0.eval_every=10",
        "stage.0.checkpoint_every=100",
        "stage.0.dropout=0.1",
    ];
    let whole = root.path().join("whole");
    run(&options(recipe(&tok, "", &sets), &whole), |_| {}).unwrap();
    let parts = root.path().join("parts");
    let first = TrainOptions {
        max_steps_this_run: Some(13),
        ..options(recipe(&tok, "", &sets), &parts)
    };
    assert_eq!(run(&first, |_| {}).unwrap(), Outcome::Stopped);
    // A crash after step 13's checkpoint leaves later lines in metrics.jsonl: resume drops them.
    let stray = serde_json::json!({"stage": "pretrain", "step": 14, "tokens": 0, "train_loss": 99.0, "lr": 0.0, "tokens_per_sec": 0.0, "tflops": 0.0});
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(parts.join(METRICS_FILE))
        .unwrap();
    std::io::Write::write_all(&mut f, format!("{stray}\n").as_bytes()).unwrap();
    let again = TrainOptions {
        max_steps_this_run: Some(4),
        resume: true,
        ..options(recipe(&tok, "", &sets), &parts)
    };
    assert_eq!(run(&again, |_| {}).unwrap(), Outcome::Stopped);
    let rest = TrainOptions {
        resume: true,
        ..options(recipe(&tok, "", &sets), &parts)
    };
    assert_eq!(run(&rest, |_| {}).unwrap(), Outcome::Finished);
    let (a, b) = (metrics(&whole), metrics(&parts));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.step, x.tokens), (y.step, y.tokens));
        for (p, q) in [
            (x.train_loss, y.train_loss),
            (x.val_loss, y.val_loss),
            (x.grad_norm, y.grad_norm),
        ] {
            match (p, q) {
                (Some(p), Some(q)) => assert!((p - q).abs() < 1e-5, "step {}: {p} vs {q}", x.step),
                (None, None) => {}
                other => panic!("step {}: {other:?}", x.step),
            }
        }
    }
    // Dropout is on: without it the same batches give another step-1 loss.
    let plain = root.path().join("plain");
    let no_dropout = ["stage.0.steps=6", "stage.0.checkpoint_every=100"];
    run(&options(recipe(&tok, "", &no_dropout), &plain), |_| {}).unwrap();
    let (p, d) = (metrics(&plain)[0].train_loss, a[0].train_loss);
    assert!((p.unwrap() - d.unwrap()).abs() > 1e-4, "{p:?} vs {d:?}");
    // Starting again without --resume would overwrite the run: refused.
    let err = run(&options(recipe(&tok, "", &sets), &parts), |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("--resume"), "{err}");
}

/// A finetune stage starts from the pretrain stage's last checkpoint with its own settings.
#[test]
fn stages_chain_through_checkpoints() {
    let root = tempfile::tempdir().unwrap();
    let tok = tokens(root.path());
    let finetune = format!(
        "[[stage]]\nname = \"finetune\"\ninit = \"previous\"\ndata = [{{ path = \"{}\" }}]\nseq_len = 16\nmicro_batch = 4\nsteps = 5\nlr = 1e-4\nwarmup = 1\neval_every = 5\n",
        tok.display()
    );
    let out = root.path().join("run");
    run(
        &options(recipe(&tok, &finetune, &["stage.0.steps=10"]), &out),
        |_| {},
    )
    .unwrap();
    let m = metrics(&out);
    let pre_val = m
        .iter()
        .filter(|m| m.stage == "pretrain")
        .find_map(|m| m.val_loss)
        .unwrap();
    let first_ft = m.iter().find(|m| m.stage == "finetune").unwrap();
    assert_eq!((first_ft.step, first_ft.tokens), (1, 64));
    // Continuing from trained weights: the first finetune loss is near the pretrain's, far
    // below a fresh model's ln(50304) ≈ 10.8.
    assert!(
        first_ft.train_loss.unwrap() < pre_val + 1.0,
        "{first_ft:?} vs {pre_val}"
    );
    assert_eq!(checkpoints(&out, "finetune").unwrap().last().unwrap().0, 5);
}

/// Two optimizer steps from the `phi` fixture equal `torch.optim.AdamW` + `clip_grad_norm_` on
/// the same batch (scripts/make_fixtures.py, `phi_adamw`): losses, gradient norms and every
/// weight after the steps within 1e-5.
#[test]
fn adamw_steps_match_pytorch() {
    check_adamw(&Device::Cpu, 1e-5);
}

/// The same on the GPU (the AdamW there is composed from tensor ops, the loss is unfused), within
/// 1e-4: cuBLAS sums in another order.
#[cfg(feature = "cuda")]
#[test]
fn cuda_adamw_steps_match_pytorch() {
    check_adamw(&Device::new_cuda(0).unwrap(), 1e-4);
}

fn check_adamw(device: &Device, tol: f64) {
    #[derive(serde::Deserialize)]
    struct Fixture {
        lr: f64,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
        clip: f64,
        batch: Vec<Vec<u32>>,
        losses: Vec<f64>,
        grad_norms: Vec<f64>,
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
    let f: Fixture =
        serde_json::from_str(&std::fs::read_to_string(root.join("phi_adamw/adamw.json")).unwrap())
            .unwrap();
    let (cfg, before) =
        crate::model::checkpoint::load_weights(&root.join("phi"), DType::F32, device).unwrap();
    let (_, after) =
        crate::model::checkpoint::load_weights(&root.join("phi_adamw"), DType::F32, device)
            .unwrap();
    let mut opt = optim::AdamW::new(&before).unwrap();
    let batch = candle_core::Tensor::new(f.batch, device).unwrap();
    let hyper = optim::Hyper {
        lr: f.lr,
        beta1: f.betas[0],
        beta2: f.betas[1],
        eps: f.eps,
        weight_decay: f.weight_decay,
    };
    for i in 0..2 {
        let (loss, norm) = train_step(
            &cfg,
            &mut opt,
            &[MicroBatch {
                ids: batch.clone(),
                dropout_seed: 0,
                target: Target::Next,
            }],
            f.clip,
            hyper,
            DType::F32,
            recipe::Recompute::Off,
        )
        .unwrap();
        assert!(
            (loss - f.losses[i]).abs() < tol,
            "step {i}: loss {loss} vs {}",
            f.losses[i]
        );
        assert!(
            (norm - f.grad_norms[i]).abs() < 10.0 * tol,
            "step {i}: grad norm {norm} vs {}",
            f.grad_norms[i]
        );
    }
    let mine = opt.weights(DType::F32).unwrap();
    for (name, expected) in &after {
        let diff = crate::model::tests::max_abs_diff(&mine[name], expected);
        assert!((diff as f64) < tol, "{name}: differs by {diff}");
    }
}

/// On the GPU the tiny recipe's loss curve follows the CPU one: f32 within 0.02 at every step
/// (the same batches and initial weights; only summation order differs), bf16 within 0.15 and
/// its last validation loss within 5% of the CPU's.
#[cfg(feature = "cuda")]
#[test]
fn cuda_loss_curve_follows_the_cpu_one() {
    let root = tempfile::tempdir().unwrap();
    let tok = tokens(root.path());
    let sets = ["stage.0.steps=30", "stage.0.eval_every=10"];
    let curve = |device: Device, dtype: DType, name: &str| {
        let out = root.path().join(name);
        let opts = TrainOptions {
            device,
            dtype,
            ..options(recipe(&tok, "", &sets), &out)
        };
        assert_eq!(run(&opts, |_| {}).unwrap(), Outcome::Finished);
        metrics(&out)
    };
    let gpu = Device::new_cuda(0).unwrap();
    let cpu = curve(Device::Cpu, DType::F32, "cpu");
    for (dtype, tol) in [(DType::F32, 0.02), (DType::BF16, 0.15)] {
        let other = curve(gpu.clone(), dtype, &format!("{dtype:?}"));
        assert_eq!(cpu.len(), other.len());
        for (c, g) in cpu.iter().zip(&other) {
            assert_eq!((c.step, c.tokens), (g.step, g.tokens));
            if let (Some(lc), Some(lg)) = (c.train_loss, g.train_loss) {
                assert!(
                    (lc - lg).abs() < tol,
                    "{dtype:?} step {}: cpu {lc} vs cuda {lg}",
                    c.step
                );
            }
        }
        let last = |m: &[Metrics]| m.iter().rev().find_map(|m| m.val_loss).unwrap();
        let (c, g) = (last(&cpu), last(&other));
        assert!(
            (c - g).abs() < 0.05 * c,
            "{dtype:?} last val loss: cpu {c} vs cuda {g}"
        );
    }
}

/// Tiling from a checkpoint of another model type is refused with the typed error that names
/// the directory and both types (the tiny presets are phi and phi-3, so their layouts differ).
#[test]
fn tiling_from_another_model_type_names_both() {
    let dir = tempfile::tempdir().unwrap();
    let small = PhiConfig::preset(crate::model::Preset::TinyPhi3);
    checkpoint::save_random(dir.path(), &small, 0, DType::F32, Encoding::Gpt2).unwrap();
    let cfg = PhiConfig::preset(crate::model::Preset::TinyPhi);
    let err = tile_weights(&cfg, dir.path()).unwrap_err();
    assert!(
        matches!(
            &err,
            TrainError::TileModelType {
                expected: ModelType::Phi,
                found: ModelType::Phi3,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("tile:DIR"), "{err}");
}

/// `micro_batch = "auto"` with recompute trains end to end under a stated budget
/// (`device_memory`), records the micro-batch it chose in the checkpoint, and a run resumed
/// under another budget keeps that choice: its curve equals the uninterrupted one (rows are
/// drawn per micro-batch, so another split would read other rows). A budget too small for one
/// sequence is refused naming the stage, the numbers and what to change.
#[test]
fn auto_micro_batch_with_recompute_trains_and_resumes_with_its_choice() {
    let root = tempfile::tempdir().unwrap();
    let tok = tokens(root.path());
    let sets = [
        "stage.0.steps=6",
        "stage.0.eval_every=3",
        "stage.0.checkpoint_every=100",
        "stage.0.micro_batch=auto",
        "stage.0.grad_accum=1",
        "stage.0.batch=8",
        "stage.0.checkpoint=blocks",
    ];
    let r = recipe(&tok, "", &sets);
    let need = |m: usize| memory::estimate(&r.model, &r.stages[0].with_micro_batch(m), DType::F32);
    // Holds 4 sequences a pass, not 8; the resumed run's budget would hold 8.
    let small = (need(4) + need(8)) / 2.0 / memory::HEADROOM;
    let whole = root.path().join("whole");
    let opts = |out: &Path, bytes: f64| TrainOptions {
        device_memory: Some(bytes),
        ..options(recipe(&tok, "", &sets), out)
    };
    let mut chosen = Vec::new();
    run(&opts(&whole, small), |e| {
        if let Event::StageStart { stage, .. } = e {
            chosen.push((stage.micro_batch, stage.grad_accum));
        }
    })
    .unwrap();
    assert_eq!(chosen, [(4, 2)]);
    let parts = root.path().join("parts");
    let first = TrainOptions {
        max_steps_this_run: Some(2),
        ..opts(&parts, small)
    };
    assert_eq!(run(&first, |_| {}).unwrap(), Outcome::Stopped);
    let state = read_state(&checkpoints(&parts, "pretrain").unwrap()[0].1).unwrap();
    assert_eq!(state.micro_batch, Some(4));
    let rest = TrainOptions {
        resume: true,
        ..opts(&parts, 1e15)
    };
    assert_eq!(run(&rest, |_| {}).unwrap(), Outcome::Finished);
    // Within 1e-5 as `kill_and_resume_equals_the_uninterrupted_run`: the CPU kernels' parallel
    // sums may add in another order from run to run.
    let (a, b) = (metrics(&whole), metrics(&parts));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        let (p, q) = (x.train_loss.or(x.val_loss), y.train_loss.or(y.val_loss));
        assert!(
            (p.unwrap() - q.unwrap()).abs() < 1e-5,
            "step {}: {p:?} vs {q:?}",
            x.step
        );
    }

    let err = run(&opts(&root.path().join("tight"), need(1)), |_| {})
        .unwrap_err()
        .to_string();
    for part in [
        "stage `pretrain`",
        "micro_batch 1 × seq_len 32",
        "--device-memory",
        "lower seq_len",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
}

/// One metrics line: (step, train loss, val loss, grad norm).
type Point = (usize, Option<f64>, Option<f64>, Option<f64>);

/// The metrics of `out`, for curve comparisons.
fn curve(out: &Path) -> Vec<Point> {
    metrics(out)
        .into_iter()
        .map(|m| (m.step, m.train_loss, m.val_loss, m.grad_norm))
        .collect()
}

/// Equal curves within `rel` relative (None where the other is None).
fn assert_same_curve(a: &[Point], b: &[Point], rel: f64) {
    assert_eq!(a.len(), b.len(), "{a:?}\nvs\n{b:?}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0);
        for (p, q) in [(x.1, y.1), (x.2, y.2), (x.3, y.3)] {
            match (p, q) {
                (Some(p), Some(q)) => {
                    assert!(
                        (p - q).abs() <= rel * p.abs().max(q.abs()),
                        "step {}: {p} vs {q}",
                        x.0
                    )
                }
                (None, None) => {}
                other => panic!("step {}: {other:?}", x.0),
            }
        }
    }
}

/// Runs `opts` as `ranks` data parallel ranks (threads, the CPU backend's sockets between them);
/// returns each rank's result, in rank order.
fn rank_results(
    ranks: usize,
    opts: impl Fn() -> TrainOptions + Sync,
) -> Vec<Result<Outcome, TrainError>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let opts = &opts;
                s.spawn(move || {
                    let o = TrainOptions {
                        world: super::dist::World {
                            rank,
                            size: ranks,
                            local_rank: rank,
                            launch: "test".into(),
                        },
                        ..opts()
                    };
                    run(&o, |_| {})
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// [`rank_results`] where every rank must succeed with the same outcome; returns it.
fn run_ranks(ranks: usize, opts: impl Fn() -> TrainOptions + Sync) -> Outcome {
    let outcomes: Vec<Outcome> = rank_results(ranks, opts)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(outcomes.iter().all(|o| *o == outcomes[0]));
    outcomes.into_iter().next().unwrap()
}

/// Data parallel training over 2 and 3 ranks (the local IPC backend) follows the one-process curve
/// at the same global batch (6 micro-batches a step, shared out by rank) within 1e-5 relative —
/// only the order of the fp32 gradient sums differs — and its checkpoint holds the same weights
/// within that tolerance; a run stopped on 2 ranks and resumed on 3 continues the same curve.
/// Only rank 0 writes: the metrics have one line per step.
#[test]
fn data_parallel_ranks_follow_the_one_process_curve() {
    let root = tempfile::tempdir().unwrap();
    let tok = tokens(root.path());
    let sets = [
        "stage.0.steps=20",
        "stage.0.micro_batch=2",
        "stage.0.grad_accum=6",
        "stage.0.eval_every=10",
        "stage.0.eval_batches=5",
        "stage.0.checkpoint_every=100",
    ];
    let opts = |out: &Path| options(recipe(&tok, "", &sets), out);
    let single = root.path().join("single");
    assert_eq!(run(&opts(&single), |_| {}).unwrap(), Outcome::Finished);
    let expected = curve(&single);
    let weights = |out: &Path| {
        let dir = latest_checkpoint(out, &recipe(&tok, "", &sets))
            .unwrap()
            .unwrap();
        checkpoint::load_weights(&dir, DType::F32, &Device::Cpu)
            .unwrap()
            .1
    };
    let reference = weights(&single);
    for ranks in [2, 3] {
        let out = root.path().join(format!("ranks-{ranks}"));
        assert_eq!(run_ranks(ranks, || opts(&out)), Outcome::Finished);
        assert_same_curve(&expected, &curve(&out), 1e-5);
        let max_abs = |t: &candle_core::Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        for (name, w) in weights(&out) {
            let mut pairs = vec![(w.clone(), reference[&name].clone())];
            // The key bias's true gradient is zero (a softmax ignores a constant added to all of
            // a query's scores), so AdamW turns its round-off into steps of the order of lr,
            // whatever the sum order: compare the query and value parts only.
            if name.ends_with("qkv_proj.bias") {
                let c = w.dim(0).unwrap() / 3;
                pairs = [0, 2 * c]
                    .map(|at| {
                        (
                            w.narrow(0, at, c).unwrap(),
                            reference[&name].narrow(0, at, c).unwrap(),
                        )
                    })
                    .to_vec();
            }
            for (a, b) in pairs {
                let (diff, scale) = (max_abs(&(&a - &b).unwrap()), max_abs(&b));
                assert!(
                    diff <= 1e-5 * scale,
                    "{name}: max difference {diff} of {scale}"
                );
            }
        }
    }
    // Stopped after 7 steps on 2 ranks, resumed on 3.
    let moved = root.path().join("moved");
    let first = || TrainOptions {
        max_steps_this_run: Some(7),
        ..opts(&moved)
    };
    assert_eq!(run_ranks(2, first), Outcome::Stopped);
    let rest = || TrainOptions {
        resume: true,
        ..opts(&moved)
    };
    assert_eq!(run_ranks(3, rest), Outcome::Finished);
    assert_same_curve(&expected, &curve(&moved), 1e-5);
}

/// More ranks than a step has micro-batches is refused before training, on every rank, naming
/// the numbers (the test recipe has grad_accum 2).
#[test]
fn more_ranks_than_micro_batches_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let tok = tokens(root.path());
    let out = root.path().join("run");
    let sets = ["stage.0.steps=2", "stage.0.warmup=1"];
    let errors = rank_results(3, || options(recipe(&tok, "", &sets), &out));
    for err in errors {
        let err = err.unwrap_err().to_string();
        assert!(
            err.contains("3 ranks") && err.contains("grad_accum"),
            "{err}"
        );
    }
    assert!(latest_checkpoint(&out, &recipe(&tok, "", &[]))
        .unwrap()
        .is_none());
}

/// The corpus tokenized with the Llama-style tokenizer.json of tests/fixtures/tokenizers
/// (made by tests/fixtures/make_tokenizer.py with Python `tokenizers`).
fn file_tokens(root: &Path) -> (std::path::PathBuf, TokenizerSpec) {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers/llama_style");
    let spec = TokenizerSpec::parse(fixture.to_str().unwrap()).unwrap();
    let input = root.join("corpus-file");
    corpus(&input, 200);
    let out = root.join("tok-file");
    let opts = TokenizeOptions {
        inputs: vec![input],
        out: out.clone(),
        tokenizer: spec.clone(),
        eos_token: None,
        val_fraction: 0.1,
        shard_tokens: 1 << 20,
        force: false,
        follow_symlinks: false,
        order: tokenize::Order::Input,
    };
    tokenize::run(&opts, |_| {}).unwrap();
    (out, spec)
}

/// Training on a Hugging Face tokenizer.json: the recipe names the fixture's directory, the
/// model's vocab_size is checked against the tokenizer's 646 ids, and every checkpoint holds a
/// copy of tokenizer.json and tokenizer_config.json, so sampling and `eval loss` load the same
/// tokenizer from the checkpoint alone. One stage mixing that data with GPT-2 data is refused,
/// naming both directories.
#[test]
fn a_file_tokenizer_trains_and_travels_with_its_checkpoints() {
    let root = tempfile::tempdir().unwrap();
    let (tok, spec) = file_tokens(root.path());
    let fixture = match &spec {
        TokenizerSpec::File { path, .. } => path.parent().unwrap().to_path_buf(),
        TokenizerSpec::Tiktoken(_) => unreachable!("parsed from a directory"),
    };
    let tokenizer = format!("model.tokenizer={}", fixture.display());
    let err = Recipe::parse(
        &format!(
            "name = \"t\"\n[model]\npreset = \"tiny-phi\"\nvocab_size = 600\ntokenizer = \"{}\"\n[[stage]]\nname = \"a\"\ndata = [{{ path = \"{}\" }}]\nseq_len = 32\nmicro_batch = 4\nsteps = 1\nlr = 1e-3\n",
            fixture.display(),
            tok.display()
        ),
        Path::new("small.toml"),
        &[],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("model.vocab_size") && err.contains("646"),
        "{err}"
    );
    let sets = [
        tokenizer.as_str(),
        "model.vocab_size=704",
        "stage.0.steps=4",
        "stage.0.warmup=1",
        "stage.0.eval_every=2",
        "stage.0.checkpoint_every=4",
    ];
    let out = root.path().join("run");
    run(&options(recipe(&tok, "", &sets), &out), |_| {}).unwrap();
    let ckpt = checkpoints(&out, "pretrain")
        .unwrap()
        .last()
        .unwrap()
        .1
        .clone();
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(ckpt.join(name)).unwrap(),
            std::fs::read(fixture.join(name)).unwrap(),
            "{name}"
        );
    }
    assert!(TokenizerSpec::for_checkpoint(&ckpt)
        .unwrap()
        .same_tokenizer(&spec));
    let t = crate::model::tokenizer::Tokenizer::for_checkpoint(&ckpt).unwrap();
    assert!(matches!(
        t,
        crate::model::tokenizer::Tokenizer::HuggingFace(_)
    ));
    crate::eval::validation_loss(&ckpt, &tok, 32, 1, 2).unwrap();
    // A GPT-2 directory in the same stage.
    let gpt2 = tokens(root.path());
    let data = [(tok.clone(), 1.0), (gpt2.clone(), 1.0)];
    let err = super::data::Mixture::open(&data, &spec, 50304, 32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&tok.display().to_string())
            && err.contains(&gpt2.display().to_string())
            && err.contains("`gpt2`"),
        "{err}"
    );
}

/// Things and the one color each has: an assistant's answer follows from the question.
const THINGS: [(&str, &str); 6] = [
    ("ball", "red"),
    ("cat", "black"),
    ("kite", "green"),
    ("box", "brown"),
    ("tree", "green"),
    ("boat", "white"),
];

/// `n` mock conversations (jsonl, `messages`): a user with a random name asks a thing's color,
/// one in three goes on to a second question; the answers are fixed by the question.
fn conversations(path: &Path, n: usize) {
    let names = ["Tom", "Lily", "Ben", "Sue", "Max"];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut lines = String::new();
    for i in 0..n {
        let mut messages = Vec::new();
        for turn in 0..if i % 3 == 0 { 2 } else { 1 } {
            let (thing, color) = THINGS[rng.random_range(0..THINGS.len())];
            let who = names[rng.random_range(0..names.len())];
            let question = if turn == 0 {
                format!("I am {who}. What color is the {thing}?")
            } else {
                format!("And the {thing}?")
            };
            messages.push(serde_json::json!({"role": "user", "content": question}));
            messages.push(
                serde_json::json!({"role": "assistant", "content": format!("The {thing} is {color}.")}),
            );
        }
        lines.push_str(&serde_json::json!({ "messages": messages }).to_string());
        lines.push('\n');
    }
    std::fs::write(path, lines).unwrap();
}

/// `n` mock preference pairs: the prompt names a thing; the chosen answer praises it, the
/// rejected one does not.
fn pairs(path: &Path, n: usize) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let mut lines = String::new();
    for _ in 0..n {
        let (thing, _) = THINGS[rng.random_range(0..THINGS.len())];
        let pair = serde_json::json!({
            "prompt": format!("Tell me about the {thing}."),
            "chosen": format!("The {thing} is nice."),
            "rejected": format!("The {thing} is bad."),
        });
        lines.push_str(&pair.to_string());
        lines.push('\n');
    }
    std::fs::write(path, lines).unwrap();
}

/// A one-stage `objective` recipe on `data` with the phi-3 template, tiny-phi, GPT-2 ids.
fn chat_recipe(data: &Path, objective: &str, sets: &[&str]) -> Recipe {
    let text = format!(
        r#"
name = "chat"
seed = 1
[model]
preset = "tiny-phi"
vocab_size = 50304
max_position_embeddings = 64
[[stage]]
name = "{objective}"
objective = "{objective}"
chat_template = "phi-3"
data = [{{ path = "{}" }}]
seq_len = 48
micro_batch = 4
grad_accum = 2
steps = 40
lr = 3e-3
warmup = 2
eval_every = 10
eval_batches = 2
checkpoint_every = 100
"#,
        data.display()
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Recipe::parse(&text, Path::new("chat.toml"), &sets).unwrap()
}

/// SFT on 300 mock conversations lowers the assistant-token loss on held-out conversations
/// (every 20th) at every evaluation, from about ln(50304) ≈ 10.8 at the start to under a quarter
/// of it in 40 steps (the answers follow from the questions); the tokenized examples are cached in the stage's directory, and a second
/// run's stage start reads them from there (the file is not rewritten).
#[test]
fn sft_lowers_the_assistant_token_loss() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("chat.jsonl");
    conversations(&data, 300);
    let out = root.path().join("run");
    let sets = ["stage.0.lr=1e-2"];
    run(&options(chat_recipe(&data, "sft", &sets), &out), |_| {}).unwrap();
    let val: Vec<f64> = metrics(&out).iter().filter_map(|m| m.val_loss).collect();
    assert_eq!(val.len(), 4, "{val:?}");
    let first_train = metrics(&out)[0].train_loss.unwrap();
    assert!(first_train > 9.0, "{first_train}");
    assert!(val.windows(2).all(|w| w[1] < w[0]), "{val:?}");
    assert!(val[3] < 0.25 * first_train, "{first_train} → {val:?}");
    let cached: Vec<_> = std::fs::read_dir(out.join("sft"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("examples-"))
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let again = root.path().join("again");
    let copy = again.join("sft").join(cached[0].file_name().unwrap());
    std::fs::create_dir_all(again.join("sft")).unwrap();
    std::fs::copy(&cached[0], &copy).unwrap();
    let written = std::fs::metadata(&copy).unwrap().modified().unwrap();
    let opts = TrainOptions {
        max_steps_this_run: Some(1),
        ..options(chat_recipe(&data, "sft", &sets), &again)
    };
    run(&opts, |_| {}).unwrap();
    assert_eq!(metrics(&again)[0].train_loss, metrics(&out)[0].train_loss);
    assert_eq!(
        std::fs::metadata(&copy).unwrap().modified().unwrap(),
        written
    );
    answers_in_its_template(&checkpoints(&out, "sft").unwrap().pop().unwrap().1);
}

/// Issue 31 item 5: an SFT checkpoint carries its chat template (`chat_template.jinja`, and the
/// template's end of turn in phigen.json), so the local teacher (and `phigen serve`, which loads
/// the same `LocalModel`) renders a question as the stage trained on — phi-3's text, written out
/// by hand below — and ends the answer at `<|end|>`, five GPT-2 tokens, not one id.
fn answers_in_its_template(dir: &Path) {
    use crate::model::chat::Message;
    use crate::teacher::{engine::Engine, local::LocalModel, FinishReason, Teacher};
    assert!(dir.join("chat_template.jinja").is_file());
    let model = LocalModel::load(&dir.to_string_lossy(), DType::F32, false).unwrap();
    let question = "I am Tom. What color is the ball?";
    let rendered = model
        .chat
        .as_ref()
        .expect("the checkpoint has a template")
        .render(&[Message::user(question)], true)
        .unwrap();
    assert_eq!(
        rendered,
        format!("<|user|>\n{question}<|end|>\n<|assistant|>\n")
    );
    assert_eq!(model.chat_stop, vec!["<|end|>".to_string()]);
    let sampling = crate::teacher::Sampling {
        temperature: 0.0,
        top_p: 1.0,
        max_tokens: 24,
        top_k: None,
        min_p: None,
        repetition_penalty: None,
        min_tokens: None,
    };
    let teacher = crate::teacher::local::LocalTeacher::new(
        Arc::new(Engine::start(Arc::new(model), 1, 0)),
        sampling,
    );
    let answer = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(teacher.chat(question, 0))
        .unwrap();
    // After 40 steps it has learned the form of an answer (which thing goes with the question
    // it has not yet: the held-out loss is still ~2): one of the trained sentences, then the end.
    let trained: Vec<String> = THINGS
        .iter()
        .map(|(thing, color)| format!("The {thing} is {color}."))
        .collect();
    assert!(
        trained.contains(&answer.text.trim().to_string()),
        "{answer:?}"
    );
    assert_eq!(answer.finish_reason, FinishReason::Stop, "{answer:?}");
}

/// DPO from random weights on 200 mock pairs: at the start the policy is the reference, so every
/// held-out pair's reward margin is 0; after training the held-out pairs (every 20th) prefer the
/// chosen answer — reward accuracy 1 and a positive margin β · ((π_c − ref_c) − (π_r − ref_r)).
/// The reference log-probs are cached in the stage's directory.
#[test]
fn dpo_raises_the_chosen_over_rejected_log_ratio_on_held_out_pairs() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("pairs.jsonl");
    pairs(&data, 200);
    let out = root.path().join("run");
    let sets = [
        "stage.0.steps=20",
        "stage.0.micro_batch=2",
        "stage.0.eval_every=5",
    ];
    run(&options(chat_recipe(&data, "dpo", &sets), &out), |_| {}).unwrap();
    let evals: Vec<Metrics> = metrics(&out)
        .into_iter()
        .filter(|m| m.val_loss.is_some())
        .collect();
    let last = evals.last().unwrap();
    assert_eq!(last.reward_accuracy, Some(1.0), "{evals:?}");
    assert!(last.reward_margin.unwrap() > 0.1, "{evals:?}");
    assert!(
        last.val_loss.unwrap() < 0.5 * std::f64::consts::LN_2,
        "{evals:?}"
    );
    let first_train = metrics(&out)[0].clone();
    assert!((first_train.train_loss.unwrap() - std::f64::consts::LN_2).abs() < 1e-3);
    assert!(std::fs::read_dir(out.join("dpo")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("reference-")));
}

/// SFT and DPO on 2 data parallel ranks follow the one-process curve within 1e-5 relative: the
/// SFT loss is normalized by the trained tokens of the whole step and DPO's by its pairs, so the
/// ranks' shares sum to the same loss and gradient whatever each micro-batch holds.
#[test]
fn sft_and_dpo_ranks_follow_the_one_process_curve() {
    let root = tempfile::tempdir().unwrap();
    let (chat, prefs) = (
        root.path().join("chat.jsonl"),
        root.path().join("pairs.jsonl"),
    );
    conversations(&chat, 100);
    pairs(&prefs, 60);
    for (objective, data) in [("sft", &chat), ("dpo", &prefs)] {
        let sets = [
            "stage.0.steps=4",
            "stage.0.micro_batch=2",
            "stage.0.grad_accum=4",
            "stage.0.eval_every=2",
        ];
        let opts = |out: &Path| options(chat_recipe(data, objective, &sets), out);
        let single = root.path().join(format!("{objective}-single"));
        run(&opts(&single), |_| {}).unwrap();
        let out = root.path().join(format!("{objective}-ranks"));
        assert_eq!(run_ranks(2, || opts(&out)), Outcome::Finished);
        assert_same_curve(&curve(&single), &curve(&out), 1e-5);
    }
}
