//! What one repair pass did: the objects it put right and the first thing it could not.

use super::BackendError;

/// The outcome of [`Backend::repair`](super::Backend::repair). A pass tries every part
/// whatever another's failure (one family's trouble must not keep the other's entries or the
/// routes from coming back), so it can both have put things right and have failed: the count
/// holds either way, and only the first error is kept (the next pass meets the others again).
#[derive(Debug, Default)]
#[must_use]
pub struct Repaired {
    /// Kernel objects put back, or removed where nothing justified them.
    pub restored: usize,
    /// The first failure of the pass.
    pub error: Option<BackendError>,
}

impl Repaired {
    /// Counts `n` objects put right.
    pub fn count(&mut self, n: usize) {
        self.restored += n;
    }

    /// Keeps `e` unless an earlier failure of this pass is kept already.
    pub fn fail(&mut self, e: impl Into<BackendError>) {
        self.error.get_or_insert(e.into());
    }

    /// Takes in one part's outcome: a count, or why it stopped.
    pub fn note<E: Into<BackendError>>(&mut self, part: Result<usize, E>) {
        match part {
            Ok(n) => self.count(n),
            Err(e) => self.fail(e),
        }
    }

    /// Takes in another pass's outcome (one device's, say).
    pub fn merge(&mut self, other: Repaired) {
        self.count(other.restored);
        if let Some(e) = other.error {
            self.fail(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(what: &str) -> BackendError {
        BackendError::Config(what.into())
    }

    #[test]
    fn counts_what_went_back_beside_a_failure_and_keeps_the_first() {
        let mut pass = Repaired::default();
        pass.note(Ok::<_, BackendError>(2));
        pass.note(Err(failure("first")));
        pass.count(1);
        let mut device = Repaired::default();
        device.note(Ok::<_, BackendError>(3));
        device.fail(failure("second"));
        pass.merge(device);
        assert_eq!(pass.restored, 6);
        assert_eq!(
            pass.error.map(|e| e.to_string()),
            Some("Backend config: first".to_string())
        );
    }

    #[test]
    fn a_clean_pass_has_no_error() {
        let mut pass = Repaired::default();
        pass.merge(Repaired::default());
        pass.note(Ok::<_, BackendError>(0));
        assert_eq!(pass.restored, 0);
        assert!(pass.error.is_none());
    }
}
