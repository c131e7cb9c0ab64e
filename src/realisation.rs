//! Realisations: which output path a content-addressed derivation's output resolved to, as Nix's binary caches
//! store them in `realisations/<id>.doi`.
//!
//! ```text
//! {"dependentRealisations":{"sha256:e2ab…53f8!out":"4y55…cbqac-ca-dep"},
//!  "id":"sha256:c1a1…aee7!out","outPath":"aqki…rzkn-ca-top","signatures":["cache-1:…"]}
//! ```
//!
//! The id is the derivation's hash modulo (hex SHA-256) and the output name. Keys are in the order Nix's JSON
//! library writes them (sorted), and a signature covers the compact JSON without `signatures`, which is what
//! `nix copy` writes and checks. Where the rows come from is [`crate::pathinfo`]'s business.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::signing::{PublicKey, SecretKey};

/// One realisation document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Realisation {
    /// Other realisations this one was built from, id → output path base name.
    pub dependent_realisations: BTreeMap<String, String>,
    /// `sha256:<hex>!<output>`.
    pub id: String,
    /// The output path's base name (`<hash>-<name>`).
    pub out_path: String,
    /// `name:base64` signatures, sorted.
    pub signatures: Vec<String>,
}

/// The part of a realisation a signature covers.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Signed<'a> {
    dependent_realisations: &'a BTreeMap<String, String>,
    id: &'a str,
    out_path: &'a str,
}

impl Realisation {
    /// The document as Nix writes it.
    pub fn to_json(&self) -> String {
        // Serialising plain strings and maps cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// What a signature signs: the compact JSON without `signatures`.
    pub fn fingerprint(&self) -> String {
        serde_json::to_string(&Signed {
            dependent_realisations: &self.dependent_realisations,
            id: &self.id,
            out_path: &self.out_path,
        })
        .unwrap_or_default()
    }

    /// Adds `key`'s signature, replacing one made under the same key name; keeps the list sorted as Nix does.
    pub fn sign(&mut self, key: &SecretKey) {
        let sig = key.sign(self.fingerprint().as_bytes());
        self.signatures
            .retain(|s| s.split_once(':').map(|(name, _)| name) != Some(key.name()));
        self.signatures.push(sig);
        self.signatures.sort();
        self.signatures.dedup();
    }

    /// Whether a signature by `key` verifies.
    pub fn verify(&self, key: &PublicKey) -> bool {
        let fingerprint = self.fingerprint();
        self.signatures
            .iter()
            .any(|s| key.verify(fingerprint.as_bytes(), s))
    }

    /// Where it lives in a cache.
    pub fn key(&self) -> String {
        crate::backend::documents::realisation_key(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_fingerprint_as_nix_writes_them() {
        // Written by `nix copy` (Nix 2.8, ca-derivations) for a content-addressed derivation with one dependency.
        let nix = r#"{"dependentRealisations":{"sha256:e2ab84efa95b94f9992ead366ffe226af6a683c0d3bdbc392f6c56bce52853f8!out":"4y55a41ddayz07zyjrwc8p42258cbqac-ca-dep"},"id":"sha256:c1a16cd3a04e2df5309913373e1f30ecc147be9e16131dc6b8e87f6ffe68aee7!out","outPath":"aqkij5s7wh30fwd7rdlkh2cpnbwirzkn-ca-top","signatures":[]}"#;
        let parsed: Realisation = serde_json::from_str(nix).unwrap();
        assert_eq!(parsed.to_json(), nix);
        assert_eq!(parsed.fingerprint(), nix.replace(r#","signatures":[]"#, ""));
        let key = crate::signing::generate("test-1");
        let mut signed = parsed.clone();
        signed.sign(&key);
        signed.sign(&key);
        assert_eq!(signed.signatures.len(), 1);
        assert!(signed.verify(&key.public_key()));
        assert!(signed.key().starts_with("realisations/sha256:c1a1"));
    }
}
