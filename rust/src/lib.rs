//! `llm_embedder._native`: the tight loops of llm-embedder (module wiring only).
//!
//! Kernels live in plain-Rust modules ([`reward`], [`bucket`], [`topk`], [`pool`]) with their
//! own tests; this file converts numpy arrays (zero-copy, read-only), turns their errors into
//! `ValueError`s that name the argument (or a `RuntimeError` when no worker thread can start),
//! and releases the GIL around every loop. Functions only the benchmarks use live in the
//! `bench` submodule ([`bench`]).

pub mod bench;
pub mod bucket;
pub mod kernels;
pub mod pool;
pub mod reward;
pub mod rng;
pub mod topk;

use numpy::ndarray::{Array2, ArrayViewD};
use numpy::{Element, IntoPyArray, PyArray1, PyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::borrow::Cow;

fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

fn topk_error(err: topk::Error) -> PyErr {
    match err {
        topk::Error::Input(m) => PyValueError::new_err(m),
        topk::Error::Threads(m) => PyRuntimeError::new_err(m),
    }
}

/// Borrow `obj` as a read-only numpy array of `T`, or explain what was expected.
fn borrow_array<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    dtype: &str,
    ndim: usize,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    match obj.extract::<PyReadonlyArrayDyn<'py, T>>() {
        Ok(a) => {
            if a.ndim() != ndim {
                return Err(value_error(format!(
                    "{name} must be a {ndim}-D {dtype} array, got {}-D with shape {:?}",
                    a.ndim(),
                    a.shape()
                )));
            }
            Ok(a)
        }
        Err(_) => {
            let got = match obj.getattr("dtype") {
                Ok(dt) => format!(
                    "{} array of dtype {}",
                    obj.getattr("ndim")
                        .map(|x| x.to_string())
                        .unwrap_or_default()
                        + "-D",
                    dt
                ),
                Err(_) => format!("{}", obj.get_type().name()?),
            };
            Err(value_error(format!(
                "{name} must be a {ndim}-D {dtype} numpy array, got {got}"
            )))
        }
    }
}

/// A contiguous view of the data (zero-copy when already C-contiguous).
fn contiguous<'a, T: Clone>(view: &'a ArrayViewD<'a, T>) -> Cow<'a, [T]> {
    match view.as_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(view.iter().cloned().collect()),
    }
}

/// Rank-aware reward (docs/method.md, Rewards) of Q queries × M candidates × N samples.
///
/// >>> rank_aware_reward(np.array([[-1.0]], np.float32), np.array([[[-2.0, -3.0]]], np.float32))
#[pyfunction]
#[pyo3(name = "rank_aware_reward", signature = (target_ll, sample_ll, mode = "position", baseline = None))]
fn py_rank_aware_reward<'py>(
    py: Python<'py>,
    target_ll: &Bound<'py, PyAny>,
    sample_ll: &Bound<'py, PyAny>,
    mode: &str,
    baseline: Option<i64>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let t = borrow_array::<f32>(target_ll, "target_ll", "float32", 2)?;
    let s = borrow_array::<f32>(sample_ll, "sample_ll", "float32", 3)?;
    let (q, m) = (t.shape()[0], t.shape()[1]);
    let ss = s.shape();
    if ss[0] != q || ss[1] != m {
        return Err(value_error(format!(
            "sample_ll must have shape [Q, M, N] = [{q}, {m}, N] to match target_ll {:?}, got {:?}",
            t.shape(),
            ss
        )));
    }
    let n = ss[2];
    if let Some(b) = baseline {
        if b < 0 || b as u64 >= m as u64 {
            return Err(value_error(format!(
                "baseline must be a candidate column in [0, {m}), got {b}"
            )));
        }
    }
    let mode = match mode {
        "position" => reward::Mode::Position,
        "shift" => match baseline {
            Some(b) => reward::Mode::Shift {
                baseline: b as usize,
            },
            None => {
                return Err(value_error(
                    "mode='shift' needs baseline (the column of the empty-context candidate)",
                ))
            }
        },
        other => {
            return Err(value_error(format!(
                "mode must be 'position' or 'shift', got {other:?}"
            )))
        }
    };
    let tv = t.as_array();
    let sv = s.as_array();
    let (td, sd) = (contiguous(&tv), contiguous(&sv));
    let out = py.detach(|| {
        reward::validate(&td, &sd)?;
        Ok::<_, String>(reward::rank_aware_reward(&td, &sd, q, m, n, mode))
    });
    let out = out.map_err(value_error)?;
    let arr = Array2::from_shape_vec((q, m), out).expect("q*m rewards");
    Ok(arr.into_pyarray(py))
}

/// Homogeneous, length-bucketed batches: one task per batch, every index exactly once.
///
/// >>> bucket_batches(np.array([0, 0, 1]), np.array([5, 3, 4]), batch_size=2, seed=0)
#[pyfunction]
#[pyo3(name = "bucket_batches", signature = (task_ids, lengths, batch_size, seed, shuffle = true, bucket_factor = 16, task_temperature = 1.0))]
#[allow(clippy::too_many_arguments)]
fn py_bucket_batches<'py>(
    py: Python<'py>,
    task_ids: &Bound<'py, PyAny>,
    lengths: &Bound<'py, PyAny>,
    batch_size: i64,
    seed: i128,
    shuffle: bool,
    bucket_factor: i64,
    task_temperature: f64,
) -> PyResult<Vec<Bound<'py, PyArray1<i64>>>> {
    let t = borrow_array::<i64>(task_ids, "task_ids", "int64", 1)?;
    let l = borrow_array::<i64>(lengths, "lengths", "int64", 1)?;
    if batch_size < 1 {
        return Err(value_error(format!(
            "batch_size must be >= 1, got {batch_size}"
        )));
    }
    if bucket_factor < 1 {
        return Err(value_error(format!(
            "bucket_factor must be >= 1, got {bucket_factor}"
        )));
    }
    if !(-(1i128 << 63)..(1i128 << 64)).contains(&seed) {
        return Err(value_error(format!(
            "seed must fit in 64 bits (-2**63 <= seed < 2**64), got {seed}"
        )));
    }
    let opts = bucket::BucketOptions {
        batch_size: batch_size as usize,
        // Negative seeds wrap to their two's-complement bits: every int64 or uint64 is a seed.
        seed: seed.rem_euclid(1i128 << 64) as u64,
        shuffle,
        bucket_factor: bucket_factor as usize,
        task_temperature,
    };
    let (tv, lv) = (t.as_array(), l.as_array());
    let (td, ld) = (contiguous(&tv), contiguous(&lv));
    let batches = py.detach(|| {
        bucket::validate(&td, &ld, &opts)?;
        Ok::<_, String>(bucket::bucket_batches(&td, &ld, &opts))
    });
    let batches = batches.map_err(value_error)?;
    Ok(batches.into_iter().map(|b| b.into_pyarray(py)).collect())
}

type TopkResult<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<i64>>);

/// (scores, indices) of a GIL-free search as [rows, k] numpy arrays.
fn topk_arrays(
    py: Python<'_>,
    rows: usize,
    k: usize,
    (scores, indices): (Vec<f32>, Vec<i64>),
) -> TopkResult<'_> {
    (
        Array2::from_shape_vec((rows, k), scores)
            .expect("rows*k scores")
            .into_pyarray(py),
        Array2::from_shape_vec((rows, k), indices)
            .expect("rows*k indices")
            .into_pyarray(py),
    )
}

/// Shared body of `topk` and `bench.topk_f16`: checks, GIL-free search, numpy results.
fn topk_impl<'py, T: Element + Copy>(
    py: Python<'py>,
    queries: &Bound<'py, PyAny>,
    keys: &Bound<'py, PyAny>,
    key_dtype: &str,
    k: i64,
    threads: Option<i64>,
    wrap: fn(&[T]) -> topk::Keys<'_>,
) -> PyResult<TopkResult<'py>> {
    let qa = borrow_array::<f32>(queries, "queries", "float32", 2)?;
    let ka = borrow_array::<T>(keys, "keys", key_dtype, 2)?;
    let (q, qd) = (qa.shape()[0], qa.shape()[1]);
    let (n, kd) = (ka.shape()[0], ka.shape()[1]);
    let threads = check_threads(threads)?;
    let (qv, kv) = (qa.as_array(), ka.as_array());
    let (qd_, kd_) = (contiguous(&qv), contiguous(&kv));
    let out = py.detach(|| {
        topk::validate(&qd_, qd, kd, n, k)?;
        topk::topk(&qd_, wrap(&kd_), q, n, qd, k as usize, threads)
    });
    Ok(topk_arrays(py, q, k as usize, out.map_err(topk_error)?))
}

fn check_threads(threads: Option<i64>) -> PyResult<Option<usize>> {
    threads
        .map(|t| pool::check_threads(t).map_err(value_error))
        .transpose()
}

/// Exact inner-product top-k: (scores [Q, k] descending, indices [Q, k]; ties: lower index).
///
/// `threads` limits the worker threads of this call (default: `set_num_threads`, else
/// rayon's default, which honours RAYON_NUM_THREADS).
///
/// >>> scores, idx = topk(queries, keys, k=10)
#[pyfunction]
#[pyo3(name = "topk", signature = (queries, keys, k, threads = None))]
fn py_topk<'py>(
    py: Python<'py>,
    queries: &Bound<'py, PyAny>,
    keys: &Bound<'py, PyAny>,
    k: i64,
    threads: Option<i64>,
) -> PyResult<TopkResult<'py>> {
    topk_impl::<f32>(py, queries, keys, "float32", k, threads, |x| {
        topk::Keys::F32(x)
    })
}

/// Top-k columns of each row of a score matrix, in `topk`'s order (ties: lower column).
///
/// >>> scores, columns = topk_scores(np.array([[0.5, 2.0, 2.0]], np.float32), k=2)
#[pyfunction]
#[pyo3(name = "topk_scores", signature = (scores, k, threads = None))]
fn py_topk_scores<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    k: i64,
    threads: Option<i64>,
) -> PyResult<TopkResult<'py>> {
    let sa = borrow_array::<f32>(scores, "scores", "float32", 2)?;
    let (q, n) = (sa.shape()[0], sa.shape()[1]);
    let threads = check_threads(threads)?;
    let view = sa.as_array();
    let data = contiguous(&view);
    let out = py.detach(|| {
        topk::validate_rows(&data, n, k)?;
        topk::topk_rows(&data, q, n, k as usize, threads)
    });
    Ok(topk_arrays(py, q, k as usize, out.map_err(topk_error)?))
}

/// Threads for `topk` calls that name none (like `faiss.omp_set_num_threads`); 0 restores the
/// default (all cores, or RAYON_NUM_THREADS).
///
/// >>> set_num_threads(1)
#[pyfunction]
#[pyo3(name = "set_num_threads")]
fn py_set_num_threads(threads: i64) -> PyResult<()> {
    let threads = match threads {
        0 => 0,
        t => pool::check_threads(t).map_err(|_| {
            value_error(format!(
                "threads must be >= 0 (0: the default) and <= {}, got {t}",
                pool::max_threads()
            ))
        })?,
    };
    pool::set_default_threads(threads);
    Ok(())
}

/// Threads a `topk` call that names none will use.
///
/// >>> get_num_threads()
#[pyfunction]
#[pyo3(name = "get_num_threads")]
fn py_get_num_threads() -> PyResult<usize> {
    pool::effective_threads(None).map_err(PyRuntimeError::new_err)
}

/// `topk` over float16 keys (half the bytes to read; scores accumulate in float32).
///
/// >>> scores, idx = bench.topk_f16(queries, keys.astype(np.float16), k=10)
#[pyfunction]
#[pyo3(name = "topk_f16", signature = (queries, keys, k, threads = None))]
fn py_topk_f16<'py>(
    py: Python<'py>,
    queries: &Bound<'py, PyAny>,
    keys: &Bound<'py, PyAny>,
    k: i64,
    threads: Option<i64>,
) -> PyResult<TopkResult<'py>> {
    topk_impl::<half::f16>(py, queries, keys, "float16", k, threads, |x| {
        topk::Keys::F16(x)
    })
}

/// Sum of a float32 array read once, front to back, split across `threads`: the
/// streaming-read bandwidth probe of benches/bench_topk.py.
///
/// >>> bench.stream_sum(np.ones(1 << 20, np.float32), threads=1)
#[pyfunction]
#[pyo3(name = "stream_sum", signature = (x, threads = None))]
fn py_stream_sum<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    threads: Option<i64>,
) -> PyResult<f64> {
    let a = borrow_array::<f32>(x, "x", "float32", 1)?;
    let view = a.as_array();
    let data = view
        .as_slice()
        .ok_or_else(|| value_error("x must be C-contiguous (the probe must not copy)"))?;
    let threads = check_threads(threads)?;
    py.detach(|| bench::stream_sum(data, threads))
        .map_err(PyRuntimeError::new_err)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(py_rank_aware_reward, m)?)?;
    m.add_function(wrap_pyfunction!(py_bucket_batches, m)?)?;
    m.add_function(wrap_pyfunction!(py_topk, m)?)?;
    m.add_function(wrap_pyfunction!(py_topk_scores, m)?)?;
    m.add_function(wrap_pyfunction!(py_set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(py_get_num_threads, m)?)?;
    let bench = PyModule::new(m.py(), "bench")?;
    bench.add_function(wrap_pyfunction!(py_topk_f16, &bench)?)?;
    bench.add_function(wrap_pyfunction!(py_stream_sum, &bench)?)?;
    m.add_submodule(&bench)?;
    Ok(())
}
