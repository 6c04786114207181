//! Diagnostics for the benchmarks only (benches/bench_topk.py): nothing in the library calls
//! these. They are exposed to Python as `llm_embedder._native.bench`.

use crate::{kernels, pool};
use rayon::prelude::*;

/// Sum of `data` read once, front to back, split into one contiguous part per thread: the
/// machine's streaming-read bandwidth is what a top-k scan of the same bytes can at best reach.
/// `Err` when the worker threads cannot start.
pub fn stream_sum(data: &[f32], threads: Option<usize>) -> Result<f64, String> {
    let pool = pool::get(threads)?;
    let parts = pool.current_num_threads().max(1);
    let part = data.len().div_ceil(parts).max(1);
    Ok(pool.install(|| {
        // collected in order, so the total does not depend on which thread finished first
        let sums: Vec<f64> = data.par_chunks(part).map(kernels::sum).collect();
        sums.into_iter().sum()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_sum_is_the_sum_for_any_thread_count() {
        let data: Vec<f32> = (0..10_001).map(|i| (i % 7) as f32).collect();
        let want: f64 = data.iter().map(|&x| x as f64).sum();
        for threads in [1, 2, 3] {
            assert_eq!(stream_sum(&data, Some(threads)).unwrap(), want);
        }
        assert_eq!(stream_sum(&[], Some(2)).unwrap(), 0.0);
    }
}
