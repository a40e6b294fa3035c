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

/// The current time, RFC 3339 in whole seconds (`2026-11-30T10:02:01Z`), as `clusterctl`
/// reads it back.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_whole_seconds_and_read_back() {
        let text = now();
        assert_eq!(
            (text.len(), &text[10..11], &text[19..]),
            (20, "T", "Z"),
            "{text}"
        );
        let read = humantime::parse_rfc3339(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let apart = std::time::SystemTime::now()
            .duration_since(read)
            .unwrap_or_default();
        assert!(apart < std::time::Duration::from_secs(5), "{text}");
    }

    #[test]
    fn the_inventory_sees_memory_and_cpus() {
        let inv = read(Some(1 << 30));
        assert!(inv.memory_total_bytes > 0 && inv.cpu_threads > 0, "{inv:?}");
        assert!(inv.placeable_bytes(0, 0) <= 1 << 30);
        assert_eq!(inv.placeable_bytes(0, 1 << 30), 0);
    }
}
