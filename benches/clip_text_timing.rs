//! Times the CLIP ViT-L/14 text encoder (SD 1.x's; `--config bigg` for SDXL's second) with
//! random weights on 2×77 tokens on the default backend; prints one JSON line.
//! `cargo xtask bench-clip` runs it next to `xtask/python/bench_clip.py`; `--profile 1` also
//! times one layer's parts.

use sd_benches::{arg, peak_rss_mib, time_runs};
use sd_conditioner::{ClipTextConfig, ClipTextModel, HiddenAct};
use sd_core::backend::DefaultBackend as B;

fn main() -> Result<(), String> {
    sd_benches::tune_allocator();
    let name = arg("--config").unwrap_or_else(|| "vit-l".into());
    let runs: usize = arg("--runs").and_then(|r| r.parse().ok()).unwrap_or(5);
    let config = match name.as_str() {
        "vit-l" => ClipTextConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            hidden_act: HiddenAct::QuickGelu,
            ..ClipTextConfig::default()
        },
        "bigg" => ClipTextConfig {
            hidden_size: 1280,
            intermediate_size: 5120,
            projection_dim: 1280,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: HiddenAct::Gelu,
            ..ClipTextConfig::default()
        },
        other => return Err(format!("unknown config {other}")),
    };
    let device = Default::default();
    let model = ClipTextModel::<B>::new(&config, false, &device).map_err(|e| e.to_string())?;
    // A prompt-like batch: start, 20 tokens, end, end padding; and the empty prompt.
    let mut prompt: Vec<u32> = vec![49406];
    prompt.extend((0..20).map(|i| 320 + i * 37));
    prompt.resize(77, 49407);
    let mut empty = vec![49406];
    empty.resize(77, 49407);
    let ids = vec![empty, prompt];
    let (median, min) = time_runs(runs, || {
        let out = model.forward(&ids).map_err(|e| e.to_string())?;
        let _ = out.last_hidden_state.into_data();
        Ok(())
    })?;
    if arg("--profile").is_some() {
        use burn::tensor::{Distribution, Tensor};
        let d = config.hidden_size;
        let x = Tensor::<B, 2>::random([154, d], Distribution::Normal(0.0, 1.0), &device);
        let wide = Tensor::<B, 2>::random([154, 4 * d], Distribution::Normal(0.0, 1.0), &device);
        let fc1 = burn::nn::LinearConfig::new(d, 4 * d).init::<B>(&device);
        let fc2 = burn::nn::LinearConfig::new(4 * d, d).init::<B>(&device);
        let qp = burn::nn::LinearConfig::new(d, d).init::<B>(&device);
        let ln = burn::nn::LayerNormConfig::new(d).init::<B>(&device);
        let heads = config.num_attention_heads;
        let q = Tensor::<B, 4>::random(
            [2, heads, 77, d / heads],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let sync2 = |t: Tensor<B, 2>| drop(t.slice([0..1, 0..1]).into_data());
        let sync4 = |t: Tensor<B, 4>| drop(t.slice([0..1, 0..1, 0..1, 0..1]).into_data());
        let report = |name: &str, f: &mut dyn FnMut()| -> Result<(), String> {
            let (t, _) = time_runs(20, || {
                f();
                Ok(())
            })?;
            println!("{name}: {:.3} ms", t * 1e3);
            Ok(())
        };
        report("fc1", &mut || sync2(fc1.forward(x.clone())))?;
        report("fc2", &mut || sync2(fc2.forward(wide.clone())))?;
        report("q_proj", &mut || sync2(qp.forward(x.clone())))?;
        report("layer norm", &mut || sync2(ln.forward(x.clone())))?;
        report("causal attention", &mut || {
            sync4(sd_core::layers::causal_attention(
                q.clone(),
                q.clone(),
                q.clone(),
            ))
        })?;
        report("quick gelu", &mut || {
            sync2(wide.clone() / ((wide.clone() * -1.702).exp() + 1.0))
        })?;
        report("swap+reshape", &mut || {
            sync2(q.clone().swap_dims(1, 2).reshape([154, d]) * 1.0)
        })?;
    }
    println!(
        "{}",
        serde_json::json!({
            "backend": std::any::type_name::<B>(),
            "latent": [2, 77, config.hidden_size],
            "median_s": median,
            "min_s": min,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
