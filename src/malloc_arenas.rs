//! Two glibc malloc arenas for the long-running commands (`daemon`, `push`).
//!
//! glibc gives every thread that allocates at the same moment an arena of its own (up to eight per core) and
//! keeps what is freed in each, so a process with tokio workers, blocking threads and libzstd's workers grows
//! with the work it has done, not with what it holds (see the README's design notes: 57 → 36 MiB after 3,000
//! paths). Only `MALLOC_ARENA_MAX`, read when the process starts, or `mallopt`, which needs `unsafe`, set the
//! limit; so the command runs itself again, same pid, same arguments and descriptors, with the variable set.
//! A value the user set is kept as it is.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

/// The variable glibc reads.
pub const VARIABLE: &str = "MALLOC_ARENA_MAX";

/// Replaces the process with itself under `MALLOC_ARENA_MAX=2`, unless the variable is already set (by the
/// user, the unit, or an earlier pass through here). Returns only when that is not possible (no
/// `/proc/self/exe`), and then the process simply goes on with glibc's default.
pub fn limit() {
    if !cfg!(target_env = "gnu") || std::env::var_os(VARIABLE).is_some() {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| OsString::from("nixpush"));
    // `exec` keeps the pid, so systemd's NOTIFY_SOCKET and socket activation (LISTEN_PID) still hold.
    let _error = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env(VARIABLE, "2")
        .exec();
}
