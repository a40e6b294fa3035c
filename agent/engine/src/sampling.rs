//! Picking the next token: candle-transformers' `LogitsProcessor` (greedy, temperature, top-k,
//! top-p, seeded) after a repetition penalty, over the ids the tokenizer can spell.

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use cluster_api::SamplingParams;

use crate::error::{EngineError, Result};

/// The sampler of one sequence; it keeps the recent tokens the repetition penalty looks at.
pub struct Sampler {
    processor: LogitsProcessor,
    params: SamplingParams,
    /// Ids past the tokenizer's vocabulary have no text: real checkpoints pad `vocab_size` for
    /// speed and those rows were never trained, so they are never sampled.
    vocab_limit: usize,
    recent: Vec<u32>,
}

impl Sampler {
    /// A sampler for `params`; `context` primes the repetition penalty (the prompt's tail).
    pub fn new(params: &SamplingParams, vocab_limit: usize, context: &[u32]) -> Result<Self> {
        params.validate().map_err(EngineError::InvalidRequest)?;
        let greedy = params.temperature <= 0.0;
        let sampling = if greedy {
            Sampling::ArgMax
        } else {
            let temperature = params.temperature;
            match (params.top_k, params.top_p) {
                (None, None) => Sampling::All { temperature },
                (Some(k), None) => Sampling::TopK { k, temperature },
                (None, Some(p)) => Sampling::TopP { p, temperature },
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            }
        };
        let window = params.repetition_window;
        let start = context.len().saturating_sub(window);
        Ok(Self {
            processor: LogitsProcessor::from_sampling(params.seed, sampling),
            params: params.clone(),
            vocab_limit,
            recent: context[start..].to_vec(),
        })
    }

    /// Makes the random draws of `n` samples without keeping them: a sequence resumed after
    /// `n` tokens elsewhere goes on with the draws it would have had. Greedy sampling draws
    /// nothing; every other kind draws once per token whatever the logits and their number
    /// (the test below holds it to that), so one logit stands in for the vocabulary: a
    /// sequence resumed after thousands of tokens must not hold the last stage for seconds.
    pub fn skip(&mut self, n: usize) -> Result<()> {
        if n == 0 || self.params.temperature <= 0.0 {
            return Ok(());
        }
        let flat = Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)?;
        for _ in 0..n {
            self.processor.sample(&flat)?;
        }
        Ok(())
    }

    /// Picks a token from the last position's logits, shape `(vocab,)`.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let vocab = logits.dim(0)?;
        let logits = if vocab > self.vocab_limit {
            logits.narrow(0, 0, self.vocab_limit)?
        } else {
            logits.clone()
        };
        let logits = if self.params.repetition_penalty != 1.0 && !self.recent.is_empty() {
            candle_transformers::utils::apply_repeat_penalty(
                &logits,
                self.params.repetition_penalty,
                &self.recent,
            )?
        } else {
            logits
        };
        let id = self.processor.sample(&logits)?;
        self.recent.push(id);
        if self.recent.len() > self.params.repetition_window {
            self.recent.remove(0);
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn logits(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn padded_vocabulary_rows_are_never_sampled() {
        let mut s = Sampler::new(&SamplingParams::greedy(), 3, &[]).unwrap();
        assert_eq!(s.sample(&logits(&[0.1, 0.5, 0.2, 9.0, 8.0])).unwrap(), 1);
        let hot = SamplingParams {
            temperature: 5.0,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(&hot, 2, &[]).unwrap();
        for _ in 0..200 {
            assert!(s.sample(&logits(&[0.0, 0.0, 50.0])).unwrap() < 2);
        }
    }

    #[test]
    fn a_seed_reproduces_a_sampled_sequence() {
        let params = |seed| SamplingParams {
            temperature: 1.0,
            top_p: Some(0.95),
            top_k: Some(5),
            seed,
            ..SamplingParams::default()
        };
        let l = logits(&[0.3, 0.1, 0.2, 0.25, 0.15, 0.05]);
        let draw = |seed| {
            let mut s = Sampler::new(&params(seed), 6, &[]).unwrap();
            (0..64).map(|_| s.sample(&l).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn a_sampler_that_skips_the_draws_of_earlier_tokens_goes_on_as_the_first_did() {
        let cases = [
            (None, None),
            (Some(3), None),
            (None, Some(0.9)),
            (Some(4), Some(0.8)),
        ];
        for (top_k, top_p) in cases {
            let params = SamplingParams {
                temperature: 0.8,
                top_k,
                top_p,
                seed: 42,
                repetition_penalty: 1.3,
                ..SamplingParams::default()
            };
            // Logits that move with the step, so that the draws are not all alike.
            let at = |i: usize| {
                let v: Vec<f32> = (0..8)
                    .map(|j| ((i * 7 + j * 3) % 11) as f32 * 0.2)
                    .collect();
                logits(&v)
            };
            let mut whole = Sampler::new(&params, 8, &[1, 2]).unwrap();
            let tokens: Vec<u32> = (0..40).map(|i| whole.sample(&at(i)).unwrap()).collect();
            // The sequence resumed after `cut` tokens: they join its context, as the endpoint
            // sends them with the prompt.
            let resumed_after = |cut: usize, skip: bool| {
                let mut context = vec![1, 2];
                context.extend(&tokens[..cut]);
                let start = context.len().saturating_sub(params.repetition_window);
                let mut s = Sampler::new(&params, 8, &context[start..]).unwrap();
                if skip {
                    s.skip(cut).unwrap();
                }
                (cut..40)
                    .map(|i| s.sample(&at(i)).unwrap())
                    .collect::<Vec<_>>()
            };
            for cut in [1, 17, 39] {
                assert_eq!(
                    resumed_after(cut, true),
                    tokens[cut..],
                    "top_k {top_k:?} top_p {top_p:?} cut {cut}"
                );
            }
            // Without the skip the draws differ: the test can tell.
            assert_ne!(resumed_after(17, false), tokens[17..], "top_k {top_k:?}");
        }
    }

    #[test]
    fn repetition_penalty_steers_away_from_seen_tokens() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(&params, 3, &[0]).unwrap();
        assert_eq!(s.sample(&logits(&[1.0, 0.9, 0.1])).unwrap(), 1);
        // Token 1 is now seen too: 1.0/2 = 0.5 and 0.9/2 = 0.45 both fall below 0.6.
        assert_eq!(s.sample(&logits(&[1.0, 0.9, 0.6])).unwrap(), 2);
    }

    #[test]
    fn bad_parameters_are_refused_by_name() {
        let bad = |p: SamplingParams| Sampler::new(&p, 3, &[]).err().unwrap().to_string();
        let e = bad(SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        });
        assert!(e.contains("temperature") && e.contains("-1"), "{e}");
        let e = bad(SamplingParams {
            top_p: Some(1.5),
            ..SamplingParams::default()
        });
        assert!(e.contains("top_p") && e.contains("1.5"), "{e}");
        let e = bad(SamplingParams {
            top_k: Some(0),
            ..SamplingParams::default()
        });
        assert!(e.contains("top_k"), "{e}");
    }
}
