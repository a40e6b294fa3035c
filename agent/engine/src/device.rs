//! Choosing the compute device and the weights' precision.

use candle_core::{DType, Device};
use cluster_api::{DeviceKind, WeightDType};

use crate::error::{EngineError, Result};

/// Opens the device asked for. `Auto` prefers Metal (when built with it), then CUDA (when built
/// with it and a GPU answers), then the CPU.
pub fn open_device(kind: DeviceKind) -> Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Metal => metal(),
        DeviceKind::Cuda => cuda(),
        DeviceKind::Auto => {
            if cfg!(feature = "metal")
                && let Ok(d) = metal()
            {
                return Ok(d);
            }
            if cfg!(feature = "cuda")
                && let Ok(d) = cuda()
            {
                return Ok(d);
            }
            Ok(Device::Cpu)
        }
    }
}

#[cfg(feature = "metal")]
fn metal() -> Result<Device> {
    Device::new_metal(0).map_err(|e| EngineError::Device {
        requested: "metal".into(),
        message: e.to_string(),
    })
}

#[cfg(not(feature = "metal"))]
fn metal() -> Result<Device> {
    Err(EngineError::Device {
        requested: "metal".into(),
        message: "this binary was built without the `metal` feature (cargo build --features metal, on macOS)".into(),
    })
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Device> {
    Device::new_cuda(0).map_err(|e| EngineError::Device {
        requested: "cuda".into(),
        message: e.to_string(),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Device> {
    Err(EngineError::Device {
        requested: "cuda".into(),
        message: "this binary was built without the `cuda` feature (cargo build --features cuda)"
            .into(),
    })
}

/// A short name of a device for logs and reports: `cpu`, `metal`, `cuda:0`.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// The candle dtype of a weight precision.
pub fn dtype_of(d: WeightDType) -> DType {
    match d {
        WeightDType::F32 => DType::F32,
        WeightDType::F16 => DType::F16,
        WeightDType::Bf16 => DType::BF16,
    }
}

/// Picks the weights' precision: the one asked for, else the checkpoint's, else f32. Half
/// precision on the CPU keeps its memory (each weight is widened as it is multiplied), and
/// decodes faster than f32 for reading half the bytes.
pub fn choose_dtype(asked: Option<WeightDType>, checkpoint: Option<WeightDType>) -> DType {
    dtype_of(asked.or(checkpoint).unwrap_or(WeightDType::F32))
}

/// The GPUs this build can use: the Metal device (its name and recommended working-set size)
/// with the `metal` feature on macOS, the CUDA devices candle can open with `cuda`. Empty on a
/// CPU-only build.
pub fn gpus() -> Vec<cluster_api::cluster::Gpu> {
    #[allow(unused_mut)]
    let mut found = Vec::new();
    #[cfg(all(feature = "metal", target_os = "macos"))]
    {
        use objc2_metal::MTLDevice;
        if let Some(device) = objc2_metal::MTLCreateSystemDefaultDevice() {
            found.push(cluster_api::cluster::Gpu {
                kind: "metal".into(),
                index: 0,
                name: device.name().to_string(),
                memory_bytes: Some(device.recommendedMaxWorkingSetSize()),
            });
        }
    }
    #[cfg(feature = "cuda")]
    {
        // candle does not expose device names or memory; the ordinal is what a stage uses.
        for index in 0..16 {
            if Device::new_cuda(index).is_err() {
                break;
            }
            found.push(cluster_api::cluster::Gpu {
                kind: "cuda".into(),
                index,
                name: format!("CUDA device {index}"),
                memory_bytes: None,
            });
        }
    }
    found
}
