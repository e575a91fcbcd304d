//! 3×3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(m×m, 3×3) (Lavin &
//! Gray 2016, "Fast Algorithms for Convolutional Neural Networks", eq. 8):
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` for each m×m output tile `Y`, its (m+2)×(m+2) input patch
//! `d` and the 3×3 filter `g`. Summed over input channels, the element-wise product becomes
//! (m+2)² matrix multiplies `U_k [out × in] · V_k [in × tiles]`. F(2×2, 3×3) does 2.25 times
//! fewer multiply-adds than the direct convolution, F(4×4, 3×3) four times fewer, for larger
//! transforms and a larger rounding error (its transforms hold 4s, 5s and 8s: about 1e-5 of
//! the largest output, against 1e-6 for F(2×2, 3×3)).
//!
//! The transforms run on 16 tiles of a tile row at once. Each padded input row is stored as its
//! m column phases (columns `≡ p mod m`, one after another), so that every element of those
//! tiles' patches is a unit-stride load. Tiles go by in groups (transformed inputs ≤ 28 MiB);
//! a group's multiplies are split into tile blocks × output-channel blocks by the memory they
//! read (large maps by tiles, deep levels with large filters by channels).

use rayon::prelude::*;

use super::conv::{Conv2dShape, Epilogue};
use super::{SharedOut, Spare, multiply};

/// Transformed inputs kept at a time (28 MiB): tiles are transformed and multiplied in groups
/// of this size, so that large maps (the VAE's 512² levels) need no more. Under glibc's
/// largest `mmap` threshold (32 MiB), so that the buffer is reused rather than faulted in.
const GROUP_FLOATS: usize = 7 << 20;

/// The transformed inputs' buffer, kept between calls (28 MiB at most: [`GROUP_FLOATS`]).
static INPUTS: Spare = Spare::new();

/// Transformed filters per piece (28 MiB, for the same reason): the output channels are split
/// into blocks whose filters fit.
const PIECE_FLOATS: usize = 7 << 20;

/// Products one task keeps (8 MiB): its tiles × output channels.
const BLOCK_FLOATS: usize = 1 << 21;

/// Tiles transformed together: one AVX-512 register of f32, two AVX2 ones.
const LANES: usize = 16;

/// A convolution's filters (`[out][in][3][3]`) as held: f32, or f16/bf16 (a model whose
/// matrices are held narrower than its arithmetic), widened one output channel at a time as
/// they are transformed, in a buffer that stays in cache.
#[derive(Debug, Clone, Copy)]
pub enum Filters<'a> {
    /// Held in f32: read in place.
    F32(&'a [f32]),
    /// Held in f16.
    F16(&'a [half::f16]),
    /// Held in bf16.
    Bf16(&'a [half::bf16]),
}

impl<'a> Filters<'a> {
    /// How many values.
    pub fn len(&self) -> usize {
        match self {
            Filters::F32(w) => w.len(),
            Filters::F16(w) => w.len(),
            Filters::Bf16(w) => w.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `start..start + dst.len()`, widened to f32 into `dst`.
    pub(super) fn widen_into(&self, start: usize, dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let len = dst.len();
        match self {
            Filters::F32(w) => dst.copy_from_slice(&w[start..][..len]),
            Filters::F16(w) => w[start..][..len].convert_to_f32_slice(dst),
            Filters::Bf16(w) => w[start..][..len].convert_to_f32_slice(dst),
        }
    }

    /// Values `start..start + len` in f32: borrowed when held in f32, widened into `buffer`
    /// otherwise.
    pub(super) fn chunk<'b>(
        &'b self,
        start: usize,
        len: usize,
        buffer: &'b mut Vec<f32>,
    ) -> &'b [f32] {
        if let Filters::F32(w) = self {
            return &w[start..][..len];
        }
        buffer.resize(len, 0.0);
        self.widen_into(start, buffer);
        buffer
    }
}

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

/// `G g Gᵀ` for the 3×3 filters of `LANES` input channels at once: see [`transform_filters`].
#[inline(always)]
fn filters_of<const P: usize>(weight: &[f32], dst: &mut [f32], in_channels: usize) {
    let mut c = 0;
    while c < in_channels {
        let w = LANES.min(in_channels - c);
        // g[tap][l]: tap `tap` of channel c + l's filter.
        let mut g = [[0f32; LANES]; 9];
        for (l, filter) in weight[c * 9..][..w * 9].chunks_exact(9).enumerate() {
            for (tap, &x) in filter.iter().enumerate() {
                g[tap][l] = x;
            }
        }
        let mut u = [[0f32; LANES]; 36];
        for l in 0..LANES {
            let mut columns = [[0f32; P]; 3];
            for (col, column) in columns.iter_mut().enumerate() {
                *column = filter_1d([g[col][l], g[3 + col][l], g[6 + col][l]]);
            }
            for i in 0..P {
                let row = filter_1d::<P>([columns[0][i], columns[1][i], columns[2][i]]);
                for (j, &x) in row.iter().enumerate() {
                    u[i * P + j][l] = x;
                }
            }
        }
        for (k, uk) in u.iter().take(P * P).enumerate() {
            store(&mut dst[k * in_channels + c..], uk, w);
        }
        c += w;
    }
}

dispatched! {
    /// `G g Gᵀ` for one output channel's 3×3 filters (`weight`: `[in][3][3]`), into `dst`:
    /// `[P²][in]`, element `k` of input channel `c`'s transform at `k · in_channels + c`.
    pub fn transform_filters(tile: Tile, weight: &[f32], dst: &mut [f32], in_channels: usize) {
        match tile {
            Tile::Two => filters_of::<4>(weight, dst, in_channels),
            Tile::Four => filters_of::<6>(weight, dst, in_channels),
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

/// A run of tiles in one tile row: image `b`, tile row `row`, tile columns `col..col + len`;
/// `first` is the first one's place among the tiles of the block being worked on.
#[derive(Clone, Copy)]
struct Run {
    b: usize,
    row: usize,
    col: usize,
    len: usize,
    first: usize,
}

/// The runs that tiles `first..first + n` (numbered over the batch) make up.
fn runs_of(first: usize, n: usize, [tiles_h, tiles_w]: [usize; 2], runs: &mut Vec<Run>) {
    runs.clear();
    let mut tile = first;
    while tile < first + n {
        let (b, t) = (tile / (tiles_h * tiles_w), tile % (tiles_h * tiles_w));
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
}

/// How a group of `tiles` is split into `[tile blocks, channel blocks]` tasks: a multiple of
/// `threads` tasks whose products fit BLOCK_FLOATS and whose block of transformed filters fits
/// PIECE_FLOATS, reading the least memory. Each tile block reads all transformed filters and
/// each channel block all the group's transformed inputs: large maps split by tiles, deep
/// levels (few tiles, large filters) by channels.
fn split(
    [tiles, in_channels, out_channels]: [usize; 3],
    products_per_tile: usize,
    threads: usize,
) -> [usize; 2] {
    let (inputs, filters) = (
        products_per_tile * in_channels * tiles,
        products_per_tile * in_channels * out_channels,
    );
    let mut best = ([tiles.min(64), out_channels.min(64)], usize::MAX);
    for tile_blocks in 1..=tiles.min(64) {
        for channel_blocks in 1..=out_channels.min(64) {
            let channels = out_channels.div_ceil(channel_blocks);
            let products = products_per_tile * tiles.div_ceil(tile_blocks) * channels;
            if !(tile_blocks * channel_blocks).is_multiple_of(threads)
                || products > BLOCK_FLOATS
                || products_per_tile * in_channels * channels > PIECE_FLOATS
            {
                continue;
            }
            let read = tile_blocks * filters + channel_blocks * inputs;
            if read < best.1 {
                best = ([tile_blocks, channel_blocks], read);
            }
        }
    }
    best.0
}

/// The padded rows `m · row .. m · row + m + 2` of one channel of one image (`src`:
/// `height × width`) into `rows` (`m + 2` rows of `m · phase_len`), each stored by column
/// phase: padded column `x + 1` (pixel `x`) at `((x + 1) mod m) · phase_len + (x + 1) div m`.
fn pad_rows(src: &[f32], width: usize, m: usize, row: usize, phase_len: usize, rows: &mut [f32]) {
    let height = src.len() / width;
    for (i, dst) in rows.chunks_exact_mut(m * phase_len).enumerate() {
        let y = (m * row + i).checked_sub(1).filter(|&y| y < height);
        let Some(y) = y else {
            dst.fill(0.0);
            continue;
        };
        let line = &src[y * width..][..width];
        for (phase, lane) in dst.chunks_exact_mut(phase_len).enumerate() {
            // Padded column `phase + j·m` holds pixel `phase + j·m − 1`.
            let (skip, first) = if phase == 0 {
                (m - 1, 1)
            } else {
                (phase - 1, 0)
            };
            lane[..first].fill(0.0);
            let mut j = first;
            for &v in line.iter().skip(skip).step_by(m) {
                lane[j] = v;
                j += 1;
            }
            lane[j..].fill(0.0);
        }
    }
}

/// The convolution of [`super::conv::conv2d`] for a 3×3 kernel with padding 1 on every side,
/// by F(m×m, 3×3); the caller has checked the slice lengths against `shape`.
pub(super) fn conv3x3(
    tile: Tile,
    x: &[f32],
    weight: Filters<'_>,
    epilogue: Epilogue,
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
    let tiles = batch * tiles_h * tiles_w;
    // A padded row's column `c` sits at `(c mod m) · phase_len + c div m`.
    let phase_len = tiles_w + 1;
    let padded_w = m * phase_len;
    let threads = rayon::current_num_threads().max(1);

    // Tiles go by in groups whose transformed inputs fit GROUP_FLOATS (in multiples of 64,
    // the matrix kernels' rows).
    let per_tile = products_per_tile * in_channels;
    let mut group = (GROUP_FLOATS / per_tile).min(tiles);
    if group > 64 {
        group -= group % 64;
    }
    let group = tiles.div_ceil(tiles.div_ceil(group.max(1)));
    let [tile_blocks, channel_blocks] = split(
        [group, in_channels, out_channels],
        products_per_tile,
        threads,
    );
    let block = group.div_ceil(tile_blocks);
    let channels = out_channels.div_ceil(channel_blocks);
    let channel_blocks = out_channels.div_ceil(channels);

    // U, one piece per channel block: `[out][P²][in]`, each of the P² `out × in` matrices
    // with unit stride along `in`. Where each piece is multiplied once (one group of tiles in
    // one block: the deep levels), its task transforms it into a buffer of its own just
    // before: no model-sized set of transformed filters is written out and read back. Where
    // pieces are used again (large maps), they are transformed once, up front.
    // One task's piece, on that task's core.
    let filter_len = in_channels * 9;
    let transform_piece = |cb: usize, piece: &mut Vec<f32>, wide: &mut Vec<f32>| {
        let (o0, on) = (cb * channels, channels.min(out_channels - cb * channels));
        piece.clear();
        piece.resize(on * per_tile, 0f32);
        for (i, dst) in piece.chunks_mut(per_tile).enumerate() {
            let src = weight.chunk((o0 + i) * filter_len, filter_len, wide);
            transform_filters(tile, src, dst, in_channels);
        }
    };
    let in_task = tile_blocks == 1 && group == tiles;
    let filters: Vec<Vec<f32>> = if in_task {
        Vec::new()
    } else {
        // Piece by piece, each piece's output channels over the cores (a single piece, as
        // the VAE's levels often have, still uses them all).
        (0..channel_blocks)
            .map(|cb| {
                let (o0, on) = (cb * channels, channels.min(out_channels - cb * channels));
                let mut piece = vec![0f32; on * per_tile];
                piece.par_chunks_mut(per_tile).enumerate().for_each_init(
                    Vec::new,
                    |wide, (i, dst)| {
                        let src = weight.chunk((o0 + i) * filter_len, filter_len, wide);
                        transform_filters(tile, src, dst, in_channels);
                    },
                );
                piece
            })
            .collect()
    };

    let mut out = vec![0f32; batch * out_channels * height * width];
    let out_ptr = SharedOut(out.as_mut_ptr());
    // Every value a group uses is written by its input transform before it is read.
    let mut inputs = INPUTS.take(per_tile * group);
    let mut runs = Vec::new();
    for first in (0..tiles).step_by(group) {
        let n = group.min(tiles - first);
        runs_of(first, n, [tiles_h, tiles_w], &mut runs);
        // V: `[in][P²][n]`, one channel per task, each tile row padded on the way.
        inputs[..per_tile * n]
            .par_chunks_mut(products_per_tile * n)
            .enumerate()
            .for_each_init(Vec::new, |padded, (c, dst)| {
                padded.resize(patch * padded_w, 0f32);
                for run in runs.iter() {
                    let image = &x[(run.b * in_channels + c) * height * width..][..height * width];
                    pad_rows(image, width, m, run.row, phase_len, padded);
                    let mut rows: [&[f32]; 6] = [&[]; 6];
                    for (r, row) in rows.iter_mut().zip(padded.chunks_exact(padded_w)) {
                        *r = &row[run.col..];
                    }
                    transform_input_row(
                        tile,
                        &rows[..patch],
                        phase_len,
                        &mut dst[run.first..],
                        n,
                        run.len,
                    );
                }
            });

        let inputs = &inputs;
        let filters = &filters;
        let tile_blocks = n.div_ceil(block);
        (0..tile_blocks * channel_blocks)
            .into_par_iter()
            .for_each_init(
                || (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
                |(products, block_runs, own_piece, wide), task| {
                    let (tb, cb) = (task / channel_blocks, task % channel_blocks);
                    let (t0, o0) = (tb * block, cb * channels);
                    let (tn, on) = (block.min(n - t0), channels.min(out_channels - o0));
                    let piece = if in_task {
                        transform_piece(cb, own_piece, wide);
                        &own_piece[..]
                    } else {
                        &filters[cb][..]
                    };
                    // M_k = V_kᵀ U_kᵀ: `[P²][on][tn]`, tiles along the matrix kernels' rows.
                    products.resize(products_per_tile * on * tn, 0f32);
                    for k in 0..products_per_tile {
                        // SAFETY: V_kᵀ (`tn × in`) is tile `t0 + t`, channel `c` of V at
                        // `c · P² · n + k · n + t0 + t`, inside `inputs[..per_tile · n]`;
                        // U_kᵀ (`in × on`) is channel `c` of output `o` of the piece at
                        // `o · P² · in + k · in + c`, inside `piece`; M_k is `tn × on` at
                        // `k · on · tn`, column stride `tn`, inside `products`.
                        unsafe {
                            multiply(
                                [tn, on, in_channels],
                                (products.as_mut_ptr().add(k * on * tn), [1, tn]),
                                (inputs.as_ptr().add(k * n + t0), [1, products_per_tile * n]),
                                (piece.as_ptr().add(k * in_channels), [1, per_tile]),
                                false,
                                1.0,
                                false,
                            );
                        }
                    }
                    // This block's runs: the group's, cut to tiles `t0..t0 + tn`.
                    runs_of(first + t0, tn, [tiles_h, tiles_w], block_runs);
                    // A bias is added by the output transform; the rest of the epilogue goes
                    // over the rows it wrote, still in cache.
                    let bias_only = epilogue.bias_only();
                    for o in 0..on {
                        let bias = match epilogue.shift {
                            Some(b) if bias_only => b[o0 + o],
                            _ => 0.0,
                        };
                        for run in block_runs.iter() {
                            let (y, x0) = (m * run.row, m * run.col);
                            let cols = (x0 + m * run.len).min(width) - x0;
                            let base = (run.b * out_channels + o0 + o) * height * width + x0;
                            let mut pixel_rows: [Option<&mut [f32]>; 4] = [None, None, None, None];
                            for (r, dst) in pixel_rows.iter_mut().take(m).enumerate() {
                                if y + r < height {
                                    // SAFETY: the `cols` pixels from `(y + r, x0)` of channel
                                    // `o0 + o` of image `b` lie inside `out` and belong to
                                    // this task's tiles and channels only.
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
                                &products[o * tn + run.first..],
                                on * tn,
                                run.len,
                                bias,
                                &mut pixel_rows[..m],
                            );
                            if !bias_only {
                                for row in pixel_rows.iter_mut().take(m).flatten() {
                                    epilogue.finish(o0 + o, row);
                                }
                            }
                        }
                    }
                },
            );
    }
    out
}
