//! Busy polling: after it handled traffic, a packet thread keeps asking its fd for more without
//! sleeping, for a configured window, before it blocks again.
//!
//! Why: a thread that sleeps in `poll` costs a wake-up for the next packet that finds it asleep,
//! and on a virtual machine waking a halted vCPU takes tens of microseconds. A ping through the
//! userspace path finds four threads asleep (sender and receiver on each node): most of the
//! round-trip time above kernel VXLAN. Between tries the thread yields, so a runnable pod
//! thread on the same core gets it; the price is CPU time spent polling while traffic is
//! sparse, which is why the window is the operator's choice (`--busy-poll`).

use std::io;
use std::time::{Duration, Instant};

/// When the thread last did something, and how long it polls after that.
pub(super) struct Poller {
    window: Duration,
    /// Poll without sleeping until then (`None`: block at once).
    until: Option<Instant>,
}

impl Poller {
    pub fn new(window: Duration) -> Self {
        Poller {
            window,
            until: None,
        }
    }

    /// Runs `op`, an I/O call that waits when asked to (`op(true)`) and returns `WouldBlock`
    /// at once otherwise (`op(false)`). Within the window after the last call that got
    /// something, it retries `op(false)`, yielding between tries; then it waits.
    pub fn next<T>(&mut self, mut op: impl FnMut(bool) -> io::Result<T>) -> io::Result<T> {
        if let Some(until) = self.until {
            loop {
                match op(false) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if Instant::now() >= until {
                            self.until = None;
                            break;
                        }
                        std::thread::yield_now();
                    }
                    got => return self.noted(got),
                }
            }
        }
        let got = op(true);
        self.noted(got)
    }

    /// Opens the window again after a call that got something.
    fn noted<T>(&mut self, got: io::Result<T>) -> io::Result<T> {
        if got.is_ok() {
            self.active();
        }
        got
    }

    /// Opens the window again: the thread found work without asking through [`next`](Self::next)
    /// (it read again at once after a read that got something).
    pub fn active(&mut self) {
        if !self.window.is_zero() {
            self.until = Some(Instant::now() + self.window);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An fd that has something on the calls listed (numbered from 0).
    fn scripted(ready: &[usize]) -> impl FnMut(bool) -> io::Result<usize> + '_ {
        let mut calls = 0;
        move |_wait: bool| {
            let i = calls;
            calls += 1;
            if ready.contains(&i) {
                Ok(i)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }

    #[test]
    fn without_a_window_every_call_waits() {
        let mut p = Poller::new(Duration::ZERO);
        let mut waited = Vec::new();
        for _ in 0..3 {
            let _ = p.next(|wait| {
                waited.push(wait);
                Ok::<_, io::Error>(1)
            });
        }
        assert_eq!(waited, [true, true, true]);
    }

    #[test]
    fn after_traffic_it_polls_instead_of_waiting() {
        let mut op = scripted(&[0, 5]);
        let mut p = Poller::new(Duration::from_secs(5));
        let mut waited = Vec::new();
        // The first call waits (nothing happened yet) and gets something.
        let first = p.next(|w| {
            waited.push(w);
            op(w)
        });
        assert_eq!(first.ok(), Some(0));
        // The next polls without waiting until the fd has something (call 5).
        let second = p.next(|w| {
            waited.push(w);
            op(w)
        });
        assert_eq!(second.ok(), Some(5));
        assert_eq!(waited, [true, false, false, false, false, false]);
    }

    #[test]
    fn work_found_outside_next_opens_the_window_too() {
        let mut p = Poller::new(Duration::from_secs(5));
        p.active();
        let mut op = scripted(&[2]);
        let mut waited = Vec::new();
        let got = p.next(|w| {
            waited.push(w);
            op(w)
        });
        assert_eq!(got.ok(), Some(2));
        assert_eq!(waited, [false, false, false], "polled, never waited");
    }

    #[test]
    fn once_the_window_is_over_it_waits_again() {
        let mut p = Poller::new(Duration::from_millis(1));
        assert!(p.next(|_| Ok::<_, io::Error>(())).is_ok());
        let mut polls = 0;
        let mut waits = 0;
        let got = p.next(|wait| {
            if wait {
                waits += 1;
                Err::<(), _>(io::Error::from(io::ErrorKind::TimedOut))
            } else {
                polls += 1;
                Err(io::ErrorKind::WouldBlock.into())
            }
        });
        assert_eq!(got.err().map(|e| e.kind()), Some(io::ErrorKind::TimedOut));
        assert!(polls >= 1);
        assert_eq!(waits, 1);
        // Nothing came, so the following call waits straight away.
        let mut waited = Vec::new();
        let _ = p.next(|w| {
            waited.push(w);
            Err::<(), _>(io::Error::from(io::ErrorKind::TimedOut))
        });
        assert_eq!(waited, [true]);
    }
}
