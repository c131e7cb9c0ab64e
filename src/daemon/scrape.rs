//! The daemon's `/metrics` endpoint: binds `metrics_listen` at start, builds each scrape from [`Shared`] (the
//! status report, the queue's backlog and the counters), and binds a changed address on reload.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::listen::{self, Bound};
use crate::metrics::{scrape, server};

use super::Shared;

/// The running endpoint's control: a new listener (or none) for the server task.
pub(super) struct Endpoint {
    rebind: mpsc::UnboundedSender<Option<Bound>>,
}

/// Binds `metrics_listen` if it is set and starts serving it; the server task runs until `stop`, also when nothing
/// is bound yet, so that a reload can start it.
pub(super) fn start(
    shared: &Arc<Shared>,
    stop: CancellationToken,
) -> Result<Endpoint, listen::Error> {
    let bound = match &shared.config().metrics_listen {
        Some(address) => {
            let bound = listen::bind(address)?;
            tracing::info!("serving metrics on {}", bound.describe());
            Some(bound)
        }
        None => None,
    };
    let (rebind, changes) = mpsc::unbounded_channel();
    tokio::spawn(server::serve(
        bound,
        changes,
        scrape_of(Arc::clone(shared)),
        stop,
    ));
    Ok(Endpoint { rebind })
}

impl Endpoint {
    /// Serves `new` instead of `old` (both `metrics_listen` values). The new address is bound first; when it
    /// cannot be, the old one stays and the value to keep is returned.
    pub(super) fn reload(&self, old: &Option<String>, new: &Option<String>) -> Option<String> {
        if old == new {
            return new.clone();
        }
        let bound = match new {
            None => None,
            Some(address) => match listen::bind(address) {
                Ok(bound) => Some(bound),
                Err(e) => {
                    tracing::error!("{e}; the metrics endpoint stays as it was");
                    return old.clone();
                }
            },
        };
        if self.rebind.send(bound).is_err() {
            tracing::warn!("the metrics server has stopped; metrics_listen changes take effect after a restart");
            return old.clone();
        }
        new.clone()
    }
}

fn scrape_of(shared: Arc<Shared>) -> server::Scrape {
    Arc::new(move || {
        let backlogs = shared
            .lanes
            .iter()
            .map(|lane| (lane.name.clone(), lane.queue.backlog()))
            .collect();
        let report = shared.report().map_err(|e| e.to_string())?;
        let (daemon, targets) = scrape::blocks(&report, &backlogs, crate::queue::now_ms());
        Ok(scrape::render(&daemon, &targets, &shared.metrics))
    })
}
