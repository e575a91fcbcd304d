//! Times one 4096-token self-attention of SD 1.5's first level (batch 2, 8 heads of 40
//! channels) through Burn's fused `attention` op and through explicit matmul, softmax, matmul
//! in query chunks; prints one JSON line per variant.

use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, Tensor};
use sd_benches::{arg, time_runs};
use sd_core::backend::DefaultBackend as B;

fn main() -> Result<(), String> {
    let runs: usize = arg("--runs").and_then(|r| r.parse().ok()).unwrap_or(3);
    let len: usize = arg("--len").and_then(|r| r.parse().ok()).unwrap_or(4096);
    let device = Default::default();
    let shape = [2, 8, len, 40];
    let q = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let k = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let v = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let flops = 4.0 * 2.0 * 8.0 * (len * len) as f64 * 40.0;
    let (fused, _) = time_runs(runs, || {
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
    let (explicit, _) = time_runs(runs, || {
        let out = sd_core::layers::scaled_dot_product_attention(q.clone(), k.clone(), v.clone());
        let _ = out.slice([0..1, 0..1, 0..1, 0..1]).into_data();
        Ok(())
    })?;
    let scale = 1.0 / (40f64).sqrt();
    let (naive, _) = time_runs(runs, || {
        let scores = q.clone().matmul(k.clone().swap_dims(2, 3)) * scale;
        let out = softmax(scores, 3).matmul(v.clone());
        let _ = out.slice([0..1, 0..1, 0..1, 0..1]).into_data();
        Ok(())
    })?;
    let mut rows = vec![
        ("burn attention".to_string(), fused),
        ("sd-core attention".to_string(), explicit),
        ("one matmul block".to_string(), naive),
    ];
    for log2 in [16, 18, 20, 22] {
        let (t, _) = time_runs(runs, || {
            let out =
                sd_core::layers::chunked_attention(q.clone(), k.clone(), v.clone(), 1 << log2);
            let _ = out.slice([0..1, 0..1, 0..1, 0..1]).into_data();
            Ok(())
        })?;
        rows.push((format!("burn attention, 2^{log2} scores per chunk"), t));
    }
    for (name, s) in rows {
        println!(
            "{}",
            serde_json::json!({"variant": name, "median_s": s, "gflops": flops / s / 1e9})
        );
    }
    Ok(())
}
