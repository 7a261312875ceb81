//! systemd integration: readiness and stopping notifications on `$NOTIFY_SOCKET`
//! (`Type=notify`), and making the process non-dumpable.
//!
//! The notification protocol is one datagram per state change to the unix socket systemd
//! names in `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`); see
//! sd_notify(3). Without the variable every call does nothing.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `"READY=1"`, `"STOPPING=1"`, `"STATUS=…"`, newline-separated) to
/// the service manager. `Ok(false)` when there is none (`$NOTIFY_SOCKET` unset).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)?;
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = name;
                return Err(io::Error::other("abstract sockets need Linux"));
            }
        }
        None => {
            socket.send_to(state.as_bytes(), &target)?;
        }
    }
    Ok(true)
}

/// Tells the service manager, logging (not failing) when it cannot be reached.
pub fn notify_or_log(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "cannot notify the service manager ($NOTIFY_SOCKET)");
    }
}

/// Makes this process non-dumpable (`PR_SET_DUMPABLE` 0): no core file, and other processes
/// of the same user can no longer attach to it or read its memory through `/proc/PID/mem`.
/// The process holds data keys and values in the clear for moments, and the token's PIN.
/// An `execve` resets the flag, so this must run after any re-exec.
pub fn make_non_dumpable() -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_reads_back_as_not_dumpable() {
        // Runs in its own process under nextest; under `cargo test` it makes the test
        // binary non-dumpable, which is harmless.
        make_non_dumpable().unwrap();
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
    }
}
