//! Whole-run recipes through the binary (`phigen train --recipe R`): every step against the
//! loopback mock teacher, no network, no key.
//!
//! Expected values come from the recipe runner's contract (issue 24): a done step is skipped and
//! sends nothing; a killed run continues and ends with the artifacts of an uninterrupted one
//! (same record ids, same token-shard bytes, same losses); a changed setting re-runs exactly its
//! step and those downstream; bad recipes are refused before anything is written; the plan's cost
//! lies within 25% of what the run then spends.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use phigen::artifact::table;
use phigen::teacher::mock::{Faults, MockServer};

mod common;
use common::{durable_prompts, mock, run, BIN};

/// A small whole run: mock stories → dedup → tokenize → a tiny phi → validation loss.
fn mini_recipe(dir: &Path, server: &MockServer) -> PathBuf {
    let text = format!(
        r#"name = "mini"
seed = 0

[teacher]
teacher = "http"
base_url = "{}"
model = "mock"
price_input = 1.0
price_output = 2.0
max_cost = 100.0
concurrency = 4

[[data]]
name = "stories"
kind = "stories"
n = 60

[[data]]
name = "dedup"
kind = "dedup"
from = ["stories"]

[[data]]
name = "tok"
kind = "tokenize"
from = ["dedup"]
val_fraction = 0.2

[model]
preset = "tiny-phi"
vocab_size = 50304
max_position_embeddings = 64

[[stage]]
name = "pretrain"
data = [{{ step = "tok" }}]
seq_len = 32
micro_batch = 4
steps = 12
lr = 1e-3
warmup = 2
eval_every = 6
eval_batches = 1
checkpoint_every = 4
keep_last = 3

[[eval]]
name = "loss"
kind = "loss"
batches = 1
rows = 2
"#,
        server.base_url()
    );
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("mini.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn train_cmd(recipe: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["train", "--recipe", recipe.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("PHIGEN_TEACHER")
        .env_remove("PHIGEN_MODEL");
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn manifest(out: &Path, step: &str) -> serde_json::Value {
    let p = out.join("steps").join(format!("{step}.json"));
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn step_dir(out: &Path, step: &str) -> PathBuf {
    PathBuf::from(manifest(out, step)["dir"].as_str().unwrap())
}

/// The ids of every record in a generate step's directory.
fn record_ids(dir: &Path) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name.starts_with("part-") && name.ends_with(".parquet") {
            let df = table::read_columns(&p, &["id"]).unwrap();
            ids.extend(
                table::text_column(&df, &p, "id")
                    .unwrap()
                    .into_iter()
                    .flatten(),
            );
        }
    }
    ids
}

/// Name → bytes of every token shard of a tokenize step.
fn shard_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .map(|p| {
            (
                p.file_name().unwrap().to_str().unwrap().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// (step, val loss) of every eval line of a training run's metrics.
fn val_losses(train_dir: &Path) -> Vec<(usize, f64)> {
    std::fs::read_to_string(train_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()? as usize, v["val_loss"].as_f64()?))
        })
        .collect()
}

/// The two training runs logged validation losses at the same steps, equal within 1e-4 relative:
/// the trainer's multi-threaded reductions are not bitwise reproducible from run to run.
fn assert_same_losses(a: &Path, b: &Path) {
    let (la, lb) = (val_losses(a), val_losses(b));
    assert_eq!(la.len(), lb.len(), "{la:?} vs {lb:?}");
    for ((sa, va), (sb, vb)) in la.iter().zip(&lb) {
        assert_eq!(sa, sb);
        assert!((va - vb).abs() <= 1e-4 * va.abs(), "{la:?} vs {lb:?}");
    }
}

fn requests(server: &MockServer) -> u64 {
    server.log.requests.load(Ordering::SeqCst)
}

/// Waits (polling) until `ready`, then SIGKILLs the run; returns whether `ready` was seen.
async fn kill_when(mut child: std::process::Child, ready: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = false;
    while Instant::now() < deadline {
        if ready() {
            seen = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = child.kill();
    child.wait().unwrap();
    seen
}

/// The first directory under `parent` whose name starts with `prefix`.
fn dir_starting(parent: &Path, prefix: &str) -> Option<PathBuf> {
    std::fs::read_dir(parent).ok()?.find_map(|e| {
        let p = e.ok()?.path();
        p.file_name()?.to_str()?.starts_with(prefix).then_some(p)
    })
}

/// The shipped demo recipe (the whole phi-1 shape) runs end to end with the mock in place of the
/// local teacher and fewer records and steps, ends with a scoreboard holding HumanEval pass@1 and
/// the loss, records lineage back to the seeds; a second run skips every step and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_recipe_runs_end_to_end_then_skips_everything() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let base = format!("teacher.base_url=\"{}\"", server.base_url());
    let sets = [
        "teacher.teacher=\"http\"",
        "teacher.price_input=0",
        "teacher.price_output=0",
        base.as_str(),
        "teacher.model=\"mock\"",
        "data.0.n=12",
        "data.1.n=12",
        "stage.0.steps=6",
        "stage.0.warmup=1",
        "stage.0.eval_every=3",
        "stage.0.checkpoint_every=3",
        "stage.1.steps=4",
        "stage.1.warmup=1",
        "stage.1.eval_every=2",
        "stage.1.checkpoint_every=2",
        "eval.1.max_new_tokens=8",
        "eval.1.workers=2",
    ];
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/demo.toml");
    let mut args: Vec<&str> = Vec::new();
    for s in &sets {
        args.extend(["--set", s]);
    }
    let o = run(train_cmd(&recipe, &out, &args)).await;
    assert!(o.status.success(), "{}", text(&o));
    let board = std::fs::read_to_string(out.join("scoreboard.md")).unwrap();
    assert!(board.contains("demo"), "{board}");
    assert!(
        manifest(&out, "humaneval")["summary"]["pass_at_k"]["pass@1"].is_number(),
        "{}",
        manifest(&out, "humaneval")
    );
    assert!(manifest(&out, "loss")["summary"]["loss"].as_f64().unwrap() > 0.0);
    // Lineage of the finetuned checkpoint reaches back to the generated textbooks and the
    // benchmark file decontamination read.
    let train = step_dir(&out, "train");
    let ckpt = dir_starting(&train.join("finetune"), "step-").unwrap();
    let l = run({
        let mut c = Command::new(BIN);
        c.args(["lineage", ckpt.to_str().unwrap()]);
        c
    })
    .await;
    let tree = text(&l);
    assert!(l.status.success(), "{tree}");
    for part in [
        "textbooks",
        "exercises",
        "tok-textbooks",
        "HumanEval.jsonl.gz",
        "train",
    ] {
        assert!(tree.contains(part), "lineage lacks {part}:\n{tree}");
    }
    // Everything is done: the same command skips every step and sends nothing.
    let sent = requests(&server);
    let o = run(train_cmd(&recipe, &out, &args)).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(requests(&server), sent, "a done step sent requests");
    let skipped = text(&o).matches("done, skipped").count();
    assert_eq!(skipped, 7 + 1 + 2, "{}", text(&o));
}

/// kill -9 during generation, during tokenize and during training, each followed by the same
/// command: the final artifacts equal an uninterrupted run's (record ids, token-shard bytes,
/// validation losses), and no prompt whose record was written is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_any_step_then_the_same_command_ends_like_an_uninterrupted_run() {
    let faults = Faults {
        latency_ms: 20,
        ..Faults::default()
    };
    let dir = tempfile::tempdir().unwrap();
    // The reference: one uninterrupted run.
    let a_server = mock(faults.clone()).await;
    let a_recipe = mini_recipe(&dir.path().join("a-recipe"), &a_server);
    let a = dir.path().join("a");
    let o = run(train_cmd(&a_recipe, &a, &["--quiet"])).await;
    assert!(o.status.success(), "{}", text(&o));

    let server = mock(faults).await;
    let recipe = mini_recipe(&dir.path().join("b-recipe"), &server);
    let b = dir.path().join("b");
    let spawn = || {
        train_cmd(&recipe, &b, &["--quiet"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // 1. During generation: after 20 of 60 answers.
    assert!(kill_when(spawn(), || server.log.answered.load(Ordering::SeqCst) >= 20).await);
    let sent_before: HashMap<String, u64> = server.log.per_prompt.lock().unwrap().clone();
    let stories = dir_starting(&b.join("data"), "stories-").expect("the stories step's directory");
    let written_before = durable_prompts(&stories);
    assert!(
        written_before.len() >= 10,
        "only {} records survived the kill",
        written_before.len()
    );
    // 2. As soon as tokenize has made its directory.
    let data = b.join("data");
    kill_when(spawn(), || dir_starting(&data, "tok-").is_some()).await;
    // 3. During training: once its first checkpoint exists.
    kill_when(spawn(), || {
        dir_starting(&b, "train-")
            .and_then(|t| dir_starting(&t.join("pretrain"), "step-"))
            .is_some()
    })
    .await;
    let o = run(train_cmd(&recipe, &b, &["--quiet"])).await;
    assert!(o.status.success(), "{}", text(&o));

    assert_eq!(
        record_ids(&step_dir(&b, "stories")),
        record_ids(&step_dir(&a, "stories"))
    );
    assert_eq!(record_ids(&step_dir(&b, "stories")).len(), 60);
    assert_eq!(
        shard_bytes(&step_dir(&b, "tok")),
        shard_bytes(&step_dir(&a, "tok"))
    );
    assert_same_losses(&step_dir(&a, "train"), &step_dir(&b, "train"));
    // No prompt whose record was durable at the first kill was sent again. (Answers still on
    // their way to the journal, and requests in flight, are sent again: more than the
    // concurrency can be, as a worker takes its next prompt once its answer is queued.)
    let sent_after = server.log.per_prompt.lock().unwrap().clone();
    for p in &written_before {
        assert_eq!(
            sent_after[p], sent_before[p],
            "a prompt whose record was written before the kill was sent again"
        );
    }
}

/// A changed dedup setting re-runs dedup and everything after it — and `--plan` says so first —
/// while the stories are not generated again; the old directories stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_setting_reruns_exactly_its_step_and_its_dependants() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(dir.path(), &server);
    let out = dir.path().join("run");
    let o = run(train_cmd(&recipe, &out, &["--quiet"])).await;
    assert!(o.status.success(), "{}", text(&o));
    let before: BTreeMap<&str, serde_json::Value> = ["stories", "dedup", "tok", "train", "loss"]
        .into_iter()
        .map(|s| (s, manifest(&out, s)))
        .collect();
    let sent = requests(&server);

    let change = ["--set", "data.1.bands=10"];
    let o = run(train_cmd(
        &recipe,
        &out,
        &[&["--plan"][..], &change[..]].concat(),
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let plan = text(&o);
    let status = |step: &str| -> String {
        let line = plan
            .lines()
            .find(|l| l.split_whitespace().next() == Some(step))
            .unwrap_or_else(|| panic!("no row for {step}:\n{plan}"));
        line.split_whitespace().nth(2).unwrap().to_string()
    };
    assert_eq!(status("stories"), "done", "{plan}");
    for s in ["dedup", "tok", "train", "loss"] {
        assert_eq!(status(s), "stale", "{s}:\n{plan}");
    }
    assert!(
        !out.join("steps").join("dedup.json").exists()
            || manifest(&out, "dedup") == before["dedup"],
        "--plan wrote nothing"
    );

    let o = run(train_cmd(
        &recipe,
        &out,
        &[&["--quiet"][..], &change[..]].concat(),
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(requests(&server), sent, "the stories were generated again");
    assert_eq!(manifest(&out, "stories"), before["stories"]);
    for s in ["dedup", "tok", "train", "loss"] {
        let now = manifest(&out, s);
        assert_ne!(now["id"], before[s]["id"], "{s} did not re-run");
        assert_ne!(now["dir"], before[s]["dir"]);
        assert!(
            Path::new(before[s]["dir"].as_str().unwrap()).exists(),
            "the old {s} directory was removed"
        );
    }
}

/// Bad recipes are refused with the recipe file, the key and its line, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_recipes_are_refused_before_anything_is_written() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(mini_recipe(dir.path(), &server)).unwrap();
    let cases: [(&str, String, &[&str]); 4] = [
        (
            "unknown key",
            good.replace("kind = \"dedup\"", "kind = \"dedup\"\nbandz = 3"),
            &["bandz", "data.1.bandz", "toml:21:"],
        ),
        (
            "dangling reference",
            good.replace("from = [\"dedup\"]", "from = [\"dedupe\"]"),
            &["data.2.from.0", "`dedupe`", "toml:26:"],
        ),
        (
            "cycle",
            good.replace("from = [\"stories\"]", "from = [\"tok\"]")
                .replace(
                    "from = [\"dedup\"]",
                    "from = [\"dedup\"]\npaths = [\"seeds\"]",
                ),
            &["names `tok`, a tokenize step"],
        ),
        (
            "missing input path",
            good.replace("from = [\"stories\"]", "paths = [\"no/such/corpus\"]"),
            &["no/such/corpus", "dedup"],
        ),
    ];
    for (what, recipe_text, expected) in cases {
        let recipe = dir.path().join(format!("{}.toml", what.replace(' ', "-")));
        std::fs::write(&recipe, recipe_text).unwrap();
        let out = dir.path().join(format!("out-{}", what.replace(' ', "-")));
        let o = run(train_cmd(&recipe, &out, &["--quiet"])).await;
        let msg = text(&o);
        assert!(!o.status.success(), "{what}: accepted\n{msg}");
        assert!(
            msg.contains(recipe.to_str().unwrap()) || what == "missing input path",
            "{what}: the message does not name the recipe: {msg}"
        );
        for e in expected {
            assert!(msg.contains(e), "{what}: `{e}` not in: {msg}");
        }
        assert!(!out.exists(), "{what}: {} was created", out.display());
    }
    // A real cycle among generated-from steps: dedup ⇄ dedup2.
    let cycle = good.replace(
        "[[data]]\nname = \"tok\"",
        "[[data]]\nname = \"dedup2\"\nkind = \"dedup\"\nfrom = [\"dedup\"]\n\n[[data]]\nname = \"tok\"",
    )
    .replace("from = [\"stories\"]", "from = [\"stories\", \"dedup2\"]");
    let recipe = dir.path().join("cycle2.toml");
    std::fs::write(&recipe, cycle).unwrap();
    let out = dir.path().join("out-cycle2");
    let o = run(train_cmd(&recipe, &out, &["--quiet"])).await;
    let msg = text(&o);
    assert!(!o.status.success());
    assert!(msg.contains("cycle: dedup → dedup2 → dedup"), "{msg}");
    assert!(!out.exists());
}

/// The plan's teacher cost for a generate step with a pilot (an earlier, smaller run of it) lies
/// within 25% of what the run then reports spending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_planned_cost_is_within_a_quarter_of_the_spend() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(dir.path(), &server);
    let out = dir.path().join("run");
    let pilot = ["--set", "data.0.n=20", "--until", "stories", "--quiet"];
    let o = run(train_cmd(&recipe, &out, &pilot)).await;
    assert!(o.status.success(), "{}", text(&o));
    let full = ["--set", "data.0.n=120", "--until", "stories"];
    let o = run(train_cmd(&recipe, &out, &[&full[..], &["--plan"]].concat())).await;
    assert!(o.status.success(), "{}", text(&o));
    let plan = text(&o);
    let row = plan
        .lines()
        .find(|l| l.split_whitespace().next() == Some("stories"))
        .unwrap();
    let planned: f64 = row
        .split_whitespace()
        .find_map(|c| c.strip_prefix('$'))
        .unwrap()
        .parse()
        .unwrap();
    assert!(plan.contains("estimate from the pilot"), "{plan}");
    let o = run(train_cmd(
        &recipe,
        &out,
        &[&full[..], &["--quiet"]].concat(),
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let spent = manifest(&out, "stories")["summary"]["cost_usd_this_run"]
        .as_f64()
        .unwrap();
    assert!(spent > 0.0);
    assert!(
        (planned - spent).abs() <= 0.25 * spent,
        "planned ${planned} vs spent ${spent}"
    );
}

/// A paid teacher without a budget never spends: the plan is printed and the run exits 4 naming
/// the flag to add; with --max-cost it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_teacher_without_a_budget_sends_nothing() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(dir.path(), &server);
    let text_no_budget = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("max_cost = 100.0\n", "");
    std::fs::write(&recipe, text_no_budget).unwrap();
    let out = dir.path().join("run");
    let o = run(train_cmd(&recipe, &out, &["--until", "stories"])).await;
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("--max-cost"), "{}", text(&o));
    assert_eq!(requests(&server), 0);
    let o = run(train_cmd(
        &recipe,
        &out,
        &["--until", "stories", "--max-cost", "5", "--quiet"],
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(requests(&server) > 0);
}

/// A filter step in a recipe: the teacher rates a sample, a forest scores every file, and the
/// steps after it read only the kept files (the CLI's filter test gives the expected 150 of 300:
/// the mock rates the documented functions high and the data tables low).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_step_feeds_its_kept_files_downstream() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("stack");
    std::fs::create_dir_all(&stack).unwrap();
    for i in 0..300 {
        let text = if i % 2 == 0 {
            format!("def add_{i}(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    # Add them.\n    return a + b\n")
        } else {
            let data: Vec<String> = (0..60).map(|k| (k * i % 997).to_string()).collect();
            format!("DATA_{i} = [{}]\n", data.join(", "))
        };
        std::fs::write(stack.join(format!("f{i:03}.py")), text).unwrap();
    }
    let recipe = mini_recipe(dir.path(), &server);
    let edited = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace(
            "[[data]]\nname = \"stories\"\nkind = \"stories\"\nn = 60\n",
            &format!(
                "[[data]]\nname = \"code\"\nkind = \"filter\"\npaths = [\"{}\"]\nsample = 80\nforest = {{ trees = 30 }}\n",
                stack.display()
            ),
        )
        .replace("from = [\"stories\"]", "from = [\"code\"]\nchar_ngrams = 10");
    std::fs::write(&recipe, edited).unwrap();
    let out = dir.path().join("run");
    let o = run(train_cmd(&recipe, &out, &["--until", "tok", "--quiet"])).await;
    assert!(o.status.success(), "{}", text(&o));
    let filter = manifest(&out, "code");
    assert_eq!(filter["summary"]["files_scored"], 300, "{filter}");
    assert_eq!(filter["summary"]["records"], 150, "{filter}");
    // Dedup read the kept files only: 150 documents, none of the data tables.
    let dedup = manifest(&out, "dedup");
    assert_eq!(dedup["summary"]["documents_in"], 150, "{dedup}");
    assert!(manifest(&out, "tok")["summary"]["tokens"].as_u64().unwrap() > 0);
    let lineage = std::fs::read_to_string(step_dir(&out, "tok").join("lineage.json")).unwrap();
    assert!(
        lineage.contains("f299.py"),
        "the lineage lists the filtered files"
    );
}

/// `mini_recipe` with its stories step replaced by a filter step over 300 Python files (half
/// documented functions, half data tables) that rates a sample of 80, and dedup reading it.
fn filter_recipe(dir: &Path, server: &MockServer) -> PathBuf {
    let stack = dir.join("stack");
    std::fs::create_dir_all(&stack).unwrap();
    for i in 0..300 {
        let text = if i % 2 == 0 {
            format!("def add_{i}(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    # Add them.\n    return a + b\n")
        } else {
            let data: Vec<String> = (0..60).map(|k| (k * i % 997).to_string()).collect();
            format!("DATA_{i} = [{}]\n", data.join(", "))
        };
        std::fs::write(stack.join(format!("f{i:03}.py")), text).unwrap();
    }
    let recipe = mini_recipe(dir, server);
    let edited = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace(
            "[[data]]\nname = \"stories\"\nkind = \"stories\"\nn = 60\n",
            &format!(
                "[[data]]\nname = \"code\"\nkind = \"filter\"\npaths = [\"{}\"]\nsample = 80\nforest = {{ trees = 30 }}\n",
                stack.display()
            ),
        )
        .replace("from = [\"stories\"]", "from = [\"code\"]\nchar_ngrams = 10");
    std::fs::write(&recipe, edited).unwrap();
    recipe
}

/// The filter's rating spends from the run's --max-cost like a generate step (issue 24): a
/// budget the rating alone exceeds (80 prompts of a few hundred tokens at $1/M input cost a few
/// cents; the budget is a tenth of a cent) stops the run at the filter step with the budget
/// message, exit 4 and no manifest; the plan then prices the rest of the rating from what the
/// rated files cost (a pilot), and a larger budget finishes the step with its spend recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_rating_spends_from_the_run_budget() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let recipe = filter_recipe(dir.path(), &server);
    let out = dir.path().join("run");
    let o = run(train_cmd(
        &recipe,
        &out,
        &["--until", "code", "--max-cost", "0.001", "--quiet"],
    ))
    .await;
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("code: stopped before it finished: the budget ran out after rating"),
        "{}",
        text(&o)
    );
    assert!(!out.join("steps/code.json").exists());
    let sent = requests(&server);
    assert!(sent > 0 && sent < 80, "{sent} rating requests");
    // The plan of the rest: priced from the pilot.
    let o = run(train_cmd(&recipe, &out, &["--until", "code", "--plan"])).await;
    assert!(o.status.success(), "{}", text(&o));
    let plan = text(&o);
    let row = plan
        .lines()
        .skip_while(|l| l.split_whitespace().next() != Some("code"))
        .take(2)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(row.contains("estimate from the pilot"), "{plan}");
    let o = run(train_cmd(
        &recipe,
        &out,
        &["--until", "code", "--max-cost", "5", "--quiet"],
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let summary = &manifest(&out, "code")["summary"];
    assert!(
        summary["cost_usd_this_run"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
    assert_eq!(summary["files_scored"], 300, "{summary}");
}

/// `--jobs 2` runs the demo recipe's independent data steps (textbooks and exercises, then
/// their cleaning and tokenizing) side by side, and ends with what `--jobs 1` ends with: every
/// step has the same id, and the exercises' token shards the same bytes (issue 24: a step's
/// output depends only on its inputs and seed). The textbooks' shards are not compared: not even
/// two `--jobs 1` runs agree there, since generation writes records in answer order and dedup
/// keeps the first of two near-duplicates by (file, row) — which the mock's textbooks have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_2_gives_the_artifacts_of_jobs_1() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let base = format!("teacher.base_url=\"{}\"", server.base_url());
    let sets = [
        "teacher.teacher=\"http\"",
        "teacher.price_input=0",
        "teacher.price_output=0",
        base.as_str(),
        "teacher.model=\"mock\"",
        "data.0.n=12",
        "data.1.n=12",
        "stage.0.steps=2",
        "stage.0.warmup=1",
        "stage.0.eval_every=2",
        "stage.0.checkpoint_every=2",
        "stage.1.steps=2",
        "stage.1.warmup=1",
        "stage.1.eval_every=2",
        "stage.1.checkpoint_every=2",
    ];
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/demo.toml");
    let mut outs = Vec::new();
    for jobs in ["1", "2"] {
        let out = dir.path().join(format!("jobs-{jobs}"));
        let mut args: Vec<&str> = vec!["--until", "train", "--jobs", jobs];
        for s in &sets {
            args.extend(["--set", s]);
        }
        let o = run(train_cmd(&recipe, &out, &args)).await;
        assert!(o.status.success(), "--jobs {jobs}: {}", text(&o));
        outs.push(out);
    }
    let steps = [
        "textbooks",
        "exercises",
        "textbooks-dedup",
        "textbooks-clean",
        "exercises-clean",
        "tok-textbooks",
        "tok-exercises",
        "train",
    ];
    for step in steps {
        assert_eq!(
            manifest(&outs[0], step)["id"],
            manifest(&outs[1], step)["id"],
            "{step}"
        );
    }
    // Both token sets: generation writes records in arrival order, and the recipe's dedup keeps
    // the least id of a cluster, so the kept set (and the id-ordered tokens) are the same.
    for step in ["tok-textbooks", "tok-exercises"] {
        let (a, b) = (
            shard_bytes(&step_dir(&outs[0], step)),
            shard_bytes(&step_dir(&outs[1], step)),
        );
        assert!(!a.is_empty(), "{step}");
        let hashes = |m: &BTreeMap<String, Vec<u8>>| -> Vec<(String, String)> {
            m.iter()
                .map(|(k, v)| (k.clone(), blake3::hash(v).to_hex().to_string()))
                .collect()
        };
        assert_eq!(hashes(&a), hashes(&b), "{step}");
    }
}

/// `--executor slurm` writes batch scripts that run the recipe as Slurm jobs: generate and
/// tokenize steps as arrays of --shards tasks, each followed by its merge, dedup as its four array
/// stages and a finishing job, chained by the steps' dependencies. Submitted through a stand-in `sbatch` that runs each script at once (an array's
/// tasks one by one, last first, with the variables Slurm sets), they end where one local run ends:
/// the same record ids, token-shard bytes and validation losses (within 1e-4, as the kill -9 test
/// allows) (the oracle: a whole local run of
/// the same recipe against the same deterministic mock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slurm_scripts_run_the_recipe_like_one_local_run() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(&dir.path().join("recipe"), &server);
    let a = dir.path().join("a");
    let o = run(train_cmd(&recipe, &a, &["--quiet"])).await;
    assert!(o.status.success(), "{}", text(&o));

    let b = dir.path().join("b");
    let o = run(train_cmd(
        &recipe,
        &b,
        &["--quiet", "--executor", "slurm", "--shards", "3"],
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let slurm = b.join("slurm");
    let array = std::fs::read_to_string(slurm.join("00-stories.sbatch")).unwrap();
    assert!(array.contains("#SBATCH --array=0-2\n"), "{array}");
    assert!(array.contains("--only stories --shards 3"), "{array}");
    let clusters = std::fs::read_to_string(slurm.join("01-dedup-clusters.sbatch")).unwrap();
    assert!(
        clusters.contains("--only dedup --dedup-stage clusters\n") && !clusters.contains("--array"),
        "{clusters}"
    );
    let submit = std::fs::read_to_string(slurm.join("submit.sh")).unwrap();
    assert!(
        submit.contains(
            "j_dedup=$(sbatch --parsable --dependency=afterok:$j_stories 01-dedup-signatures.sbatch)"
        ),
        "{submit}"
    );
    assert!(
        !b.join("steps").exists(),
        "the scripts were written, nothing was run"
    );

    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.path().join("sbatch.log");
    std::fs::write(
        bin.join("sbatch"),
        format!(
            r#"#!/bin/bash
# A stand-in for sbatch: runs the script now (an array task by task, last first) and prints an id.
file="${{@: -1}}"
last=$(sed -n 's/^#SBATCH --array=0-\([0-9]*\).*/\1/p' "$file")
if [ -n "$last" ]; then
  for ((k = last; k >= 0; k--)); do
    SLURM_ARRAY_TASK_ID=$k SLURM_ARRAY_TASK_COUNT=$((last + 1)) bash "$file" >>{log} 2>&1 || exit 1
  done
else
  bash "$file" >>{log} 2>&1 || exit 1
fi
echo $RANDOM
"#,
            log = log.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join("sbatch"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let o = run({
        let mut c = Command::new("bash");
        c.arg(slurm.join("submit.sh"))
            .env("PATH", path)
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("PHIGEN_TEACHER")
            .env_remove("PHIGEN_MODEL");
        c
    })
    .await;
    let jobs_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(o.status.success(), "{}\n{jobs_log}", text(&o));

    // The stories step's records, written by three tasks, are one run's.
    let stories = step_dir(&b, "stories");
    let mut ids = BTreeSet::new();
    for k in 0..3 {
        ids.extend(record_ids(&stories.join(format!("tasks/{k:05}"))));
    }
    assert_eq!(ids, record_ids(&step_dir(&a, "stories")));
    assert_eq!(manifest(&b, "stories")["summary"]["tasks"], 3);
    assert_eq!(
        shard_bytes(&step_dir(&b, "tok")),
        shard_bytes(&step_dir(&a, "tok"))
    );
    assert_same_losses(&step_dir(&a, "train"), &step_dir(&b, "train"));
    assert!(b.join("scoreboard.md").exists(), "{jobs_log}");
}

/// `--executor kubernetes` writes one Job per step (Indexed Jobs of --shards completions for the
/// steps that shard, each followed by a one-pod merge Job) and apply.sh, which applies them in
/// plan order and waits for each. No cluster here: the test checks the manifests' fields against
/// Kubernetes' Indexed Job API (completionMode, completions, the command a pod runs, read back as
/// JSON, which YAML flow sequences are), and that a missing --image is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_jobs_are_written_for_each_step() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(&dir.path().join("recipe"), &server);
    let out = dir.path().join("k8s");
    let o = run(train_cmd(
        &recipe,
        &out,
        &["--quiet", "--executor", "kubernetes", "--shards", "3"],
    ))
    .await;
    assert!(!o.status.success());
    assert!(text(&o).contains("--image"), "{}", text(&o));
    let o = run(train_cmd(
        &recipe,
        &out,
        &[
            "--quiet",
            "--executor",
            "kubernetes",
            "--shards",
            "3",
            "--image",
            "registry.example/phigen:1",
            "--volume-claim",
            "phigen-data",
        ],
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let k8s = out.join("kubernetes");
    let apply = std::fs::read_to_string(k8s.join("apply.sh")).unwrap();
    let applied: Vec<&str> = apply
        .lines()
        .filter_map(|l| l.strip_prefix("kubectl apply -f "))
        .collect();
    assert_eq!(
        applied,
        [
            "00-stories.yaml",
            "00-stories-merge.yaml",
            "01-dedup-signatures.yaml",
            "01-dedup-buckets.yaml",
            "01-dedup-clusters.yaml",
            "01-dedup-filter.yaml",
            "01-dedup-finish.yaml",
            "02-tok.yaml",
            "02-tok-merge.yaml",
            "03-train.yaml",
            "04-loss.yaml"
        ]
    );
    assert!(apply.contains(
        "kubectl wait --for=condition=complete --timeout=-1s job/phigen-mini-00-stories\n"
    ));
    let job = std::fs::read_to_string(k8s.join("00-stories.yaml")).unwrap();
    for line in [
        "kind: Job\n",
        "  completionMode: Indexed\n",
        "  completions: 3\n",
        "        image: \"registry.example/phigen:1\"\n",
        "          claimName: \"phigen-data\"\n",
    ] {
        assert!(job.contains(line), "{line:?} not in\n{job}");
    }
    let command: Vec<String> = job
        .lines()
        .find_map(|l| l.trim().strip_prefix("command: "))
        .map(|c| serde_json::from_str(c).unwrap())
        .unwrap();
    assert_eq!(command[..2], ["phigen", "train"]);
    assert_eq!(
        command[command.len() - 4..],
        ["--only", "stories", "--shards", "3"]
    );
    assert!(command.contains(&recipe.display().to_string()));
    let merge = std::fs::read_to_string(k8s.join("00-stories-merge.yaml")).unwrap();
    assert!(
        !merge.contains("Indexed") && !merge.contains("--shards"),
        "{merge}"
    );
    // --train-ranks 4 --device cuda: the training pod starts 4 ranks with torchrun on 4 GPUs; the
    // eval keeps one; Slurm's training job is 4 srun tasks with a GPU each.
    for executor in ["kubernetes", "slurm"] {
        let o = run(train_cmd(
            &recipe,
            &out,
            &[
                "--quiet",
                "--executor",
                executor,
                "--shards",
                "3",
                "--image",
                "registry.example/phigen:1",
                "--volume-claim",
                "phigen-data",
                "--train-ranks",
                "4",
                "--device",
                "cuda",
            ],
        ))
        .await;
        assert!(o.status.success(), "{}", text(&o));
    }
    let train = std::fs::read_to_string(k8s.join("03-train.yaml")).unwrap();
    assert!(
        train.contains("nvidia.com/gpu: 4")
            && train.contains(
                r#"command: ["torchrun","--no-python","--nproc-per-node","4","phigen","train""#
            ),
        "{train}"
    );
    let eval = std::fs::read_to_string(k8s.join("04-loss.yaml")).unwrap();
    assert!(
        eval.contains("nvidia.com/gpu: 1") && !eval.contains("torchrun"),
        "{eval}"
    );
    let sbatch = std::fs::read_to_string(out.join("slurm/03-train.sbatch")).unwrap();
    assert!(
        sbatch.contains("#SBATCH --ntasks=4\n#SBATCH --gpus-per-task=1\n")
            && sbatch.contains("\nexec srun --kill-on-bad-exit=1 ")
            && !sbatch.contains("--gres"),
        "{sbatch}"
    );
}

/// A step run as an array splits its budget: each of N tasks may spend max_cost / N (the
/// ledger never exceeds its limit, as the generate tests check), so the array together spends at
/// most what one run may. The oracle is the step's cost C in a whole run against the same mock:
/// with max_cost C/2, task 0 of 2 (half the slots, about C/2 of work) stops on its budget having
/// spent at most C/4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_array_task_spends_its_share_of_the_budget() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(&dir.path().join("recipe"), &server);
    let step_stats = |out: &Path, rel: &str| -> serde_json::Value {
        let data = std::fs::read_dir(out.join("data")).unwrap();
        let step = data.map(|e| e.unwrap().path()).next().unwrap();
        serde_json::from_slice(&std::fs::read(step.join(rel)).unwrap()).unwrap()
    };
    let whole = dir.path().join("whole");
    let o = run(train_cmd(
        &recipe,
        &whole,
        &["--quiet", "--only", "stories"],
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let cost = step_stats(&whole, "stats.json")["run"]["cost_usd"]
        .as_f64()
        .unwrap();
    let out = dir.path().join("run");
    let budget = format!("teacher.max_cost={}", cost / 2.0);
    let o = run(train_cmd(
        &recipe,
        &out,
        &[
            "--quiet", "--only", "stories", "--shard", "0/2", "--set", &budget,
        ],
    ))
    .await;
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let stats = step_stats(&out, "tasks/00000/stats.json");
    let spent = stats["run"]["cost_usd"].as_f64().unwrap();
    assert!(spent > 0.0 && spent <= cost / 4.0, "{spent} of {cost}");
    assert_eq!(stats["stopped"], "budget", "{stats}");
}

/// `mini_recipe` with its stories step replaced by a filter step over six jsonl files of 50
/// Python snippets each (so that an array of 3 has two parts per task): half documented
/// functions, which the mock rates 4, half data tables, which it rates low. The functions'
/// docstrings are 40 words drawn from a fixed LCG, so dedup keeps them and the recipe's
/// training has text to read. The teacher rates a sample of 60; dedup reads the kept files.
fn array_filter_recipe(dir: &Path, server: &MockServer) -> PathBuf {
    let code = dir.join("code");
    std::fs::create_dir_all(&code).unwrap();
    let words = [
        "sum", "list", "value", "count", "index", "sorted", "string", "number", "each", "the",
    ];
    let mut x: u64 = 1;
    let mut word = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        format!(
            "{}{}",
            words[(x >> 33) as usize % words.len()],
            (x >> 40) % 100
        )
    };
    for f in 0..6 {
        let jsonl: String = (0..50)
            .map(|r| {
                let i = f * 50 + r;
                let text = if i % 2 == 0 {
                    let doc: Vec<String> = (0..40).map(|_| word()).collect();
                    format!(
                        "def add_{i}(a, b):\n    \"\"\"{}\"\"\"\n    return a + b + {i}\n",
                        doc.join(" ")
                    )
                } else {
                    let data: Vec<String> = (0..60).map(|k| (k * i % 997).to_string()).collect();
                    format!("DATA_{i} = [{}]\n", data.join(", "))
                };
                serde_json::json!({"id": format!("f{i:03}"), "content": text}).to_string() + "\n"
            })
            .collect();
        std::fs::write(code.join(format!("part-{f}.jsonl")), jsonl).unwrap();
    }
    let recipe = mini_recipe(dir, server);
    let edited = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace(
            "[[data]]\nname = \"stories\"\nkind = \"stories\"\nn = 60\n",
            &format!(
                "[[data]]\nname = \"code\"\nkind = \"filter\"\npaths = [\"{}\"]\nsample = 60\nforest = {{ trees = 30 }}\n",
                code.display()
            ),
        )
        .replace("from = [\"stories\"]", "from = [\"code\"]\nchar_ngrams = 10");
    std::fs::write(&recipe, edited).unwrap();
    recipe
}

/// Path below `dir` → bytes, of every file below `dir/sub`.
fn files_below(dir: &Path, sub: &str) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.join(sub)];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The filter's outputs that must not depend on how it ran: every row with its score and verdict
/// (`scored/`) and the kept rows (`kept/`).
fn filter_outputs(step: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = files_below(step, "scored");
    out.extend(files_below(step, "kept"));
    out
}

/// The numbers of a filter step's manifest that do not depend on how it ran.
fn filter_summary(out: &Path) -> serde_json::Value {
    let s = &manifest(out, "code")["summary"];
    serde_json::json!([s["records"], s["files_scored"], s["tokens"], s["threshold"]])
}

/// Issue 27's task contract for a filter step: `--filter-stage classifier` (one job: the rating
/// and the classifier), then N scoring tasks run at once as separate processes told who they are
/// by SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, then the same command without a task, end
/// with one run's step: byte-identical `scored/` and `kept/` files and the same summary (the
/// oracle: a whole local run of the step against the same deterministic mock, which keeps the
/// 150 documented functions of 300). The merge names a task that has not finished; a relaunched
/// finished task scores nothing again; a task killed between its two parts, relaunched, scores
/// only the part it had not finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_step_as_array_tasks_ends_like_one_run() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let recipe = array_filter_recipe(&dir.path().join("recipe"), &server);
    let whole = dir.path().join("whole");
    let o = run(train_cmd(&recipe, &whole, &["--quiet", "--until", "code"])).await;
    assert!(o.status.success(), "{}", text(&o));
    let expected = filter_outputs(&step_dir(&whole, "code"));
    assert_eq!(expected.len(), 12, "{:?}", expected.keys());
    assert_eq!(manifest(&whole, "code")["summary"]["records"], 150);

    for n in [1usize, 3] {
        let out = dir.path().join(format!("array-{n}"));
        let task = |k: usize| {
            let mut c = train_cmd(&recipe, &out, &["--quiet", "--only", "code"]);
            c.env("SLURM_ARRAY_TASK_ID", k.to_string())
                .env("SLURM_ARRAY_TASK_COUNT", n.to_string());
            c
        };
        // A scoring task before the classifier exists says which job to run first.
        let o = run(task(0)).await;
        assert!(!o.status.success());
        assert!(
            text(&o).contains("--only code --filter-stage classifier"),
            "{}",
            text(&o)
        );
        let o = run(train_cmd(
            &recipe,
            &out,
            &["--quiet", "--only", "code", "--filter-stage", "classifier"],
        ))
        .await;
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            !out.join("steps/code.json").exists(),
            "the classifier job does not finish the step"
        );
        // Every task but the last, at once.
        let running: Vec<_> = (0..n - 1).map(|k| tokio::spawn(run(task(k)))).collect();
        for r in running {
            let o = r.await.unwrap();
            assert!(o.status.success(), "{}", text(&o));
        }
        let merge = || train_cmd(&recipe, &out, &["--quiet", "--only", "code"]);
        if n > 1 {
            let o = run(merge()).await;
            assert!(!o.status.success());
            assert!(
                text(&o).contains(&format!("tasks {};", n - 1)),
                "{}",
                text(&o)
            );
        }
        let o = run(task(n - 1)).await;
        assert!(o.status.success(), "{}", text(&o));
        // Relaunched after it finished: its progress file gets no new line.
        let step = dir_starting(&out.join("data"), "code-").unwrap();
        let progress = step.join(if n == 1 {
            "progress.jsonl".to_string()
        } else {
            format!("progress-0-of-{n}.jsonl")
        });
        let before = std::fs::read(&progress).unwrap();
        let o = run(task(0)).await;
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(std::fs::read(&progress).unwrap(), before);
        if n > 1 {
            // Task 1 "killed" while scoring its second part (of parts 1 and 4): no marker, no
            // progress line and no files for that part. Relaunched, it scores that part only.
            std::fs::remove_file(step.join("completions/00001")).unwrap();
            let progress = step.join(format!("progress-1-of-{n}.jsonl"));
            let journal = std::fs::read_to_string(&progress).unwrap();
            let lines: Vec<&str> = journal.lines().collect();
            assert_eq!(lines.len(), 2, "{journal}");
            let rel: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
            let rel = rel["rel"].as_str().unwrap();
            for dir in ["scored", "kept"] {
                std::fs::remove_file(step.join(dir).join(rel)).unwrap();
            }
            std::fs::write(&progress, format!("{}\n", lines[0])).unwrap();
            let o = run(merge()).await;
            assert!(text(&o).contains("tasks 1;"), "{}", text(&o));
            let o = run(task(1)).await;
            assert!(o.status.success(), "{}", text(&o));
            let again = std::fs::read_to_string(&progress).unwrap();
            assert_eq!(again.lines().count(), 2, "{again}");
            assert_eq!(
                again.lines().next(),
                Some(lines[0]),
                "part 1 was not scored again"
            );
        }
        let o = run(merge()).await;
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(filter_outputs(&step), expected, "{n} tasks");
        assert_eq!(filter_summary(&out), filter_summary(&whole), "{n} tasks");
        assert_eq!(manifest(&out, "code")["summary"]["tasks"], n);
    }
}

/// For a test whose tool is missing: under CI (`CI` set and not `false` or `0`) it fails with
/// `missing`; elsewhere it prints `skipped: {missing}` and the test returns.
fn skip_unless_ci(missing: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    assert!(
        !ci,
        "{missing} (CI is set: a test whose tool is missing fails in CI)"
    );
    eprintln!("skipped: {missing}");
}

/// `program` on PATH or in the sbin directories (where Debian puts the daemons, outside a
/// non-root PATH).
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `program` (found by [`which`]) as a command.
fn command(program: &str) -> Command {
    Command::new(which(program).unwrap_or_else(|| panic!("{program} not found")))
}

/// A one-node Slurm cluster of the test's own: `munged`, `slurmctld -D` and `slurmd -D` as
/// children of the test, with their key, config, state, sockets and logs in `dir` and ports
/// of their own, so that it touches no system Slurm. Dropping it cancels its jobs and stops the
/// daemons.
struct Slurm {
    dir: PathBuf,
    conf: PathBuf,
    daemons: Vec<std::process::Child>,
}

impl Slurm {
    /// Starts the daemons and waits (up to a minute) until the node is idle.
    fn start(dir: &Path) -> Slurm {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let munge = dir.join("munge");
        for d in ["munge", "state", "spool"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        // munged refuses a socket whose directory others cannot search, and a key others can read.
        mode(dir, 0o755);
        mode(&munge, 0o755);
        let key = munge.join("munge.key");
        let mut bytes = vec![0u8; 1024];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").unwrap(),
            &mut bytes,
        )
        .unwrap();
        std::fs::write(&key, bytes).unwrap();
        mode(&key, 0o400);
        let socket = munge.join("munge.socket");
        let log = |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).unwrap());
        let mut cluster = Slurm {
            dir: dir.to_path_buf(),
            conf: dir.join("slurm.conf"),
            daemons: Vec::new(),
        };
        cluster.daemons.push(
            command("munged")
                .arg("--foreground")
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--key-file={}", key.display()))
                .arg(format!("--pid-file={}", munge.join("munged.pid").display()))
                .arg(format!(
                    "--seed-file={}",
                    munge.join("munged.seed").display()
                ))
                .stdout(Stdio::null())
                .stderr(log("munged.log"))
                .spawn()
                .unwrap(),
        );
        cluster.wait_for("munged's socket", || socket.exists());
        // The node as slurmd measures it: a node configured with more CPUs or memory than it
        // has is drained.
        let measured = command("slurmd").arg("-C").output().unwrap();
        let measured = String::from_utf8_lossy(&measured.stdout).into_owned();
        let field = |name: &str| -> u64 {
            measured
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("`slurmd -C` printed no {name}: {measured}"))
        };
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let d = dir.display();
        std::fs::write(
            &cluster.conf,
            format!(
                "ClusterName=phigen\n\
                 SlurmctldHost=localhost(127.0.0.1)\n\
                 SlurmctldPort={ctld}\n\
                 SlurmdPort={slurmd}\n\
                 SlurmUser=root\n\
                 SlurmdUser=root\n\
                 AuthType=auth/munge\n\
                 CredType=cred/munge\n\
                 AuthInfo=socket={socket}\n\
                 StateSaveLocation={d}/state\n\
                 SlurmdSpoolDir={d}/spool\n\
                 SlurmctldPidFile={d}/slurmctld.pid\n\
                 SlurmdPidFile={d}/slurmd.pid\n\
                 ProctrackType=proctrack/linuxproc\n\
                 TaskPlugin=task/none\n\
                 JobAcctGatherType=jobacct_gather/none\n\
                 AccountingStorageType=accounting_storage/none\n\
                 JobCompType=jobcomp/none\n\
                 MpiDefault=none\n\
                 MailProg=/bin/true\n\
                 ReturnToService=2\n\
                 SelectType=select/cons_tres\n\
                 SelectTypeParameters=CR_Core\n\
                 SchedulerType=sched/backfill\n\
                 SchedulerParameters=bf_interval=1,sched_interval=1\n\
                 NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN\n\
                 PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n",
                ctld = port(),
                slurmd = port(),
                socket = socket.display(),
                cpus = field("CPUs"),
                memory = field("RealMemory"),
            ),
        )
        .unwrap();
        for (daemon, extra) in [("slurmctld", &[][..]), ("slurmd", &["-N", "localhost"][..])] {
            cluster.daemons.push(
                command(daemon)
                    .arg("-D")
                    .arg("-f")
                    .arg(&cluster.conf)
                    .args(extra)
                    .stdout(Stdio::null())
                    .stderr(log(&format!("{daemon}.log")))
                    .spawn()
                    .unwrap(),
            );
        }
        cluster.wait_for("an idle node (sinfo)", || {
            cluster
                .client("sinfo")
                .args(["-h", "-o", "%t"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle")
        });
        cluster
    }

    /// A Slurm client command (sbatch, sinfo…) that talks to this cluster.
    fn client(&self, program: &str) -> Command {
        let mut c = command(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// The daemons' logs, for a failure message.
    fn logs(&self) -> String {
        ["munged.log", "slurmctld.log", "slurmd.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                format!(
                    "--- {f} (last lines)\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn wait_for(&self, what: &str, ready: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "no {what} after 60 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = self.client("scancel").args(["--user", "root"]).output();
        for d in self.daemons.iter_mut().rev() {
            // SIGTERM first: slurmd and slurmctld save their state and exit.
            // SAFETY: a signal to a child this struct started and has not reaped.
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

/// Issue 27's "real Slurm": a one-node cluster (Debian's slurm-wlm and munge, which .ci/run
/// installs; as root) runs the scripts `--executor slurm --shards 3` writes for a recipe with a
/// filter step (the classifier job, an array of 3 scoring tasks, the merge), dedup's four array
/// stages, a tokenize array, training and an eval, each submitted by submit.sh with
/// `--dependency=afterok`. Waited for by polling the last step's manifest (no squeue, no
/// accounting), the run ends where one local run of the same recipe ends (the oracle): the
/// filter's scored and kept files, the dedup's kept files and the token shards byte for byte,
/// and the validation losses within 1e-4 (as the kill -9 test allows). The array tasks' logs
/// show that Slurm ran them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_slurm_runs_the_emitted_scripts_like_one_local_run() {
    let missing: Vec<&str> = [
        "munged",
        "slurmctld",
        "slurmd",
        "sbatch",
        "sinfo",
        "scancel",
    ]
    .into_iter()
    .filter(|p| which(p).is_none())
    .collect();
    if !missing.is_empty() {
        return skip_unless_ci(&format!(
            "{} not found: install Debian's slurm-wlm and munge (`apt-get install slurm-wlm munge`, as .ci/run does)",
            missing.join(", ")
        ));
    }
    // SAFETY: geteuid reads the process's user id; it cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return skip_unless_ci(
            "the one-node Slurm cluster needs root (slurmd starts jobs as their user)",
        );
    }
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let recipe = array_filter_recipe(&dir.path().join("recipe"), &server);
    let a = dir.path().join("a");
    let o = run(train_cmd(&recipe, &a, &["--quiet"])).await;
    assert!(o.status.success(), "{}", text(&o));

    let b = dir.path().join("b");
    let o = run(train_cmd(
        &recipe,
        &b,
        &["--quiet", "--executor", "slurm", "--shards", "3"],
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let slurm = b.join("slurm");
    let score = std::fs::read_to_string(slurm.join("00-code-score.sbatch")).unwrap();
    assert!(score.contains("#SBATCH --array=0-2\n"), "{score}");

    // submit.sh finds sbatch on PATH.
    let path = format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    );
    let cluster = tokio::task::block_in_place(|| Slurm::start(&dir.path().join("slurm")));
    let o = run({
        let mut c = cluster.client("bash");
        c.arg(slurm.join("submit.sh"))
            .env("PATH", &path)
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("PHIGEN_TEACHER")
            .env_remove("PHIGEN_MODEL");
        c
    })
    .await;
    assert!(o.status.success(), "{}\n{}", text(&o), cluster.logs());
    let jobs_log = || {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(slurm.join("logs"))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        logs.sort();
        logs.iter()
            .map(|p| {
                format!(
                    "--- {}\n{}",
                    p.display(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Done when the last step's manifest is written; a failed job leaves its dependants pending
    // for ever, so a log that says `error:` ends the wait at once.
    let deadline = Instant::now() + Duration::from_secs(600);
    while !b.join("steps/loss.json").exists() {
        let logs = jobs_log();
        assert!(
            !logs.contains("error:") && Instant::now() < deadline,
            "the Slurm jobs did not finish:\n{logs}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(cluster);

    // Slurm ran the scoring array as three tasks (`%A_%a` logs), each of which left its marker.
    let logs = std::fs::read_dir(slurm.join("logs")).unwrap();
    let score_tasks: BTreeSet<String> = logs
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let rest = name.strip_prefix("code-")?.strip_suffix(".out")?;
            Some(rest.split_once('_')?.1.to_string())
        })
        .collect();
    assert_eq!(
        score_tasks,
        BTreeSet::from(["0", "1", "2"].map(String::from))
    );
    assert_eq!(manifest(&b, "code")["summary"]["tasks"], 3);
    assert_eq!(
        filter_outputs(&step_dir(&b, "code")),
        filter_outputs(&step_dir(&a, "code"))
    );
    assert_eq!(filter_summary(&b), filter_summary(&a));
    let kept =
        |out: &Path| -> BTreeMap<String, Vec<u8>> { files_below(&step_dir(out, "dedup"), "kept") };
    assert_eq!(kept(&b), kept(&a));
    assert_eq!(
        shard_bytes(&step_dir(&b, "tok")),
        shard_bytes(&step_dir(&a, "tok"))
    );
    assert_same_losses(&step_dir(&a, "train"), &step_dir(&b, "train"));
    assert!(b.join("scoreboard.md").exists());
}

/// `--executor kubernetes` writes a filter step as three Jobs, in order: the classifier (one pod,
/// `--filter-stage classifier`), an Indexed Job of --shards completions that scores
/// (`--filter-stage score --shards 3`, each pod's task from JOB_COMPLETION_INDEX), and the merge
/// (one pod, no stage): the shape the real Slurm test runs, in Kubernetes' Indexed Job API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_jobs_run_a_filter_step_as_classifier_scoring_and_merge() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let recipe = array_filter_recipe(&dir.path().join("recipe"), &server);
    let out = dir.path().join("k8s");
    let o = run(train_cmd(
        &recipe,
        &out,
        &[
            "--quiet",
            "--executor",
            "kubernetes",
            "--shards",
            "3",
            "--image",
            "registry.example/phigen:1",
            "--volume-claim",
            "phigen-data",
        ],
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let k8s = out.join("kubernetes");
    let apply = std::fs::read_to_string(k8s.join("apply.sh")).unwrap();
    let applied: Vec<&str> = apply
        .lines()
        .filter_map(|l| l.strip_prefix("kubectl apply -f "))
        .take(3)
        .collect();
    assert_eq!(
        applied,
        [
            "00-code-classifier.yaml",
            "00-code-score.yaml",
            "00-code-merge.yaml"
        ]
    );
    let command = |file: &str| -> (String, Vec<String>) {
        let job = std::fs::read_to_string(k8s.join(file)).unwrap();
        let command = job
            .lines()
            .find_map(|l| l.trim().strip_prefix("command: "))
            .map(|c| serde_json::from_str(c).unwrap())
            .unwrap();
        (job, command)
    };
    let (job, c) = command("00-code-classifier.yaml");
    assert!(!job.contains("Indexed"), "{job}");
    assert_eq!(
        c[c.len() - 4..],
        ["--only", "code", "--filter-stage", "classifier"]
    );
    let (job, c) = command("00-code-score.yaml");
    assert!(
        job.contains("  completionMode: Indexed\n") && job.contains("  completions: 3\n"),
        "{job}"
    );
    assert_eq!(
        c[c.len() - 6..],
        ["--only", "code", "--filter-stage", "score", "--shards", "3"]
    );
    let (job, c) = command("00-code-merge.yaml");
    assert!(!job.contains("Indexed"), "{job}");
    assert_eq!(c[c.len() - 2..], ["--only", "code"]);
}

/// Issue 28: a whole-run recipe under a data parallel launcher. Two processes with torchrun's
/// variables: rank 0 runs the data steps while rank 1 waits connected to it, then both train, and
/// rank 0 alone runs the eval and writes the scoreboard. The data are those of one local run and
/// the validation losses equal it within 1e-4 relative (the gradient sums are added in another
/// order); rank 1 wrote nothing (one metrics line per step). A second launch finds the training
/// done: rank 0 releases rank 1 without training.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_run_recipe_trains_on_all_ranks_of_a_torchrun_launch() {
    let server = mock(Faults::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(tmp.path(), &server);
    let local = tmp.path().join("local");
    let out = run(train_cmd(
        &recipe,
        &local,
        &[
            "--quiet",
            "--set",
            "stage.0.micro_batch=2",
            "--set",
            "stage.0.grad_accum=2",
        ],
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let launch = |out: &Path| -> Vec<std::process::Child> {
        (0..2)
            .map(|rank| {
                let mut c = train_cmd(
                    &recipe,
                    out,
                    &[
                        "--set",
                        "stage.0.micro_batch=2",
                        "--set",
                        "stage.0.grad_accum=2",
                    ],
                );
                c.env("RANK", rank.to_string())
                    .env("WORLD_SIZE", "2")
                    .env("LOCAL_RANK", rank.to_string())
                    .env("RAYON_NUM_THREADS", "1")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
                c.spawn().unwrap()
            })
            .collect()
    };
    let ranks = tmp.path().join("ranks");
    let outputs = |children: Vec<std::process::Child>| async move {
        tokio::task::spawn_blocking(move || {
            children
                .into_iter()
                .map(|c| c.wait_with_output().unwrap())
                .collect::<Vec<_>>()
        })
        .await
        .unwrap()
    };
    let done = outputs(launch(&ranks)).await;
    for o in &done {
        assert!(o.status.success(), "{}", text(o));
    }
    assert!(
        text(&done[1]).contains("rank 1 of 2: trained with rank 0"),
        "{}",
        text(&done[1])
    );
    assert_eq!(
        shard_bytes(&step_dir(&local, "tok")),
        shard_bytes(&step_dir(&ranks, "tok"))
    );
    let train = step_dir(&ranks, "train");
    assert_same_losses(&step_dir(&local, "train"), &train);
    let steps: Vec<u64> = std::fs::read_to_string(train.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m.get("train_loss").is_some())
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    assert!(ranks.join("scoreboard.md").is_file() || ranks.join("scoreboard.json").is_file());
    let again = outputs(launch(&ranks)).await;
    for o in &again {
        assert!(o.status.success(), "{}", text(o));
    }
    assert!(
        text(&again[1]).contains("finished without training"),
        "{}",
        text(&again[1])
    );
}

/// Issue 30: recipes/phi-1.5.toml and recipes/phi-2-data.toml make their own data. Each parses
/// and plans (`--plan`, no key: nothing is sent) with its inputs given as small stand-ins and
/// its generate targets cut to 1M tokens; the prose textbooks read a topics step's list; every training input is a tokenize step of the recipe (no token directory a
/// user must make by hand), phi-1.5 weighs prose textbooks 0.8 against phi-1's code data 0.2, and
/// phi-2-data's web filter plans with the web preset (the plan lists its steps by name). Expected
/// values are the issue's recipe (80/20, prose + code, + web filtered by educational value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phi_1_5_and_phi_2_data_recipes_plan_their_own_data() {
    use phigen::pipeline::recipe::{Action, DataKind};
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stack = dir.path().join("stack-python");
    std::fs::create_dir_all(&stack).unwrap();
    std::fs::write(
        stack.join("a.py"),
        "def f(x):\n    \"\"\"Twice x.\"\"\"\n    return 2 * x\n",
    )
    .unwrap();
    let web = dir.path().join("web");
    std::fs::create_dir_all(&web).unwrap();
    std::fs::write(
        web.join("crawl.jsonl"),
        "{\"text\": \"Plants make their food from light, water and air.\"}\n",
    )
    .unwrap();
    for (name, prose_weight) in [("phi-1.5.toml", 0.8), ("phi-2-data.toml", 0.4)] {
        let path = root.join("recipes").join(name);
        let p =
            phigen::pipeline::Pipeline::load(&path, &[], None).unwrap_or_else(|e| panic!("{e}"));
        let mut sets = Vec::new();
        for (i, s) in p.data.iter().enumerate() {
            // The planner's work grows with a generate step's target (20B tokens: minutes).
            if s.kind == DataKind::Textbooks {
                sets.push(format!("data.{i}.tokens=\"1M\""));
            }
            if s.kind == DataKind::Filter {
                let Action::Filter { settings, .. } = &s.action else {
                    unreachable!()
                };
                let input = if settings.preset == phigen::classify::preset::Preset::Web {
                    &web
                } else {
                    &stack
                };
                sets.push(format!("data.{i}.paths=[\"{}\"]", input.display()));
            }
        }
        let by_step: HashMap<String, f64> = p.stage_refs[0]
            .iter()
            .zip(&p.train.stages[0].raw.data)
            .map(|(r, d)| (r.clone().expect("a step, not a path"), d.weight))
            .collect();
        for step in by_step.keys() {
            assert_eq!(
                p.step(step).map(|s| s.kind),
                Some(DataKind::Tokenize),
                "{name}: {step}"
            );
        }
        assert!(
            (by_step["tok-prose"] - prose_weight).abs() < 1e-9,
            "{name}: {by_step:?}"
        );
        let code: f64 = ["tok-code", "tok-code-textbooks"]
            .iter()
            .map(|s| by_step[*s])
            .sum();
        assert!((code - 0.2).abs() < 1e-9, "{name}: {by_step:?}");
        let prose = p.step("prose").expect("a prose textbooks step");
        assert_eq!(prose.kind, DataKind::Textbooks);
        // phi-1.5's ~20K topics come from a topics step, which the prose step reads.
        assert_eq!(prose.from, ["topics"], "{name}");
        assert_eq!(p.step("topics").map(|s| s.kind), Some(DataKind::Topics));
        if name == "phi-2-data.toml" {
            let Action::Filter { settings, .. } = &p.step("web").expect("a web filter").action
            else {
                panic!("`web` is not a filter step")
            };
            assert_eq!(settings.preset, phigen::classify::preset::Preset::Web);
        }
        let out = dir.path().join(name);
        let mut args = vec!["--plan"];
        for s in &sets {
            args.extend(["--set", s.as_str()]);
        }
        let o = run(train_cmd(&path, &out, &args)).await;
        assert!(o.status.success(), "{name}: {}", text(&o));
        let plan = text(&o);
        for step in p.data.iter().map(|s| s.name.as_str()) {
            assert!(
                plan.contains(step),
                "{name}: the plan lacks {step}:\n{plan}"
            );
        }
    }
}

/// Issue 31: a whole run on a Hugging Face tokenizer (the Llama-style tokenizer.json of
/// tests/fixtures/tokenizers, a copy in a checkpoint-style directory) given as `model.tokenizer`:
/// the tokenize step uses it, training and the loss eval run on its ids. The files' hash is part
/// of the steps' identity: after tokenizer_config.json changes (another eos), `--plan` shows the
/// tokenize step and everything after it stale and the stories done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenizer_file_is_part_of_the_tokenize_steps_identity() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(dir.path(), &server);
    let tok_dir = dir.path().join("tokenizer");
    std::fs::create_dir_all(&tok_dir).unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers/llama_style");
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(name), tok_dir.join(name)).unwrap();
    }
    let set = format!("model.tokenizer={}", tok_dir.display());
    let out = dir.path().join("run");
    let o = run(train_cmd(&recipe, &out, &["--quiet", "--set", &set])).await;
    assert!(o.status.success(), "{}", text(&o));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(step_dir(&out, "tok").join("meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["vocab_size"], 646, "{meta}");
    assert_eq!(
        meta["end_of_text"], 2,
        "</s>, the eos of tokenizer_config.json"
    );
    std::fs::write(
        tok_dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<pad>"}"#,
    )
    .unwrap();
    let o = run(train_cmd(&recipe, &out, &["--plan", "--set", &set])).await;
    assert!(o.status.success(), "{}", text(&o));
    let plan = text(&o);
    let status = |step: &str| -> String {
        let line = plan
            .lines()
            .find(|l| l.split_whitespace().next() == Some(step))
            .unwrap_or_else(|| panic!("no row for {step}:\n{plan}"));
        line.split_whitespace().nth(2).unwrap().to_string()
    };
    assert_eq!(status("stories"), "done", "{plan}");
    for s in ["tok", "train", "loss"] {
        assert_eq!(status(s), "stale", "{s}:\n{plan}");
    }
}

/// A recipe with a prefs step (issue 31, item 4): the tiny model pretrains on mock stories, the
/// prefs step samples two responses per prompt from the pretrain stage's final checkpoint and has
/// the mock judge score them, and a dpo stage trains on the pairs — all through the binary. The
/// prefs step is listed first in the file, so the run order comes from its student: after the
/// data the pretrain stage reads, before the training step whose dpo stage reads it. Expected:
/// every pair names the judge, the rubric, and the hash of the pretrain stage's last checkpoint
/// (step 4 of 4); the dpo stage trains to its last step; a second run skips every step and sends
/// nothing; and a changed pretrain stage makes the prefs step stale (its id holds the stage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefs_step_samples_a_trained_stage_for_a_later_dpo_stage() {
    let started = Instant::now();
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    let lines: Vec<String> = (0..12)
        .map(|i| format!("Tell me about toy number {i}."))
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let recipe = dir.path().join("prefs.toml");
    let toml = format!(
        r#"name = "prefs"
seed = 0

[teacher]
teacher = "http"
base_url = "{}"
model = "mock"
price_input = 1.0
price_output = 2.0
max_cost = 100.0
concurrency = 4

[[data]]
name = "prefs"
kind = "prefs"
student = "pretrain"
prompts = "{}"
samples = 2
max_new_tokens = 8

[[data]]
name = "stories"
kind = "stories"
n = 20

[[data]]
name = "tok"
kind = "tokenize"
from = ["stories"]
val_fraction = 0.2

[model]
preset = "tiny-phi"
vocab_size = 50304
max_position_embeddings = 64

[[stage]]
name = "pretrain"
data = [{{ step = "tok" }}]
seq_len = 32
micro_batch = 4
steps = 4
lr = 1e-3
warmup = 1
eval_every = 4
eval_batches = 1
checkpoint_every = 4

[[stage]]
name = "dpo"
init = "previous"
objective = "dpo"
chat_template = "phi-3"
data = [{{ step = "prefs" }}]
seq_len = 48
micro_batch = 2
steps = 3
lr = 1e-3
warmup = 1
eval_every = 3
eval_batches = 1
checkpoint_every = 3
"#,
        server.base_url(),
        prompts.display()
    );
    std::fs::write(&recipe, toml).unwrap();
    let out = dir.path().join("run");
    let o = run(train_cmd(&recipe, &out, &["--quiet"])).await;
    assert!(o.status.success(), "{}", text(&o));

    let prefs = manifest(&out, "prefs");
    let upstream = prefs["upstream"]
        .as_object()
        .map(|u| u.keys().cloned().collect::<Vec<_>>());
    assert_eq!(upstream, Some(vec!["tok".to_string()]), "{prefs}");
    let train = step_dir(&out, "train");
    let ckpt = train.join("pretrain").join("step-000004");
    let student = phigen::generate::prefs::student_hash(&ckpt).unwrap();
    let pairs_path = step_dir(&out, "prefs").join("pairs.jsonl");
    let pairs: Vec<serde_json::Value> = std::fs::read_to_string(&pairs_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // 12 prompts; the mock judge scores 1–10 from a hash, so about one in ten ties.
    assert!(pairs.len() >= 6, "{} pairs", pairs.len());
    for p in &pairs {
        assert_eq!(p["judge"], "mock", "{p}");
        assert!(
            p["rubric"]
                .as_str()
                .unwrap()
                .starts_with("prefs-judge v1 ("),
            "{p}"
        );
        assert_eq!(p["student_hash"].as_str(), Some(student.as_str()), "{p}");
        assert_ne!(p["chosen"], p["rejected"]);
        let scores: Vec<i64> = serde_json::from_value(p["scores"].clone()).unwrap();
        let (c, r) = (
            p["chosen_sample"].as_u64().unwrap() as usize,
            p["rejected_sample"].as_u64().unwrap() as usize,
        );
        assert!(scores[c] > scores[r], "{p}");
        let mut order: Vec<u64> = serde_json::from_value(p["order"].clone()).unwrap();
        order.sort();
        assert_eq!(order, vec![0, 1], "{p}");
    }
    let dpo_lines = std::fs::read_to_string(train.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"stage\":\"dpo\""))
        .count();
    assert!(dpo_lines >= 3, "dpo trained {dpo_lines} logged steps");
    assert!(train.join("dpo").join("step-000003").is_dir());

    let sent = requests(&server);
    let o = run(train_cmd(&recipe, &out, &["--quiet"])).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(requests(&server), sent, "a done step sent requests again");
    assert_eq!(manifest(&out, "prefs"), prefs);

    let o = run(train_cmd(
        &recipe,
        &out,
        &["--plan", "--set", "stage.0.lr=2e-3"],
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let plan = text(&o);
    let status = |step: &str| -> String {
        let line = plan
            .lines()
            .find(|l| l.split_whitespace().next() == Some(step))
            .unwrap_or_else(|| panic!("no row for {step}:\n{plan}"));
        line.split_whitespace().nth(2).unwrap().to_string()
    };
    assert_eq!(status("tok"), "done", "{plan}");
    assert_eq!(status("prefs"), "stale", "{plan}");
    assert_eq!(status("train"), "stale", "{plan}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

/// Issue 31 item 5: the shipped phi-3-tiny recipe runs pretrain → SFT → DPO end to end, with the
/// mock in place of the local teacher and fewer records and steps: the chat-data step feeds the
/// sft stage; the prefs step reads its prompts from the chat-data step (`from`), samples the sft
/// stage's final checkpoint (every pair names that checkpoint's hash) and the dpo stage trains on
/// the pairs; the chat stages' checkpoints carry the phi-3 template, so `phigen serve` answers in
/// it; a second run skips every step and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phi3_tiny_recipe_pretrains_then_sft_then_dpo() {
    let server = mock(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("phi3");
    let base = format!("teacher.base_url=\"{}\"", server.base_url());
    let sets = [
        "teacher.teacher=\"http\"",
        "teacher.price_input=0",
        "teacher.price_output=0",
        base.as_str(),
        "teacher.model=\"mock\"",
        "data.0.n=24",
        "data.1.val_fraction=0.25",
        "data.2.n=24",
        "data.3.max_new_tokens=12",
        "stage.0.steps=4",
        "stage.0.warmup=1",
        "stage.0.eval_every=2",
        "stage.0.checkpoint_every=2",
        "stage.1.steps=4",
        "stage.1.warmup=1",
        "stage.1.eval_every=2",
        "stage.1.checkpoint_every=2",
        "stage.2.steps=3",
        "stage.2.warmup=1",
        "stage.2.eval_every=3",
        "stage.2.checkpoint_every=3",
    ];
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/phi-3-tiny.toml");
    let mut args: Vec<&str> = Vec::new();
    for s in &sets {
        args.extend(["--set", s]);
    }
    let o = run(train_cmd(&recipe, &out, &args)).await;
    assert!(o.status.success(), "{}", text(&o));
    let train = step_dir(&out, "train");
    let sft = train.join("sft").join("step-000004");
    let dpo = train.join("dpo").join("step-000003");
    for ckpt in [&sft, &dpo] {
        let template = std::fs::read_to_string(ckpt.join("chat_template.jinja")).unwrap();
        assert!(template.contains("<|end|>"), "{template}");
    }
    let prefs = manifest(&out, "prefs");
    let upstream: Vec<String> = prefs["upstream"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(upstream.contains(&"chat".to_string()), "{prefs}");
    let student = phigen::generate::prefs::student_hash(&sft).unwrap();
    let pairs = std::fs::read_to_string(step_dir(&out, "prefs").join("pairs.jsonl")).unwrap();
    assert!(pairs.lines().count() >= 6, "{pairs}");
    for line in pairs.lines() {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(p["student_hash"].as_str(), Some(student.as_str()), "{p}");
    }
    let metrics = std::fs::read_to_string(train.join("metrics.jsonl")).unwrap();
    for stage in ["pretrain", "sft", "dpo"] {
        assert!(
            metrics.contains(&format!("\"stage\":\"{stage}\"")),
            "no {stage} metrics"
        );
    }
    let sent = requests(&server);
    let o = run(train_cmd(&recipe, &out, &args)).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(requests(&server), sent, "a done step sent requests again");
}
