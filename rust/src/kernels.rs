//! Dot-product kernels for [`crate::topk`]: a block of queries against a block of keys.
//!
//! Scores are computed in register tiles of R queries × C keys: every 16 (AVX-512) or 8 (AVX2)
//! dimensions, R query vectors and C key vectors are loaded once and feed R·C fused
//! multiply-adds, so loads per FMA fall to (R + C)/(R·C). Lanes are summed once per tile at the
//! end. The instruction set is chosen once at run time (AVX-512F, else AVX2+FMA, else a
//! portable loop that the compiler vectorises for the baseline target).
//!
//! `unsafe` is confined to the tile functions below: they read through raw pointers whose
//! bounds are established by their safe callers (documented at each call) and need the CPU
//! features they are compiled for, which [`isa`] checks before any of them is called.

use std::sync::OnceLock;

/// Queries scored together against one key block (a multiple of every kernel's R).
pub const QUERY_TILE: usize = 8;

/// Instruction sets with a dedicated kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// The best kernel this CPU runs; `LLM_EMBEDDER_ISA=avx2|portable` forces a lesser one
/// (for tests and benchmarks of the fallbacks).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detect();
        match std::env::var("LLM_EMBEDDER_ISA").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") if best != Isa::Portable => Isa::Avx2,
            _ => best,
        }
    })
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Plain dot product (the reference the fast kernels are tested against).
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Dot product with eight independent partial sums, which the compiler vectorises.
#[inline]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// `out[r·nb + j] = ⟨queries[r], keys[j]⟩` for `rows` queries and `nb` keys (row-major, `d`).
pub fn score_block(
    queries: &[f32],
    rows: usize,
    keys: &[f32],
    nb: usize,
    d: usize,
    out: &mut [f32],
) {
    score_block_with(isa(), queries, rows, keys, nb, d, out)
}

/// [`score_block`] with an explicit instruction set (must be supported by this CPU).
pub fn score_block_with(
    isa: Isa,
    queries: &[f32],
    rows: usize,
    keys: &[f32],
    nb: usize,
    d: usize,
    out: &mut [f32],
) {
    assert!(queries.len() >= rows * d && keys.len() >= nb * d && out.len() >= rows * nb);
    assert!(
        isa == Isa::Portable || isa == detect() || (isa == Isa::Avx2 && detect() == Isa::Avx512)
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the slices hold rows·d, nb·d and rows·nb values (asserted above) and the CPU
        // has AVX-512F (asserted above via `detect`).
        Isa::Avx512 => unsafe {
            x86::block_avx512(
                queries.as_ptr(),
                rows,
                keys.as_ptr(),
                nb,
                d,
                out.as_mut_ptr(),
            )
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX2 and FMA detected.
        Isa::Avx2 => unsafe {
            x86::block_avx2(
                queries.as_ptr(),
                rows,
                keys.as_ptr(),
                nb,
                d,
                out.as_mut_ptr(),
            )
        },
        _ => {
            for r in 0..rows {
                let qr = &queries[r * d..(r + 1) * d];
                for j in 0..nb {
                    out[r * nb + j] = dot_portable(qr, &keys[j * d..(j + 1) * d]);
                }
            }
        }
    }
}

/// Queries per panel in the many-query kernels.
pub const PANEL: usize = 16;

/// Pack `q` queries [q, d] into panels of [`PANEL`] queries stored dimension-major:
/// `panels[g·d·16 + p·16 + lane] = queries[g·16 + lane][p]` (zero for padding queries).
///
/// With queries along the vector lanes, each key element is broadcast against 16 queries at
/// once: no horizontal sums, and keys are read straight from their row-major storage.
pub fn pack_panels(queries: &[f32], q: usize, d: usize) -> Vec<f32> {
    let groups = q.div_ceil(PANEL);
    let mut panels = vec![0f32; groups * d * PANEL];
    for (i, row) in queries.chunks_exact(d).take(q).enumerate() {
        let (g, lane) = (i / PANEL, i % PANEL);
        let panel = &mut panels[g * d * PANEL..(g + 1) * d * PANEL];
        for (p, &x) in row.iter().enumerate() {
            panel[p * PANEL + lane] = x;
        }
    }
    panels
}

/// Keys per tile and panels per tile of [`panel_tile`] for an instruction set.
pub fn panel_tile_shape(isa: Isa) -> (usize, usize) {
    match isa {
        Isa::Avx512 => (12, 2),
        Isa::Avx2 => (6, 1),
        Isa::Portable => (4, 1),
    }
}

/// Scores of `c` keys (rows of `keys`, `d` columns) against `g` consecutive panels.
///
/// `c` is either the full tile width of [`panel_tile_shape`] or 1, and `g` is the shape's
/// panel count or 1. Writes the scores to `out[key·g·16 + panel·16 + lane]` and, in
/// `masks[key·g + panel]`, the lanes whose score is above its threshold
/// `thr[panel·16 + lane]` or is not finite; returns whether any mask is non-zero. The caller
/// visits only flagged lanes, which after the first few tiles are rare.
///
/// `ahead` (data needed soon, e.g. the next key block) is prefetched into L2 a cache line per
/// dimension step, spread through the tile so the requests never pile up.
#[allow(clippy::too_many_arguments)]
pub fn panel_tile<T>(
    isa: Isa,
    panels: &[f32],
    g: usize,
    keys: &[f32],
    c: usize,
    d: usize,
    thr: &[f32],
    out: &mut [f32],
    masks: &mut [u16],
    ahead: &[T],
) -> bool {
    let (cw, gw) = panel_tile_shape(isa);
    assert!((c == cw || c == 1) && (g == gw || g == 1));
    assert!(panels.len() >= g * d * PANEL && keys.len() >= c * d);
    assert!(thr.len() >= g * PANEL && out.len() >= c * g * PANEL && masks.len() >= c * g);
    let mp = masks.as_mut_ptr();
    // Lines of `ahead` the AVX-512 kernel may touch: one per dimension step, never past the end.
    let (ap, al) = (
        ahead.as_ptr() as *const i8,
        std::mem::size_of_val(ahead).div_ceil(64).min(d),
    );
    if isa != Isa::Avx512 {
        prefetch_l2(ahead);
    }
    assert!(
        isa == Isa::Portable || isa == detect() || (isa == Isa::Avx2 && detect() == Isa::Avx512)
    );
    let (pp, kp, tp, op) = (
        panels.as_ptr(),
        keys.as_ptr(),
        thr.as_ptr(),
        out.as_mut_ptr(),
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: lengths asserted above match the kernels' contracts; the CPU feature was
        // detected (asserted above).
        Isa::Avx512 => unsafe {
            match (c, g) {
                (12, 2) => x86::panel_avx512::<12, 2>(pp, kp, d, tp, op, mp, ap, al),
                (12, 1) => x86::panel_avx512::<12, 1>(pp, kp, d, tp, op, mp, ap, al),
                (1, 2) => x86::panel_avx512::<1, 2>(pp, kp, d, tp, op, mp, ap, al),
                _ => x86::panel_avx512::<1, 1>(pp, kp, d, tp, op, mp, ap, al),
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe {
            match c {
                6 => x86::panel_avx2::<6>(pp, kp, d, tp, op, mp),
                _ => x86::panel_avx2::<1>(pp, kp, d, tp, op, mp),
            }
        },
        _ => panel_portable(&panels[..d * PANEL], &keys[..c * d], c, d, thr, out, masks),
    }
}

fn panel_portable(
    panel: &[f32],
    keys: &[f32],
    c: usize,
    d: usize,
    thr: &[f32],
    out: &mut [f32],
    masks: &mut [u16],
) -> bool {
    let mut flag = false;
    for (j, key) in keys.chunks_exact(d).take(c).enumerate() {
        let mut acc = [0f32; PANEL];
        for (&x, lanes) in key.iter().zip(panel.chunks_exact(PANEL)) {
            for (a, &l) in acc.iter_mut().zip(lanes) {
                *a += x * l;
            }
        }
        let mut m = 0u16;
        for (lane, &a) in acc.iter().enumerate() {
            m |= u16::from(a > thr[lane] || !a.is_finite()) << lane;
        }
        masks[j] = m;
        flag |= m != 0;
        out[j * PANEL..(j + 1) * PANEL].copy_from_slice(&acc);
    }
    flag
}

/// `out[j] = ⟨query, keys[j]⟩` for float16 keys, widened in registers (no scratch copy, so
/// a single-query scan streams half the bytes of float32 keys and nothing else).
pub fn score_row_f16(query: &[f32], keys: &[half::f16], nb: usize, d: usize, out: &mut [f32]) {
    assert!(query.len() >= d && keys.len() >= nb * d && out.len() >= nb);
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: lengths asserted above; AVX-512F detected.
        unsafe {
            x86::gemv_f16_avx512(
                query.as_ptr(),
                keys.as_ptr() as *const u16,
                nb,
                d,
                out.as_mut_ptr(),
            )
        };
        return;
    }
    for (j, o) in out.iter_mut().take(nb).enumerate() {
        let row = &keys[j * d..(j + 1) * d];
        *o = query.iter().zip(row).map(|(x, y)| x * y.to_f32()).sum();
    }
}

/// Widen float16 values to float32 (`dst.len() == src.len()`); NaN and inf are kept.
pub fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    {
        if isa() == Isa::Avx512 {
            // SAFETY: equal lengths asserted above; AVX-512F detected.
            unsafe { x86::widen_avx512(src.as_ptr() as *const u16, dst.as_mut_ptr(), src.len()) };
            return;
        }
        if isa() == Isa::Avx2 && is_x86_feature_detected!("f16c") {
            // SAFETY: equal lengths asserted above; AVX and F16C detected.
            unsafe { x86::widen_f16c(src.as_ptr() as *const u16, dst.as_mut_ptr(), src.len()) };
            return;
        }
    }
    for (o, x) in dst.iter_mut().zip(src) {
        *o = x.to_f32();
    }
}

/// Sum of `xs` read front to back: the streaming-read probe of the benchmarks (it does as
/// little work per byte as a scan can, so its speed is the machine's read bandwidth).
pub fn sum(xs: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: reads xs.len() values from xs; AVX-512F detected.
        return unsafe { x86::sum_avx512(xs.as_ptr(), xs.len()) };
    }
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + rest as f64
}

/// Ask for `data` to be brought into L2 ahead of use (a hint: never faults, may be dropped).
///
/// The many-query scan calls it on the next key block, a slice at a time, so that block's
/// first pass runs from cache instead of waiting on memory.
#[inline]
pub fn prefetch_l2<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let start = data.as_ptr() as *const i8;
        let bytes = std::mem::size_of_val(data);
        let mut off = 0;
        while off < bytes {
            // SAFETY: the address lies inside `data`; prefetching never faults anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(start.add(off)) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Whether every value is finite (vectorises: one compare per value, no early exit).
pub fn all_finite(xs: &[f32]) -> bool {
    xs.iter().fold(true, |ok, x| ok & x.is_finite())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Drive R×C tiles over a `rows × nb` block; rows and keys left over use narrower tiles.
    macro_rules! block_driver {
        ($name:ident, $tile:ident, $gemv:ident, $feat:literal, $rmain:literal, $cmain:literal, $csmall:literal) => {
            /// # Safety
            /// `q` points to `rows·d` floats, `k` to `nb·d`, `out` to `rows·nb`; the CPU has
            /// the features this function is compiled for.
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(
                q: *const f32,
                rows: usize,
                k: *const f32,
                nb: usize,
                d: usize,
                out: *mut f32,
            ) {
                let mut r = 0;
                while r + $rmain <= rows {
                    run_keys::<$rmain, $cmain>(q.add(r * d), k, nb, d, out.add(r * nb), nb);
                    r += $rmain;
                }
                match rows - r {
                    0 => {}
                    1 => $gemv(q.add(r * d), k, nb, d, out.add(r * nb)),
                    2 => run_keys::<2, $csmall>(q.add(r * d), k, nb, d, out.add(r * nb), nb),
                    3 => run_keys::<3, $cmain>(q.add(r * d), k, nb, d, out.add(r * nb), nb),
                    rest => {
                        for i in 0..rest {
                            run_keys::<1, $csmall>(
                                q.add((r + i) * d),
                                k,
                                nb,
                                d,
                                out.add((r + i) * nb),
                                nb,
                            );
                        }
                    }
                }

                #[target_feature(enable = $feat)]
                unsafe fn run_keys<const R: usize, const C: usize>(
                    q: *const f32,
                    k: *const f32,
                    nb: usize,
                    d: usize,
                    out: *mut f32,
                    ld: usize,
                ) {
                    let mut j = 0;
                    while j + C <= nb {
                        $tile::<R, C>(q, k.add(j * d), d, out.add(j), ld);
                        j += C;
                    }
                    while j < nb {
                        $tile::<R, 1>(q, k.add(j * d), d, out.add(j), ld);
                        j += 1;
                    }
                }
            }
        };
    }

    block_driver!(block_avx512, tile_avx512, gemv_avx512, "avx512f", 4, 4, 8);
    block_driver!(block_avx2, tile_avx2, gemv_avx2, "avx2,fma", 2, 4, 4);

    /// One query against `nb` keys, each key read front to back with four accumulators to hide
    /// FMA latency: one sequential stream, which the hardware prefetcher follows best (software
    /// prefetching and interleaved multi-key tiles both measured slower here).
    ///
    /// # Safety
    /// `q` holds `d` floats, `k` holds `nb·d`, `out` has `nb` writable values; AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn gemv_avx512(q: *const f32, k: *const f32, nb: usize, d: usize, out: *mut f32) {
        for j in 0..nb {
            let row = k.add(j * d);
            let mut a = [_mm512_setzero_ps(); 4];
            let mut p = 0;
            while p + 64 <= d {
                for (i, acc) in a.iter_mut().enumerate() {
                    let x = _mm512_loadu_ps(q.add(p + 16 * i));
                    let y = _mm512_loadu_ps(row.add(p + 16 * i));
                    *acc = _mm512_fmadd_ps(x, y, *acc);
                }
                p += 64;
            }
            while p + 16 <= d {
                let x = _mm512_loadu_ps(q.add(p));
                let y = _mm512_loadu_ps(row.add(p));
                a[0] = _mm512_fmadd_ps(x, y, a[0]);
                p += 16;
            }
            if p < d {
                let mask: __mmask16 = (1u32 << (d - p)) as u16 - 1;
                let x = _mm512_maskz_loadu_ps(mask, q.add(p));
                let y = _mm512_maskz_loadu_ps(mask, row.add(p));
                a[1] = _mm512_fmadd_ps(x, y, a[1]);
            }
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            *out.add(j) = _mm512_reduce_add_ps(s);
        }
    }

    /// [`gemv_avx512`] with 8-lane vectors.
    ///
    /// # Safety
    /// As [`gemv_avx512`], with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gemv_avx2(q: *const f32, k: *const f32, nb: usize, d: usize, out: *mut f32) {
        for j in 0..nb {
            let row = k.add(j * d);
            let mut a = [_mm256_setzero_ps(); 4];
            let mut p = 0;
            while p + 32 <= d {
                for (i, acc) in a.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(q.add(p + 8 * i));
                    let y = _mm256_loadu_ps(row.add(p + 8 * i));
                    *acc = _mm256_fmadd_ps(x, y, *acc);
                }
                p += 32;
            }
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            let mut tail = 0.0;
            while p < d {
                tail += *q.add(p) * *row.add(p);
                p += 1;
            }
            let h = hsum4x8([
                s,
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            ]);
            *out.add(j) = _mm_cvtss_f32(h) + tail;
        }
    }

    /// One R×C tile with 16-lane accumulators.
    ///
    /// # Safety
    /// `q` holds R rows and `k` C rows of `d` floats each; `out` has R rows of stride `ld`
    /// with at least C writable values each; AVX-512F is available.
    #[inline]
    #[allow(clippy::needless_range_loop)] // acc[r][c]: a 2-D register tile
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_avx512<const R: usize, const C: usize>(
        q: *const f32,
        k: *const f32,
        d: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let full = d / 16 * 16;
        let mut p = 0;
        while p < full {
            let mut qv = [_mm512_setzero_ps(); R];
            for (r, v) in qv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(q.add(r * d + p));
            }
            for c in 0..C {
                let kv = _mm512_loadu_ps(k.add(c * d + p));
                for r in 0..R {
                    acc[r][c] = _mm512_fmadd_ps(qv[r], kv, acc[r][c]);
                }
            }
            p += 16;
        }
        if p < d {
            // Masked loads read only the d − p valid lanes (the rest are zero), so nothing past
            // a row's end is touched.
            let mask: __mmask16 = (1u32 << (d - p)) as u16 - 1;
            let mut qv = [_mm512_setzero_ps(); R];
            for (r, v) in qv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, q.add(r * d + p));
            }
            for c in 0..C {
                let kv = _mm512_maskz_loadu_ps(mask, k.add(c * d + p));
                for r in 0..R {
                    acc[r][c] = _mm512_fmadd_ps(qv[r], kv, acc[r][c]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let dst = out.add(r * ld);
            let mut c = 0;
            while c + 4 <= C {
                let s = [
                    fold512(row[c]),
                    fold512(row[c + 1]),
                    fold512(row[c + 2]),
                    fold512(row[c + 3]),
                ];
                _mm_storeu_ps(dst.add(c), hsum4x8(s));
                c += 4;
            }
            while c < C {
                *dst.add(c) = _mm512_reduce_add_ps(row[c]);
                c += 1;
            }
        }
    }

    /// One R×C tile with 8-lane accumulators (AVX2 + FMA).
    ///
    /// # Safety
    /// As [`tile_avx512`], with AVX2 and FMA available.
    #[inline]
    #[allow(clippy::needless_range_loop)] // acc[r][c]: a 2-D register tile
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<const R: usize, const C: usize>(
        q: *const f32,
        k: *const f32,
        d: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let full = d / 8 * 8;
        let mut p = 0;
        while p < full {
            let mut qv = [_mm256_setzero_ps(); R];
            for (r, v) in qv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(q.add(r * d + p));
            }
            for c in 0..C {
                let kv = _mm256_loadu_ps(k.add(c * d + p));
                for r in 0..R {
                    acc[r][c] = _mm256_fmadd_ps(qv[r], kv, acc[r][c]);
                }
            }
            p += 8;
        }
        if p < d {
            // Lanes past d − p are masked off: maskload neither reads nor faults on them.
            const WINDOW: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
            let mask = _mm256_loadu_si256(WINDOW.as_ptr().add(8 - (d - p)) as *const __m256i);
            let mut qv = [_mm256_setzero_ps(); R];
            for (r, v) in qv.iter_mut().enumerate() {
                *v = _mm256_maskload_ps(q.add(r * d + p), mask);
            }
            for c in 0..C {
                let kv = _mm256_maskload_ps(k.add(c * d + p), mask);
                for r in 0..R {
                    acc[r][c] = _mm256_fmadd_ps(qv[r], kv, acc[r][c]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let dst = out.add(r * ld);
            let mut c = 0;
            while c + 4 <= C {
                _mm_storeu_ps(
                    dst.add(c),
                    hsum4x8([row[c], row[c + 1], row[c + 2], row[c + 3]]),
                );
                c += 4;
            }
            while c < C {
                let s = hsum4x8([
                    row[c],
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                ]);
                *dst.add(c) = _mm_cvtss_f32(s);
                c += 1;
            }
        }
    }

    /// C keys × G panels of 16 queries: per dimension, G panel loads and C key broadcasts
    /// feed C·G FMAs (24 accumulators of the 32 registers at C = 12, G = 2).
    ///
    /// # Safety
    /// `panels` holds G·d·16 floats, `k` C·d, `thr` G·16, `out` C·G·16, `masks` C·G;
    /// `ahead` is only prefetched (`ahead_lines` ≤ d cache lines of 64 bytes, the last
    /// possibly partial: prefetching never faults); AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn panel_avx512<const C: usize, const G: usize>(
        panels: *const f32,
        k: *const f32,
        d: usize,
        thr: *const f32,
        out: *mut f32,
        masks: *mut u16,
        ahead: *const i8,
        ahead_lines: usize,
    ) -> bool {
        let mut acc = [[_mm512_setzero_ps(); G]; C];
        for p in 0..d {
            if p < ahead_lines {
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(p * 64));
            }
            let mut qv = [_mm512_setzero_ps(); G];
            for (g, v) in qv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(panels.add(g * d * 16 + p * 16));
            }
            for (c, row) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*k.add(c * d + p));
                for (a, v) in row.iter_mut().zip(&qv) {
                    *a = _mm512_fmadd_ps(*v, b, *a);
                }
            }
        }
        let mut flag: __mmask16 = 0;
        for (c, row) in acc.iter().enumerate() {
            for (g, &a) in row.iter().enumerate() {
                let t = _mm512_loadu_ps(thr.add(g * 16));
                // NLE_UQ: above the threshold, or NaN; a − a is NaN exactly when a is ±inf/NaN.
                let z = _mm512_sub_ps(a, a);
                let m = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(a, t)
                    | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(z, z);
                *masks.add(c * G + g) = m;
                flag |= m;
                _mm512_storeu_ps(out.add((c * G + g) * 16), a);
            }
        }
        flag != 0
    }

    /// C keys × one panel of 16 queries as two 8-lane halves (16 registers: 2·C + 2 + 1).
    ///
    /// # Safety
    /// `panels` holds d·16 floats, `k` C·d, `thr` 16, `out` C·16, `masks` C; AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel_avx2<const C: usize>(
        panels: *const f32,
        k: *const f32,
        d: usize,
        thr: *const f32,
        out: *mut f32,
        masks: *mut u16,
    ) -> bool {
        let mut acc = [[_mm256_setzero_ps(); 2]; C];
        for p in 0..d {
            let lo = _mm256_loadu_ps(panels.add(p * 16));
            let hi = _mm256_loadu_ps(panels.add(p * 16 + 8));
            for (c, row) in acc.iter_mut().enumerate() {
                let b = _mm256_set1_ps(*k.add(c * d + p));
                row[0] = _mm256_fmadd_ps(lo, b, row[0]);
                row[1] = _mm256_fmadd_ps(hi, b, row[1]);
            }
        }
        let mut flag = 0u16;
        for (c, row) in acc.iter().enumerate() {
            let mut bits = 0u16;
            for (h, &a) in row.iter().enumerate() {
                let t = _mm256_loadu_ps(thr.add(h * 8));
                let z = _mm256_sub_ps(a, a);
                let m = _mm256_or_ps(
                    _mm256_cmp_ps::<_CMP_NLE_UQ>(a, t),
                    _mm256_cmp_ps::<_CMP_UNORD_Q>(z, z),
                );
                bits |= (_mm256_movemask_ps(m) as u16) << (8 * h);
                _mm256_storeu_ps(out.add(c * 16 + h * 8), a);
            }
            *masks.add(c) = bits;
            flag |= bits;
        }
        flag != 0
    }

    /// [`gemv_avx512`] over float16 keys: 16 halves (32 bytes) widened per load.
    ///
    /// # Safety
    /// `q` holds `d` floats, `k` holds `nb·d` halves, `out` has `nb` writable values; AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gemv_f16_avx512(
        q: *const f32,
        k: *const u16,
        nb: usize,
        d: usize,
        out: *mut f32,
    ) {
        for j in 0..nb {
            let row = k.add(j * d);
            let mut a = [_mm512_setzero_ps(); 4];
            let mut p = 0;
            while p + 64 <= d {
                for (i, acc) in a.iter_mut().enumerate() {
                    let x = _mm512_loadu_ps(q.add(p + 16 * i));
                    let h = _mm256_loadu_si256(row.add(p + 16 * i) as *const __m256i);
                    *acc = _mm512_fmadd_ps(x, _mm512_cvtph_ps(h), *acc);
                }
                p += 64;
            }
            while p + 16 <= d {
                let x = _mm512_loadu_ps(q.add(p));
                let h = _mm256_loadu_si256(row.add(p) as *const __m256i);
                a[0] = _mm512_fmadd_ps(x, _mm512_cvtph_ps(h), a[0]);
                p += 16;
            }
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            let mut total = _mm512_reduce_add_ps(s);
            while p < d {
                total += *q.add(p) * half::f16::from_bits(*row.add(p)).to_f32();
                p += 1;
            }
            *out.add(j) = total;
        }
    }

    /// # Safety
    /// `x` holds `n` floats; AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum_avx512(x: *const f32, n: usize) -> f64 {
        let mut a = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (j, acc) in a.iter_mut().enumerate() {
                *acc = _mm512_add_ps(*acc, _mm512_loadu_ps(x.add(i + 16 * j)));
            }
            i += 64;
        }
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(a[0], a[1]),
            _mm512_add_ps(a[2], a[3]),
        )) as f64;
        while i < n {
            s += *x.add(i) as f64;
            i += 1;
        }
        s
    }

    /// # Safety
    /// `src` and `dst` hold `n` values; AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn widen_avx512(src: *const u16, dst: *mut f32, n: usize) {
        let mut i = 0;
        while i + 16 <= n {
            let h = _mm256_loadu_si256(src.add(i) as *const __m256i);
            _mm512_storeu_ps(dst.add(i), _mm512_cvtph_ps(h));
            i += 16;
        }
        while i < n {
            *dst.add(i) = half::f16::from_bits(*src.add(i)).to_f32();
            i += 1;
        }
    }

    /// # Safety
    /// `src` and `dst` hold `n` values; AVX and F16C.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn widen_f16c(src: *const u16, dst: *mut f32, n: usize) {
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.add(i) as *const __m128i);
            _mm256_storeu_ps(dst.add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        while i < n {
            *dst.add(i) = half::f16::from_bits(*src.add(i)).to_f32();
            i += 1;
        }
    }

    /// Sum of the two 8-lane halves of a 16-lane vector.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fold512(v: __m512) -> __m256 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        _mm256_add_ps(lo, hi)
    }

    /// Lane sums of four 8-lane vectors, as one 4-lane vector.
    #[inline]
    #[target_feature(enable = "avx")]
    fn hsum4x8(v: [__m256; 4]) -> __m128 {
        let h01 = _mm256_hadd_ps(v[0], v[1]);
        let h23 = _mm256_hadd_ps(v[2], v[3]);
        let h = _mm256_hadd_ps(h01, h23);
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn supported() -> Vec<Isa> {
        match detect() {
            Isa::Avx512 => vec![Isa::Avx512, Isa::Avx2, Isa::Portable],
            Isa::Avx2 => vec![Isa::Avx2, Isa::Portable],
            Isa::Portable => vec![Isa::Portable],
        }
    }

    #[test]
    fn every_kernel_matches_the_scalar_dot_on_all_tile_shapes() {
        let mut rng = Rng::new(11, 0);
        for isa in supported() {
            for &d in &[1usize, 7, 8, 15, 16, 17, 31, 33, 100, 384, 385] {
                for rows in 0..=9 {
                    for &nb in &[0usize, 1, 3, 4, 5, 8, 9, 13] {
                        let q: Vec<f32> =
                            (0..rows * d).map(|_| rng.next_f64() as f32 - 0.5).collect();
                        let k: Vec<f32> =
                            (0..nb * d).map(|_| rng.next_f64() as f32 - 0.5).collect();
                        // sentinel past the block: kernels must not write outside rows·nb
                        let mut out = vec![f32::NAN; rows * nb + 1];
                        score_block_with(isa, &q, rows, &k, nb, d, &mut out);
                        assert!(out[rows * nb].is_nan());
                        for r in 0..rows {
                            for j in 0..nb {
                                let want =
                                    dot_scalar(&q[r * d..(r + 1) * d], &k[j * d..(j + 1) * d]);
                                let got = out[r * nb + j];
                                assert!(
                                    (got - want).abs() <= 1e-5 * (1.0 + d as f32),
                                    "{isa:?} d={d} rows={rows} nb={nb} r={r} j={j}: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn panel_kernels_match_the_scalar_dot_and_flag_correctly() {
        let mut rng = Rng::new(12, 0);
        for isa in supported() {
            let (cw, gw) = panel_tile_shape(isa);
            for &d in &[1usize, 3, 16, 17, 100, 385] {
                for &(c, g) in &[(cw, gw), (cw, 1), (1, gw), (1, 1)] {
                    let q = g * PANEL - 3; // padding lanes exercised
                    let queries: Vec<f32> =
                        (0..q * d).map(|_| rng.next_f64() as f32 - 0.5).collect();
                    let keys: Vec<f32> = (0..c * d).map(|_| rng.next_f64() as f32 - 0.5).collect();
                    let panels = pack_panels(&queries, q, d);
                    let mut out = vec![f32::NAN; c * g * PANEL];
                    let mut masks = vec![0u16; c * g];
                    let high = vec![f32::INFINITY; g * PANEL];
                    assert!(!panel_tile(
                        isa, &panels, g, &keys, c, d, &high, &mut out, &mut masks, &queries
                    ));
                    for j in 0..c {
                        for i in 0..g * PANEL {
                            let want = if i < q {
                                dot_scalar(&queries[i * d..(i + 1) * d], &keys[j * d..(j + 1) * d])
                            } else {
                                0.0
                            };
                            let got = out[j * g * PANEL + i];
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + d as f32),
                                "{isa:?} d={d} c={c} g={g}: {got} vs {want}"
                            );
                        }
                    }
                    let low = vec![f32::NEG_INFINITY; g * PANEL];
                    assert!(panel_tile(
                        isa, &panels, g, &keys, c, d, &low, &mut out, &mut masks, &queries
                    ));
                    let mid: Vec<f32> = (0..g * PANEL)
                        .map(|_| (rng.next_f64() as f32 - 0.5) * 0.3)
                        .collect();
                    panel_tile(
                        isa, &panels, g, &keys, c, d, &mid, &mut out, &mut masks, &[0u8; 0],
                    );
                    for j in 0..c {
                        for p in 0..g {
                            for lane in 0..PANEL {
                                let above = out[(j * g + p) * PANEL + lane] > mid[p * PANEL + lane];
                                assert_eq!(
                                    masks[j * g + p] >> lane & 1 == 1,
                                    above,
                                    "{isa:?} mask bit"
                                );
                            }
                        }
                    }
                    let mut bad = keys.clone();
                    bad[c * d - 1] = f32::NEG_INFINITY; // a −inf score is below any threshold
                                                        // every lane a real query with a positive weight on the −inf element
                    let full = g * PANEL;
                    let q2: Vec<f32> = (0..full * d)
                        .map(|i| if i % d == d - 1 { 1.0 } else { 0.25 })
                        .collect();
                    let panels2 = pack_panels(&q2, full, d);
                    assert!(
                        panel_tile(isa, &panels2, g, &bad, c, d, &high, &mut out, &mut masks, &q2),
                        "{isa:?} missed -inf"
                    );
                }
            }
        }
    }

    #[test]
    fn widening_f16_is_exact_for_every_length() {
        let vals: Vec<half::f16> = (0..70)
            .map(|i| half::f16::from_f32(i as f32 * 0.37 - 9.0))
            .chain([half::f16::INFINITY, half::f16::NAN, half::f16::NEG_INFINITY])
            .collect();
        for n in 0..vals.len() {
            let mut out = vec![0f32; n];
            widen_f16(&vals[..n], &mut out);
            for (o, v) in out.iter().zip(&vals) {
                assert!(o.to_bits() == v.to_f32().to_bits() || (o.is_nan() && v.is_nan()));
            }
        }
    }

    #[test]
    fn f16_row_kernel_matches_widening() {
        let mut rng = Rng::new(13, 0);
        for &d in &[1usize, 15, 16, 17, 64, 100, 385] {
            let nb = 9;
            let q: Vec<f32> = (0..d).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let k: Vec<half::f16> = (0..nb * d)
                .map(|_| half::f16::from_f64(rng.next_f64() - 0.5))
                .collect();
            let mut out = vec![0f32; nb];
            score_row_f16(&q, &k, nb, d, &mut out);
            for j in 0..nb {
                let wide: Vec<f32> = k[j * d..(j + 1) * d].iter().map(|x| x.to_f32()).collect();
                let want = dot_scalar(&q, &wide);
                assert!(
                    (out[j] - want).abs() <= 1e-5 * (1.0 + d as f32),
                    "d={d}: {} vs {want}",
                    out[j]
                );
            }
        }
    }

    #[test]
    fn all_finite_spots_nan_and_inf() {
        assert!(all_finite(&[0.0, 1.0, -3.0]));
        assert!(!all_finite(&[0.0, f32::NAN]));
        assert!(!all_finite(&[f32::NEG_INFINITY]));
    }
}
