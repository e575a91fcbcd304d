//! Backend selection by cargo feature.
//!
//! Each feature re-exports one of Burn's backends; [`DefaultBackend`] is the most capable one
//! compiled in (CUDA, then WGPU, then Flex, then NdArray). Library code never names a backend:
//! it is generic over `B: Backend`, and only binaries, tests and benchmarks pick one.

pub use burn::tensor::backend::Backend;

#[cfg(feature = "autodiff")]
pub use burn::backend::Autodiff;
#[cfg(feature = "cuda")]
pub use burn::backend::Cuda;
#[cfg(feature = "flex")]
pub use burn::backend::Flex;
#[cfg(feature = "ndarray")]
pub use burn::backend::NdArray;
#[cfg(feature = "wgpu")]
pub use burn::backend::Wgpu;

/// The most capable backend compiled in.
#[cfg(feature = "cuda")]
pub type DefaultBackend = Cuda;
/// The most capable backend compiled in.
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
pub type DefaultBackend = Wgpu;
/// The most capable backend compiled in.
#[cfg(all(feature = "flex", not(any(feature = "cuda", feature = "wgpu"))))]
pub type DefaultBackend = Flex;
/// The most capable backend compiled in.
#[cfg(all(
    feature = "ndarray",
    not(any(feature = "cuda", feature = "wgpu", feature = "flex"))
))]
pub type DefaultBackend = NdArray;

/// Names of the backends compiled into this build, most capable first.
pub fn compiled_backends() -> &'static [&'static str] {
    &[
        #[cfg(feature = "cuda")]
        "cuda",
        #[cfg(feature = "wgpu")]
        "wgpu",
        #[cfg(feature = "flex")]
        "flex",
        #[cfg(feature = "ndarray")]
        "ndarray",
    ]
}

/// The WGPU device with its graphics API chosen by the `SD_WGPU_API` environment variable
/// (`vulkan`, `gl`, `metal`, `dx12`; unset: wgpu's own choice, Vulkan on Linux). A machine
/// without a GPU has no Vulkan driver but can run on Mesa's software OpenGL with `gl`.
/// Set up once per process; later calls return the same device.
#[cfg(feature = "wgpu")]
pub fn wgpu_device() -> burn::backend::wgpu::WgpuDevice {
    use burn::backend::wgpu::graphics::{Dx12, Metal, OpenGl, Vulkan};
    use burn::backend::wgpu::{RuntimeOptions, WgpuDevice, init_setup};
    static SETUP: std::sync::Once = std::sync::Once::new();
    let device = WgpuDevice::default();
    SETUP.call_once(|| {
        let options = RuntimeOptions::default();
        match std::env::var("SD_WGPU_API").as_deref() {
            Ok("gl") | Ok("opengl") => drop(init_setup::<OpenGl>(&device, options)),
            Ok("vulkan") => drop(init_setup::<Vulkan>(&device, options)),
            Ok("metal") => drop(init_setup::<Metal>(&device, options)),
            Ok("dx12") => drop(init_setup::<Dx12>(&device, options)),
            _ => {}
        }
    });
    device
}
