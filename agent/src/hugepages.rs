//! Model weights in transparent huge pages on Linux.
//!
//! A decode step reads every weight of a stage once, so on a CPU it is bound by memory: with
//! 4 KiB pages it also walks a page table entry per 4 KiB, which on this project's VM made one
//! step of the 230 MB benchmark model 40% slower than with 2 MiB pages (84-88 against 124-128
//! tokens/s, `generate` back to back). Linux distributions mostly ship transparent huge pages in
//! `madvise` mode, where only memory a program asks for gets them, and Rust's allocator (glibc's
//! malloc) asks only when the `glibc.malloc.hugetlb=1` tunable is set, which glibc reads once,
//! when the process starts. So the process starts itself again with it, before anything else
//! runs: same pid, arguments and environment plus the tunable.
//!
//! `glibc.malloc.arena_max=1` goes with it: weights are loaded on a worker thread, and a
//! thread's own malloc arena grows in pieces that did not get huge pages (10 MB of 106 MB
//! measured), while the main arena did. One arena costs a lock per allocation, uncontended on
//! the compute path.
//!
//! Set `CLUSTERAGENT_HUGE_PAGES=off` to keep the process as it started; a `GLIBC_TUNABLES` that
//! already names `glibc.malloc.hugetlb` is left alone.

/// What is added to `GLIBC_TUNABLES`.
pub const TUNABLES: &str = "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1";

/// Whether transparent huge pages are available on request: the kernel's mode, as
/// `/sys/kernel/mm/transparent_hugepage/enabled` shows it ("always [madvise] never").
pub fn madvise_mode(enabled: &str) -> bool {
    enabled.contains("[madvise]")
}

/// The `GLIBC_TUNABLES` value to start again with, or `None` to keep going as is.
pub fn tunables_to_add(
    current: Option<&str>,
    opt_out: Option<&str>,
    thp_enabled: &str,
) -> Option<String> {
    if opt_out.is_some_and(|v| matches!(v.trim(), "off" | "0" | "false" | "no")) {
        return None;
    }
    if !madvise_mode(thp_enabled) {
        // "always" gives every large mapping huge pages already; "never" gives none.
        return None;
    }
    match current.map(str::trim) {
        Some(c) if c.contains("glibc.malloc.hugetlb") => None,
        Some(c) if !c.is_empty() => Some(format!("{c}:{TUNABLES}")),
        _ => Some(TUNABLES.to_string()),
    }
}

/// Starts this process again with huge pages for its allocations, when that applies (see the
/// module docs). Returns only when it does not apply or the new start failed (then with a
/// warning on stderr: the process runs on, with small pages). Call first thing in `main`,
/// before any thread exists.
pub fn restart_with_huge_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;

        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        let current = std::env::var("GLIBC_TUNABLES").ok();
        let opt_out = std::env::var("CLUSTERAGENT_HUGE_PAGES").ok();
        let Some(value) = tunables_to_add(current.as_deref(), opt_out.as_deref(), &thp) else {
            return;
        };
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
        let err = std::process::Command::new(&exe)
            .arg0(argv0)
            .args(args)
            .env("GLIBC_TUNABLES", value)
            .exec();
        eprintln!(
            "clusteragent: warning: could not restart {} with huge pages for weights ({err}); \
             running with small pages",
            exe.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MADVISE: &str = "always [madvise] never\n";

    #[test]
    fn tunables_are_added_once_only_in_madvise_mode_and_never_against_the_user() {
        assert_eq!(
            tunables_to_add(None, None, MADVISE).as_deref(),
            Some(TUNABLES)
        );
        assert_eq!(
            tunables_to_add(Some("glibc.malloc.check=3"), None, MADVISE).unwrap(),
            format!("glibc.malloc.check=3:{TUNABLES}")
        );
        // After the restart, or set by the user either way: no second restart.
        assert_eq!(tunables_to_add(Some(TUNABLES), None, MADVISE), None);
        assert_eq!(
            tunables_to_add(Some("glibc.malloc.hugetlb=0"), None, MADVISE),
            None
        );
        assert_eq!(tunables_to_add(None, Some("off"), MADVISE), None);
        assert_eq!(
            tunables_to_add(None, Some("on"), MADVISE).as_deref(),
            Some(TUNABLES)
        );
        assert_eq!(tunables_to_add(None, None, "[always] madvise never"), None);
        assert_eq!(tunables_to_add(None, None, "always madvise [never]"), None);
        // No sysfs file (not Linux, a container without it): nothing to do.
        assert_eq!(tunables_to_add(None, None, ""), None);
    }
}
