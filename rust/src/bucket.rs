//! Homogeneous, length-bucketed batches (docs/method.md).
//!
//! Every batch holds indices of one task only (so in-batch negatives are real negatives), and
//! indices of similar length travel together (less padding). With `shuffle`:
//!
//! 1. each task's indices are shuffled (seeded, one independent stream per task id);
//! 2. they are cut into pools of `batch_size · bucket_factor`, each pool is sorted by length
//!    and cut into batches (only a task's final pool can leave one smaller batch);
//! 3. the task's batches are shuffled;
//! 4. tasks are interleaved: the next batch comes from task t with probability proportional to
//!    `remaining_batches(t)^(1/task_temperature)` (1 = proportional to size, large = uniform).
//!
//! Without `shuffle` the order is deterministic and random-free: tasks in ascending id order,
//! each task's indices sorted by (length, index) and cut into batches — what an encoder wants
//! to cut padding while keeping a reproducible order.

use crate::rng::{splitmix64, Rng};
use std::collections::BTreeMap;

/// Options of [`bucket_batches`].
#[derive(Clone, Copy, Debug)]
pub struct BucketOptions {
    pub batch_size: usize,
    pub seed: u64,
    pub shuffle: bool,
    pub bucket_factor: usize,
    pub task_temperature: f64,
}

/// Check the arguments; `Err` names the argument and what was expected.
pub fn validate(task_ids: &[i64], lengths: &[i64], opts: &BucketOptions) -> Result<(), String> {
    if task_ids.len() != lengths.len() {
        return Err(format!(
            "task_ids and lengths must have the same length, got {} and {}",
            task_ids.len(),
            lengths.len()
        ));
    }
    if opts.batch_size == 0 {
        return Err("batch_size must be >= 1, got 0".into());
    }
    if opts.bucket_factor == 0 {
        return Err("bucket_factor must be >= 1, got 0".into());
    }
    if !(opts.task_temperature.is_finite() && opts.task_temperature > 0.0) {
        return Err(format!(
            "task_temperature must be a finite number > 0, got {}",
            opts.task_temperature
        ));
    }
    if let Some(pos) = lengths.iter().position(|&l| l < 0) {
        return Err(format!(
            "lengths must be >= 0, got {} at index {pos}",
            lengths[pos]
        ));
    }
    Ok(())
}

/// Batches of indices into the inputs; see the module docs for the order.
pub fn bucket_batches(task_ids: &[i64], lengths: &[i64], opts: &BucketOptions) -> Vec<Vec<i64>> {
    let mut by_task: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &t) in task_ids.iter().enumerate() {
        by_task.entry(t).or_default().push(i);
    }
    let by_length = |a: &usize, b: &usize| lengths[*a].cmp(&lengths[*b]).then(a.cmp(b));

    if !opts.shuffle {
        let mut out = Vec::new();
        for (_, mut idx) in by_task {
            idx.sort_by(by_length);
            out.extend(idx.chunks(opts.batch_size).map(to_i64));
        }
        return out;
    }

    let pool = opts.batch_size.saturating_mul(opts.bucket_factor);
    let mut per_task: Vec<Vec<Vec<i64>>> = Vec::with_capacity(by_task.len());
    for (&task, idx) in by_task.iter_mut() {
        let mut stream = task as u64;
        let mut rng = Rng::new(opts.seed, splitmix64(&mut stream));
        rng.shuffle(idx);
        let mut batches: Vec<Vec<i64>> = Vec::with_capacity(idx.len().div_ceil(opts.batch_size));
        for chunk in idx.chunks_mut(pool) {
            chunk.sort_by(by_length);
            batches.extend(chunk.chunks(opts.batch_size).map(to_i64));
        }
        rng.shuffle(&mut batches);
        // Popped from the back below, so reverse to emit in shuffled order.
        batches.reverse();
        per_task.push(batches);
    }

    let total: usize = per_task.iter().map(Vec::len).sum();
    let inv_temp = 1.0 / opts.task_temperature;
    // Stream u64::MAX is reserved for interleaving; task streams are hashed task ids.
    let mut rng = Rng::new(opts.seed, u64::MAX);
    let mut out = Vec::with_capacity(total);
    let mut weights = vec![0f64; per_task.len()];
    while out.len() < total {
        let mut sum = 0.0;
        for (w, b) in weights.iter_mut().zip(&per_task) {
            *w = if b.is_empty() {
                0.0
            } else {
                (b.len() as f64).powf(inv_temp)
            };
            sum += *w;
        }
        let mut u = rng.next_f64() * sum;
        // Fall back to the last non-empty task should rounding leave u past every weight.
        let mut pick = weights.iter().rposition(|&w| w > 0.0).unwrap_or(0);
        for (t, &w) in weights.iter().enumerate() {
            if w > 0.0 && u < w {
                pick = t;
                break;
            }
            u -= w;
        }
        out.push(per_task[pick].pop().expect("picked task has batches"));
    }
    out
}

fn to_i64(chunk: &[usize]) -> Vec<i64> {
    chunk.iter().map(|&i| i as i64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(seed: u64) -> BucketOptions {
        BucketOptions {
            batch_size: 4,
            seed,
            shuffle: true,
            bucket_factor: 4,
            task_temperature: 1.0,
        }
    }

    fn data(n: usize) -> (Vec<i64>, Vec<i64>) {
        let tasks = (0..n).map(|i| (i % 3) as i64 * 10).collect();
        let lengths = (0..n).map(|i| ((i * 7919) % 101) as i64).collect();
        (tasks, lengths)
    }

    #[test]
    fn every_index_exactly_once_and_one_task_per_batch() {
        let (t, l) = data(103);
        let batches = bucket_batches(&t, &l, &opts(1));
        let mut seen: Vec<i64> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..103).collect::<Vec<_>>());
        for b in &batches {
            assert!(!b.is_empty() && b.len() <= 4);
            assert!(b.iter().all(|&i| t[i as usize] == t[b[0] as usize]));
        }
        // at most one short batch per task
        let short = batches.iter().filter(|b| b.len() < 4).count();
        assert!(short <= 3);
    }

    #[test]
    fn seeds_are_deterministic_and_distinct() {
        let (t, l) = data(200);
        assert_eq!(
            bucket_batches(&t, &l, &opts(5)),
            bucket_batches(&t, &l, &opts(5))
        );
        assert_ne!(
            bucket_batches(&t, &l, &opts(5)),
            bucket_batches(&t, &l, &opts(6))
        );
    }

    #[test]
    fn unshuffled_is_sorted_by_length_per_task() {
        let (t, l) = data(50);
        let o = BucketOptions {
            shuffle: false,
            ..opts(0)
        };
        let batches = bucket_batches(&t, &l, &o);
        let flat: Vec<i64> = batches.iter().flatten().copied().collect();
        let mut want: Vec<i64> = (0..50).collect();
        want.sort_by_key(|&i| (t[i as usize], l[i as usize], i));
        assert_eq!(flat, want);
        assert_eq!(
            batches,
            bucket_batches(&t, &l, &BucketOptions { seed: 9, ..o })
        );
    }

    #[test]
    fn batches_within_a_pool_are_length_sorted() {
        let n = 64;
        let t = vec![0i64; n];
        let l: Vec<i64> = (0..n as i64).rev().collect();
        let o = BucketOptions {
            batch_size: 8,
            bucket_factor: 8,
            ..opts(3)
        };
        // one pool holds everything: each batch is a run of 8 consecutive lengths
        for b in bucket_batches(&t, &l, &o) {
            let lens: Vec<i64> = b.iter().map(|&i| l[i as usize]).collect();
            assert_eq!(lens.iter().max().unwrap() - lens.iter().min().unwrap(), 7);
        }
    }

    #[test]
    fn validation_names_the_argument() {
        let o = opts(0);
        assert!(validate(&[0], &[1, 2], &o).unwrap_err().contains("lengths"));
        assert!(validate(&[0], &[-1], &o).unwrap_err().contains("lengths"));
        let bad = BucketOptions { batch_size: 0, ..o };
        assert!(validate(&[0], &[1], &bad)
            .unwrap_err()
            .contains("batch_size"));
        let bad = BucketOptions {
            task_temperature: 0.0,
            ..o
        };
        assert!(validate(&[0], &[1], &bad)
            .unwrap_err()
            .contains("task_temperature"));
    }

    #[test]
    fn empty_input_gives_no_batches() {
        assert!(bucket_batches(&[], &[], &opts(0)).is_empty());
    }
}
