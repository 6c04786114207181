//! Worker thread pools of the parallel kernels: built on first use, a few kept for reuse.
//!
//! A call names its thread count (or takes the process default of [`set_default_threads`],
//! else rayon's default: RAYON_NUM_THREADS or one per core). Pools are cached per thread count
//! so repeated calls reuse their threads, but only the [`KEEP`] most recently used are kept:
//! a caller sweeping thread counts does not accumulate idle threads. Building a pool can fail
//! (the OS refuses threads); that is an `Err`, never a panic, and rayon's global pool is never
//! used because its lazy initialisation panics on the same failure.

use rayon::{ThreadPool, ThreadPoolBuildError, ThreadPoolBuilder};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Pools kept alive at once (most recently used first to stay).
pub const KEEP: usize = 4;

static DEFAULT_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Threads used when a call names none; 0 restores rayon's default.
pub fn set_default_threads(threads: usize) {
    DEFAULT_THREADS.store(threads, Ordering::Relaxed);
}

/// Most threads a pool can have (rayon would silently clamp a larger request).
pub fn max_threads() -> usize {
    rayon::max_num_threads()
}

/// Check a thread count that came from the caller; `Err` names the argument.
pub fn check_threads(threads: i64) -> Result<usize, String> {
    if threads < 1 || threads as u64 > max_threads() as u64 {
        return Err(format!(
            "threads must be >= 1 and <= {}, got {threads}",
            max_threads()
        ));
    }
    Ok(threads as usize)
}

/// A bounded most-recently-used cache of pools keyed by requested thread count (0: default).
pub struct Pools {
    keep: usize,
    entries: Mutex<Vec<(usize, Arc<ThreadPool>)>>,
}

impl Pools {
    pub fn new(keep: usize) -> Self {
        Pools {
            keep: keep.max(1),
            entries: Mutex::new(Vec::new()),
        }
    }

    /// The pool for `threads` (0: rayon's default count), built by `build` when not cached.
    pub fn get_with(
        &self,
        threads: usize,
        build: impl FnOnce(usize) -> Result<ThreadPool, ThreadPoolBuildError>,
    ) -> Result<Arc<ThreadPool>, String> {
        // A panic elsewhere while holding the lock leaves a consistent Vec: keep using it.
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = entries.iter().position(|(t, _)| *t == threads) {
            let entry = entries.remove(pos);
            let pool = entry.1.clone();
            entries.push(entry);
            return Ok(pool);
        }
        let pool = Arc::new(build(threads).map_err(|e| {
            let count = if threads == 0 {
                "the default number of".to_string()
            } else {
                threads.to_string()
            };
            format!(
                "could not start {count} worker threads ({e}); pass fewer threads or raise the \
                 process's thread limit"
            )
        })?);
        entries.push((threads, pool.clone()));
        if entries.len() > self.keep {
            // Dropping the last handle of an evicted pool stops its threads; a call still
            // running on it holds its own handle.
            entries.remove(0);
        }
        Ok(pool)
    }

    /// How many pools are cached.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn build(threads: usize) -> Result<ThreadPool, ThreadPoolBuildError> {
    // num_threads(0) is rayon's default: RAYON_NUM_THREADS, else one per core.
    ThreadPoolBuilder::new().num_threads(threads).build()
}

fn pools() -> &'static Pools {
    static POOLS: OnceLock<Pools> = OnceLock::new();
    POOLS.get_or_init(|| Pools::new(KEEP))
}

/// The pool a call with `threads` (None: the process default) runs on.
pub fn get(threads: Option<usize>) -> Result<Arc<ThreadPool>, String> {
    let requested = threads.unwrap_or_else(|| DEFAULT_THREADS.load(Ordering::Relaxed));
    pools().get_with(requested, build)
}

/// Threads a call with `threads` (None: the process default) runs on.
pub fn effective_threads(threads: Option<usize>) -> Result<usize, String> {
    match threads.or(match DEFAULT_THREADS.load(Ordering::Relaxed) {
        0 => None,
        t => Some(t),
    }) {
        Some(t) => Ok(t),
        None => Ok(get(None)?.current_num_threads()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn a_thread_count_reuses_its_pool() {
        let pools = Pools::new(2);
        let a = pools.get_with(2, build).unwrap();
        let b = pools.get_with(2, build).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.current_num_threads(), 2);
        assert_eq!(pools.len(), 1);
    }

    #[test]
    fn only_the_most_recently_used_pools_are_kept() {
        let pools = Pools::new(2);
        let one = pools.get_with(1, build).unwrap();
        pools.get_with(2, build).unwrap();
        pools.get_with(1, build).unwrap(); // 1 is now the most recent
        pools.get_with(3, build).unwrap(); // evicts 2
        assert_eq!(pools.len(), 2);
        assert!(Arc::ptr_eq(&one, &pools.get_with(1, build).unwrap()));
        for t in 1..=6 {
            pools.get_with(t, build).unwrap();
        }
        assert_eq!(pools.len(), 2);
    }

    #[test]
    fn an_evicted_pool_still_serves_the_call_that_holds_it() {
        let pools = Pools::new(1);
        let held = pools.get_with(2, build).unwrap();
        pools.get_with(1, build).unwrap(); // evicts the 2-thread pool from the cache
        assert_eq!(held.install(rayon::current_num_threads), 2);
    }

    #[test]
    fn a_pool_that_cannot_start_is_an_error_not_a_panic() {
        let pools = Pools::new(2);
        let failing = |t: usize| {
            ThreadPoolBuilder::new()
                .num_threads(t)
                .spawn_handler(|_| Err(io::Error::other("no threads for you")))
                .build()
        };
        let err = pools.get_with(3, failing).unwrap_err();
        assert!(err.contains("could not start 3 worker threads"), "{err}");
        assert!(err.contains("no threads for you"), "{err}");
        assert!(pools.is_empty(), "a failed build is not cached");
        assert!(pools.get_with(3, build).is_ok());
    }

    #[test]
    fn thread_counts_are_checked() {
        assert_eq!(check_threads(3), Ok(3));
        assert!(check_threads(0)
            .unwrap_err()
            .contains("threads must be >= 1 and <="));
        assert!(check_threads(-2).is_err());
        assert!(check_threads(max_threads() as i64 + 1).is_err());
    }
}
