//! Model weights in transparent huge pages, and a thread count set, without restarting.
//!
//! A decode step reads every weight of a stage once, so on a CPU it is bound by memory: with
//! 4 KiB pages it also walks a page table entry per 4 KiB, which on this project's VM made one
//! step of the 230 MB benchmark model 40% slower than with 2 MiB pages (84-88 against 124-128
//! tokens/s, `generate` back to back). Linux distributions mostly ship transparent huge pages in
//! `madvise` mode, where only memory a program marks with `madvise(MADV_HUGEPAGE)` gets them.
//!
//! Weights are read into ordinary heap buffers (candle's tensors own `Vec`s), so the marking
//! happens in the allocator: [`HugePageAlloc`] is this crate's global allocator, the system's
//! malloc underneath, and after malloc returns it advises what malloc newly took from the
//! kernel, before anything but malloc's own bookkeeping is written there:
//!
//! - the heap's growth: when the program break has moved past what was advised, the new part.
//!   Malloc keeps every allocation below [`MMAP_FROM`] there (a model of sub-megabyte tensors,
//!   a 135M-parameter quantized file, sits between malloc's other chunks);
//! - an allocation outside the heap (one that malloc maps on its own), which starts on a 2 MiB
//!   boundary when it is at least that large, so that all its whole huge pages can be used.
//!
//! Malloc is told to keep one arena (`M_ARENA_MAX`), so that weights loaded on a worker thread
//! land in that heap too rather than in a thread arena, whose growth is not visible from here;
//! one arena costs a lock per allocation, uncontended on the compute path.
//!
//! That is what glibc's own `glibc.malloc.hugetlb=1` and `arena_max=1` tunables do, which glibc
//! reads only when a process starts: the agent used to start itself again with them (up to ten
//! times, as glibc 2.35-2.36 took the tunable on only some starts).
//!
//! `CLUSTERAGENT_HUGE_PAGES=off` turns the advice off. Where the kernel's mode is not `madvise`
//! nothing is advised: `always` gives large mappings huge pages already, `never` none.
//!
//! [`set_thread_count`] sets `RAYON_NUM_THREADS` (when unset) to the CPUs the process may use,
//! rayon's own default: without it candle works out its default thread count on every CPU
//! matrix product by reading `/proc/cpuinfo`, tens of microseconds each, 10% of a decode step
//! of the benchmark model (`generate` at 105-115 against 122-125 tokens/s).
//!
//! This module is one of the two in the workspace allowed `unsafe` (see
//! `cluster_engine::matvec::f16c`'s test of it): a global allocator is an `unsafe` trait, the
//! advice and the environment are set through functions Rust cannot check.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Allocations outside the heap of at least this many bytes are advised (glibc's default mmap
/// threshold; smaller ones share pages with other allocations).
const ADVISED_FROM: usize = 128 << 10;

/// The least the heap grows by (malloc's top pad) while advising: each growth is a region of
/// its own (the kernel does not merge it with the advised heap before it, whose pages were
/// touched first), and a region holds huge pages only on the 2 MiB-aligned stretches inside
/// it, at least 15 of 16 in 32 MiB. glibc's own tunable ends each growth on a 2 MiB
/// boundary instead, which is not available from outside.
const HEAP_STEP: usize = 32 << 20;

/// Allocations below this size come from the heap, whose growth is advised: a mapping of its
/// own gets its first page written by malloc before it can be advised, and the kernel then
/// keeps it apart from its advised neighbours, so one of less than 2 MiB never holds a huge
/// page. glibc's largest automatic threshold (it starts at 128 KiB and rises to the size of
/// the largest mapping freed, up to this); freed heap above twice this much goes back to the
/// kernel, as glibc's automatic setting would do.
const MMAP_FROM: usize = 32 << 20;

/// Whether [`HugePageAlloc`] advises; set once by [`init`].
static ADVISE: AtomicBool = AtomicBool::new(false);

/// The system allocator, with large allocations advised to use transparent huge pages once
/// [`init`] found that the kernel wants the advice and the user did not turn it off.
pub struct HugePageAlloc;

#[cfg(target_os = "linux")]
#[global_allocator]
static GLOBAL: HugePageAlloc = HugePageAlloc;

/// The program break up to which the main heap was advised (0: not yet known).
static ADVISED_BREAK: AtomicUsize = AtomicUsize::new(0);

/// The program break when advice began: the heap above it is advised as it grows.
static HEAP_START: AtomicUsize = AtomicUsize::new(0);

/// The system's page size (4 KiB on x86-64; 16 or 64 KiB on some arm64 kernels), read by
/// [`start_advising`]: madvise takes only ranges that start on a page.
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// Marks the whole pages of `[start, end)` for huge pages; a failure leaves them on small
/// pages, which is only slower.
#[cfg(target_os = "linux")]
fn advise_range(start: usize, end: usize) {
    let page = PAGE.load(Ordering::Relaxed);
    let (start, end) = (start.next_multiple_of(page), end / page * page);
    if end > start {
        // SAFETY: the callers pass memory malloc owns (an allocation it just returned, or the
        // heap below the program break); MADV_HUGEPAGE changes how the kernel backs those
        // pages, never their contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

/// Advises what malloc newly took from the kernel for the allocation `[ptr, ptr + size)`: the
/// allocation itself when it is large, and the heap's growth (see the module docs).
fn advise(ptr: *mut u8, size: usize) {
    #[cfg(target_os = "linux")]
    if !ptr.is_null() && ADVISE.load(Ordering::Relaxed) {
        // SAFETY: `sbrk(0)` only reads the current break (glibc keeps it; no system call).
        #[cfg(target_env = "gnu")]
        let brk = unsafe { libc::sbrk(0) } as usize;
        #[cfg(not(target_env = "gnu"))]
        let brk = 0;
        // A chunk inside the heap is advised with it: advising it alone would split the heap's
        // region around it.
        if size >= ADVISED_FROM
            && !(HEAP_START.load(Ordering::Relaxed)..brk).contains(&(ptr as usize))
        {
            advise_range(ptr as usize, ptr as usize + size);
        }
        #[cfg(target_env = "gnu")]
        {
            let advised = ADVISED_BREAK.load(Ordering::Relaxed);
            if advised != 0
                && brk != advised
                && ADVISED_BREAK
                    .compare_exchange(advised, brk, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                && brk > advised
            {
                // Whole pages of the growth; a shrink only lowers the mark, so that the next
                // growth is advised again.
                let page = PAGE.load(Ordering::Relaxed);
                advise_range(advised / page * page, brk);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, size);
}

// SAFETY: every block comes from `System` with `widened(layout)` and goes back to it with the
// same layout (`widened` depends on the layout alone); advising memory changes nothing the
// caller can observe.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `widened` keeps the caller's (valid) size and raises only the alignment.
        let ptr = unsafe { System.alloc(widened(layout)) };
        advise(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let wide = widened(layout);
        if wide == layout {
            // SAFETY: as in `alloc`.
            let ptr = unsafe { System.alloc_zeroed(layout) };
            advise(ptr, layout.size());
            return ptr;
        }
        // The system allocator zeroes an over-aligned block by writing it, which would back it
        // with small pages before the advice: advise first, then zero.
        // SAFETY: as in `alloc`; the zeroing stays within the block just allocated.
        unsafe {
            let ptr = System.alloc(wide);
            advise(ptr, layout.size());
            if !ptr.is_null() {
                std::ptr::write_bytes(ptr, 0, layout.size());
            }
            ptr
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with `widened(layout)`, which depends on the layout
        // alone, so it is the layout it was allocated with.
        unsafe { System.dealloc(ptr, widened(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees that `new_size`, rounded up to the alignment, does not
        // overflow `isize`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if widened(layout) == layout && widened(new_layout) == new_layout {
            // SAFETY: `ptr` was allocated with `layout` (not widened); the caller's contract.
            let new = unsafe { System.realloc(ptr, layout, new_size) };
            if new_size > layout.size() {
                advise(new, new_size);
            }
            return new;
        }
        // To or from a 2 MiB-aligned block: the system allocator would move it by copying into
        // a block not yet advised, so the move is done here, advice first.
        // SAFETY: both blocks are live and distinct, the copy within both; `ptr` goes back
        // with the layout it was allocated with.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

/// A huge page's size on x86-64, and on arm64 with 4 KiB pages (32 MiB with 16 KiB pages, where
/// aligning to this helps less).
const HUGE: usize = 2 << 20;

/// The layout malloc is asked for: allocations of [`HUGE`] bytes or more start on a huge page
/// boundary, so that all their whole huge pages can be backed as such (a mapping of 2 MiB and a
/// bit at an arbitrary address holds none). Depends on the layout alone, as `dealloc` needs.
fn widened(layout: Layout) -> Layout {
    if cfg!(target_os = "linux") && layout.size() >= HUGE && layout.align() < HUGE {
        Layout::from_size_align(layout.size(), HUGE).unwrap_or(layout)
    } else {
        layout
    }
}

/// Reads the kernel's mode and the user's opt-out and turns the advice on or off; then sets the
/// thread count. Call first thing in `main`, before any thread exists.
pub fn init() {
    #[cfg(target_os = "linux")]
    {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        let opt_out = std::env::var("CLUSTERAGENT_HUGE_PAGES").ok();
        if wanted(opt_out.as_deref(), &thp) {
            start_advising();
        }
    }
    set_thread_count();
}

/// Sets malloc up as the module docs say and turns the advice on.
#[cfg(target_os = "linux")]
fn start_advising() {
    // SAFETY: sysconf only reads a system setting.
    if let Ok(page) = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        && page.is_power_of_two()
    {
        PAGE.store(page, Ordering::Relaxed);
    }
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes malloc's settings, and `sbrk(0)` only reads the break.
        let brk = unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            libc::mallopt(libc::M_TOP_PAD, HEAP_STEP as libc::c_int);
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_FROM as libc::c_int);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * MMAP_FROM as libc::c_int);
            libc::sbrk(0) as usize
        };
        // The heap so far is small (no model yet): advised from here up.
        HEAP_START.store(brk, Ordering::Relaxed);
        ADVISED_BREAK.store(brk, Ordering::Relaxed);
    }
    ADVISE.store(true, Ordering::Relaxed);
}

/// Whether to advise, from `CLUSTERAGENT_HUGE_PAGES` and the kernel's mode as
/// `/sys/kernel/mm/transparent_hugepage/enabled` shows it ("always [madvise] never").
pub fn wanted(opt_out: Option<&str>, thp_enabled: &str) -> bool {
    let off = opt_out.is_some_and(|v| matches!(v.trim(), "off" | "0" | "false" | "no"));
    !off && thp_enabled.contains("[madvise]")
}

/// Sets `RAYON_NUM_THREADS` to the CPUs this process may use when the user left it unset (see
/// the module docs), so that candle reads it instead of `/proc/cpuinfo` on every product.
fn set_thread_count() {
    if let Some(n) = thread_count_to_set(std::env::var_os("RAYON_NUM_THREADS").as_deref(), || {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }) {
        // SAFETY: called from `init`, first thing in `main`, while the process has one thread:
        // nothing reads the environment concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}

/// The `RAYON_NUM_THREADS` to set: `available()` when the variable is unset or empty; `None`
/// when the user set it.
pub fn thread_count_to_set(
    current: Option<&std::ffi::OsStr>,
    available: impl FnOnce() -> usize,
) -> Option<usize> {
    match current {
        Some(v) if !v.is_empty() => None,
        _ => Some(available().max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_follows_the_kernels_mode_and_the_users_opt_out() {
        const MADVISE: &str = "always [madvise] never\n";
        assert!(wanted(None, MADVISE));
        assert!(wanted(Some("on"), MADVISE));
        assert!(!wanted(Some("off"), MADVISE));
        assert!(!wanted(Some(" 0 "), MADVISE));
        assert!(!wanted(None, "[always] madvise never"));
        assert!(!wanted(None, "always madvise [never]"));
        assert!(!wanted(None, ""));
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

    /// The allocator keeps contents across growth and shrinking, zeroes what it must, and
    /// marks a large allocation for huge pages where the kernel takes the advice.
    #[cfg(target_os = "linux")]
    #[test]
    fn large_allocations_are_marked_and_keep_their_contents() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if wanted(None, &thp) {
            start_advising();
        }
        let mut v: Vec<u8> = Vec::with_capacity(16);
        for i in 0..(3usize << 20) {
            v.push((i % 251) as u8);
        }
        assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        v.truncate(1000);
        v.shrink_to_fit();
        assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        // Past the mmap threshold: a mapping of its own, whatever the heap holds.
        let zeros = vec![0u32; MMAP_FROM / 2];
        assert!(zeros.iter().all(|&z| z == 0));
        assert_eq!(zeros.as_ptr() as usize % HUGE, 0);
        if thp.contains("[madvise]") {
            let flags = vm_flags(zeros.as_ptr() as usize).expect("the allocation's mapping");
            assert!(
                flags.split_whitespace().any(|f| f == "hg"),
                "a 64 MiB allocation not marked for huge pages: {flags}"
            );
        }
    }

    /// The `VmFlags` of the mapping holding `addr`, from `/proc/self/smaps`.
    #[cfg(target_os = "linux")]
    fn vm_flags(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
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
                return Some(flags.to_string());
            }
        }
        None
    }
}
