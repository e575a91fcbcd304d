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

/// `Bᵀ d B` for a 4×4 patch, row-major.
#[inline(always)]
fn transform_patch(d: [[f32; 4]; 4]) -> [f32; 16] {
    // Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]
    let rows = |a: [f32; 4]| [a[0] - a[2], a[1] + a[2], a[2] - a[1], a[1] - a[3]];
    let mut t = [[0f32; 4]; 4];
    for col in 0..4 {
        let r = rows([d[0][col], d[1][col], d[2][col], d[3][col]]);
        for i in 0..4 {
            t[i][col] = r[i];
        }
    }
    let mut v = [0f32; 16];
    for i in 0..4 {
        v[i * 4..i * 4 + 4].copy_from_slice(&rows(t[i]));
    }
    v
}

/// `Aᵀ m A` for a 4×4 product, as a 2×2 tile.
#[inline(always)]
fn transform_product(m: [f32; 16]) -> [[f32; 2]; 2] {
    // Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]
    let pair = |a: f32, b: f32, c: f32, d: f32| [a + b + c, b - c - d];
    let mut s = [[0f32; 4]; 2];
    for col in 0..4 {
        let r = pair(m[col], m[4 + col], m[8 + col], m[12 + col]);
        s[0][col] = r[0];
        s[1][col] = r[1];
    }
    [
        pair(s[0][0], s[0][1], s[0][2], s[0][3]),
        pair(s[1][0], s[1][1], s[1][2], s[1][3]),
    ]
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
    let (padded_h, padded_w) = (2 * tiles_h + 2, 2 * tiles_w + 2);
    let image_len = padded_h * padded_w;
    let mut padded = vec![0f32; batch * in_channels * image_len];
    padded
        .par_chunks_mut(image_len)
        .zip(x.par_chunks(height * width))
        .for_each(|(dst, src)| {
            for (y, row) in src.chunks_exact(width).enumerate() {
                dst[(y + 1) * padded_w + 1..][..width].copy_from_slice(row);
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
    let per_task = (TASK_FLOATS / (16 * (in_channels + out_channels)))
        .next_multiple_of(16)
        .clamp(16, 1024)
        .min(
            tiles
                .div_ceil(rayon::current_num_threads())
                .next_multiple_of(16),
        );
    let mut out = vec![0f32; batch * out_channels * height * width];
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..tiles.div_ceil(per_task)).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(inputs, products, places), task| {
            let first = task * per_task;
            let n = per_task.min(tiles - first);
            // Each tile's image and top-left pixel, worked out once for all channels.
            places.clear();
            places.extend((first..first + n).map(|tile| {
                let (b, t) = (tile / tiles_per_image, tile % tiles_per_image);
                (b, 2 * (t / tiles_w), 2 * (t % tiles_w))
            }));
            // V: `[16][in][n]`.
            inputs.resize(16 * in_channels * n, 0f32);
            for c in 0..in_channels {
                for (j, &(b, ty, tx)) in places.iter().enumerate() {
                    let image = &padded[(b * in_channels + c) * image_len..][..image_len];
                    let mut d = [[0f32; 4]; 4];
                    for (i, row) in d.iter_mut().enumerate() {
                        row.copy_from_slice(&image[(ty + i) * padded_w + tx..][..4]);
                    }
                    for (k, v) in transform_patch(d).into_iter().enumerate() {
                        inputs[(k * in_channels + c) * n + j] = v;
                    }
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
                for (j, &(b, ty, tx)) in places.iter().enumerate() {
                    let mut m = [0f32; 16];
                    for (k, v) in m.iter_mut().enumerate() {
                        *v = products[(k * out_channels + o) * n + j];
                    }
                    let y = transform_product(m);
                    let base = (b * out_channels + o) * height * width;
                    for (i, row) in y.iter().enumerate() {
                        let py = ty + i;
                        if py >= height {
                            continue;
                        }
                        for (jj, &value) in row.iter().enumerate() {
                            let px = tx + jj;
                            if px < width {
                                // SAFETY: pixel `(py, px)` of channel `o` of image `b`
                                // lies inside `out`, and belongs to this task's tile.
                                unsafe {
                                    *out_ptr.get().add(base + py * width + px) = value + bias;
                                }
                            }
                        }
                    }
                }
            }
        },
    );
    out
}
