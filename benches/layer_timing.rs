//! Times the building blocks of SD 1.5's U-Net at its first level (batch 2, 320 channels,
//! 64×64, 4096 tokens) on the default backend, to see where a step's time goes; prints one JSON
//! line per block with its GFLOP/s where that means something.

use burn::nn::{LayerNormConfig, LinearConfig};
use burn::tensor::activation::{gelu, silu as burn_silu};
use burn::tensor::{Distribution, Tensor};
use sd_benches::{arg, time_runs};
use sd_core::backend::DefaultBackend as B;
use sd_core::layers::{
    add_per_channel, conv2d, conv2d_forward, group_norm, linear_forward, silu, upsample_nearest2x,
};

fn main() -> Result<(), String> {
    sd_benches::tune_allocator();
    let runs: usize = arg("--runs").and_then(|r| r.parse().ok()).unwrap_or(3);
    let device = Default::default();
    #[cfg(feature = "flex")]
    if arg("--convs").is_some() {
        return convs(runs, &device);
    }
    let (b, c, s) = (2, 320, 64);
    let x = Tensor::<B, 4>::random([b, c, s, s], Distribution::Normal(0.0, 1.0), &device);
    let tokens = Tensor::<B, 3>::random([b, s * s, c], Distribution::Normal(0.0, 1.0), &device);
    let conv = conv2d::<B>(c, c, 3, 1, 1, &device);
    let norm = group_norm::<B>(32, c, 1e-5, &device);
    let ln = LayerNormConfig::new(c).init::<B>(&device);
    let proj = LinearConfig::new(c, 8 * c).init::<B>(&device);
    let down = LinearConfig::new(4 * c, c).init::<B>(&device);
    let wide = Tensor::<B, 3>::random([b, s * s, 4 * c], Distribution::Normal(0.0, 1.0), &device);
    let sync4 = |t: Tensor<B, 4>| drop(t.slice([0..1, 0..1, 0..1, 0..1]).into_data());
    let sync3 = |t: Tensor<B, 3>| drop(t.slice([0..1, 0..1, 0..1]).into_data());
    let mut rows: Vec<(&str, f64, f64)> = Vec::new();
    let mut time = |name: &'static str, flops: f64, f: &mut dyn FnMut()| -> Result<(), String> {
        let (t, _) = time_runs(runs, || {
            f();
            Ok(())
        })?;
        rows.push((name, t, flops));
        Ok(())
    };
    let n = (b * s * s) as f64;
    time(
        "conv3x3 320→320",
        2.0 * n * (c * c * 9) as f64,
        &mut || sync4(conv.forward(x.clone())),
    )?;
    time(
        "conv3x3 320→320 (sd-core conv2d_forward)",
        2.0 * n * (c * c * 9) as f64,
        &mut || sync4(conv2d_forward(&conv, x.clone())),
    )?;
    time("group norm", 0.0, &mut || sync4(norm.forward(x.clone())))?;
    let grouped = x.clone().reshape([b, 32, c / 32 * s * s]);
    let stat = grouped.clone().sum_dim(2);
    let gamma = Tensor::<B, 1>::ones([c], &device).reshape([1, c, 1, 1]);
    time("  sum_dim over [2, 32, 40960]", 0.0, &mut || {
        sync3(grouped.clone().sum_dim(2))
    })?;
    time("  sub [2,32,1] broadcast", 0.0, &mut || {
        sync3(grouped.clone() - stat.clone())
    })?;
    time("  square", 0.0, &mut || sync3(grouped.clone().square()))?;
    time("  mul [1,c,1,1] broadcast", 0.0, &mut || {
        sync4(x.clone() * gamma.clone())
    })?;
    time("  reshape to [2,320,64,64] (copy?)", 0.0, &mut || {
        sync4(grouped.clone().reshape([b, c, s, s]) * 1.0)
    })?;
    time("silu x/(1+e^-x)", 0.0, &mut || sync4(silu(x.clone())))?;
    time("silu (burn)", 0.0, &mut || sync4(burn_silu(x.clone())))?;
    time("add", 0.0, &mut || sync4(x.clone() + x.clone()))?;
    let per_image = Tensor::<B, 2>::random([b, c], Distribution::Normal(0.0, 1.0), &device);
    let low = Tensor::<B, 4>::random(
        [b, 2 * c, s / 2, s / 2],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    time("upsample nearest ×2 [2, 640, 32, 32]", 0.0, &mut || {
        sync4(upsample_nearest2x(low.clone()))
    })?;
    time(
        "add per channel [2, 320] (time embedding)",
        0.0,
        &mut || sync4(add_per_channel(x.clone(), per_image.clone())),
    )?;
    time("layer norm", 0.0, &mut || sync3(ln.forward(tokens.clone())))?;
    time(
        "linear 320→2560 (GEGLU in)",
        2.0 * n * (c * 8 * c) as f64,
        &mut || sync3(proj.forward(tokens.clone())),
    )?;
    time(
        "linear 1280→320 (FF out)",
        2.0 * n * (4 * c * c) as f64,
        &mut || sync3(down.forward(wide.clone())),
    )?;
    time(
        "linear 320→2560 (sd-core linear_forward)",
        2.0 * n * (c * 8 * c) as f64,
        &mut || sync3(linear_forward(&proj, tokens.clone())),
    )?;
    let proj_nobias = LinearConfig::new(c, 8 * c)
        .with_bias(false)
        .init::<B>(&device);
    time(
        "linear 320→2560 no bias (sd-core linear_forward)",
        2.0 * n * (c * 8 * c) as f64,
        &mut || sync3(linear_forward(&proj_nobias, tokens.clone())),
    )?;
    let chunk = tokens.clone().slice([0..1, 0..1638, 0..c]);
    time(
        "linear 320→2560 on 1638 rows (a feed-forward chunk)",
        2.0 * 1638.0 * (c * 8 * c) as f64,
        &mut || sync3(linear_forward(&proj, chunk.clone())),
    )?;
    time(
        "linear 1280→320 (sd-core linear_forward)",
        2.0 * n * (4 * c * c) as f64,
        &mut || sync3(linear_forward(&down, wide.clone())),
    )?;
    time("gelu on [2, 4096, 1280]", 0.0, &mut || {
        sync3(gelu(wide.clone()))
    })?;
    time("NCHW→tokens (swap, reshape)", 0.0, &mut || {
        sync3(
            x.clone()
                .reshape([b, c, s * s])
                .swap_dims(1, 2)
                .reshape([b, s * s, c])
                * 1.0,
        )
    })?;
    for (name, t, flops) in rows {
        println!(
            "{}",
            serde_json::json!({"block": name, "ms": t * 1e3, "gflops": if flops > 0.0 { flops / t / 1e9 } else { 0.0 }})
        );
    }
    Ok(())
}

/// `--convs x`: the 3×3 convolutions of SD 1.5's U-Net (batch 2), through Burn's `Conv2d` and
/// through each of `sd_kernels::cpu::conv`'s methods (`--side N`: one level only). Flex only.
#[cfg(feature = "flex")]
fn convs(runs: usize, device: &burn::tensor::Device<B>) -> Result<(), String> {
    use sd_kernels::cpu::conv::{Conv2dShape, ConvMethod, conv2d_by};
    let only: Option<usize> = arg("--side").and_then(|s| s.parse().ok());
    for (cin, cout, side) in [
        (320, 320, 64),
        (960, 320, 64),
        (640, 640, 64),
        (640, 640, 32),
        (1280, 640, 32),
        (1280, 1280, 32),
        (1280, 1280, 16),
        (2560, 1280, 16),
        (1280, 1280, 8),
        (2560, 1280, 8),
    ] {
        if only.is_some_and(|o| o != side) {
            continue;
        }
        let x =
            Tensor::<B, 4>::random([2, cin, side, side], Distribution::Normal(0.0, 1.0), device);
        let conv = conv2d::<B>(cin, cout, 3, 1, 1, device);
        let flops = 2.0 * (2 * side * side * cin * cout * 9) as f64;
        let sync = |t: Tensor<B, 4>| drop(t.slice([0..1, 0..1, 0..1, 0..1]).into_data());
        let (burn, _) = time_runs(runs, || {
            sync(conv.forward(x.clone()));
            Ok(())
        })?;
        let xs = x.to_data().to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
        let ws = conv
            .weight
            .val()
            .to_data()
            .to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?;
        let shape = Conv2dShape {
            batch: 2,
            in_channels: cin,
            out_channels: cout,
            height: side,
            width: side,
            kernel: [3, 3],
            padding: [1; 4],
            stride: [1, 1],
        };
        let mut row = serde_json::json!({
            "conv": format!("{cin}→{cout} at {side}²"),
            "burn_gflops": flops / burn / 1e9,
            "chosen": format!("{:?}", ConvMethod::choose(shape)),
        });
        // Each method's largest difference from the shifted multiplies' (direct) result,
        // relative to the largest output.
        let direct = conv2d_by(ConvMethod::Shifted, &xs, &ws, None, shape).ok_or("sizes")?;
        let largest = direct.iter().fold(0f32, |m, v| m.max(v.abs()));
        for method in [
            ConvMethod::Winograd4x4,
            ConvMethod::Winograd2x2,
            ConvMethod::Im2col,
            ConvMethod::Shifted,
        ] {
            let (t, _) = time_runs(runs, || {
                conv2d_by(method, &xs, &ws, None, shape).ok_or("sizes")?;
                Ok(())
            })?;
            let ours = conv2d_by(method, &xs, &ws, None, shape).ok_or("sizes")?;
            let worst = ours
                .iter()
                .zip(&direct)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            row[format!("{method:?}_gflops")] = (flops / t / 1e9).into();
            row[format!("{method:?}_relative_error")] = (worst / largest).into();
        }
        println!("{row}");
    }
    Ok(())
}
