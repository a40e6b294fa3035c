//! Where a stage runs and in what precision, as manifests and command lines name them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The compute device a stage asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// Metal on macOS when built with it, else CUDA when available, else the CPU.
    #[default]
    Auto,
    /// The CPU, always available.
    Cpu,
    /// Apple's GPU; needs a build with the `metal` feature.
    Metal,
    /// An NVIDIA GPU; needs a build with the `cuda` feature.
    Cuda,
}

impl DeviceKind {
    /// The name used in manifests and flags.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Metal => "metal",
            Self::Cuda => "cuda",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            "cuda" => Ok(Self::Cuda),
            other => Err(format!(
                "unknown device {other:?}: expected one of auto, cpu, metal, cuda"
            )),
        }
    }
}

/// The precision weights are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDType {
    /// 32-bit floats.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16, the usual precision of published checkpoints.
    Bf16,
}

impl WeightDType {
    /// The name used in manifests and flags.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}

impl fmt::Display for WeightDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WeightDType {
    type Err = String;

    /// Accepts our short names and the names Hugging Face configs use (`bfloat16`, `float32`...).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(Self::F32),
            "f16" | "float16" | "half" | "fp16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown dtype {other:?}: expected one of f32, f16, bf16"
            )),
        }
    }
}
