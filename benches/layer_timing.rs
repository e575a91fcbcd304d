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

/// A convolution to time: in, out, side, kernel, padding (top and bottom, left and right),
/// stride.
type ConvCase = (usize, usize, usize, [usize; 2], [usize; 2], usize);

/// Every convolution shape of the FID Inception (299² input).
const INCEPTION_CONVS: &[ConvCase] = &[
    (3, 32, 299, [3, 3], [0, 0], 2),
    (32, 32, 149, [3, 3], [0, 0], 1),
    (32, 64, 147, [3, 3], [1, 1], 1),
    (64, 80, 73, [1, 1], [0, 0], 1),
    (80, 192, 73, [3, 3], [0, 0], 1),
    (192, 64, 35, [1, 1], [0, 0], 1),
    (288, 64, 35, [1, 1], [0, 0], 1),
    (48, 64, 35, [5, 5], [2, 2], 1),
    (64, 96, 35, [3, 3], [1, 1], 1),
    (96, 96, 35, [3, 3], [1, 1], 1),
    (288, 384, 35, [3, 3], [0, 0], 2),
    (768, 192, 17, [1, 1], [0, 0], 1),
    (192, 192, 17, [1, 7], [0, 3], 1),
    (192, 192, 17, [7, 1], [3, 0], 1),
    (160, 160, 17, [1, 7], [0, 3], 1),
    (192, 320, 17, [3, 3], [0, 0], 2),
    (2048, 448, 8, [1, 1], [0, 0], 1),
    (384, 384, 8, [1, 3], [0, 1], 1),
    (448, 384, 8, [3, 3], [1, 1], 1),
];

/// SD 1.5's convolutions that are not 3×3 with padding 1 (U-Net downsamplers and shortcuts,
/// VAE shortcuts), at 512².
const SD_OTHER_CONVS: &[ConvCase] = &[
    (320, 320, 64, [3, 3], [1, 1], 2),
    (640, 640, 32, [3, 3], [1, 1], 2),
    (1280, 1280, 16, [3, 3], [1, 1], 2),
    (320, 640, 32, [1, 1], [0, 0], 1),
    (960, 320, 64, [1, 1], [0, 0], 1),
    (1920, 640, 32, [1, 1], [0, 0], 1),
    (2560, 1280, 8, [1, 1], [0, 0], 1),
    (512, 256, 256, [1, 1], [0, 0], 1),
    (256, 128, 512, [1, 1], [0, 0], 1),
];

/// `--convs inception` (pytorch-fid's batch of 50) and `--convs sd-other` (batch 2, `--batch`
/// overrides): each shape by each method that applies, in GFLOP/s, and the method `choose`
/// picks.
#[cfg(feature = "flex")]
fn other_convs(runs: usize, shapes: &[ConvCase], batch: usize) -> Result<(), String> {
    use sd_kernels::cpu::conv::{Conv2dShape, ConvMethod, conv2d_by};
    let batch: usize = arg("--batch").and_then(|s| s.parse().ok()).unwrap_or(batch);
    for &(cin, cout, side, kernel, [ph, pw], stride) in shapes {
        let shape = Conv2dShape {
            batch,
            in_channels: cin,
            out_channels: cout,
            height: side,
            width: side,
            kernel,
            padding: [ph, pw, ph, pw],
            stride: [stride, stride],
        };
        let [oh, ow] = shape.output_size();
        let flops = 2.0 * (batch * oh * ow * cin * cout * kernel[0] * kernel[1]) as f64;
        let xs: Vec<f32> = (0..batch * cin * side * side)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let ws: Vec<f32> = (0..cout * cin * kernel[0] * kernel[1])
            .map(|i| ((i * 104729) % 1000) as f32 / 5e4 - 0.01)
            .collect();
        let mut row = serde_json::json!({
            "conv": format!("{cin}→{cout} {}×{} s{stride} at {side}²", kernel[0], kernel[1]),
            "chosen": format!("{:?}", ConvMethod::choose(shape)),
        });
        let winograd = kernel == [3, 3] && [ph, pw] == [1, 1] && stride == 1;
        let mut methods = vec![ConvMethod::Blocked];
        if winograd {
            methods.extend([ConvMethod::Winograd4x4, ConvMethod::Winograd2x2]);
        }
        for method in methods {
            let (t, _) = time_runs(runs, || {
                conv2d_by(method, &xs, &ws, None, shape).ok_or("sizes")?;
                Ok(())
            })?;
            row[format!("{method:?}")] = format!("{:.1}", flops / t / 1e9).into();
        }
        println!("{row}");
    }
    Ok(())
}

/// `--convs x`: the 3×3 convolutions of SD 1.5's U-Net (batch 2), through Burn's `Conv2d` and
/// through each of `sd_kernels::cpu::conv`'s methods (`--side N`: one level only). Flex only.
#[cfg(feature = "flex")]
fn convs(runs: usize, device: &burn::tensor::Device<B>) -> Result<(), String> {
    use sd_kernels::cpu::conv::{Conv2dShape, ConvMethod, conv2d_by};
    let only: Option<usize> = arg("--side").and_then(|s| s.parse().ok());
    match arg("--convs").as_deref() {
        Some("inception") => return other_convs(runs, INCEPTION_CONVS, 50),
        Some("sd-other") => return other_convs(runs, SD_OTHER_CONVS, 2),
        _ => {}
    }
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
        // Each method's largest difference from the blocks' (direct) result, relative to the
        // largest output.
        let direct = conv2d_by(ConvMethod::Blocked, &xs, &ws, None, shape).ok_or("sizes")?;
        let largest = direct.iter().fold(0f32, |m, v| m.max(v.abs()));
        for method in [
            ConvMethod::Winograd4x4,
            ConvMethod::Winograd2x2,
            ConvMethod::Blocked,
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
