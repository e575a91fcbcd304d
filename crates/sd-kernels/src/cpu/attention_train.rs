//! Multi-head attention for training: the forward of [`super::attention`] that also keeps the
//! softmax probabilities, and the backward from them, one task per image and head.
//!
//! Why: under autodiff, attention in Burn ops is a split of the heads (a permuted copy of each
//! of q, k and v), two batched matmuls, a scale, a softmax (max, subtraction, `exp`, sum,
//! division: element-wise passes that Flex runs on one core, `exp` through libm) and a merge
//! of the heads, and the backward walks all of them again. On the shapes model's training step
//! that was about a fifth of the main thread's time. Here tensors stay token-major
//! (`[batch, tokens, heads · dim]`) and heads are strided views, as in the inference kernel.
//!
//! With `P = softmax(s · q kᵀ)` (masked entries 0) and `o = P v`, the gradients are
//! `∂v = Pᵀ ∂o`, `∂P = ∂o vᵀ`, `∂S = P ⊙ (∂P − rowsum(∂P ⊙ P))` and, with the scale `s`,
//! `∂q = s ∂S k`, `∂k = s ∂Sᵀ q`.

use rayon::prelude::*;

use super::attention::AttentionShape;
use super::vector::softmax_rows;
use super::{SharedOut, multiply};

/// The most probabilities a call keeps (`batch · heads · len_q · len_k`): 2²⁶ floats, 256 MiB.
/// Larger attentions (SD 1.5's 4096-token self-attention on 512² images) take the tensor ops.
pub const MAX_PROBABILITIES: usize = 1 << 26;

/// The sizes checked: `None` unless every size is positive, the slices hold `shape`'s tensors
/// and the probabilities fit [`MAX_PROBABILITIES`].
fn checked(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Option<()> {
    let (qk, vw) = (s.heads * s.head_dim, s.heads * s.value_dim);
    let fits = ![s.batch, s.heads, s.len_q, s.len_k, s.head_dim, s.value_dim].contains(&0)
        && q.len() == s.batch * s.len_q * qk
        && k.len() == s.batch * s.len_k * qk
        && v.len() == s.batch * s.len_k * vw
        && s.batch * s.heads * s.len_q * s.len_k <= MAX_PROBABILITIES;
    fits.then_some(())
}

/// Keys query `r` sees: all, or with `causal` those up to `r + len_k − len_q`.
fn visible(s: AttentionShape, causal: bool) -> impl Fn(usize) -> usize {
    move |r| {
        if causal {
            (r + 1 + s.len_k).saturating_sub(s.len_q)
        } else {
            s.len_k
        }
    }
}

/// `softmax(q kᵀ / sqrt(head_dim)) v` per head, as [`super::attention::attention`], and the
/// probabilities `[batch, heads, len_q, len_k]` (zero where masked).
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
    causal: bool,
) -> Option<(Vec<f32>, Vec<f32>)> {
    checked(q, k, v, s)?;
    let (qk, vw) = (s.heads * s.head_dim, s.heads * s.value_dim);
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let block = s.len_q * s.len_k;
    let mut probs = vec![0f32; s.batch * s.heads * block];
    let mut out = vec![0f32; s.batch * s.len_q * vw];
    let out_ptr = SharedOut(out.as_mut_ptr());
    let valid = visible(s, causal);
    probs
        .par_chunks_mut(block)
        .enumerate()
        .for_each_init(Vec::new, |inverse, (pair, p)| {
            let (b, h) = (pair / s.heads, pair % s.heads);
            inverse.resize(s.len_q, 0f32);
            // SAFETY: q rows of image `b` and k rows of image `b` at head `h`'s columns, inside
            // the slices checked against `shape`; `p` is this task's `len_q × len_k` block.
            unsafe {
                multiply(
                    [s.len_q, s.len_k, s.head_dim],
                    (p.as_mut_ptr(), [s.len_k, 1]),
                    (q[b * s.len_q * qk + h * s.head_dim..].as_ptr(), [qk, 1]),
                    (k[b * s.len_k * qk + h * s.head_dim..].as_ptr(), [1, qk]),
                    false,
                    scale,
                    false,
                );
            }
            softmax_rows(p, s.len_k, &valid, inverse);
            for (row, &inv) in p.chunks_exact_mut(s.len_k).zip(inverse.iter()) {
                row.iter_mut().for_each(|x| *x *= inv);
            }
            // SAFETY: v rows of image `b` at head `h`'s columns; the output rows of image `b`
            // at head `h`'s columns, which only this task writes.
            unsafe {
                multiply(
                    [s.len_q, s.value_dim, s.len_k],
                    (
                        out_ptr.get().add(b * s.len_q * vw + h * s.value_dim),
                        [vw, 1],
                    ),
                    (p.as_ptr(), [s.len_k, 1]),
                    (v[b * s.len_k * vw + h * s.value_dim..].as_ptr(), [vw, 1]),
                    false,
                    1.0,
                    false,
                );
            }
        });
    Some((out, probs))
}

/// `(∂q, ∂k, ∂v)`, token-major like `q`, `k` and `v`, from the probabilities [`forward`]
/// returned and the output gradient `grad` (`[batch, len_q, heads · value_dim]`).
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    grad: &[f32],
    s: AttentionShape,
) -> Option<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    checked(q, k, v, s)?;
    let (qk, vw) = (s.heads * s.head_dim, s.heads * s.value_dim);
    let block = s.len_q * s.len_k;
    if probs.len() != s.batch * s.heads * block || grad.len() != s.batch * s.len_q * vw {
        return None;
    }
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    );
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SharedOut(dq.as_mut_ptr()),
        SharedOut(dk.as_mut_ptr()),
        SharedOut(dv.as_mut_ptr()),
    );
    probs.par_chunks(block).enumerate().for_each_init(
        Vec::new,
        |d_scores: &mut Vec<f32>, (pair, p)| {
            let (b, h) = (pair / s.heads, pair % s.heads);
            let (q_h, k_h) = (
                b * s.len_q * qk + h * s.head_dim,
                b * s.len_k * qk + h * s.head_dim,
            );
            let (o_h, v_h) = (
                b * s.len_q * vw + h * s.value_dim,
                b * s.len_k * vw + h * s.value_dim,
            );
            d_scores.resize(block, 0f32);
            // SAFETY (every multiply): the pointers and strides address image `b`'s rows at head
            // `h`'s columns of slices checked against `shape`, this task's probability block
            // and its own scratch; the gradients' rows of image `b` at head `h`'s columns are
            // written by this task alone.
            unsafe {
                // ∂v = Pᵀ ∂o
                multiply(
                    [s.len_k, s.value_dim, s.len_q],
                    (dv_ptr.get().add(v_h), [vw, 1]),
                    (p.as_ptr(), [1, s.len_k]),
                    (grad[o_h..].as_ptr(), [vw, 1]),
                    false,
                    1.0,
                    false,
                );
                // ∂P = ∂o vᵀ
                multiply(
                    [s.len_q, s.len_k, s.value_dim],
                    (d_scores.as_mut_ptr(), [s.len_k, 1]),
                    (grad[o_h..].as_ptr(), [vw, 1]),
                    (v[v_h..].as_ptr(), [1, vw]),
                    false,
                    1.0,
                    false,
                );
            }
            // ∂S · s = P ⊙ (∂P − rowsum(∂P ⊙ P)) · s
            for (ds, pr) in d_scores
                .chunks_exact_mut(s.len_k)
                .zip(p.chunks_exact(s.len_k))
            {
                let dot: f32 = ds.iter().zip(pr).map(|(a, b)| a * b).sum();
                for (d, &pv) in ds.iter_mut().zip(pr) {
                    *d = pv * (*d - dot) * scale;
                }
            }
            unsafe {
                // ∂q = ∂S k
                multiply(
                    [s.len_q, s.head_dim, s.len_k],
                    (dq_ptr.get().add(q_h), [qk, 1]),
                    (d_scores.as_ptr(), [s.len_k, 1]),
                    (k[k_h..].as_ptr(), [qk, 1]),
                    false,
                    1.0,
                    false,
                );
                // ∂k = ∂Sᵀ q
                multiply(
                    [s.len_k, s.head_dim, s.len_q],
                    (dk_ptr.get().add(k_h), [qk, 1]),
                    (d_scores.as_ptr(), [1, s.len_k]),
                    (q[q_h..].as_ptr(), [qk, 1]),
                    false,
                    1.0,
                    false,
                );
            }
        },
    );
    Some((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::pseudo_random;

    /// `L = Σ o ⊙ u` in f64, the attention computed one score at a time.
    fn loss(q: &[f32], k: &[f32], v: &[f32], u: &[f32], s: AttentionShape, causal: bool) -> f64 {
        let (qk, vw) = (s.heads * s.head_dim, s.heads * s.value_dim);
        let mut total = 0.0;
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.len_q {
                    let seen = visible(s, causal)(i);
                    let scores: Vec<f64> = (0..seen)
                        .map(|j| {
                            (0..s.head_dim)
                                .map(|d| {
                                    f64::from(q[(b * s.len_q + i) * qk + h * s.head_dim + d])
                                        * f64::from(k[(b * s.len_k + j) * qk + h * s.head_dim + d])
                                })
                                .sum::<f64>()
                                / (s.head_dim as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    for d in 0..s.value_dim {
                        let o: f64 = (0..seen)
                            .map(|j| {
                                w[j] * f64::from(v[(b * s.len_k + j) * vw + h * s.value_dim + d])
                            })
                            .sum::<f64>()
                            / sum;
                        total += o * f64::from(u[(b * s.len_q + i) * vw + h * s.value_dim + d]);
                    }
                }
            }
        }
        total
    }

    /// The output against `super::attention`'s kernel and every gradient against central
    /// differences of the f64 loss, with and without the causal mask, for shapes with one and
    /// several heads, queries fewer than keys and value widths unlike the key widths.
    #[test]
    fn gradients_match_central_differences() {
        for (shape, causal) in [
            (
                AttentionShape {
                    batch: 2,
                    heads: 3,
                    len_q: 5,
                    len_k: 7,
                    head_dim: 4,
                    value_dim: 3,
                },
                false,
            ),
            (
                AttentionShape {
                    batch: 1,
                    heads: 2,
                    len_q: 6,
                    len_k: 6,
                    head_dim: 3,
                    value_dim: 5,
                },
                true,
            ),
            (
                AttentionShape {
                    batch: 3,
                    heads: 1,
                    len_q: 4,
                    len_k: 9,
                    head_dim: 5,
                    value_dim: 2,
                },
                true,
            ),
        ] {
            let (qk, vw) = (shape.heads * shape.head_dim, shape.heads * shape.value_dim);
            let q = pseudo_random(shape.batch * shape.len_q * qk, 1, 3.0);
            let k = pseudo_random(shape.batch * shape.len_k * qk, 2, 3.0);
            let v = pseudo_random(shape.batch * shape.len_k * vw, 3, 3.0);
            let u = pseudo_random(shape.batch * shape.len_q * vw, 4, 3.0);
            let (out, probs) = forward(&q, &k, &v, shape, causal).unwrap();
            let want = super::super::attention::attention(&q, &k, &v, shape, causal).unwrap();
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{shape:?} output {a} against {b}");
            }
            let (dq, dk, dv) = backward(&q, &k, &v, &probs, &u, shape).unwrap();
            let eps = 1e-3f32;
            for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
                for i in 0..grad.len() {
                    let mut inputs = [q.clone(), k.clone(), v.clone()];
                    inputs[which][i] += eps;
                    let up = loss(&inputs[0], &inputs[1], &inputs[2], &u, shape, causal);
                    inputs[which][i] -= 2.0 * eps;
                    let down = loss(&inputs[0], &inputs[1], &inputs[2], &u, shape, causal);
                    let want = (up - down) / (2.0 * f64::from(eps));
                    let got = f64::from(grad[i]);
                    assert!(
                        (got - want).abs() < 2e-3 * (1.0 + want.abs()),
                        "{shape:?} causal {causal}: input {which} element {i}: {got} against {want}"
                    );
                }
            }
        }
    }
}
