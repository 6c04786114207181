//! Dot-product kernels for [`crate::topk`].

/// Queries scored together against one key block.
pub const QUERY_TILE: usize = 8;

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
    for r in 0..rows {
        let qr = &queries[r * d..(r + 1) * d];
        for j in 0..nb {
            out[r * nb + j] = dot_portable(qr, &keys[j * d..(j + 1) * d]);
        }
    }
}

/// Whether every value is finite (vectorises: checks the exponent bits).
pub fn all_finite(xs: &[f32]) -> bool {
    xs.iter().fold(true, |ok, x| ok & x.is_finite())
}
