//! Formatting apart from the verbs: kubectl-like tables, ages, sizes, YAML and JSON.

use serde_json::Value;

/// Prints rows under headers, columns padded to their widest cell, three spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            out.push_str(c);
            if i + 1 < n {
                let pad = widths[i] + 3 - c.chars().count();
                out.push_str(&" ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    cluster_api::human_bytes(n)
}

/// A node's GPUs from its inventory, `name (memory)`, or `none`.
pub fn gpus(list: Option<&[cluster_api::cluster::Gpu]>) -> String {
    let list: Vec<String> = list
        .unwrap_or_default()
        .iter()
        .map(|g| {
            let mem = g
                .memory_bytes
                .map(|b| format!(" ({})", bytes(b)))
                .unwrap_or_default();
            format!("{}{mem}", g.name)
        })
        .collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

/// Seconds since the epoch of `2026-11-30T10:02:01Z`.
pub fn parse_time(text: &str) -> Option<i64> {
    let time = humantime::parse_rfc3339(text).ok()?;
    let secs = time.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    i64::try_from(secs).ok()
}

/// `5s`, `3m`, `2h`, `4d` since an RFC 3339 time.
pub fn age(created: Option<&str>) -> String {
    let Some(then) = created.and_then(parse_time) else {
        return "<unknown>".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let s = (now - then).max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A string field, or `""`.
pub fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// YAML text of a value.
pub fn yaml(v: &Value) -> String {
    serde_yaml::to_string(v).unwrap_or_else(|e| format!("# cannot show as YAML: {e}\n"))
}

/// Pretty JSON text of a value.
pub fn json(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up() {
        let t = table(
            &["NAME", "PHASE"],
            &[
                vec!["qwen".into(), "Ready".into()],
                vec!["a".into(), "Loading".into()],
            ],
        );
        assert_eq!(t, "NAME   PHASE\nqwen   Ready\na      Loading\n");
    }

    #[test]
    fn times_parse() {
        assert_eq!(parse_time("1970-01-02T00:00:01Z"), Some(86_401));
        assert_eq!(parse_time("2026-11-30T10:02:01Z"), Some(1_796_032_921));
        assert_eq!(parse_time("2026-11-30 10:02"), None);
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
