//! Sets `cfg(shapes_model)` when the trained model's files are in `model/` (written there by
//! `cargo xtask train-shapes`), so that the crate builds, without the built-in model, before
//! the model is trained.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(shapes_model)");
    println!("cargo::rerun-if-changed=model");
    let model = std::path::Path::new("model");
    let whole = [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ]
    .iter()
    .all(|f| model.join(f).is_file());
    if whole {
        println!("cargo::rustc-cfg=shapes_model");
    }
}
