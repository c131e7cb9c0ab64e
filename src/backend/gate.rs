//! When a path's narinfo may be written. A backend stores the NAR as soon as it is ready, then asks the path's
//! [`NarinfoGate`] before it writes (or, for Cachix, completes) the narinfo; the engine opens the gate once the
//! narinfos of the path's references are in the cache. So the NARs of a chain go up side by side while the cache
//! still never holds a narinfo whose references it lacks: a NAR without its narinfo is invisible to Nix.

use tokio::sync::oneshot;

use super::Error;

/// What a backend asks before writing a narinfo.
#[derive(Debug)]
pub struct NarinfoGate {
    stored: Option<oneshot::Sender<()>>,
    open: Option<oneshot::Receiver<()>>,
}

/// Resolves when the backend has stored the NAR (see [`NarStored::wait`]).
#[derive(Debug)]
pub struct NarStored(oneshot::Receiver<()>);

/// Lets the narinfo be written; dropped unopened, the narinfo is never written.
#[derive(Debug)]
pub struct Opener(oneshot::Sender<()>);

impl NarinfoGate {
    /// A gate that is open from the start: the path's references are in the cache already (or it has none).
    pub fn open() -> NarinfoGate {
        NarinfoGate {
            stored: None,
            open: None,
        }
    }

    /// A closed gate, the signal that the NAR is stored, and what opens the gate.
    pub fn closed() -> (NarinfoGate, NarStored, Opener) {
        let (stored_tx, stored_rx) = oneshot::channel();
        let (open_tx, open_rx) = oneshot::channel();
        let gate = NarinfoGate {
            stored: Some(stored_tx),
            open: Some(open_rx),
        };
        (gate, NarStored(stored_rx), Opener(open_tx))
    }

    /// Says the NAR is stored and waits until the narinfo may be written. [`Error::Interrupted`]: it may not
    /// (a reference failed, or the batch was given up), and the backend must not write it.
    pub async fn nar_stored(&mut self) -> Result<(), Error> {
        if let Some(stored) = self.stored.take() {
            let _ = stored.send(());
        }
        match self.open.take() {
            None => Ok(()),
            Some(open) => open.await.map_err(|_| Error::Interrupted),
        }
    }
}

impl NarStored {
    /// `true` once the NAR is stored; `false` when the upload ended before that.
    pub async fn wait(self) -> bool {
        self.0.await.is_ok()
    }
}

impl Opener {
    /// The references' narinfos are in: the narinfo may be written.
    pub fn open(self) {
        // The upload may have failed meanwhile; then nobody is waiting.
        let _ = self.0.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_open_gate_never_waits() {
        NarinfoGate::open().nar_stored().await.unwrap();
    }

    #[tokio::test]
    async fn a_closed_gate_says_the_nar_is_stored_and_waits_for_the_opener() {
        let (mut gate, stored, opener) = NarinfoGate::closed();
        let backend = tokio::spawn(async move { gate.nar_stored().await });
        assert!(stored.wait().await);
        assert!(!backend.is_finished());
        opener.open();
        backend.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_gate_whose_opener_is_dropped_refuses_the_narinfo() {
        let (mut gate, stored, opener) = NarinfoGate::closed();
        drop(opener);
        assert!(matches!(gate.nar_stored().await, Err(Error::Interrupted)));
        assert!(stored.wait().await);
    }

    #[tokio::test]
    async fn an_upload_that_ends_before_its_nar_is_stored_says_so() {
        let (gate, stored, _opener) = NarinfoGate::closed();
        drop(gate);
        assert!(!stored.wait().await);
    }
}
