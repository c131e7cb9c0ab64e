//! SIGHUP: the configuration file read again and applied where it can be without a restart.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{scrape, Shared};
use crate::config::Config;
use crate::systemd;

/// Re-reads the configuration file on SIGHUP. A file that does not load is refused and the old configuration
/// stays; `socket` and `state_dir` only change with a restart; a changed `metrics_listen` is bound anew.
pub(super) async fn reload_on_signal(
    shared: Arc<Shared>,
    mut reload: tokio::sync::mpsc::UnboundedReceiver<()>,
    config_path: Option<PathBuf>,
    stop: CancellationToken,
    metrics_endpoint: scrape::Endpoint,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            request = reload.recv() => if request.is_none() { return },
        }
        let Some(path) = config_path.clone() else {
            tracing::warn!(
                "reload requested, but the daemon was started without a configuration file"
            );
            continue;
        };
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        let mut new = match loaded {
            Ok(Ok(config)) => config,
            Ok(Err(e)) => {
                tracing::error!("refusing the new configuration, keeping the old one: {e}");
                continue;
            }
            Err(e) => {
                tracing::error!("configuration reload failed: {e}");
                continue;
            }
        };
        let old = shared.config();
        if new.socket != old.socket || new.state_dir != old.state_dir {
            tracing::warn!("`socket` and `state_dir` changes take effect after a restart");
            new.socket = old.socket.clone();
            new.state_dir = old.state_dir.clone();
        }
        if new.gc_roots_dir != old.gc_roots_dir || new.gc_roots_max_bytes != old.gc_roots_max_bytes
        {
            tracing::warn!(
                "`gc_roots_dir` and `gc_roots_max_bytes` changes take effect after a restart"
            );
            new.gc_roots_dir = old.gc_roots_dir.clone();
            new.gc_roots_max_bytes = old.gc_roots_max_bytes;
        }
        if new.upload_priority != old.upload_priority {
            tracing::warn!("`upload_priority` changes take effect after a restart");
            new.upload_priority = old.upload_priority;
        }
        if new.target_names() != old.target_names() {
            tracing::error!(
                "refusing the new configuration, keeping the old one: it names the targets {}, the daemon runs {}; \
                 adding, removing or renaming targets takes a restart (systemctl restart nixpush)",
                new.target_names().join(", "),
                old.target_names().join(", ")
            );
            continue;
        }
        new.metrics_listen = metrics_endpoint.reload(&old.metrics_listen, &new.metrics_listen);
        // At once, for uploads in flight too; each scheduler's next engine shares its lane's limiter.
        for lane in &shared.lanes {
            lane.apply_rate(&new);
        }
        shared.replace_config(new);
        // Each scheduler rebuilds its engine for the new configuration, re-reading the token and key.
        for lane in &shared.lanes {
            lane.work_available.notify_one();
        }
        tracing::info!("configuration reloaded");
        let _ = systemd::notify(&format!("STATUS={}", shared.status_line()));
    }
}
