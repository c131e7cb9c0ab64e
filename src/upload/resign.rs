//! `resign_existing`: a path the target already has, whose narinfo carries no signature by any of our keys, gets
//! its narinfo rewritten with our signatures added (and the existing ones kept); the NAR is not sent again.
//!
//! Only a narinfo that describes the same bytes as the local store (NarHash, NarSize, references) is signed:
//! nixpush vouches for what it has checked, never for what a target claims, and a mismatch fails the path so the
//! damage shows in `status` and `push`.

use crate::backend::documents::{self, Document};
use crate::backend::{Backend, DocumentBytes};
use crate::narinfo::NarInfo;
use crate::pathinfo::PathInfo;

use super::{Engine, Error};

/// What re-signing did to one path.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Resigned {
    /// Our signature was already there, or re-signing is off.
    Unchanged,
    /// The narinfo was rewritten with our signatures.
    Signed,
    /// The target's narinfo does not match the local store; left alone.
    Mismatch(String),
}

impl<B: Backend + 'static> Engine<B> {
    /// Re-signs `info`'s narinfo in the target when it lacks our signature.
    pub(super) async fn resign_if_unsigned(&self, info: &PathInfo) -> Result<Resigned, Error> {
        let keys = self.signing_keys();
        if !self.settings.resign_existing
            || keys.is_empty()
            || self.backend.cannot_store().contains(&Document::Resign)
        {
            return Ok(Resigned::Unchanged);
        }
        let key = documents::narinfo_key(&info.path);
        let Some(bytes) = self.backend.get_document(&key).await? else {
            // Gone between the presence query and now; the next batch uploads it.
            return Ok(Resigned::Unchanged);
        };
        let text = String::from_utf8_lossy(&bytes);
        let mut narinfo = match NarInfo::parse(&text, self.store.store_dir()) {
            Ok(n) => n,
            Err(e) => return Ok(Resigned::Mismatch(format!("unreadable narinfo: {e}"))),
        };
        let mut references = narinfo.references.clone();
        references.sort();
        if narinfo.store_path != info.path
            || narinfo.nar_hash != info.nar_hash
            || narinfo.nar_size != info.nar_size
            || references != info.references
        {
            return Ok(Resigned::Mismatch(
                "its NarHash, NarSize or References differ from the local store".to_owned(),
            ));
        }
        if keys.iter().all(|k| narinfo.verify(&k.public_key())) {
            return Ok(Resigned::Unchanged);
        }
        let kept = std::mem::take(&mut narinfo.sigs);
        narinfo.add_signatures(keys.iter().map(|k| k.as_ref()), &kept);
        self.backend
            .put_document(DocumentBytes::narinfo(&narinfo))
            .await?;
        Ok(Resigned::Signed)
    }
}
