//! Exact inner-product top-k without materialising the Q×N score matrix.
//!
//! Keys are scanned in cache-sized blocks and every score is folded at once into one bounded
//! collector per query. Two kernel families (rust/src/kernels.rs):
//!
//! * few queries (< [`PANEL_FROM_QUERIES`]): row kernels — one sequential pass per key at
//!   Q = 1 (memory-bound), small register tiles of queries × keys otherwise; a block's scores
//!   go through a small scratch buffer;
//! * many queries: panel kernels — queries packed 16 to a vector, key elements broadcast, the
//!   threshold test done in registers, only flagged lanes looked at (compute-bound, at the
//!   machine's sgemm rate).
//!
//! Threads split the keys (Q ≤ 256: each key is read from memory once, per-thread collectors
//! are merged) or the queries (larger Q: no merge). Keys are checked for NaN/inf through the
//! scores of the same pass. Order: scores descending, ties broken by the lower key index.

use crate::{kernels, pool};
use rayon::prelude::*;
use std::cmp::Ordering;

/// Why a top-k call failed: bad input (a `ValueError` in Python) or no worker threads (a
/// `RuntimeError`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    Input(String),
    Threads(String),
}

impl Error {
    pub fn message(&self) -> &str {
        match self {
            Error::Input(m) | Error::Threads(m) => m,
        }
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::Input(message)
    }
}

/// Keys per block of the row kernels (and the key-split granularity): 256 keys × 768 dims is
/// 768 KiB, which stays in a 1 MiB L2 while every query tile passes over it.
const KEY_BLOCK: usize = 256;

#[inline]
fn better(a: &(f32, usize), b: &(f32, usize)) -> Ordering {
    // "Less" sorts first: higher score, then lower index.
    b.0.partial_cmp(&a.0)
        .unwrap_or(Ordering::Equal)
        .then(a.1.cmp(&b.1))
}

/// Best `k` (score, index) pairs of a stream whose indices arrive in ascending order.
///
/// Accepted candidates go to a buffer of `2k`; when it fills, a linear-time selection keeps the
/// best `k` and raises the acceptance threshold to the k-th score, so almost every score costs
/// one comparison. A later score equal to the threshold has a larger index than every kept one
/// and so correctly loses the tie.
#[derive(Clone, Debug)]
pub struct Collector {
    k: usize,
    cap: usize,
    threshold: f32,
    buf: Vec<(f32, usize)>,
}

impl Collector {
    pub fn new(k: usize) -> Self {
        let cap = (2 * k).max(k + 32);
        Collector {
            k,
            cap,
            threshold: f32::NEG_INFINITY,
            // grown on demand: a large k rarely fills its buffer in every key range
            buf: Vec::with_capacity(cap.min(1024)),
        }
    }

    /// The score a candidate must beat to enter.
    #[inline]
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    #[inline]
    pub fn push(&mut self, score: f32, index: usize) {
        if score > self.threshold {
            self.accept(score, index);
        } else if self.buf.len() < self.k {
            // Only reachable before the first k candidates when scores are -inf or NaN
            // (overflowing dot products); NaN ranks as -inf so the order stays total.
            let s = if score.is_nan() {
                f32::NEG_INFINITY
            } else {
                score
            };
            self.buf.push((s, index));
        }
    }

    #[inline(never)]
    fn accept(&mut self, score: f32, index: usize) {
        self.buf.push((score, index));
        if self.buf.len() >= self.cap {
            self.compact();
        }
    }

    fn compact(&mut self) {
        if self.buf.len() > self.k {
            self.buf.select_nth_unstable_by(self.k - 1, better);
            self.buf.truncate(self.k);
            self.threshold = self.buf[self.k - 1].0;
        }
    }

    /// Fold another collector's candidates in (used to merge key ranges).
    pub fn merge(&mut self, other: Collector) {
        self.buf.extend(other.buf);
        self.compact();
        self.buf.shrink_to(self.cap);
    }

    /// The best `k`, best first.
    pub fn into_sorted(mut self) -> Vec<(f32, usize)> {
        self.buf.sort_unstable_by(better);
        self.buf.truncate(self.k);
        self.buf
    }
}

/// Where the keys live: float32 rows, or float16 rows (half the bytes to stream) that are
/// widened to float32 one cache-sized block at a time.
#[derive(Clone, Copy, Debug)]
pub enum Keys<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl Keys<'_> {
    fn bytes_per_value(&self) -> usize {
        match self {
            Keys::F32(_) => 4,
            Keys::F16(_) => 2,
        }
    }
}

/// Hands out key blocks as float32 rows: a sub-slice for float32 keys, a widened copy in a
/// reused scratch buffer for float16 keys.
struct BlockReader<'a> {
    keys: Keys<'a>,
    d: usize,
    scratch: Vec<f32>,
}

impl<'a> BlockReader<'a> {
    fn new(keys: Keys<'a>, d: usize) -> Self {
        BlockReader {
            keys,
            d,
            scratch: Vec::new(),
        }
    }

    fn block(&mut self, start: usize, end: usize) -> &[f32] {
        let d = self.d;
        match self.keys {
            Keys::F32(k) => &k[start * d..end * d],
            Keys::F16(k) => {
                let src = &k[start * d..end * d];
                self.scratch.resize(src.len(), 0.0);
                kernels::widen_f16(src, &mut self.scratch);
                &self.scratch
            }
        }
    }
}

/// Scan keys `key_lo..key_hi` against `queries` (row-major, `d` columns) and feed one
/// collector per query.
///
/// Keys are checked for NaN/inf here rather than in a separate pass (a second pass would
/// double the bytes read at Q = 1): with finite queries a non-finite key always yields a
/// non-finite score, so a block with a non-finite score is searched for the culprit.
fn scan(
    queries: &[f32],
    keys: Keys,
    d: usize,
    key_lo: usize,
    key_hi: usize,
    collectors: &mut [Collector],
) -> Result<(), String> {
    let q = collectors.len();
    let tile = kernels::QUERY_TILE;
    let mut scratch = vec![0f32; tile * KEY_BLOCK];
    let mut reader = BlockReader::new(keys, d);
    let mut start = key_lo;
    while start < key_hi {
        let end = (start + KEY_BLOCK).min(key_hi);
        let nb = end - start;
        if let (1, Keys::F16(half)) = (q, keys) {
            // One query over float16 keys: widen in registers, never through a scratch copy.
            let scores = &mut scratch[..nb];
            kernels::score_row_f16(queries, &half[start * d..end * d], nb, d, scores);
            if !kernels::all_finite(scores) {
                let pos = scores.iter().position(|x| !x.is_finite()).unwrap_or(0);
                let block = reader.block(start, end);
                return Err(explain_non_finite(block, start, d, start + pos, 0));
            }
            feed(&mut collectors[0], scores, start);
            start = end;
            continue;
        }
        let block = reader.block(start, end);
        let mut q0 = 0;
        while q0 < q {
            let q1 = (q0 + tile).min(q);
            let rows = q1 - q0;
            let scores = &mut scratch[..rows * nb];
            kernels::score_block(&queries[q0 * d..q1 * d], rows, block, nb, d, scores);
            if !kernels::all_finite(scores) {
                let pos = scores.iter().position(|x| !x.is_finite()).unwrap_or(0);
                let (qi, kj) = (q0 + pos / nb, start + pos % nb);
                return Err(explain_non_finite(block, start, d, kj, qi));
            }
            for (r, coll) in collectors[q0..q1].iter_mut().enumerate() {
                feed(coll, &scores[r * nb..(r + 1) * nb], start);
            }
            q0 = q1;
        }
        start = end;
    }
    Ok(())
}

/// Why query row `qi` · key row `kj` is not finite: a non-finite key in the block (which holds
/// keys from row `first`), or finite inputs whose product overflows.
#[cold]
fn explain_non_finite(block: &[f32], first: usize, d: usize, kj: usize, qi: usize) -> String {
    for (j, row) in block.chunks_exact(d).enumerate() {
        if let Some(x) = row.iter().find(|x| !x.is_finite()) {
            return format!("keys must be finite, found {x} in row {}", first + j);
        }
    }
    format!(
        "the inner product of queries row {qi} and keys row {kj} overflows float32; \
         normalise the vectors (cosine scores) or scale them down"
    )
}

/// Push a row of scores (key indices `first..`) into a collector, skipping quickly over
/// chunks that cannot enter.
#[inline]
fn feed(coll: &mut Collector, scores: &[f32], first: usize) {
    let mut base = first;
    for chunk in scores.chunks(16) {
        let t = coll.threshold();
        // Max of the chunk vectorises; most chunks fall below the threshold once it settles.
        let m = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if m > t || coll.buf.len() < coll.k {
            for (j, &s) in chunk.iter().enumerate() {
                coll.push(s, base + j);
            }
        }
        base += chunk.len();
    }
}

/// Check the shapes, `k` and the queries; `Err` names the argument and what was expected.
///
/// Keys are checked for NaN/inf during the scan itself (see [`scan`]).
pub fn validate(
    queries: &[f32],
    q_dim: usize,
    k_dim: usize,
    n: usize,
    k: i64,
) -> Result<(), String> {
    if q_dim != k_dim {
        return Err(format!(
            "queries and keys must have the same dimension, got queries [.., {q_dim}] and keys [.., {k_dim}]"
        ));
    }
    if q_dim == 0 {
        return Err("queries and keys must have at least one column, got dimension 0".into());
    }
    if k < 1 {
        return Err(format!("k must be >= 1, got {k}"));
    }
    if k as u64 > n as u64 {
        return Err(format!("k must be <= the number of keys ({n}), got {k}"));
    }
    if let Some(pos) = queries.iter().position(|x| !x.is_finite()) {
        let row = pos / q_dim;
        return Err(format!(
            "queries must be finite, found {} in row {row}",
            queries[pos]
        ));
    }
    Ok(())
}

/// Queries above which threads split the queries instead of the keys.
const SPLIT_QUERIES_ABOVE: usize = 256;

/// Exact top-k of `queries` [q, d] against `keys` [n, d] (row-major; shapes, `k` and queries
/// validated by [`validate`]).
///
/// Returns (scores [q·k], indices [q·k]); `threads` = None uses the default pool
/// ([`pool::get`]). `Err` when a key is not finite, a score overflows or no pool can start.
pub fn topk(
    queries: &[f32],
    keys: Keys,
    q: usize,
    n: usize,
    d: usize,
    k: usize,
    threads: Option<usize>,
) -> Result<(Vec<f32>, Vec<i64>), Error> {
    let pool = pool::get(threads).map_err(Error::Threads)?;
    Ok(pool.install(|| topk_in_pool(queries, keys, q, n, d, k))?)
}

/// Check a [q, n] score matrix for [`topk_rows`]; `Err` names the argument.
pub fn validate_rows(scores: &[f32], n: usize, k: i64) -> Result<(), String> {
    if k < 1 {
        return Err(format!("k must be >= 1, got {k}"));
    }
    if k as u64 > n as u64 {
        return Err(format!("k must be <= the number of columns ({n}), got {k}"));
    }
    if let Some(pos) = scores.iter().position(|x| !x.is_finite()) {
        return Err(format!(
            "scores must be finite, found {} in row {} column {}",
            scores[pos],
            pos / n,
            pos % n
        ));
    }
    Ok(())
}

/// The `k` best columns of each row of a row-major [q, n] score matrix (validated by
/// [`validate_rows`]), with the same order as [`topk`]: scores descending, ties to the lower
/// column. Returns (scores [q·k], columns [q·k]).
pub fn topk_rows(
    scores: &[f32],
    q: usize,
    n: usize,
    k: usize,
    threads: Option<usize>,
) -> Result<(Vec<f32>, Vec<i64>), Error> {
    let pool = pool::get(threads).map_err(Error::Threads)?;
    let rows: Vec<Vec<(f32, usize)>> = pool.install(|| {
        (0..q)
            .into_par_iter()
            .map(|r| {
                let mut coll = Collector::new(k);
                feed(&mut coll, &scores[r * n..(r + 1) * n], 0);
                coll.into_sorted()
            })
            .collect()
    });
    let mut out_scores = Vec::with_capacity(q * k);
    let mut out_columns = Vec::with_capacity(q * k);
    for row in rows {
        for (s, c) in row {
            out_scores.push(s);
            out_columns.push(c as i64);
        }
    }
    Ok((out_scores, out_columns))
}

/// Queries from which the panel kernels (queries along the vector lanes) take over from the
/// row kernels (one query against many keys, summed across lanes).
const PANEL_FROM_QUERIES: usize = 12;

/// How the queries are laid out for the kernels.
enum Layout<'a> {
    Rows(&'a [f32]),
    Panels(Vec<f32>, kernels::Isa),
}

impl Layout<'_> {
    /// Scan keys `lo..hi` for queries `q0..q1` (`q0` a multiple of [`CHUNK_ALIGN`]).
    #[allow(clippy::too_many_arguments)]
    fn scan(
        &self,
        q0: usize,
        q1: usize,
        keys: Keys,
        d: usize,
        lo: usize,
        hi: usize,
        colls: &mut [Collector],
    ) -> Result<(), String> {
        match self {
            Layout::Rows(queries) => scan(&queries[q0 * d..q1 * d], keys, d, lo, hi, colls),
            Layout::Panels(panels, isa) => {
                let start = q0 / kernels::PANEL * d * kernels::PANEL;
                scan_panels(*isa, &panels[start..], keys, d, lo, hi, colls)
            }
        }
    }
}

/// Query chunks given to threads start at multiples of this (whole panel pairs, whole tiles).
const CHUNK_ALIGN: usize = 32;

/// Many queries, packed in panels of 16 along the vector lanes (see [`kernels::pack_panels`]).
///
/// Each kernel call scores a tile of keys against one or two panels and reports whether any
/// score beats its query's current threshold (or is not finite); only then are the scores
/// looked at one by one. Key blocks are sized to stay in L2 while every panel passes over.
fn scan_panels(
    isa: kernels::Isa,
    panels: &[f32],
    keys: Keys,
    d: usize,
    key_lo: usize,
    key_hi: usize,
    collectors: &mut [Collector],
) -> Result<(), String> {
    const P: usize = kernels::PANEL;
    let q = collectors.len();
    let (cw, gw) = kernels::panel_tile_shape(isa);
    let groups = q.div_ceil(P);
    let block = ((384 * 1024 / (4 * d)).clamp(4 * cw, 4096) / cw) * cw;
    let mut thr = vec![f32::INFINITY; gw * P];
    let mut out = vec![0f32; cw * gw * P];
    let mut masks = vec![0u16; cw * gw];
    let mut reader = BlockReader::new(keys, d);
    // The next key block is prefetched while this one is scored, spread over its tiles: the
    // kernel issues at most one 64-byte line per dimension step (d lines per tile).
    let tiles_per_block = block.div_ceil(cw) * groups.div_ceil(gw);
    let block_bytes = block * d * keys.bytes_per_value();
    let per_tile = (block_bytes.div_ceil(tiles_per_block).div_ceil(64) * 64).min(64 * d);
    let mut start = key_lo;
    while start < key_hi {
        let end = (start + block).min(key_hi);
        let rows = reader.block(start, end);
        let next = end * d..(end + block).min(key_hi) * d;
        let mut ahead: &[u8] = match keys {
            Keys::F32(k) => bytemuck::cast_slice(&k[next]),
            Keys::F16(k) => bytemuck::cast_slice(&k[next]),
        };
        let mut g0 = 0;
        while g0 < groups {
            let g = if g0 + gw <= groups { gw } else { 1 };
            let lanes = (q - g0 * P).min(g * P);
            let colls = &mut collectors[g0 * P..g0 * P + lanes];
            for (t, c) in thr.iter_mut().zip(colls.iter()) {
                *t = c.threshold();
            }
            // padding lanes (beyond q) keep an infinite threshold and never report
            thr[lanes..].fill(f32::INFINITY);
            let pan = &panels[g0 * d * P..(g0 + g) * d * P];
            let mut j = start;
            while j < end {
                let c = if j + cw <= end { cw } else { 1 };
                let tile_keys = &rows[(j - start) * d..(j - start + c) * d];
                let (now, later) = ahead.split_at(per_tile.min(ahead.len()));
                ahead = later;
                if kernels::panel_tile(
                    isa, pan, g, tile_keys, c, d, &thr, &mut out, &mut masks, now,
                ) {
                    for ci in 0..c {
                        for gi in 0..g {
                            let mut m = masks[ci * g + gi];
                            while m != 0 {
                                let lane = gi * P + m.trailing_zeros() as usize;
                                m &= m - 1;
                                if lane >= lanes {
                                    continue; // padding: zero query, NaN only for a bad key
                                }
                                let sc = out[ci * g * P + lane];
                                if !sc.is_finite() {
                                    let (kj, qi) = (j + ci, g0 * P + lane);
                                    return Err(explain_non_finite(rows, start, d, kj, qi));
                                }
                                if sc > thr[lane] {
                                    colls[lane].push(sc, j + ci);
                                    thr[lane] = colls[lane].threshold();
                                }
                            }
                        }
                    }
                }
                j += c;
            }
            g0 += g;
        }
        start = end;
    }
    Ok(())
}

fn topk_in_pool(
    queries: &[f32],
    keys: Keys,
    q: usize,
    n: usize,
    d: usize,
    k: usize,
) -> Result<(Vec<f32>, Vec<i64>), String> {
    let threads = rayon::current_num_threads();
    let isa = kernels::isa();
    let layout = if q >= PANEL_FROM_QUERIES {
        Layout::Panels(kernels::pack_panels(queries, q, d), isa)
    } else {
        Layout::Rows(queries)
    };
    let per_query: Vec<Vec<(f32, usize)>> = if q > SPLIT_QUERIES_ABOVE || n < 2 * KEY_BLOCK {
        // Many queries: threads own disjoint query chunks and each streams all keys. Chunks are
        // large enough that a key block fetched from memory serves many query tiles from cache.
        let chunk = (q.div_ceil(2 * threads).max(64)).div_ceil(CHUNK_ALIGN) * CHUNK_ALIGN;
        let parts: Vec<Vec<Vec<(f32, usize)>>> = (0..q.div_ceil(chunk))
            .into_par_iter()
            .map(|c| {
                let (q0, q1) = (c * chunk, ((c + 1) * chunk).min(q));
                let mut colls = vec![Collector::new(k); q1 - q0];
                layout.scan(q0, q1, keys, d, 0, n, &mut colls)?;
                Ok(colls.into_iter().map(Collector::into_sorted).collect())
            })
            .collect::<Result<_, String>>()?;
        parts.into_iter().flatten().collect()
    } else {
        // Few queries: threads own disjoint key ranges (two each, for balance), then merge;
        // every key is read from memory once whatever the thread count.
        let parts = (threads * 2).min(n.div_ceil(KEY_BLOCK)).max(1);
        let per_part = n.div_ceil(parts).div_ceil(KEY_BLOCK) * KEY_BLOCK;
        let partial: Vec<Vec<Collector>> = (0..n.div_ceil(per_part))
            .into_par_iter()
            .map(|p| {
                let lo = p * per_part;
                let hi = (lo + per_part).min(n);
                let mut colls = vec![Collector::new(k); q];
                layout.scan(0, q, keys, d, lo, hi, &mut colls)?;
                Ok(colls)
            })
            .collect::<Result<_, String>>()?;
        let mut merged = vec![Collector::new(k); q];
        for part in partial {
            for (m, c) in merged.iter_mut().zip(part) {
                m.merge(c);
            }
        }
        merged.into_iter().map(Collector::into_sorted).collect()
    };
    let mut scores = Vec::with_capacity(q * k);
    let mut indices = Vec::with_capacity(q * k);
    for row in per_query {
        debug_assert_eq!(row.len(), k);
        for (s, i) in row {
            scores.push(s);
            indices.push(i as i64);
        }
    }
    Ok((scores, indices))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn reference(
        queries: &[f32],
        keys: &[f32],
        q: usize,
        n: usize,
        d: usize,
        k: usize,
    ) -> Vec<Vec<(f32, usize)>> {
        (0..q)
            .map(|qi| {
                let mut all: Vec<(f32, usize)> = (0..n)
                    .map(|j| {
                        let s = kernels::dot_scalar(
                            &queries[qi * d..(qi + 1) * d],
                            &keys[j * d..(j + 1) * d],
                        );
                        (s, j)
                    })
                    .collect();
                all.sort_by(better);
                all.truncate(k);
                all
            })
            .collect()
    }

    fn random(rng: &mut Rng, len: usize, grid: bool) -> Vec<f32> {
        (0..len)
            .map(|_| {
                if grid {
                    // small integers: exact dot products and many ties
                    rng.below(5) as f32 - 2.0
                } else {
                    (rng.next_f64() * 2.0 - 1.0) as f32
                }
            })
            .collect()
    }

    fn check(q: usize, n: usize, d: usize, k: usize, grid: bool, threads: Option<usize>) {
        let mut rng = Rng::new((q * 1000 + n * 10 + d) as u64, k as u64);
        let queries = random(&mut rng, q * d, grid);
        let keys = random(&mut rng, n * d, grid);
        let (scores, idx) = topk(&queries, Keys::F32(&keys), q, n, d, k, threads).unwrap();
        let want = reference(&queries, &keys, q, n, d, k);
        for qi in 0..q {
            for j in 0..k {
                let (ws, wi) = want[qi][j];
                let (gs, gi) = (scores[qi * k + j], idx[qi * k + j] as usize);
                if grid {
                    assert_eq!(
                        (gs, gi),
                        (ws, wi),
                        "q={q} n={n} d={d} k={k} row {qi} pos {j}"
                    );
                } else {
                    // SIMD summation order differs from the scalar reference by rounding only
                    assert!((gs - ws).abs() <= 1e-4 * (1.0 + ws.abs()), "{gs} vs {ws}");
                    let exact = kernels::dot_scalar(
                        &queries[qi * d..(qi + 1) * d],
                        &keys[gi * d..(gi + 1) * d],
                    );
                    assert!((exact - ws).abs() <= 1e-4 * (1.0 + ws.abs()));
                }
            }
        }
    }

    #[test]
    fn matches_reference_with_ties_across_shapes() {
        for &(q, n, d, k) in &[
            (1, 1, 1, 1),
            (1, 7, 3, 7),
            (3, 50, 5, 4),
            (5, 600, 17, 10),
            (1, 3000, 33, 25),
            (9, 1100, 8, 1),
            (40, 700, 16, 700),
        ] {
            check(q, n, d, k, true, None);
            check(q, n, d, k, true, Some(2));
        }
    }

    #[test]
    fn matches_reference_on_random_floats() {
        for &(q, n, d, k) in &[(1, 5000, 384, 10), (70, 1500, 100, 10), (130, 900, 31, 64)] {
            check(q, n, d, k, false, None);
            check(q, n, d, k, false, Some(1));
        }
    }

    #[test]
    fn f16_keys_give_the_answer_of_their_f32_widening() {
        for &(q, n, d) in &[
            (1usize, 3000usize, 384usize),
            (5, 700, 17),
            (40, 900, 33),
            (300, 520, 8),
        ] {
            let mut rng = Rng::new(q as u64, n as u64);
            let queries = random(&mut rng, q * d, false);
            let half: Vec<half::f16> = random(&mut rng, n * d, false)
                .into_iter()
                .map(half::f16::from_f32)
                .collect();
            let wide: Vec<f32> = half.iter().map(|x| x.to_f32()).collect();
            let a = topk(&queries, Keys::F16(&half), q, n, d, 7, None).unwrap();
            let b = topk(&queries, Keys::F32(&wide), q, n, d, 7, None).unwrap();
            // Same keys and ids; scores agree to float32 rounding only, since the f16 kernels
            // sum in another order than the f32 ones on some instruction sets (AVX2).
            assert_eq!(a.1, b.1);
            for (x, y) in a.0.iter().zip(&b.0) {
                assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn query_split_matches_key_split() {
        // q > SPLIT_QUERIES_ABOVE splits queries across threads; compare with one query at a time
        let (q, n, d, k) = (SPLIT_QUERIES_ABOVE + 37, 2000, 24, 5);
        let mut rng = Rng::new(99, 0);
        let queries = random(&mut rng, q * d, true);
        let keys = random(&mut rng, n * d, true);
        let all = topk(&queries, Keys::F32(&keys), q, n, d, k, Some(2)).unwrap();
        for qi in (0..q).step_by(17) {
            let one = topk(
                &queries[qi * d..(qi + 1) * d],
                Keys::F32(&keys),
                1,
                n,
                d,
                k,
                Some(2),
            )
            .unwrap();
            assert_eq!(one.0[..], all.0[qi * k..(qi + 1) * k]);
            assert_eq!(one.1[..], all.1[qi * k..(qi + 1) * k]);
        }
    }

    #[test]
    fn collector_breaks_ties_by_lower_index() {
        let mut c = Collector::new(2);
        for i in 0..100 {
            c.push(1.0, i);
        }
        assert_eq!(c.into_sorted(), vec![(1.0, 0), (1.0, 1)]);
    }

    #[test]
    fn collector_keeps_k_even_when_scores_overflow() {
        let mut c = Collector::new(3);
        c.push(f32::NAN, 0);
        c.push(f32::NEG_INFINITY, 1);
        c.push(f32::NEG_INFINITY, 2);
        let out = c.into_sorted();
        assert_eq!(out.len(), 3);
        assert_eq!(out.iter().map(|p| p.1).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn validation_names_the_argument() {
        let q = [0.0f32; 4];
        assert!(validate(&q, 2, 3, 2, 1).unwrap_err().contains("dimension"));
        assert!(validate(&q, 2, 2, 3, 0)
            .unwrap_err()
            .contains("k must be >= 1"));
        assert!(validate(&q, 2, 2, 3, 4)
            .unwrap_err()
            .contains("k must be <="));
        let bad = [0.0, f32::NAN, 0.0, 0.0];
        assert!(validate(&bad, 2, 2, 3, 1).unwrap_err().contains("queries"));
    }

    #[test]
    fn non_finite_keys_are_found_during_the_scan() {
        for &(q, n) in &[(1usize, 3000usize), (300, 600)] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let d = 5;
                let queries = vec![0.0f32; q * d]; // zero queries: 0·inf is NaN, still caught
                let mut keys = vec![1.0f32; n * d];
                keys[(n - 7) * d + 3] = bad;
                let e = topk(&queries, Keys::F32(&keys), q, n, d, 1, Some(2)).unwrap_err();
                assert!(
                    matches!(&e, Error::Input(m) if m.contains(&format!(
                        "keys must be finite, found {bad} in row {}",
                        n - 7
                    ))),
                    "{e:?}"
                );
            }
        }
    }

    #[test]
    fn overflowing_scores_are_an_error_not_a_wrong_answer() {
        let d = 4;
        let queries = vec![1e30f32; d];
        let keys = vec![1e30f32; 10 * d];
        let e = topk(&queries, Keys::F32(&keys), 1, 10, d, 1, None).unwrap_err();
        assert!(e.message().contains("overflows float32"), "{e:?}");
    }

    #[test]
    fn rows_match_a_sort_with_ties_to_the_lower_column() {
        let mut rng = Rng::new(7, 3);
        for &(q, n, k) in &[
            (1usize, 1usize, 1usize),
            (3, 40, 40),
            (5, 1000, 17),
            (2, 33, 1),
        ] {
            // small integers: many exact ties
            let scores = random(&mut rng, q * n, true);
            let (got_s, got_c) = topk_rows(&scores, q, n, k, Some(2)).unwrap();
            for r in 0..q {
                let mut all: Vec<(f32, usize)> = scores[r * n..(r + 1) * n]
                    .iter()
                    .copied()
                    .zip(0..n)
                    .collect();
                all.sort_by(better);
                for j in 0..k {
                    assert_eq!((got_s[r * k + j], got_c[r * k + j] as usize), all[j]);
                }
            }
        }
    }

    #[test]
    fn rows_equal_topk_against_a_one_dimensional_identity() {
        // scores s against keys s[:, None] with query [1.0]: the same ranking by construction
        let mut rng = Rng::new(11, 0);
        let n = 3000;
        let scores = random(&mut rng, n, false);
        let rows = topk_rows(&scores, 1, n, 25, None).unwrap();
        let via_topk = topk(&[1.0], Keys::F32(&scores), 1, n, 1, 25, None).unwrap();
        assert_eq!(rows, via_topk);
    }

    #[test]
    fn row_validation_names_the_argument() {
        assert!(validate_rows(&[0.0; 4], 2, 0)
            .unwrap_err()
            .contains("k must be >= 1"));
        assert!(validate_rows(&[0.0; 4], 2, 3)
            .unwrap_err()
            .contains("k must be <="));
        let e = validate_rows(&[0.0, 1.0, f32::NAN, 0.0], 2, 1).unwrap_err();
        assert!(
            e.contains("scores must be finite, found NaN in row 1 column 0"),
            "{e}"
        );
    }
}
