//! Upstream caches (`upstream = ["https://cache.nixos.org"]`): read-only caches nixpush never writes to, asked
//! whether they already serve a path so that it need not be uploaded. One `HEAD <base>/<hash>.narinfo` per
//! path, 16 at a time; a cache that cannot be reached counts as not having the path (uploading is always safe).

use std::collections::HashSet;
use std::time::Duration;

use futures_util::stream::StreamExt;
use reqwest::StatusCode;

use crate::store_path::StorePath;

use super::http::{client, send, status_error};
use super::Error;

/// How many narinfo queries one upstream gets at once.
const PARALLEL_QUERIES: usize = 16;

/// The upstream caches of a configuration.
#[derive(Debug, Clone)]
pub struct Upstreams {
    client: reqwest::Client,
    bases: Vec<String>,
}

impl Upstreams {
    /// Upstream caches at `bases` (binary cache URLs).
    pub fn new(bases: Vec<String>) -> Result<Upstreams, Error> {
        Ok(Upstreams {
            client: client(Duration::from_secs(10))?,
            bases,
        })
    }

    /// The paths among `paths` some upstream serves. Each upstream is asked only about what the ones before it
    /// lack; the first failure of each is logged.
    pub async fn serving(&self, paths: &[StorePath]) -> HashSet<StorePath> {
        let mut found = HashSet::new();
        for base in &self.bases {
            let unknown: Vec<StorePath> = paths
                .iter()
                .filter(|p| !found.contains(*p))
                .cloned()
                .collect();
            let client = &self.client;
            let answers: Vec<(StorePath, Result<bool, Error>)> =
                futures_util::stream::iter(unknown)
                    .map(|path| async move {
                        let has = cache_has(client, base, &path).await;
                        (path, has)
                    })
                    .buffer_unordered(PARALLEL_QUERIES)
                    .collect()
                    .await;
            let mut warned = false;
            for (path, answer) in answers {
                match answer {
                    Ok(true) => {
                        found.insert(path);
                    }
                    Ok(false) => {}
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!(upstream = %base, "upstream cache unavailable, uploading instead: {e}");
                    }
                    Err(_) => {}
                }
            }
        }
        found
    }
}

/// Asks a read-only binary cache (an upstream such as cache.nixos.org) whether it serves `path`.
async fn cache_has(client: &reqwest::Client, base: &str, path: &StorePath) -> Result<bool, Error> {
    let url = format!(
        "{}/{}.narinfo",
        base.trim_end_matches('/'),
        path.hash_part()
    );
    let response = send(client.head(&url), "HEAD", &url).await?;
    match response.status() {
        s if s.is_success() => Ok(true),
        StatusCode::NOT_FOUND | StatusCode::FORBIDDEN | StatusCode::GONE => Ok(false),
        _ => Err(status_error("HEAD", &url, response).await),
    }
}
