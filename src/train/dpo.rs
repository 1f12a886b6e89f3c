//! DPO (Rafailov et al. 2023) as TRL's `DPOTrainer` computes it with `loss_type = "sigmoid"`:
//! for each pair, −log σ(β · ((π_c − ref_c) − (π_r − ref_r))) where π and ref are the summed
//! log-probabilities of the response tokens under the policy and the frozen reference (the
//! stage's initial weights), averaged over the pairs.
//!
//! The reference log-probs are computed once at the stage's start and cached beside the tokenized
//! pairs (see [`super::Run`]), so training holds one model. The loss is not a sum over tokens, so
//! the fused cross-entropy cannot take it directly; its gradient still is one: with s_r the
//! log-prob of row r, ∂L/∂θ = Σ_r (∂L/∂s_r) · ∂s_r/∂θ = Σ_r Σ_t −(∂L/∂s_r) · m_rt · ∂ce_rt/∂θ. So
//! the rows' log-probs are read first (outside the graph), ∂L/∂s_r comes from this module's loss
//! by candle's backward pass, and the weighted fused cross-entropy with weights −(∂L/∂s_r) · m_rt
//! gives the exact gradient in one pass.

use candle_core::{DType, Device, Result, Tensor, Var};

/// Per pair (P): TRL's sigmoid DPO loss, mean over the pairs. f64 tensors (P) each.
pub fn dpo_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    beta: f64,
) -> Result<Tensor> {
    let margin = ((chosen - ref_chosen)? - (rejected - ref_rejected)?)?;
    // −log σ(x) = log(1 + e^(−x)); in f64 this overflows only past |x| ≈ 709, and its gradient is
    // exact at 0 (where every pair starts: the policy is the reference).
    let x = (margin * beta)?;
    (x.neg()?.exp()? + 1.0)?.log()?.mean_all()
}

/// What a batch of pairs contributes: its share of the step's loss (the pairs' summed loss over
/// the step's pairs), the gradient of that share with respect to each row's log-prob (rows
/// chosen₀, rejected₀, chosen₁, …), and the pairs' summed reward accuracy and margin (the
/// implicit rewards β(π − ref), as TRL's metrics) over the step's pairs.
pub struct PairsShare {
    pub loss: f64,
    pub grad: Vec<f64>,
    pub accuracy: f64,
    pub margin: f64,
}

/// `logps` and `reference` in row order (chosen, rejected per pair); `of`: the step's pairs.
pub fn share(logps: &[f64], reference: &[f64], beta: f64, of: usize) -> Result<PairsShare> {
    let dev = Device::Cpu;
    let pairs = logps.len() / 2;
    let pick = |v: &[f64], k: usize| v.iter().skip(k).step_by(2).copied().collect::<Vec<_>>();
    let policy = Var::from_vec(logps.to_vec(), (pairs, 2), &dev)?;
    let (chosen, rejected) = (policy.narrow(1, 0, 1)?, policy.narrow(1, 1, 1)?);
    let r = Tensor::from_vec(reference.to_vec(), (pairs, 2), &dev)?;
    let (rc, rr) = (r.narrow(1, 0, 1)?, r.narrow(1, 1, 1)?);
    let fraction = pairs as f64 / of as f64;
    let loss = (dpo_loss(&chosen, &rejected, &rc, &rr, beta)? * fraction)?;
    let grad = loss
        .backward()?
        .get(policy.as_tensor())
        .map(|g| g.flatten_all()?.to_vec1::<f64>())
        .transpose()?
        .unwrap_or_else(|| vec![0.0; logps.len()]);
    let (pc, pr, refc, refr) = (
        pick(logps, 0),
        pick(logps, 1),
        pick(reference, 0),
        pick(reference, 1),
    );
    let (mut accuracy, mut margin) = (0.0, 0.0);
    for (((c, r), rc), rr) in pc.iter().zip(&pr).zip(&refc).zip(&refr) {
        let m = beta * ((c - rc) - (r - rr));
        accuracy += f64::from(u8::from(m > 0.0));
        margin += m;
    }
    Ok(PairsShare {
        loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        grad,
        accuracy: accuracy / of as f64,
        margin: margin / of as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Fixture {
        beta: f64,
        token_logps: Vec<Vec<f64>>,
        completion_mask: Vec<Vec<f64>>,
        ref_chosen_logps: Vec<f64>,
        ref_rejected_logps: Vec<f64>,
        loss: f64,
        grad_token_logps: Vec<Vec<f64>>,
        reward_accuracy: f64,
        reward_margin: f64,
    }

    fn fixture() -> Fixture {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dpo/dpo.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// tests/fixtures/dpo/dpo.json is TRL 1.16's `DPOTrainer._compute_loss` (sigmoid loss) on
    /// fixed per-token log-probs, with its gradient by torch autograd (make_fixture.py). Here the
    /// same per-token log-probs are masked and summed with candle ops, fed to [`dpo_loss`], and
    /// differentiated by candle: loss and gradient within 1e-5 (they agree to ~1e-15).
    #[test]
    fn loss_and_gradient_equal_trl() {
        let f = fixture();
        let dev = Device::Cpu;
        let rows = f.token_logps.len();
        let t = f.token_logps[0].len();
        let flat = |v: &[Vec<f64>]| v.concat();
        let tokens = Var::from_vec(flat(&f.token_logps), (rows, t), &dev).unwrap();
        let mask = Tensor::from_vec(flat(&f.completion_mask), (rows, t), &dev).unwrap();
        let logps = (tokens.as_tensor() * &mask).unwrap().sum(1).unwrap(); //              (2P)
        let p = rows / 2;
        let (c, r) = (
            logps.narrow(0, 0, p).unwrap(),
            logps.narrow(0, p, p).unwrap(),
        );
        let rc = Tensor::new(f.ref_chosen_logps.as_slice(), &dev).unwrap();
        let rr = Tensor::new(f.ref_rejected_logps.as_slice(), &dev).unwrap();
        let loss = dpo_loss(&c, &r, &rc, &rr, f.beta).unwrap();
        let value = loss.to_scalar::<f64>().unwrap();
        assert!((value - f.loss).abs() < 1e-5, "{value} vs TRL {}", f.loss);
        let grad = loss.backward().unwrap();
        let grad = grad
            .get(tokens.as_tensor())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for (a, b) in grad.concat().iter().zip(flat(&f.grad_token_logps)) {
            assert!((a - b).abs() < 1e-5, "gradient {a} vs TRL {b}");
        }
    }

    /// [`share`] (what training uses: interleaved rows, one batch's share of a step) gives TRL's
    /// loss, metrics and per-row gradient (the per-token one of any response token) when the
    /// batch is the whole step, and half of each for half the pairs of a step twice as large.
    #[test]
    fn share_equals_trl_and_splits_exactly() {
        let f = fixture();
        let p = f.ref_chosen_logps.len();
        let row = |r: usize| {
            f.token_logps[r]
                .iter()
                .zip(&f.completion_mask[r])
                .map(|(l, m)| l * m)
                .sum::<f64>()
        };
        let (mut logps, mut reference) = (Vec::new(), Vec::new());
        for i in 0..p {
            logps.extend([row(i), row(p + i)]);
            reference.extend([f.ref_chosen_logps[i], f.ref_rejected_logps[i]]);
        }
        let s = share(&logps, &reference, f.beta, p).unwrap();
        assert!((s.loss - f.loss).abs() < 1e-5);
        assert!((s.accuracy - f.reward_accuracy).abs() < 1e-9);
        assert!((s.margin - f.reward_margin).abs() < 1e-5);
        for i in 0..p {
            for (k, r) in [(0, i), (1, p + i)] {
                let j = f.completion_mask[r].iter().position(|&m| m > 0.0).unwrap();
                let want = f.grad_token_logps[r][j];
                assert!((s.grad[2 * i + k] - want).abs() < 1e-5);
            }
        }
        let half = share(&logps[..p], &reference[..p], f.beta, 2 * p).unwrap();
        let other = share(&logps[p..], &reference[p..], f.beta, 2 * p).unwrap();
        assert!(((half.loss + other.loss) * 2.0 - f.loss).abs() < 1e-9);
    }
}
