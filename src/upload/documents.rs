//! The documents that complete a cache around one uploaded path: its NAR listing and its deriver's build log
//! before the narinfo, its realisations (signed) after it, so a reader never finds a realisation whose output
//! path the cache lacks. What a target cannot take ([`Backend::cannot_store`]) is skipped.

use std::sync::Arc;

use crate::backend::documents::Document;
use crate::backend::{Backend, DocumentBytes};
use crate::narinfo::NarInfo;
use crate::realisation::Realisation;
use crate::store_path::StorePath;

use super::{Engine, Error};

/// How many derivations' logs the engine remembers as sent, so the outputs of one derivation send it once.
const LOGS_REMEMBERED: usize = 10_000;

impl<B: Backend + 'static> Engine<B> {
    fn can_store(&self, document: Document) -> bool {
        !self.backend.cannot_store().contains(&document)
    }

    /// Whether NAR listings should be built for this target.
    pub(super) fn wants_listing(&self) -> bool {
        self.settings.write_nar_listing && self.can_store(Document::NarListing)
    }

    /// The listing and the build log, which must be in place before the narinfo announces the path: once the
    /// narinfo is there the path counts as present and nothing would send them later.
    pub(super) async fn put_before_narinfo(
        &self,
        narinfo: &NarInfo,
        listing: Option<&str>,
    ) -> Result<(), Error> {
        if let Some(listing) = listing.filter(|_| self.wants_listing()) {
            self.backend
                .put_document(DocumentBytes::listing(&narinfo.store_path, listing))
                .await?;
        }
        if let Some(drv) = narinfo
            .deriver
            .as_ref()
            .filter(|_| self.settings.upload_logs && self.can_store(Document::BuildLog))
        {
            self.put_log(drv).await?;
        }
        Ok(())
    }

    async fn put_log(&self, drv: &StorePath) -> Result<(), Error> {
        if self.lock_logs_sent().contains(drv) {
            return Ok(());
        }
        let (dir, drv_owned) = (self.settings.nix_log_dir.clone(), drv.clone());
        let log = tokio::task::spawn_blocking(move || crate::buildlog::read(&dir, &drv_owned))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        // No log (the derivation was substituted, or built on another machine): nothing to send.
        if let Some(log) = log {
            self.backend
                .put_document(DocumentBytes::build_log(drv, log))
                .await?;
        }
        let mut sent = self.lock_logs_sent();
        if sent.len() >= LOGS_REMEMBERED {
            sent.clear();
        }
        sent.insert(drv.clone());
        Ok(())
    }

    fn lock_logs_sent(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<StorePath>> {
        // A set of names stays consistent even if a holder panicked.
        self.logs_sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The realisations whose output is `path`, signed with every key, with the signatures Nix holds kept.
    async fn signed_realisations(&self, path: &StorePath) -> Result<Vec<Realisation>, Error> {
        if !self.can_store(Document::Realisation) {
            return Ok(Vec::new());
        }
        let (store, path) = (Arc::clone(&self.store), path.clone());
        let mut found = tokio::task::spawn_blocking(move || store.realisations(&path))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let keys = self.signing_keys();
        for realisation in &mut found {
            for key in &keys {
                realisation.sign(key);
            }
        }
        Ok(found)
    }

    /// After the narinfo: the path's realisations.
    pub(super) async fn put_after_narinfo(&self, narinfo: &NarInfo) -> Result<(), Error> {
        for realisation in self.signed_realisations(&narinfo.store_path).await? {
            self.backend
                .put_document(DocumentBytes::realisation(&realisation))
                .await?;
        }
        Ok(())
    }

    /// For a path the target already has: sends any of its realisations the target lacks, so a realisation
    /// whose upload failed after its narinfo is not lost. Costs one local query, and a request per realisation
    /// only for content-addressed outputs.
    pub(super) async fn put_missing_realisations(&self, path: &StorePath) -> Result<(), Error> {
        for realisation in self.signed_realisations(path).await? {
            let document = DocumentBytes::realisation(&realisation);
            if self.backend.get_document(&document.key).await?.is_none() {
                self.backend.put_document(document).await?;
            }
        }
        Ok(())
    }
}
