//! Syscall plumbing shared by the TUN and UDP halves: errno conversion, the wait-with-timeout
//! loop around non-blocking calls, and integer socket options.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use libc::c_int;

/// Turns a `-1`-on-error return value into the `errno` error.
pub(crate) fn cvt(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// [`cvt`] for the `ssize_t` returns of read/write/sendmsg.
pub(crate) fn cvt_size(ret: isize) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// A `poll` timeout in milliseconds that can be changed through `&self` while another thread
/// is blocked: `-1` waits forever, `0` never waits (non-blocking), anything else is the limit.
#[derive(Debug)]
pub(crate) struct Timeout(AtomicI32);

impl Timeout {
    pub(crate) fn new(t: Option<Duration>) -> Self {
        Self(AtomicI32::new(to_ms(t)))
    }

    pub(crate) fn set(&self, t: Option<Duration>) {
        self.0.store(to_ms(t), Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Option<Duration> {
        let ms = self.0.load(Ordering::Relaxed);
        u64::try_from(ms).ok().map(Duration::from_millis)
    }

    fn ms(&self) -> c_int {
        self.0.load(Ordering::Relaxed)
    }
}

/// A timeout that never waits: the call returns `WouldBlock` at once when there is nothing.
pub(crate) static NO_WAIT: Timeout = Timeout(AtomicI32::new(0));

fn to_ms(t: Option<Duration>) -> c_int {
    match t {
        None => -1,
        Some(d) if d.is_zero() => 0,
        // Round sub-millisecond timeouts up: 0 would mean "do not wait at all".
        Some(d) => c_int::try_from(d.as_millis().max(1)).unwrap_or(c_int::MAX),
    }
}

/// Runs `op`, a call on the non-blocking `fd`, until it does something. On `EAGAIN` it waits for
/// `events` with `poll` up to the timeout, then gives up with `TimedOut` (or `WouldBlock` for a
/// zero timeout). Polling only after `EAGAIN` keeps a busy fd at one syscall per call.
pub(crate) fn retry<T>(
    fd: RawFd,
    events: libc::c_short,
    timeout: &Timeout,
    mut op: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let ms = timeout.ms();
                if ms == 0 {
                    return Err(e);
                }
                if !wait(fd, events, ms)? {
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
            other => return other,
        }
    }
}

/// Waits until `fd` reports one of `events` (or an error condition), up to the timeout: then
/// `TimedOut`, or `WouldBlock` for a zero timeout.
pub(crate) fn wait_ready(fd: RawFd, events: libc::c_short, timeout: &Timeout) -> io::Result<()> {
    let ms = timeout.ms();
    match wait(fd, events, ms)? {
        true => Ok(()),
        false if ms == 0 => Err(io::ErrorKind::WouldBlock.into()),
        false => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Waits until `fd` reports one of `events` (or an error condition); false on timeout.
fn wait(fd: RawFd, events: libc::c_short, ms: c_int) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid, exclusively borrowed pollfd array of length 1.
    match cvt(unsafe { libc::poll(&mut pfd, 1, ms) }) {
        Ok(n) => Ok(n > 0),
        // A signal: let the caller retry the operation, which re-polls if still not ready.
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(e) => Err(e),
    }
}

/// `setsockopt` with an `int` value.
pub(crate) fn setsockopt_int(fd: RawFd, level: c_int, name: c_int, val: c_int) -> io::Result<()> {
    // SAFETY: the option value points to a live c_int and the length says so.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&val as *const c_int).cast(),
            size_of::<c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `getsockopt` of an `int` value.
pub(crate) fn getsockopt_int(fd: RawFd, level: c_int, name: c_int) -> io::Result<c_int> {
    let mut val: c_int = 0;
    let mut len = size_of::<c_int>() as libc::socklen_t;
    // SAFETY: value and length point to live locals of the sizes given.
    cvt(unsafe { libc::getsockopt(fd, level, name, (&mut val as *mut c_int).cast(), &mut len) })?;
    Ok(val)
}
