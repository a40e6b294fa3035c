//! The startup restart on Linux: model weights in transparent huge pages, and a thread count set.
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
//! glibc 2.35-2.36 (Debian 12's) takes the tunable only on some starts: it compares the kernel's
//! mode string without terminating it, so a stray byte on the stack decides (half the starts of
//! a stage here). After a restart the process checks that a fresh allocation of a few MiB was
//! marked for huge pages and starts again if not, up to [`MAX_TRIES`] times; children inherit
//! the tunable and check for themselves.
//!
//! Set `CLUSTERAGENT_HUGE_PAGES=off` to keep the process as it started; a `GLIBC_TUNABLES` that
//! already names `glibc.malloc.hugetlb` is left alone unless this chain of restarts set it.
//!
//! The same start sets `RAYON_NUM_THREADS` (Linux, when unset) to the CPUs the process may use,
//! which is rayon's own default: without it candle works out its default thread count on every
//! CPU matrix product by reading `/proc/cpuinfo`, tens of microseconds each, 10% of a decode
//! step of the benchmark model (`generate` at 105-115 against 122-125 tokens/s). A process
//! that needs no huge-page start still starts once more for it.

/// What is added to `GLIBC_TUNABLES`.
pub const TUNABLES: &str = "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1";

/// Whether transparent huge pages are available on request: the kernel's mode, as
/// `/sys/kernel/mm/transparent_hugepage/enabled` shows it ("always [madvise] never").
pub fn madvise_mode(enabled: &str) -> bool {
    enabled.contains("[madvise]")
}

/// How many times the process starts itself again before it gives up on huge pages.
pub const MAX_TRIES: u32 = 10;

/// What to do at startup, from the environment and the kernel's mode.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: huge pages are in use, unavailable, or not wanted.
    Keep,
    /// Start again with this `GLIBC_TUNABLES` value, as try number `try_number`.
    Restart {
        /// The tunables value.
        tunables: String,
        /// Which try the new start is.
        try_number: u32,
    },
    /// Tried [`MAX_TRIES`] times; go on with small pages.
    GiveUp,
}

/// Decides whether to start again. `try_number` is how many starts of this process came before
/// (from [`TRY_VAR`], `None` when absent: the tunable, if any, is the user's); `malloc_madvises` says whether this process's malloc asks for
/// huge pages, which glibc 2.35-2.36 does only on some starts: it compares the kernel's mode
/// string without terminating it, so whatever byte follows on the stack decides.
pub fn decide(
    current: Option<&str>,
    opt_out: Option<&str>,
    thp_enabled: &str,
    try_number: Option<u32>,
    malloc_madvises: impl FnOnce() -> bool,
) -> Decision {
    if opt_out.is_some_and(|v| matches!(v.trim(), "off" | "0" | "false" | "no")) {
        return Decision::Keep;
    }
    if !madvise_mode(thp_enabled) {
        // "always" gives every large mapping huge pages already; "never" gives none.
        return Decision::Keep;
    }
    match current.map(str::trim) {
        Some(c) if c.contains("glibc.malloc.hugetlb") => match try_number {
            // Set by the user, not by a restart: theirs to decide.
            None => Decision::Keep,
            Some(_) if malloc_madvises() => Decision::Keep,
            Some(n) if n >= MAX_TRIES => Decision::GiveUp,
            Some(n) => Decision::Restart {
                tunables: c.to_string(),
                try_number: n + 1,
            },
        },
        Some(c) if !c.is_empty() => Decision::Restart {
            tunables: format!("{c}:{TUNABLES}"),
            try_number: 1,
        },
        _ => Decision::Restart {
            tunables: TUNABLES.to_string(),
            try_number: 1,
        },
    }
}

/// Whether a fresh allocation of a few MiB was marked for huge pages (`hg` in its mapping's
/// flags): glibc took the tunable in this process. Where the mappings cannot be read (a
/// sandbox without `/proc`), it answers yes: starting again would not tell more.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc_madvises() -> bool {
    // Above malloc's mmap threshold: its own mapping, madvised when the tunable is active.
    let probe: Vec<u8> = Vec::with_capacity(4 << 20);
    let addr = probe.as_ptr() as usize;
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return true;
    };
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((start, end)) = range.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            inside = (start..end).contains(&addr);
        } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
            return flags.split_whitespace().any(|f| f == "hg");
        }
    }
    // No mapping holds the probe or shows its flags: nothing to learn from another start.
    true
}

/// Starts this process again with huge pages for its allocations and a thread count set, when
/// either applies (see the module docs). Returns when neither does or a new start failed (then
/// with a warning on stderr: the process runs on as it is). Call first thing in `main`, before
/// any thread exists.
pub fn restart_tuned() {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;

        let threads = thread_count_to_set(std::env::var_os("RAYON_NUM_THREADS").as_deref(), || {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        });
        let huge_pages = huge_pages_restart();
        if huge_pages.is_none() && threads.is_none() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg0(argv0).args(args);
        if let Some((tunables, try_number)) = huge_pages {
            cmd.env("GLIBC_TUNABLES", tunables)
                .env(TRY_VAR, format!("{}:{try_number}", std::process::id()));
        }
        if let Some(n) = threads {
            cmd.env("RAYON_NUM_THREADS", n.to_string());
        }
        let err = cmd.exec();
        eprintln!(
            "clusteragent: warning: could not restart {} with huge pages for weights and a thread \
             count set ({err}); running on as started",
            exe.display()
        );
    }
}

/// The `GLIBC_TUNABLES` value and try number to start again with, if any (see [`decide`]).
#[cfg(target_os = "linux")]
fn huge_pages_restart() -> Option<(String, u32)> {
    #[cfg(target_env = "gnu")]
    {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        let current = std::env::var("GLIBC_TUNABLES").ok();
        let opt_out = std::env::var("CLUSTERAGENT_HUGE_PAGES").ok();
        let try_number = std::env::var(TRY_VAR)
            .ok()
            .map(|v| tries_so_far(&v, std::process::id()));
        match decide(
            current.as_deref(),
            opt_out.as_deref(),
            &thp,
            try_number,
            malloc_madvises,
        ) {
            Decision::Keep => None,
            Decision::GiveUp => {
                eprintln!(
                    "clusteragent: warning: glibc did not take glibc.malloc.hugetlb in {MAX_TRIES} \
                     starts; weights are on small pages"
                );
                None
            }
            Decision::Restart {
                tunables,
                try_number,
            } => Some((tunables, try_number)),
        }
    }
    #[cfg(not(target_env = "gnu"))]
    None
}

/// The `RAYON_NUM_THREADS` to start again with: `available()` when the variable is unset or
/// empty; `None` when the user set it.
pub fn thread_count_to_set(
    current: Option<&std::ffi::OsStr>,
    available: impl FnOnce() -> usize,
) -> Option<usize> {
    match current {
        Some(v) if !v.is_empty() => None,
        _ => Some(available().max(1)),
    }
}

/// Counts the starts of one chain (see [`decide`]), as `PID:N`: a start keeps its pid, so a
/// child process that inherited the variable begins its own count.
pub const TRY_VAR: &str = "CLUSTERAGENT_HUGE_PAGES_TRY";

/// Tries so far for the process `pid`, from the value of [`TRY_VAR`]: 0 when the value was
/// inherited from a parent (or unreadable), which set the tunable for this process too.
pub fn tries_so_far(value: &str, pid: u32) -> u32 {
    match value.split_once(':') {
        Some((p, n)) if p.parse() == Ok(pid) => n.parse().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MADVISE: &str = "always [madvise] never\n";

    #[test]
    fn a_start_adds_the_tunables_retries_until_malloc_takes_them_and_respects_the_user() {
        let restart = |tunables: &str, try_number| Decision::Restart {
            tunables: tunables.into(),
            try_number,
        };
        let never = || -> bool { panic!("not asked") };
        assert_eq!(
            decide(None, None, MADVISE, None, never),
            restart(TUNABLES, 1)
        );
        assert_eq!(
            decide(Some("glibc.malloc.check=3"), None, MADVISE, None, never),
            restart(&format!("glibc.malloc.check=3:{TUNABLES}"), 1)
        );
        // After a restart: kept when malloc took the tunable, else tried again, up to a limit.
        assert_eq!(
            decide(Some(TUNABLES), None, MADVISE, Some(1), || true),
            Decision::Keep
        );
        assert_eq!(
            decide(Some(TUNABLES), None, MADVISE, Some(1), || false),
            restart(TUNABLES, 2)
        );
        assert_eq!(
            decide(Some(TUNABLES), None, MADVISE, Some(MAX_TRIES), || false),
            Decision::GiveUp
        );
        // The user's own hugetlb setting, either way, and the opt-out are left alone.
        assert_eq!(
            decide(Some("glibc.malloc.hugetlb=0"), None, MADVISE, None, never),
            Decision::Keep
        );
        assert_eq!(
            decide(None, Some("off"), MADVISE, None, never),
            Decision::Keep
        );
        assert_eq!(
            decide(None, Some("on"), MADVISE, None, never),
            restart(TUNABLES, 1)
        );
        // The count belongs to one process: a child inherits the tunable and counts afresh.
        assert_eq!(tries_so_far("41:3", 41), 3);
        assert_eq!(tries_so_far("41:3", 42), 0);
        assert_eq!(tries_so_far("garbage", 42), 0);
        assert_eq!(
            decide(Some(TUNABLES), None, MADVISE, Some(0), || false),
            restart(TUNABLES, 1)
        );
        // Other kernel modes, or no sysfs file at all: nothing to do.
        assert_eq!(
            decide(None, None, "[always] madvise never", None, never),
            Decision::Keep
        );
        assert_eq!(
            decide(None, None, "always madvise [never]", None, never),
            Decision::Keep
        );
        assert_eq!(decide(None, None, "", None, never), Decision::Keep);
    }

    #[test]
    fn the_thread_count_is_set_only_when_the_user_did_not() {
        use std::ffi::OsStr;
        assert_eq!(thread_count_to_set(None, || 6), Some(6));
        assert_eq!(thread_count_to_set(Some(OsStr::new("")), || 6), Some(6));
        assert_eq!(thread_count_to_set(None, || 0), Some(1));
        assert_eq!(thread_count_to_set(Some(OsStr::new("1")), || 6), None);
        assert_eq!(thread_count_to_set(Some(OsStr::new("0")), || 6), None);
    }
}
