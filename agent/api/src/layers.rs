//! Inclusive layer ranges (`"0-13"`) and the splits of a model into stages.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An inclusive range of transformer layers, written `"a-b"` (or `"a"` for one layer), as people
/// describe a split: "layers 0-13 on mini1, 14-27 on mini2".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerRange {
    /// First layer held, counting from 0.
    pub first: usize,
    /// Last layer held, inclusive.
    pub last: usize,
}

/// Why a layer range or a split was refused; every variant carries the text or numbers at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerRangeError {
    /// The text is not of the form `a-b` or `a`.
    #[error("layer range {text:?} is not of the form \"first-last\" (inclusive, e.g. \"0-13\")")]
    Syntax {
        /// The text as given.
        text: String,
    },
    /// The range runs backwards.
    #[error("layer range {text:?} runs backwards: {first} is after {last}")]
    Backwards {
        /// The text as given.
        text: String,
        /// Its first layer.
        first: usize,
        /// Its last layer.
        last: usize,
    },
    /// The range goes past the model's last layer.
    #[error("layer range {range} runs past the model's {layers} layers (0-{})", layers.saturating_sub(1))]
    PastEnd {
        /// The range at fault.
        range: LayerRange,
        /// How many layers the model has.
        layers: usize,
    },
    /// A split's ranges do not follow each other without gap or overlap.
    #[error(
        "stage {index} has layers {range} but should start at layer {expected}: stages must cover the layers in order, without gap or overlap"
    )]
    NotContiguous {
        /// Zero-based index of the stage at fault.
        index: usize,
        /// Its range.
        range: LayerRange,
        /// The layer it should start at.
        expected: usize,
    },
    /// A split that stops before the model's last layer.
    #[error("the stages end at layer {last} but the model has {layers} layers (0-{}): layers {}-{} are not placed", layers.saturating_sub(1), last + 1, layers.saturating_sub(1))]
    Incomplete {
        /// Last layer placed.
        last: usize,
        /// How many layers the model has.
        layers: usize,
    },
    /// A split with no stages at all.
    #[error("a split needs at least one stage")]
    Empty,
}

impl LayerRange {
    /// A range from `first` to `last`, inclusive; refuses one that runs backwards.
    pub fn new(first: usize, last: usize) -> Result<Self, LayerRangeError> {
        if first > last {
            return Err(LayerRangeError::Backwards {
                text: format!("{first}-{last}"),
                first,
                last,
            });
        }
        Ok(Self { first, last })
    }

    /// How many layers the range holds.
    pub fn len(&self) -> usize {
        self.last - self.first + 1
    }

    /// Never true: a range holds at least one layer. Present because clippy pairs it with `len`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `layer` falls inside the range.
    pub fn contains(&self, layer: usize) -> bool {
        (self.first..=self.last).contains(&layer)
    }

    /// The layers as a Rust range, for iteration.
    pub fn iter(&self) -> std::ops::RangeInclusive<usize> {
        self.first..=self.last
    }

    /// Checks the range against a model with `layers` layers.
    pub fn check_within(&self, layers: usize) -> Result<(), LayerRangeError> {
        if self.last >= layers {
            return Err(LayerRangeError::PastEnd {
                range: *self,
                layers,
            });
        }
        Ok(())
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for LayerRange {
    type Err = LayerRangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || LayerRangeError::Syntax {
            text: text.to_string(),
        };
        let number = |s: &str| s.trim().parse::<usize>().map_err(|_| syntax());
        let (first, last) = match text.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(text)?;
                (n, n)
            }
        };
        if first > last {
            return Err(LayerRangeError::Backwards {
                text: text.to_string(),
                first,
                last,
            });
        }
        Ok(Self { first, last })
    }
}

impl Serialize for LayerRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LayerRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The ranges of a model's stages, in pipeline order, covering every layer exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSplit {
    ranges: Vec<LayerRange>,
}

impl LayerSplit {
    /// Checks that `ranges` cover layers `0..layers` in order, without gap or overlap.
    pub fn new(ranges: Vec<LayerRange>, layers: usize) -> Result<Self, LayerRangeError> {
        if ranges.is_empty() {
            return Err(LayerRangeError::Empty);
        }
        let mut expected = 0;
        for (index, range) in ranges.iter().enumerate() {
            range.check_within(layers)?;
            if range.first != expected {
                return Err(LayerRangeError::NotContiguous {
                    index,
                    range: *range,
                    expected,
                });
            }
            expected = range.last + 1;
        }
        if expected != layers {
            return Err(LayerRangeError::Incomplete {
                last: expected - 1,
                layers,
            });
        }
        Ok(Self { ranges })
    }

    /// Parses a comma-separated split such as `"0-1,2-3"` and checks it against the model.
    pub fn parse(text: &str, layers: usize) -> Result<Self, LayerRangeError> {
        let ranges = text
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<LayerRange>, _>>()?;
        Self::new(ranges, layers)
    }

    /// One stage holding every layer.
    pub fn whole(layers: usize) -> Result<Self, LayerRangeError> {
        if layers == 0 {
            return Err(LayerRangeError::Empty);
        }
        Self::new(vec![LayerRange::new(0, layers - 1)?], layers)
    }

    /// The ranges in pipeline order.
    pub fn ranges(&self) -> &[LayerRange] {
        &self.ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_as_people_write_them() {
        assert_eq!(
            "0-13".parse::<LayerRange>(),
            Ok(LayerRange { first: 0, last: 13 })
        );
        assert_eq!(
            " 14 - 27 ".parse::<LayerRange>(),
            Ok(LayerRange {
                first: 14,
                last: 27
            })
        );
        assert_eq!(
            "5".parse::<LayerRange>(),
            Ok(LayerRange { first: 5, last: 5 })
        );
        assert_eq!("0-13".parse::<LayerRange>().map(|r| r.len()), Ok(14));
    }

    #[test]
    fn refuses_bad_ranges_naming_the_text() {
        let err = "13-0".parse::<LayerRange>().unwrap_err();
        assert!(err.to_string().contains("\"13-0\""), "{err}");
        let err = "a-b".parse::<LayerRange>().unwrap_err();
        assert!(err.to_string().contains("\"a-b\""), "{err}");
        let err = "0-29"
            .parse::<LayerRange>()
            .unwrap()
            .check_within(28)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "layer range 0-29 runs past the model's 28 layers (0-27)"
        );
    }

    #[test]
    fn splits_must_cover_every_layer_once() {
        assert!(LayerSplit::parse("0-13,14-27", 28).is_ok());
        let gap = LayerSplit::parse("0-12,14-27", 28).unwrap_err();
        assert!(
            gap.to_string().contains("should start at layer 13"),
            "{gap}"
        );
        let overlap = LayerSplit::parse("0-14,14-27", 28).unwrap_err();
        assert!(
            overlap.to_string().contains("should start at layer 15"),
            "{overlap}"
        );
        let short = LayerSplit::parse("0-13,14-26", 28).unwrap_err();
        assert!(
            short.to_string().contains("layers 27-27 are not placed"),
            "{short}"
        );
        let past = LayerSplit::parse("0-13,14-28", 28).unwrap_err();
        assert!(past.to_string().contains("runs past"), "{past}");
    }

    #[test]
    fn round_trips_through_serde() {
        let r: LayerRange = serde_json::from_str("\"14-27\"").unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"14-27\"");
        assert!(serde_json::from_str::<LayerRange>("\"x\"").is_err());
    }
}
