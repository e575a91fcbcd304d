//! Multi-head attention on the CPU, fused: for each block of queries, the scores against every
//! key (one matrix multiply per head), the softmax in place, and the weighted sum of the values
//! (a second multiply), with the block's scores kept in cache. Tensors stay token-major
//! (`[batch, tokens, heads · dim]`, as the projections write them): heads are strided views,
//! so nothing is transposed on the way in or out.

use rayon::prelude::*;

use super::vector::softmax_rows;
use super::{SharedOut, multiply};

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Independent sequences.
    pub batch: usize,
    /// Attention heads per sequence.
    pub heads: usize,
    /// Query tokens per sequence.
    pub len_q: usize,
    /// Key (and value) tokens per sequence.
    pub len_k: usize,
    /// Channels per head of the queries and keys.
    pub head_dim: usize,
    /// Channels per head of the values (and of the output).
    pub value_dim: usize,
}

/// Scores kept per block of queries: 2²⁰ floats (4 MiB; 256 queries at 4096 keys). The two
/// multiplies run faster on wide blocks than L2-sized ones: on SD 1.5's 4096-token attention,
/// blocks of 32 queries ran at 109 GFLOP/s, 64 at 121, 128 at 135, 256 at 139, 512 at 134.
const BLOCK_SCORES: usize = 1 << 20;

/// `softmax(q kᵀ / sqrt(head_dim)) v` per head (Vaswani et al. 2017, eq. 1); with `causal`,
/// query `i` sees keys `0..=i + len_k − len_q`. `q`: `[batch, len_q, heads · head_dim]`, `k`:
/// `[batch, len_k, heads · head_dim]`, `v`: `[batch, len_k, heads · value_dim]`, all row-major;
/// returns `[batch, len_q, heads · value_dim]`. `None` when a slice's length does not match
/// `shape` or a size is zero.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    causal: bool,
) -> Option<Vec<f32>> {
    let AttentionShape {
        batch,
        heads,
        len_q,
        len_k,
        head_dim,
        value_dim,
    } = shape;
    let qk_width = heads * head_dim;
    let v_width = heads * value_dim;
    if [batch, heads, len_q, len_k, head_dim, value_dim].contains(&0)
        || q.len() != batch * len_q * qk_width
        || k.len() != batch * len_k * qk_width
        || v.len() != batch * len_k * v_width
    {
        return None;
    }
    let scale = 1.0 / (head_dim as f32).sqrt();
    let rows = (BLOCK_SCORES / len_k).clamp(8, 512).min(len_q);
    // One task per (image, head, run of query blocks): a head's keys and values stay in cache
    // while its query blocks go by. Small batches of few heads (the VAE's single head) split
    // the queries further, so that every core has work.
    let pairs = batch * heads;
    let runs = (2 * rayon::current_num_threads())
        .div_ceil(pairs)
        .clamp(1, len_q.div_ceil(rows));
    let run_len = len_q.div_ceil(runs).next_multiple_of(rows);
    let mut out = vec![0f32; batch * len_q * v_width];
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..pairs * runs).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(scores, inverse_sums), task| {
            let (pair, run) = (task / runs, task % runs);
            let (b, h) = (pair / heads, pair % heads);
            let (q_b, k_b, v_b) = (
                &q[b * len_q * qk_width..][..len_q * qk_width],
                &k[b * len_k * qk_width..][..len_k * qk_width],
                &v[b * len_k * v_width..][..len_k * v_width],
            );
            let end = ((run + 1) * run_len).min(len_q);
            for first in (run * run_len..end).step_by(rows) {
                let n = rows.min(end - first);
                scores.resize(n * len_k, 0f32);
                inverse_sums.resize(n, 0f32);
                let valid = |r: usize| {
                    if causal {
                        (first + r + 1 + len_k).saturating_sub(len_q)
                    } else {
                        len_k
                    }
                };
                // SAFETY (both multiplies and the scaling): every pointer, stride and size
                // describes memory inside the slices above, whose lengths were checked against
                // `shape`: q rows `first..first + n` and k rows `0..len_k` at columns
                // `h·head_dim..(h+1)·head_dim`; the `n × len_k` scores; v rows `0..len_k` and
                // output rows `first..first + n` of image `b` at columns
                // `h·value_dim..(h+1)·value_dim`, which only this task writes (tasks split
                // images × heads × query runs).
                unsafe {
                    // scores = scale · q_h k_hᵀ
                    multiply(
                        [n, len_k, head_dim],
                        (scores.as_mut_ptr(), [len_k, 1]),
                        (
                            q_b.as_ptr().add(first * qk_width + h * head_dim),
                            [qk_width, 1],
                        ),
                        (k_b.as_ptr().add(h * head_dim), [1, qk_width]),
                        false,
                        scale,
                        false,
                    );
                }
                softmax_rows(scores, len_k, &valid, inverse_sums);
                unsafe {
                    // out_h = exp(scores − max) v_h / sum
                    let dst = out_ptr
                        .get()
                        .add((b * len_q + first) * v_width + h * value_dim);
                    multiply(
                        [n, value_dim, len_k],
                        (dst, [v_width, 1]),
                        (scores.as_ptr(), [len_k, 1]),
                        (v_b.as_ptr().add(h * value_dim), [v_width, 1]),
                        false,
                        1.0,
                        false,
                    );
                    for (r, &inverse) in inverse_sums.iter().enumerate() {
                        let row = std::slice::from_raw_parts_mut(dst.add(r * v_width), value_dim);
                        row.iter_mut().for_each(|x| *x *= inverse);
                    }
                }
            }
        },
    );
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::pseudo_random;

    /// The textbook computation, one score at a time.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape, causal: bool) -> Vec<f32> {
        let (qw, vw) = (s.heads * s.head_dim, s.heads * s.value_dim);
        let mut out = vec![0f32; s.batch * s.len_q * vw];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.len_q {
                    let visible = if causal {
                        i + 1 + s.len_k - s.len_q
                    } else {
                        s.len_k
                    };
                    let scores: Vec<f64> = (0..visible)
                        .map(|j| {
                            (0..s.head_dim)
                                .map(|d| {
                                    let qi = q[(b * s.len_q + i) * qw + h * s.head_dim + d];
                                    let kj = k[(b * s.len_k + j) * qw + h * s.head_dim + d];
                                    f64::from(qi) * f64::from(kj)
                                })
                                .sum::<f64>()
                                / (s.head_dim as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = weights.iter().sum();
                    for d in 0..s.value_dim {
                        let value: f64 = (0..visible)
                            .map(|j| {
                                weights[j]
                                    * f64::from(v[(b * s.len_k + j) * vw + h * s.value_dim + d])
                            })
                            .sum();
                        out[(b * s.len_q + i) * vw + h * s.value_dim + d] = (value / sum) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn fused_attention_matches_the_textbook_form() {
        for (shape, causal) in [
            (
                AttentionShape {
                    batch: 2,
                    heads: 3,
                    len_q: 37,
                    len_k: 21,
                    head_dim: 8,
                    value_dim: 8,
                },
                false,
            ),
            (
                AttentionShape {
                    batch: 1,
                    heads: 2,
                    len_q: 300,
                    len_k: 300,
                    head_dim: 5,
                    value_dim: 7,
                },
                false,
            ),
            (
                AttentionShape {
                    batch: 2,
                    heads: 2,
                    len_q: 29,
                    len_k: 29,
                    head_dim: 16,
                    value_dim: 16,
                },
                true,
            ),
            (
                AttentionShape {
                    batch: 1,
                    heads: 1,
                    len_q: 3,
                    len_k: 9,
                    head_dim: 4,
                    value_dim: 4,
                },
                true,
            ),
        ] {
            let qw = shape.heads * shape.head_dim;
            let q = pseudo_random(shape.batch * shape.len_q * qw, 1, 4.0);
            let k = pseudo_random(shape.batch * shape.len_k * qw, 2, 4.0);
            let v = pseudo_random(
                shape.batch * shape.len_k * shape.heads * shape.value_dim,
                3,
                4.0,
            );
            let fused = attention(&q, &k, &v, shape, causal).expect("consistent sizes");
            let expected = reference(&q, &k, &v, shape, causal);
            let worst = fused
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{shape:?} causal={causal}: {worst}");
        }
    }

    #[test]
    fn mismatched_sizes_are_refused() {
        let shape = AttentionShape {
            batch: 1,
            heads: 2,
            len_q: 4,
            len_k: 4,
            head_dim: 2,
            value_dim: 2,
        };
        let x = vec![0f32; 16];
        assert!(attention(&x, &x, &x[..15], shape, false).is_none());
    }
}
