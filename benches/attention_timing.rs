//! Times one 4096-token self-attention of SD 1.5's first level (batch 2, 8 heads of 40
//! channels) through Burn's fused `attention` op and through explicit matmul, softmax, matmul
//! in query chunks, and through `multi_head_attention` on token-major tensors (the fused CPU
//! kernel on Flex); prints one JSON line per variant.

use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, Tensor};
use sd_benches::{arg, time_runs};
use sd_core::backend::DefaultBackend as B;

/// [`time_runs`] when `wanted`, NaN otherwise.
fn time_if(
    wanted: bool,
    runs: usize,
    f: impl FnMut() -> Result<(), String>,
) -> Result<(f64, f64), String> {
    if wanted {
        time_runs(runs, f)
    } else {
        Ok((f64::NAN, f64::NAN))
    }
}

fn main() -> Result<(), String> {
    sd_benches::tune_allocator();
    let runs: usize = arg("--runs").and_then(|r| r.parse().ok()).unwrap_or(3);
    let len: usize = arg("--len").and_then(|r| r.parse().ok()).unwrap_or(4096);
    let device = Default::default();
    let shape = [2, 8, len, 40];
    let q = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let k = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let v = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let flops = 4.0 * 2.0 * 8.0 * (len * len) as f64 * 40.0;
    // `--only fused`: just the token-major variant (for profiling it).
    let all = arg("--only").is_none();
    let (fused, _) = time_if(all, runs, || {
        let out = attention(
            q.clone(),
            k.clone(),
            v.clone(),
            None,
            None,
            AttentionModuleOptions::default(),
        );
        let _ = out.slice([0..1, 0..1, 0..1, 0..1]).into_data();
        Ok(())
    })?;
    let (explicit, _) = time_if(all, runs, || {
        let out = sd_core::layers::scaled_dot_product_attention(q.clone(), k.clone(), v.clone());
        let _ = out.slice([0..1, 0..1, 0..1, 0..1]).into_data();
        Ok(())
    })?;
    let scale = 1.0 / (40f64).sqrt();
    let (naive, _) = time_if(all, runs, || {
        let scores = q.clone().matmul(k.clone().swap_dims(2, 3)) * scale;
        let out = softmax(scores, 3).matmul(v.clone());
        let _ = out.slice([0..1, 0..1, 0..1, 0..1]).into_data();
        Ok(())
    })?;
    // Token-major, as the projections write them: the fused CPU kernel on Flex.
    let tokens = |t: &Tensor<B, 4>| t.clone().swap_dims(1, 2).reshape([2, len, 8 * 40]);
    let (qt, kt, vt) = (tokens(&q), tokens(&k), tokens(&v));
    let (token_major, _) = time_runs(runs, || {
        let out =
            sd_core::layers::multi_head_attention(qt.clone(), kt.clone(), vt.clone(), 8, false);
        let _ = out.slice([0..1, 0..1, 0..1]).into_data();
        Ok(())
    })?;
    let rows = vec![
        ("burn attention".to_string(), fused),
        ("sd-core attention, heads split".to_string(), explicit),
        ("one matmul block".to_string(), naive),
        (
            "sd-core multi_head_attention, token-major".to_string(),
            token_major,
        ),
    ];
    for (name, s) in rows {
        println!(
            "{}",
            serde_json::json!({"variant": name, "median_s": s, "gflops": flops / s / 1e9})
        );
    }
    Ok(())
}
