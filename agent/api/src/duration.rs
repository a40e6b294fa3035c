//! Durations as manifests write them: `30s`, `1.5s`, `500ms`, `2m`, `1h`, or a bare number of
//! seconds. Kept as [`std::time::Duration`] and written back in the shortest exact unit.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Parses `30s`, `1.5s`, `500ms`, `2m`, `1h` or a number of seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let unit_at = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(unit_at);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write it as 30s, 500ms, 2m or 1h"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?}; use ms, s, m or h"
            ));
        }
    };
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 1e9 {
        return Err(format!("{text:?} must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Writes `d` as manifests do: `500ms`, `30s`, `2m`, `1h`, or seconds with a fraction.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}s", d.as_secs_f64())
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Serde for `Option<Duration>` fields in manifests (`#[serde(with = "crate::duration::option")]`).
pub mod option {
    use super::*;

    /// Writes the duration as text.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format(*d)),
            None => s.serialize_none(),
        }
    }

    /// Reads text or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Seconds(f64),
        }
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Text(t)) => parse(&t).map(Some).map_err(serde::de::Error::custom),
            Some(Raw::Seconds(s)) => parse(&s.to_string())
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_the_units_people_use() {
        for (text, ms) in [
            ("30s", 30_000),
            ("1.5s", 1_500),
            ("500ms", 500),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("45", 45_000),
        ] {
            assert_eq!(parse(text).unwrap(), Duration::from_millis(ms), "{text}");
        }
        assert_eq!(format(Duration::from_millis(500)), "500ms");
        assert_eq!(format(Duration::from_secs(90)), "90s");
        assert_eq!(format(Duration::from_secs(120)), "2m");
        for bad in ["", "s", "-3s", "0s", "3 fortnights", "1e400"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
