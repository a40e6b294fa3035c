//! Rotary position embeddings: the frequency table, with the scaling variants configs ask for.
//!
//! The cos/sin rows are computed for the positions of each forward call rather than precomputed
//! for the whole context: a 128k-token Llama 3.1 table would cost every stage tens of megabytes,
//! while a call needs only its own few rows.

use std::f64::consts::PI;

use candle_core::{Device, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;

/// Inverse frequencies of one head's rotary pairs.
#[derive(Debug, Clone)]
pub struct RotaryTable {
    inv_freq: Vec<f32>,
}

impl RotaryTable {
    /// The frequencies for `cfg`'s head width, base and scaling.
    pub fn new(cfg: &ModelConfig) -> Self {
        let dim = cfg.head_dim;
        // As the family's reference for this format computes them: the last bit matters once
        // quantized matmuls round their inputs (see `crate::family::Numerics`).
        let base: Vec<f64> = (0..dim)
            .step_by(2)
            .map(|i| {
                if cfg.numerics.rope_power_in_f32 {
                    f64::from(1f32 / (cfg.rope_theta as f32).powf(i as f32 / dim as f32))
                } else {
                    f64::from(1f32 / cfg.rope_theta.powf(i as f64 / dim as f64) as f32)
                }
            })
            .collect();
        let inv_freq = match &cfg.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let original = *original_max_position_embeddings as f64;
                let low_freq_wavelen = original / low_freq_factor;
                let high_freq_wavelen = original / high_freq_factor;
                base.into_iter()
                    .map(|freq| {
                        let wavelen = 2.0 * PI / freq;
                        if wavelen < high_freq_wavelen {
                            freq
                        } else if wavelen > low_freq_wavelen {
                            freq / factor
                        } else {
                            let smooth = (original / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        };
        Self {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
        }
    }

    /// cos and sin of shape `(len, head_dim / 2)` for positions `start..start + len`, in f32.
    ///
    /// Computed with the same tensor operations as candle-transformers' references (an outer
    /// product, then candle's cos and sin), so that the last bits agree: quantized matmuls round
    /// their inputs and can turn a one-bit difference into a visible one.
    pub fn cos_sin(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let positions = Tensor::arange(start as u32, (start + len) as u32, device)?
            .to_dtype(candle_core::DType::F32)?
            .reshape((len, 1))?;
        let inv_freq = Tensor::from_slice(&self.inv_freq, (1, half), device)?;
        let angles = positions.matmul(&inv_freq)?;
        Ok((angles.cos()?, angles.sin()?))
    }
}
