//! Guarded reads of mapped cache files.
//!
//! A cache file truncated under a mapping (by anyone: pg_twotower never writes a file in place)
//! makes the next read of a page beyond its new end raise SIGBUS, which would take the whole
//! server into crash recovery. While a mapping is registered here, a SIGBUS whose address lies
//! in it is absorbed: the handler maps a zero-filled page over the faulting page (the read then
//! sees zeros) and marks the mapping poisoned. The image reader bounds-checks every read, so
//! zeros can only give wrong candidates or an error; the scan checks the flag after each step
//! and raises an ERROR, and the mapping is dropped (the next query verifies and rewrites the
//! file from the index pages). A SIGBUS anywhere else gets the previous disposition back, so it
//! behaves exactly as before.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const SLOTS: usize = 64;

struct Range {
    start: AtomicUsize,
    len: AtomicUsize,
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Range = Range {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    poisoned: AtomicBool::new(false),
};
static RANGES: [Range; SLOTS] = [EMPTY; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
static mut PREVIOUS: Option<libc::sigaction> = None;

/// A registered mapping; unregistered when dropped.
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
}

impl Guard {
    /// True once a read of the mapping hit a page the file no longer has.
    pub fn poisoned(&self) -> bool {
        self.slot
            .is_some_and(|s| RANGES[s].poisoned.load(Ordering::SeqCst))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            RANGES[s].len.store(0, Ordering::SeqCst);
            RANGES[s].start.store(0, Ordering::SeqCst);
            RANGES[s].poisoned.store(false, Ordering::SeqCst);
        }
    }
}

/// Registers the mapping at `ptr` of `len` bytes. With every slot taken (more open mappings
/// than a backend keeps) the mapping is simply not guarded.
pub fn register(ptr: *const u8, len: usize) -> Guard {
    install();
    if len == 0 || !INSTALLED.load(Ordering::SeqCst) {
        return Guard { slot: None };
    }
    for (i, r) in RANGES.iter().enumerate() {
        if r.len.load(Ordering::SeqCst) == 0 && r.start.load(Ordering::SeqCst) == 0 {
            r.poisoned.store(false, Ordering::SeqCst);
            r.start.store(ptr as usize, Ordering::SeqCst);
            r.len.store(len, Ordering::SeqCst);
            return Guard { slot: Some(i) };
        }
    }
    Guard { slot: None }
}

fn install() {
    if INSTALLED.load(Ordering::SeqCst) {
        return;
    }
    // SAFETY: sysconf and sigaction are plain libc calls; the backend is single-threaded
    // here (worker threads never map cache files), and `PREVIOUS` is written before the
    // handler that reads it is installed.
    unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE);
        if page <= 0 {
            return;
        }
        PAGE.store(page as usize, Ordering::SeqCst);
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = on_sigbus as *const () as usize;
        new.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut new.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
            return;
        }
        *std::ptr::addr_of_mut!(PREVIOUS) = Some(old);
        if libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) == 0 {
            INSTALLED.store(true, Ordering::SeqCst);
        }
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; only atomics and
    // async-signal-safe system calls (mmap, sigaction) are used below.
    unsafe {
        let addr = (*info).si_addr() as usize;
        let page = PAGE.load(Ordering::SeqCst);
        for r in RANGES.iter() {
            let (start, len) = (r.start.load(Ordering::SeqCst), r.len.load(Ordering::SeqCst));
            if len > 0 && addr >= start && addr < start + len && page > 0 {
                let at = addr & !(page - 1);
                let p = libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                );
                if p != libc::MAP_FAILED {
                    r.poisoned.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
        // Not ours: the previous disposition handles the repeated fault.
        match *std::ptr::addr_of!(PREVIOUS) {
            Some(old) => {
                libc::sigaction(libc::SIGBUS, &old, std::ptr::null_mut());
            }
            None => {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
            }
        }
        INSTALLED.store(false, Ordering::SeqCst);
    }
}
