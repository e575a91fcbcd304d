//! 3×3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(m×m, 3×3) (Lavin &
//! Gray 2016, "Fast Algorithms for Convolutional Neural Networks", eq. 8):
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` for each m×m output tile `Y`, its (m+2)×(m+2) input patch
//! `d` and the 3×3 filter `g`. Summed over input channels, the element-wise product becomes
//! (m+2)² matrix multiplies `U_k [out × in] · V_k [in × tiles]`. F(2×2, 3×3) does 2.25 times
//! fewer multiply-adds than the direct convolution, F(4×4, 3×3) four times fewer, for larger
//! transforms and a larger rounding error (its transforms hold 4s, 5s and 8s; section 5).
//!
//! The transforms run on [`LANES`] tiles of a tile row at once. The padded input stores each
//! row as its m column phases (columns `≡ p mod m`, one after another), so that every element
//! of those tiles' patches is a unit-stride load.

use rayon::prelude::*;

use super::conv::Conv2dShape;
use super::{SharedOut, multiply};

/// Floats of transformed inputs and products one task keeps (16 MiB): blocks of tiles sized to
/// it, so that deep layers take fewer tiles at a time.
const TASK_FLOATS: usize = 1 << 22;

/// Tiles transformed together: one AVX-512 register of f32, two AVX2 ones.
const LANES: usize = 16;

/// The output tile sizes implemented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// F(2×2, 3×3): 4×4 patches, 16 products.
    Two,
    /// F(4×4, 3×3): 6×6 patches, 36 products.
    Four,
}

impl Tile {
    fn m(self) -> usize {
        match self {
            Tile::Two => 2,
            Tile::Four => 4,
        }
    }
}

/// `G g` for a column `g` of the filter: `P = m + 2` values.
#[inline(always)]
fn filter_1d<const P: usize>([a, b, c]: [f32; 3]) -> [f32; P] {
    let mut u = [0f32; P];
    if P == 4 {
        // G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]
        u[..4].copy_from_slice(&[a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]);
    } else {
        // G = [[¼, 0, 0], [−⅙, −⅙, −⅙], [−⅙, ⅙, −⅙], [1/24, 1/12, ⅙], [1/24, −1/12, ⅙],
        //      [0, 0, 1]]
        let (sixth, twelfth, quarter) = (1.0 / 6.0, 1.0 / 12.0, 0.25);
        let (ac, b12) = (a / 24.0 + c * sixth, b * twelfth);
        u[..6].copy_from_slice(&[
            a * quarter,
            -(a + b + c) * sixth,
            -(a - b + c) * sixth,
            ac + b12,
            ac - b12,
            c,
        ]);
    }
    u
}

/// `Bᵀ d` for a column `d` of a patch.
#[inline(always)]
fn input_1d<const P: usize>(d: [f32; P]) -> [f32; P] {
    let mut t = [0f32; P];
    if P == 4 {
        // Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]
        t[..4].copy_from_slice(&[d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]);
    } else {
        // Bᵀ = [[4, 0, −5, 0, 1, 0], [0, −4, −4, 1, 1, 0], [0, 4, −4, −1, 1, 0],
        //       [0, −2, −1, 2, 1, 0], [0, 2, −1, −2, 1, 0], [0, 4, 0, −5, 0, 1]]
        let (p, q) = (d[4] - 4.0 * d[2], d[3] - 4.0 * d[1]);
        let (r, s) = (d[4] - d[2], 2.0 * (d[3] - d[1]));
        t[..6].copy_from_slice(&[
            4.0 * d[0] - 5.0 * d[2] + d[4],
            p + q,
            p - q,
            r + s,
            r - s,
            4.0 * d[1] - 5.0 * d[3] + d[5],
        ]);
    }
    t
}

/// `Aᵀ m` for a column `m` of a product: `M = P − 2` values.
#[inline(always)]
fn output_1d<const P: usize, const M: usize>(m: [f32; P]) -> [f32; M] {
    let mut y = [0f32; M];
    if P == 4 {
        // Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]
        y[..2].copy_from_slice(&[m[0] + m[1] + m[2], m[1] - m[2] - m[3]]);
    } else {
        // Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, −1, 2, −2, 0], [0, 1, 1, 4, 4, 0],
        //       [0, 1, −1, 8, −8, 1]]
        let (sum12, dif12) = (m[1] + m[2], m[1] - m[2]);
        let (sum34, dif34) = (m[3] + m[4], m[3] - m[4]);
        y[..4].copy_from_slice(&[
            m[0] + sum12 + sum34,
            dif12 + 2.0 * dif34,
            sum12 + 4.0 * sum34,
            dif12 + 8.0 * dif34 + m[5],
        ]);
    }
    y
}

/// `G g Gᵀ` for a 3×3 filter, row-major `P × P`, into `dst[k · stride]`.
fn transform_filter<const P: usize>(g: &[f32], dst: &mut [f32], stride: usize) {
    let mut columns = [[0f32; P]; 3];
    for (col, c) in columns.iter_mut().enumerate() {
        *c = filter_1d([g[col], g[3 + col], g[6 + col]]);
    }
    for i in 0..P {
        let row = filter_1d::<P>([columns[0][i], columns[1][i], columns[2][i]]);
        for (j, &u) in row.iter().enumerate() {
            dst[(i * P + j) * stride] = u;
        }
    }
}

/// The first `len` (at most `N`) floats of `src`, zeros after them.
#[inline(always)]
fn load<const N: usize>(src: &[f32], len: usize) -> [f32; N] {
    let mut lanes = [0f32; N];
    if len == N {
        lanes.copy_from_slice(&src[..N]);
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

/// `Bᵀ d B` for `len` consecutive tiles of one tile row of one channel: see
/// [`transform_input_row`].
#[inline(always)]
fn input_row<const M: usize, const P: usize>(
    rows: &[&[f32]],
    phase_len: usize,
    dst: &mut [f32],
    stride: usize,
    len: usize,
) {
    let mut s = 0;
    while s < len {
        let w = LANES.min(len - s);
        // d[i][col]: lane l holds tile s + l; column `col` of a patch is phase `col % M` at
        // tile index `+ col / M`.
        let mut d = [[[0f32; LANES]; P]; P];
        for (i, row) in d.iter_mut().enumerate() {
            for (col, lanes) in row.iter_mut().enumerate() {
                *lanes = load(&rows[i][(col % M) * phase_len + col / M + s..], w);
            }
        }
        let mut v = [[0f32; LANES]; 36];
        for l in 0..LANES {
            let mut t = [[0f32; P]; P];
            for col in 0..P {
                let column = input_1d::<P>(std::array::from_fn(|i| d[i][col][l]));
                for (i, &x) in column.iter().enumerate() {
                    t[i][col] = x;
                }
            }
            for (i, &row) in t.iter().enumerate() {
                for (j, x) in input_1d::<P>(row).into_iter().enumerate() {
                    v[i * P + j][l] = x;
                }
            }
        }
        for (k, vk) in v.iter().take(P * P).enumerate() {
            store(&mut dst[k * stride + s..], vk, w);
        }
        s += w;
    }
}

dispatched! {
    /// `Bᵀ d B` for `len` consecutive tiles of one tile row of one channel. `rows[i]` is the
    /// patches' padded row `i` (`m + 2` of them), stored as its `m` column phases of
    /// `phase_len` each and started at the first tile, so that column `c` of tile `t`'s patch
    /// is `rows[i][(c mod m) · phase_len + t + c div m]`. Writes element `k` of tile `t`'s
    /// transform to `dst[k · stride + t]`.
    pub fn transform_input_row(
        tile: Tile,
        rows: &[&[f32]],
        phase_len: usize,
        dst: &mut [f32],
        stride: usize,
        len: usize,
    ) {
        match tile {
            Tile::Two => input_row::<2, 4>(rows, phase_len, dst, stride, len),
            Tile::Four => input_row::<4, 6>(rows, phase_len, dst, stride, len),
        }
    }
}

/// `Aᵀ m A + bias` for `len` consecutive tiles: see [`transform_output_row`].
#[inline(always)]
fn output_row<const M: usize, const P: usize>(
    products: &[f32],
    stride: usize,
    len: usize,
    bias: f32,
    rows: &mut [Option<&mut [f32]>],
) {
    let Some(Some(first)) = rows.first() else {
        return;
    };
    let cols = first.len();
    let mut s = 0;
    while s < len {
        let w = LANES.min(len - s);
        let mut m = [[0f32; LANES]; 36];
        for (k, mk) in m.iter_mut().take(P * P).enumerate() {
            *mk = load(&products[k * stride + s..], w);
        }
        // y[r][M·l + c]: pixel (r, c) of tile s + l, so that each row is stored in one copy.
        let mut y = [[0f32; 4 * LANES]; M];
        for l in 0..LANES {
            let mut t = [[0f32; P]; M];
            for col in 0..P {
                let column = output_1d::<P, M>(std::array::from_fn(|i| m[i * P + col][l]));
                for (r, &x) in column.iter().enumerate() {
                    t[r][col] = x;
                }
            }
            for (yr, &row) in y.iter_mut().zip(&t) {
                for (c, x) in output_1d::<P, M>(row).into_iter().enumerate() {
                    yr[M * l + c] = x + bias;
                }
            }
        }
        let n = (M * w).min(cols - M * s);
        for (dst, yr) in rows.iter_mut().zip(&y) {
            if let Some(dst) = dst {
                if n == M * LANES {
                    dst[M * s..][..M * LANES].copy_from_slice(&yr[..M * LANES]);
                } else {
                    dst[M * s..][..n].copy_from_slice(&yr[..n]);
                }
            }
        }
        s += w;
    }
}

dispatched! {
    /// `Aᵀ m A + bias` for `len` consecutive tiles of one tile row of one output channel:
    /// element `k` of tile `t`'s product is `products[k · stride + t]`. Writes the tiles'
    /// `m` pixel rows into `rows` (`None` below the image; each as long as the image keeps
    /// of those `m · len` columns).
    pub fn transform_output_row(
        tile: Tile,
        products: &[f32],
        stride: usize,
        len: usize,
        bias: f32,
        rows: &mut [Option<&mut [f32]>],
    ) {
        match tile {
            Tile::Two => output_row::<2, 4>(products, stride, len, bias, rows),
            Tile::Four => output_row::<4, 6>(products, stride, len, bias, rows),
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

/// The convolution of [`super::conv::conv2d`] for a 3×3 kernel with padding 1 on every side,
/// by F(m×m, 3×3); the caller has checked the slice lengths against `shape`.
pub(super) fn conv3x3(
    tile: Tile,
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
    let m = tile.m();
    let (patch, products_per_tile) = (m + 2, (m + 2) * (m + 2));
    let (tiles_h, tiles_w) = (height.div_ceil(m), width.div_ceil(m));
    // Padded column `c` of a row sits at `(c mod m) · phase_len + c div m`.
    let phase_len = tiles_w + 1;
    let (padded_h, padded_w) = (m * tiles_h + 2, m * phase_len);
    let image_len = padded_h * padded_w;
    let mut padded = vec![0f32; batch * in_channels * image_len];
    padded
        .par_chunks_mut(image_len)
        .zip(x.par_chunks(height * width))
        .for_each(|(dst, src)| {
            for (y, row) in src.chunks_exact(width).enumerate() {
                let dst = &mut dst[(y + 1) * padded_w..][..padded_w];
                // Pixel x sits in padded column x + 1.
                for (phase, lane) in dst.chunks_exact_mut(phase_len).enumerate() {
                    let first_pixel = (phase + m - 1) % m;
                    let first_index = usize::from(phase == 0);
                    for (d, &v) in lane[first_index..]
                        .iter_mut()
                        .zip(row.iter().skip(first_pixel).step_by(m))
                    {
                        *d = v;
                    }
                }
            }
        });

    // U: `[out][P²][in]`, each of the P² `out × in` matrices with unit stride along `in`.
    let mut filters = vec![0f32; out_channels * products_per_tile * in_channels];
    filters
        .par_chunks_mut(products_per_tile * in_channels)
        .zip(weight.par_chunks(in_channels * 9))
        .for_each(|(dst, src)| {
            for (c, g) in src.chunks_exact(9).enumerate() {
                match tile {
                    Tile::Two => transform_filter::<4>(g, &mut dst[c..], in_channels),
                    Tile::Four => transform_filter::<6>(g, &mut dst[c..], in_channels),
                }
            }
        });

    let tiles_per_image = tiles_h * tiles_w;
    let tiles = batch * tiles_per_image;
    // As many tasks as fit the buffers in TASK_FLOATS, rounded up to a multiple of the
    // threads so that none idles in the last round.
    let threads = rayon::current_num_threads().max(1);
    let most = (TASK_FLOATS / (products_per_tile * (in_channels + out_channels))).clamp(16, 1024);
    let per_task = tiles.div_ceil(tiles.div_ceil(most).next_multiple_of(threads));
    let mut out = vec![0f32; batch * out_channels * height * width];
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..tiles.div_ceil(per_task)).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(inputs, products, runs), task| {
            let first = task * per_task;
            let n = per_task.min(tiles - first);
            runs.clear();
            let mut tile_index = first;
            while tile_index < first + n {
                let (b, t) = (tile_index / tiles_per_image, tile_index % tiles_per_image);
                let (row, col) = (t / tiles_w, t % tiles_w);
                let len = (tiles_w - col).min(first + n - tile_index);
                runs.push(Run {
                    b,
                    row,
                    col,
                    len,
                    first: tile_index - first,
                });
                tile_index += len;
            }
            // V: `[P²][in][n]`.
            inputs.resize(products_per_tile * in_channels * n, 0f32);
            let mut rows: [&[f32]; 6] = [&[]; 6];
            for c in 0..in_channels {
                for run in runs.iter() {
                    let image = &padded[(run.b * in_channels + c) * image_len..][..image_len];
                    for (i, r) in rows.iter_mut().take(patch).enumerate() {
                        *r = &image[(m * run.row + i) * padded_w + run.col..][..padded_w - run.col];
                    }
                    transform_input_row(
                        tile,
                        &rows[..patch],
                        phase_len,
                        &mut inputs[c * n + run.first..],
                        in_channels * n,
                        run.len,
                    );
                }
            }
            // M_k = U_k V_k: `[P²][out][n]`.
            products.resize(products_per_tile * out_channels * n, 0f32);
            for k in 0..products_per_tile {
                // SAFETY: U_k is `out × in` at offset `k · in` with row stride `P² · in`
                // inside `filters`; V_k is `in × n` at `k · in · n` inside `inputs`; M_k is
                // `out × n` at `k · out · n` inside `products`; all sized above.
                unsafe {
                    multiply(
                        [out_channels, n, in_channels],
                        (products.as_mut_ptr().add(k * out_channels * n), [n, 1]),
                        (
                            filters.as_ptr().add(k * in_channels),
                            [products_per_tile * in_channels, 1],
                        ),
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
                    let (y, x0) = (m * run.row, m * run.col);
                    let cols = (x0 + m * run.len).min(width) - x0;
                    let base = (run.b * out_channels + o) * height * width + x0;
                    let mut pixel_rows: [Option<&mut [f32]>; 4] = [None, None, None, None];
                    for (r, dst) in pixel_rows.iter_mut().take(m).enumerate() {
                        if y + r < height {
                            // SAFETY: the `cols` pixels from `(y + r, x0)` of channel `o` of
                            // image `b` lie inside `out` and belong to this task's tiles only.
                            *dst = Some(unsafe {
                                std::slice::from_raw_parts_mut(
                                    out_ptr.get().add(base + (y + r) * width),
                                    cols,
                                )
                            });
                        }
                    }
                    transform_output_row(
                        tile,
                        &products[o * n + run.first..],
                        out_channels * n,
                        run.len,
                        bias,
                        &mut pixel_rows[..m],
                    );
                }
            }
        },
    );
    out
}
