//! Rank-aware reward (docs/method.md, Rewards).
//!
//! For one (query, candidate) pair with target log-likelihood `t` and the log-likelihoods
//! `s_1..s_N` of N sampled outputs (NaN = missing sample, so N varies per pair):
//!
//! * `rank   = 1 + #{s_i > t} + ½·#{s_i = t}`
//! * `margin = sigmoid(t − max_i s_i)`
//! * `reward = (N + 1 − rank + margin) / (N + 1)`
//!
//! Two documented choices keep the stated properties true in float32:
//!
//! * The margin's argument is clipped to ±[`MARGIN_CLIP`] nats. Past 8 nats of mean
//!   token log-likelihood the sigmoid is already within 3.4e-4 of 0 or 1; the clip keeps the
//!   reward strictly inside (0, 1) and a strictly better rank strictly larger after rounding
//!   to float32 (for N up to a few thousand samples), instead of collapsing onto 0 or 1.
//! * With no present sample (N = 0) there is nothing to rank against: rank = 1 and the
//!   margin is sigmoid(0) = ½, so the reward is ½ — uninformative, and still inside (0, 1).

use rayon::prelude::*;

/// Bound on |t − max s| inside the margin's sigmoid, in nats (see module docs).
pub const MARGIN_CLIP: f64 = 8.0;

/// How rewards are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The reward itself, in (0, 1).
    Position,
    /// Reward minus the reward of candidate column `baseline` (the empty context), in (−1, 1).
    Shift { baseline: usize },
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Reward of one pair; `samples` may hold NaN for missing samples. `target` must be finite.
pub fn pair_reward(target: f32, samples: &[f32]) -> f64 {
    let mut present = 0usize;
    let mut greater = 0usize;
    let mut equal = 0usize;
    let mut best = f32::NEG_INFINITY;
    for &s in samples {
        if s.is_nan() {
            continue;
        }
        present += 1;
        if s > target {
            greater += 1;
        } else if s == target {
            equal += 1;
        }
        if s > best {
            best = s;
        }
    }
    let n = present as f64;
    let rank = 1.0 + greater as f64 + 0.5 * equal as f64;
    let gap = if present == 0 {
        0.0
    } else {
        (target as f64 - best as f64).clamp(-MARGIN_CLIP, MARGIN_CLIP)
    };
    (n + 1.0 - rank + sigmoid(gap)) / (n + 1.0)
}

/// Rewards for `q` queries × `m` candidates × `n` sample slots, row-major.
///
/// Inputs must already be validated (finite targets, no infinite samples, shapes).
/// Returns `q × m` rewards.
pub fn rank_aware_reward(
    target: &[f32],
    samples: &[f32],
    q: usize,
    m: usize,
    n: usize,
    mode: Mode,
) -> Vec<f32> {
    debug_assert_eq!(target.len(), q * m);
    debug_assert_eq!(samples.len(), q * m * n);
    let mut out = vec![0f32; q * m];
    if m == 0 {
        return out;
    }
    out.par_chunks_mut(m).enumerate().for_each(|(qi, row)| {
        let mut rewards = vec![0f64; m];
        for (mi, r) in rewards.iter_mut().enumerate() {
            let pair = qi * m + mi;
            *r = pair_reward(target[pair], &samples[pair * n..(pair + 1) * n]);
        }
        let base = match mode {
            Mode::Position => 0.0,
            Mode::Shift { baseline } => rewards[baseline],
        };
        for (o, r) in row.iter_mut().zip(&rewards) {
            *o = (r - base) as f32;
        }
    });
    out
}

/// Check the inputs of [`rank_aware_reward`]; `Err` names the argument and the fault.
pub fn validate(target: &[f32], samples: &[f32]) -> Result<(), String> {
    if let Some(pos) = target.iter().position(|x| !x.is_finite()) {
        return Err(format!(
            "target_ll must be finite (the desired output is always scored); found {} at flat index {pos}",
            target[pos]
        ));
    }
    if let Some(pos) = samples.iter().position(|x| x.is_infinite()) {
        return Err(format!(
            "sample_ll must be finite or NaN (NaN marks a missing sample); found {} at flat index {pos}",
            samples[pos]
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn golden_best_target_gets_rank_one() {
        // t = -1, samples -2, -3: rank 1, margin sigmoid(1)
        let r = pair_reward(-1.0, &[-2.0, -3.0]);
        assert!(close(r, (2.0 + sigmoid(1.0)) / 3.0));
    }

    #[test]
    fn golden_ties_count_half() {
        // t = -1, samples -1 (tie), 0 (better), -5: rank 1 + 1 + 0.5 = 2.5, margin sigmoid(-1)
        let r = pair_reward(-1.0, &[-1.0, 0.0, -5.0]);
        assert!(close(r, (4.0 - 2.5 + sigmoid(-1.0)) / 4.0));
    }

    #[test]
    fn nan_samples_are_dropped() {
        let a = pair_reward(-1.0, &[-2.0, f32::NAN, 0.5, f32::NAN]);
        let b = pair_reward(-1.0, &[-2.0, 0.5]);
        assert!(close(a, b));
    }

    #[test]
    fn no_samples_gives_one_half() {
        assert!(close(pair_reward(-3.0, &[]), 0.5));
        assert!(close(pair_reward(-3.0, &[f32::NAN, f32::NAN]), 0.5));
    }

    #[test]
    fn extreme_gaps_stay_strictly_inside_unit_interval_in_f32() {
        let hi = rank_aware_reward(&[0.0], &[-1e6, -1e6, -1e6], 1, 1, 3, Mode::Position)[0];
        let lo = rank_aware_reward(&[-1e6], &[0.0, 0.0, 0.0], 1, 1, 3, Mode::Position)[0];
        assert!(hi < 1.0 && hi > 0.99, "{hi}");
        assert!(lo > 0.0 && lo < 0.01, "{lo}");
    }

    #[test]
    fn better_rank_is_strictly_larger_even_at_extremes() {
        // rank 2 with the better sample far above vs rank 2.5 made of exact ties at the max
        let a = rank_aware_reward(
            &[-100.0],
            &[0.0, -200.0, -200.0, -200.0],
            1,
            1,
            4,
            Mode::Position,
        );
        let b = rank_aware_reward(&[0.0], &[0.0, 0.0, 0.0, -200.0], 1, 1, 4, Mode::Position);
        assert!(a[0] > b[0], "{} <= {}", a[0], b[0]);
    }

    #[test]
    fn shift_subtracts_the_baseline_column() {
        let target = [-1.0, -2.0, -0.5, -3.0];
        let samples = [-1.5, -0.7, -2.5, -1.0, -0.2, -0.9, -4.0, -3.5];
        let pos = rank_aware_reward(&target, &samples, 2, 2, 2, Mode::Position);
        let shift = rank_aware_reward(&target, &samples, 2, 2, 2, Mode::Shift { baseline: 1 });
        for qi in 0..2 {
            for mi in 0..2 {
                let want = pos[qi * 2 + mi] - pos[qi * 2 + 1];
                assert!((shift[qi * 2 + mi] - want).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn validate_rejects_bad_values() {
        assert!(validate(&[f32::NAN], &[])
            .unwrap_err()
            .contains("target_ll"));
        assert!(validate(&[0.0], &[f32::INFINITY])
            .unwrap_err()
            .contains("sample_ll"));
        assert!(validate(&[0.0], &[f32::NAN]).is_ok());
    }
}
