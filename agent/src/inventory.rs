//! What this host has: CPU, memory, OS and GPUs, read with sysinfo and the candle devices.

use cluster_api::cluster::Inventory;

/// Reads the host's inventory now. `limit` is the agent's own cap on stage memory.
pub fn read(limit: Option<u64>) -> Inventory {
    let mut inv = Inventory {
        hostname: sysinfo::System::host_name().unwrap_or_default(),
        os: sysinfo::System::long_os_version().unwrap_or_default(),
        cpu_cores: sysinfo::System::physical_core_count().unwrap_or(0),
        memory_limit_bytes: limit,
        gpus: cluster_engine::device::gpus(),
        ..Inventory::default()
    };
    if let Ok(mut system) = sysinfo::System::new() {
        system.refresh_memory();
        system.refresh_cpu_all();
        inv.memory_total_bytes = system.total_memory();
        inv.memory_available_bytes = system.available_memory();
        inv.cpu_threads = system.cpus().len();
        inv.cpu_model = system
            .cpus()
            .first()
            .map(|c| c.brand().trim().to_string())
            .unwrap_or_default();
    }
    if inv.cpu_threads == 0 {
        inv.cpu_threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
    }
    inv
}

/// `2026-11-30T10:02:01Z` for a time given as seconds since the Unix epoch.
pub fn rfc3339(unix_seconds: u64) -> String {
    let days = unix_seconds / 86_400;
    let secs = unix_seconds % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// The current time, RFC 3339.
pub fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_032_921), "2026-11-30T10:02:01Z");
    }

    #[test]
    fn the_inventory_sees_memory_and_cpus() {
        let inv = read(Some(1 << 30));
        assert!(inv.memory_total_bytes > 0 && inv.cpu_threads > 0, "{inv:?}");
        assert!(inv.placeable_bytes(0, 0) <= 1 << 30);
        assert_eq!(inv.placeable_bytes(0, 1 << 30), 0);
    }
}
