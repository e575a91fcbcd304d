//! Gradients reach every VAE parameter: on `Autodiff<Flex>`, the encoder and decoder of the
//! first (sorted) `tests/fixtures/vae` case encode, sample and decode a random 16×16 image, and
//! one backward pass of an MSE reconstruction + 1e-6 · KL loss must give every float parameter
//! of both halves a finite, non-zero gradient. No other model is checked here.

use crate::common;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::ElementConversion;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use sd_decoder::VaeDecoder;
use sd_encoder::VaeEncoder;

type B = Autodiff<sd_core::backend::Flex>;

fn grad_norm<Bk: AutodiffBackend, M: AutodiffModule<Bk>>(
    module: &M,
    grads: &Bk::Gradients,
) -> (usize, usize) {
    // (parameters with a gradient, parameters in total)
    struct Count<'a, Bk: AutodiffBackend> {
        grads: &'a Bk::Gradients,
        with: usize,
        total: usize,
    }
    impl<Bk: AutodiffBackend> burn::module::ModuleVisitor<Bk> for Count<'_, Bk> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<Bk, D>>) {
            self.total += 1;
            if let Some(g) = param.val().grad(self.grads) {
                let norm: f32 = g.abs().sum().into_scalar().elem();
                if norm.is_finite() && norm > 0.0 {
                    self.with += 1;
                }
            }
        }
    }
    let mut count = Count::<Bk> {
        grads,
        with: 0,
        total: 0,
    };
    module.visit(&mut count);
    (count.with, count.total)
}

#[test]
fn gradients_reach_every_vae_parameter() {
    let dir = common::cases("vae").into_iter().next().unwrap().join("vae");
    let device = Default::default();
    let encoder = VaeEncoder::<B>::from_pretrained(&dir, None, &device).unwrap();
    let decoder = VaeDecoder::<B>::from_pretrained(&dir, None, &device).unwrap();

    let images = Tensor::<B, 4>::random(
        [1, 3, 16, 16],
        burn::tensor::Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let posterior = encoder.encode(images.clone()).unwrap();
    let noise = Tensor::random(
        posterior.mean.dims(),
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let reconstruction = decoder.decode(posterior.sample(noise)).unwrap();
    let loss = (reconstruction - images).powi_scalar(2).mean() + posterior.kl().mean() * 1e-6;
    let grads = loss.backward();

    let (with, total) = grad_norm(&encoder, &grads);
    assert_eq!(
        with, total,
        "encoder: {with} of {total} parameters got a gradient"
    );
    let (with, total) = grad_norm(&decoder, &grads);
    assert_eq!(
        with, total,
        "decoder: {with} of {total} parameters got a gradient"
    );
}
