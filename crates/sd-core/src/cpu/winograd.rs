//! 3×3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(2×2, 3×3) (Lavin &
//! Gray 2016, "Fast Algorithms for Convolutional Neural Networks", eq. 8):
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` for each 2×2 output tile `Y`, its 4×4 input patch `d` and
//! the 3×3 filter `g`. Summed over input channels, the element-wise product becomes 16 matrix
//! multiplies `U_k [out × in] · V_k [in × tiles]`: 2.25 times fewer multiply-adds than the direct
//! convolution, for three cheap, linear transforms.

use rayon::prelude::*;

use super::conv::Conv2dShape;
use super::{SharedOut, multiply};

/// Floats of transformed inputs and products one task keeps (16 MiB): blocks of tiles sized to
/// it, so that deep layers take fewer tiles at a time.
const TASK_FLOATS: usize = 1 << 22;

/// Tiles transformed together: one AVX-512 register of f32, two AVX2 ones.
const LANES: usize = 16;

/// `G g Gᵀ` for a 3×3 filter, row-major 4×4.
fn transform_filter(g: &[f32]) -> [f32; 16] {
    // G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]
    let rows = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    let mut gg = [[0f32; 3]; 4];
    for col in 0..3 {
        let r = rows(g[col], g[3 + col], g[6 + col]);
        for i in 0..4 {
            gg[i][col] = r[i];
        }
    }
    let mut u = [0f32; 16];
    for i in 0..4 {
        let r = rows(gg[i][0], gg[i][1], gg[i][2]);
        u[i * 4..i * 4 + 4].copy_from_slice(&r);
    }
    u
}

/// The first `len` (at most [`LANES`]) floats of `src`, zeros after them.
#[inline(always)]
fn load(src: &[f32], len: usize) -> [f32; LANES] {
    let mut lanes = [0f32; LANES];
    if len == LANES {
        lanes.copy_from_slice(&src[..LANES]);
    } else {
        lanes[..len].copy_from_slice(&src[..len]);
    }
    lanes
}

/// Copies the first `len` floats of `src` to `dst`, with a fixed-size copy for a full block.
#[inline(always)]
fn store<const N: usize>(dst: &mut [f32], src: &[f32; N], len: usize) {
    if len == N {
        dst[..N].copy_from_slice(src);
    } else {
        dst[..len].copy_from_slice(&src[..len]);
    }
}

dispatched! {
    /// `Bᵀ d B` for `len` consecutive tiles of one tile row of one channel. `even[i]` and
    /// `odd[i]` are the even and odd columns of the patches' padded row `i`, from the first
    /// tile's, so that tile `t`'s patch row is `[even[t], odd[t], even[t + 1], odd[t + 1]]`:
    /// unit-stride loads across tiles. Writes element `k` of tile `t`'s transform to
    /// `dst[k · stride + t]`.
    pub fn transform_input_row(
        even: [&[f32]; 4],
        odd: [&[f32]; 4],
        dst: &mut [f32],
        stride: usize,
        len: usize,
    ) {
        // Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]
        let mut s = 0;
        while s < len {
            let w = LANES.min(len - s);
            // d[i][col]: lane l holds tile s + l.
            let mut d = [[[0f32; LANES]; 4]; 4];
            for (i, row) in d.iter_mut().enumerate() {
                row[0] = load(&even[i][s..], w);
                row[1] = load(&odd[i][s..], w);
                row[2] = load(&even[i][s + 1..], w);
                row[3] = load(&odd[i][s + 1..], w);
            }
            let mut v = [[0f32; LANES]; 16];
            for l in 0..LANES {
                let mut t = [[0f32; 4]; 4];
                for col in 0..4 {
                    let (a, b, c, e) = (d[0][col][l], d[1][col][l], d[2][col][l], d[3][col][l]);
                    t[0][col] = a - c;
                    t[1][col] = b + c;
                    t[2][col] = c - b;
                    t[3][col] = b - e;
                }
                for (i, &[a, b, c, e]) in t.iter().enumerate() {
                    v[4 * i][l] = a - c;
                    v[4 * i + 1][l] = b + c;
                    v[4 * i + 2][l] = c - b;
                    v[4 * i + 3][l] = b - e;
                }
            }
            for (k, vk) in v.iter().enumerate() {
                store(&mut dst[k * stride + s..], vk, w);
            }
            s += w;
        }
    }
}

dispatched! {
    /// `Aᵀ m A + bias` for `len` consecutive tiles of one tile row of one output channel:
    /// element `k` of tile `t`'s product is `products[k · stride + t]`. Writes the tiles'
    /// pixel rows interleaved into `top` and, when given, `bottom` (both as long as the image
    /// keeps of those `2 · len` columns).
    pub fn transform_output_row(
        products: &[f32],
        stride: usize,
        len: usize,
        bias: f32,
        top: &mut [f32],
        bottom: Option<&mut [f32]>,
    ) {
        // Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]
        let cols = top.len();
        let mut bottom = bottom;
        let mut s = 0;
        while s < len {
            let w = LANES.min(len - s);
            let mut m = [[0f32; LANES]; 16];
            for (k, mk) in m.iter_mut().enumerate() {
                *mk = load(&products[k * stride + s..], w);
            }
            let mut y = [[0f32; 2 * LANES]; 2];
            for l in 0..LANES {
                let mut r = [[0f32; 4]; 2];
                for col in 0..4 {
                    let (a, b, c, e) = (m[col][l], m[4 + col][l], m[8 + col][l], m[12 + col][l]);
                    r[0][col] = a + b + c;
                    r[1][col] = b - c - e;
                }
                for (yr, &[a, b, c, e]) in y.iter_mut().zip(&r) {
                    yr[2 * l] = a + b + c + bias;
                    yr[2 * l + 1] = b - c - e + bias;
                }
            }
            let n = (2 * w).min(cols - 2 * s);
            store(&mut top[2 * s..], &y[0], n);
            if let Some(bottom) = bottom.as_deref_mut() {
                store(&mut bottom[2 * s..], &y[1], n);
            }
            s += w;
        }
    }
}

/// A run of tiles in one tile row: image `b`, tile row `row`, tile columns `col..col + len`,
/// the task's tiles `first..first + len`.
#[derive(Clone, Copy)]
struct Run {
    b: usize,
    row: usize,
    col: usize,
    len: usize,
    first: usize,
}

/// The convolution of [`super::conv::conv2d`] for a 3×3 kernel with padding 1 on every side;
/// the caller has checked the slice lengths against `shape`.
pub(super) fn conv3x3(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    shape: Conv2dShape,
) -> Vec<f32> {
    let Conv2dShape {
        batch,
        in_channels,
        out_channels,
        height,
        width,
        ..
    } = shape;
    let (tiles_h, tiles_w) = (height.div_ceil(2), width.div_ceil(2));
    // Each padded row is stored as its even columns, then its odd ones (`half` each).
    let half = tiles_w + 1;
    let (padded_h, padded_w) = (2 * tiles_h + 2, 2 * half);
    let image_len = padded_h * padded_w;
    let mut padded = vec![0f32; batch * in_channels * image_len];
    padded
        .par_chunks_mut(image_len)
        .zip(x.par_chunks(height * width))
        .for_each(|(dst, src)| {
            for (y, row) in src.chunks_exact(width).enumerate() {
                let (even, odd) = dst[(y + 1) * padded_w..][..padded_w].split_at_mut(half);
                // Pixel x sits in padded column x + 1: odd for even x.
                for (o, &v) in odd.iter_mut().zip(row.iter().step_by(2)) {
                    *o = v;
                }
                for (e, &v) in even[1..].iter_mut().zip(row.iter().skip(1).step_by(2)) {
                    *e = v;
                }
            }
        });

    // U: `[out][16][in]`, each of the 16 `out × in` matrices with unit stride along `in`.
    let mut filters = vec![0f32; out_channels * 16 * in_channels];
    filters
        .par_chunks_mut(16 * in_channels)
        .zip(weight.par_chunks(in_channels * 9))
        .for_each(|(dst, src)| {
            for (c, g) in src.chunks_exact(9).enumerate() {
                for (k, u) in transform_filter(g).into_iter().enumerate() {
                    dst[k * in_channels + c] = u;
                }
            }
        });

    let tiles_per_image = tiles_h * tiles_w;
    let tiles = batch * tiles_per_image;
    // As many tasks as fit the buffers in TASK_FLOATS, rounded up to a multiple of the
    // threads so that none idles in the last round.
    let threads = rayon::current_num_threads().max(1);
    let most = (TASK_FLOATS / (16 * (in_channels + out_channels))).clamp(16, 1024);
    let per_task = tiles.div_ceil(tiles.div_ceil(most).next_multiple_of(threads));
    let mut out = vec![0f32; batch * out_channels * height * width];
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..tiles.div_ceil(per_task)).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(inputs, products, runs), task| {
            let first = task * per_task;
            let n = per_task.min(tiles - first);
            runs.clear();
            let mut tile = first;
            while tile < first + n {
                let (b, t) = (tile / tiles_per_image, tile % tiles_per_image);
                let (row, col) = (t / tiles_w, t % tiles_w);
                let len = (tiles_w - col).min(first + n - tile);
                runs.push(Run {
                    b,
                    row,
                    col,
                    len,
                    first: tile - first,
                });
                tile += len;
            }
            // V: `[16][in][n]`.
            inputs.resize(16 * in_channels * n, 0f32);
            for c in 0..in_channels {
                for run in runs.iter() {
                    let image = &padded[(run.b * in_channels + c) * image_len..][..image_len];
                    let rows: [&[f32]; 4] =
                        std::array::from_fn(|i| &image[(2 * run.row + i) * padded_w..][..padded_w]);
                    transform_input_row(
                        rows.map(|r| &r[run.col..half]),
                        rows.map(|r| &r[half + run.col..]),
                        &mut inputs[c * n + run.first..],
                        in_channels * n,
                        run.len,
                    );
                }
            }
            // M_k = U_k V_k: `[16][out][n]`.
            products.resize(16 * out_channels * n, 0f32);
            for k in 0..16 {
                // SAFETY: U_k is `out × in` at offset `k · in` with row stride `16 · in`
                // inside `filters`; V_k is `in × n` at `k · in · n` inside `inputs`; M_k is
                // `out × n` at `k · out · n` inside `products`; all sized above.
                unsafe {
                    multiply(
                        [out_channels, n, in_channels],
                        (products.as_mut_ptr().add(k * out_channels * n), [n, 1]),
                        (filters.as_ptr().add(k * in_channels), [16 * in_channels, 1]),
                        (inputs.as_ptr().add(k * in_channels * n), [n, 1]),
                        false,
                        1.0,
                        false,
                    );
                }
            }
            for o in 0..out_channels {
                let bias = bias.map_or(0.0, |b| b[o]);
                for run in runs.iter() {
                    let (y, x0) = (2 * run.row, 2 * run.col);
                    let cols = (x0 + 2 * run.len).min(width) - x0;
                    let at = (run.b * out_channels + o) * height * width + y * width + x0;
                    // SAFETY: the `cols` pixels from `(y, x0)` (and from `(y + 1, x0)` when
                    // inside the image) of channel `o` of image `b` lie inside `out` and
                    // belong to this task's tiles only.
                    let (top, bottom) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(out_ptr.get().add(at), cols),
                            (y + 1 < height).then(|| {
                                std::slice::from_raw_parts_mut(out_ptr.get().add(at + width), cols)
                            }),
                        )
                    };
                    transform_output_row(
                        &products[o * n + run.first..],
                        out_channels * n,
                        run.len,
                        bias,
                        top,
                        bottom,
                    );
                }
            }
        },
    );
    out
}
