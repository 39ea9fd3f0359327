//! BEiT's relative-position index and bias, built from the window size with integer loops (never
//! trusted from a file; a stored index is only checked against this one).
//!
//! For patches i = (hi, wi) (query) and j = (hj, wj) (key) of a Wh×Ww grid:
//!   idx(i, j) = (hi − hj + Wh − 1)·(2Ww − 1) + (wi − wj + Ww − 1),
//! and with R = (2Wh−1)(2Ww−1): class-token row = R, class-token column = R+1, corner = R+2.
//! The table has R + 3 rows and one column per head.

/// Number of rows of the bias table for a Wh×Ww grid.
pub fn num_relative_distance(wh: usize, ww: usize) -> usize {
    (2 * wh - 1) * (2 * ww - 1) + 3
}

/// The (N+1)×(N+1) index, row-major, N = Wh·Ww.
pub fn relative_position_index(wh: usize, ww: usize) -> Vec<usize> {
    let n = wh * ww + 1;
    let r = (2 * wh - 1) * (2 * ww - 1);
    let mut idx = vec![0usize; n * n];
    for i in 0..wh * ww {
        let (hi, wi) = (i / ww, i % ww);
        for j in 0..wh * ww {
            let (hj, wj) = (j / ww, j % ww);
            idx[(i + 1) * n + (j + 1)] = (hi + wh - 1 - hj) * (2 * ww - 1) + (wi + ww - 1 - wj);
        }
    }
    for k in 0..n {
        idx[k] = r; // class token attends to patches
        idx[k * n] = r + 1; // patches attend to the class token
    }
    idx[0] = r + 2;
    idx
}

/// Gathers the table [R+3, H] into a dense bias [H, N+1, N+1].
pub fn gather_bias(table: &[f32], heads: usize, index: &[usize]) -> Vec<f32> {
    let nn = index.len();
    let mut out = vec![0.0f32; heads * nn];
    for h in 0..heads {
        for (o, &ix) in out[h * nn..(h + 1) * nn].iter_mut().zip(index) {
            *o = table[ix * heads + h];
        }
    }
    out
}

/// The adjoint of `gather_bias`: accumulates a dense bias gradient [H, N+1, N+1] into the table
/// gradient [R+3, H] (many (i, j) pairs share one table row).
pub fn scatter_bias_grad(dbias: &[f32], heads: usize, index: &[usize], rows: usize) -> Vec<f32> {
    let nn = index.len();
    let mut dtable = vec![0.0f32; rows * heads];
    for h in 0..heads {
        for (g, &ix) in dbias[h * nn..(h + 1) * nn].iter().zip(index) {
            dtable[ix * heads + h] += g;
        }
    }
    dtable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_corners_and_symmetry() {
        let idx = relative_position_index(14, 14);
        let n = 197;
        assert_eq!(num_relative_distance(14, 14), 732);
        assert_eq!(idx[0], 731);
        assert_eq!(idx[5], 729);
        assert_eq!(idx[5 * n], 730);
        // Same patch → zero offset → centre of the (2W-1)² grid.
        assert_eq!(idx[n + 1], 13 * 27 + 13);
        // Query (0,0), key (13,13): most negative offsets → index 0.
        assert_eq!(idx[n + 196], 0);
    }
}
