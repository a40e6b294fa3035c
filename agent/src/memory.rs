//! Resident memory of this process, as the OS reports it.

/// Resident set size of this process in bytes, or `None` where the OS does not tell.
pub fn resident_bytes() -> Option<u64> {
    let pid = sysinfo::get_current_pid().ok()?;
    let mut system = sysinfo::System::new().ok()?;
    system.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[pid]), true);
    system.process(pid).map(|p| p.memory())
}

/// Bytes of this process's memory in transparent huge pages (Linux: `AnonHugePages` of
/// `/proc/self/smaps_rollup`), or `None` where the OS does not tell.
pub fn huge_page_bytes() -> Option<u64> {
    anon_huge_bytes("/proc/self/smaps_rollup")
}

/// [`huge_page_bytes`] of another process.
pub fn huge_page_bytes_of(pid: u32) -> Option<u64> {
    anon_huge_bytes(&format!("/proc/{pid}/smaps_rollup"))
}

fn anon_huge_bytes(path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let kb = text
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}
