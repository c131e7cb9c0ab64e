//! Ed25519 keys in Nix's `name:base64` form (and Cachix's bare base64 secret), and signatures over narinfo
//! fingerprints.
//!
//! `nix-store --generate-binary-cache-key nixpush-test-1 test-key.sec test-key.pub` writes, without trailing
//! newlines, a secret key `nixpush-test-1:<base64 of seed ‖ public key, 64 bytes>` and a public key
//! `nixpush-test-1:<base64 of 32 bytes>`; a signature is `nixpush-test-1:<base64 of 64 bytes>`.
//!
//! Key material never reaches a log line or an error message: errors name the file or say which part of the
//! format is wrong, and `Debug` prints the key name only.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use crate::excerpt::excerpt;
use crate::secret::Secret;

/// Standard alphabet; encodes with `=` padding as Nix does, decodes with or without it (people trim keys).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a key could not be used. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A secret key is malformed. `reason` describes the format problem, not the content.
    #[error("invalid secret key{}: {reason}", origin_suffix(.origin))]
    InvalidSecretKey {
        /// The file it came from, if any.
        origin: Option<PathBuf>,
        /// What is wrong, e.g. "decodes to 32 bytes, expected 64".
        reason: String,
    },
    /// A public key is malformed.
    #[error("invalid public key {key:?}: {reason}")]
    InvalidPublicKey {
        /// The offending text (public, so it can be shown), shortened if very long.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

fn origin_suffix(origin: &Option<PathBuf>) -> String {
    match origin {
        Some(path) => format!(" in {}", path.display()),
        None => String::new(),
    }
}

fn secret_error(reason: impl Into<String>) -> Error {
    Error::InvalidSecretKey {
        origin: None,
        reason: reason.into(),
    }
}

/// An Ed25519 secret key with its Nix key name (e.g. `cache.example.org-1`).
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Parses Nix's `name:base64(seed ‖ public key)`, tolerating surrounding whitespace. Checks that the stored
    /// public half matches the one derived from the seed, which catches truncated or mangled keys.
    pub fn parse(text: &str) -> Result<SecretKey, Error> {
        let text = text.trim();
        let (name, b64) = text.split_once(':').ok_or_else(|| {
            secret_error(
                "expected NAME:BASE64 (as written by nix-store --generate-binary-cache-key)",
            )
        })?;
        validate_name(name).map_err(secret_error)?;
        let key = signing_key_from_base64(b64)?;
        Ok(SecretKey {
            name: name.to_owned(),
            key,
        })
    }

    /// Parses the value of Cachix's `CACHIX_SIGNING_KEY`: bare base64 of the same 64 bytes, named `name`. A Nix
    /// `name:base64` key is accepted too and keeps its own name. Unlike Cachix's client, which decodes leniently,
    /// this rejects stray characters and wrong lengths.
    pub fn parse_cachix(text: &str, name: &str) -> Result<SecretKey, Error> {
        let text = text.trim();
        if text.is_empty() {
            return Err(secret_error("a signing key must not be empty"));
        }
        if text.contains(':') {
            return SecretKey::parse(text);
        }
        validate_name(name).map_err(secret_error)?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: signing_key_from_base64(text)?,
        })
    }

    /// Reads a Nix secret key file. Warns (naming the file) when group or others may read it.
    pub fn load(path: &Path) -> Result<SecretKey, Error> {
        let text = read_key_file(path)?;
        SecretKey::parse(text.expose()).map_err(|e| in_file(e, path))
    }

    /// Reads every file of `signing_key_files`, in order; the first that fails is the error.
    pub fn load_all(paths: &[std::path::PathBuf]) -> Result<Vec<SecretKey>, Error> {
        paths.iter().map(|p| SecretKey::load(p)).collect()
    }

    /// Reads a key file holding either form [`SecretKey::parse_cachix`] accepts.
    pub fn load_cachix(path: &Path, name: &str) -> Result<SecretKey, Error> {
        let text = read_key_file(path)?;
        SecretKey::parse_cachix(text.expose(), name).map_err(|e| in_file(e, path))
    }

    /// The key name that prefixes signatures.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Signs `msg` and returns `name:base64(signature)`, the value of a narinfo `Sig:` line.
    pub fn sign(&self, msg: &[u8]) -> String {
        format!("{}:{}", self.name, self.sign_base64(msg))
    }

    /// Signs `msg` and returns the base64 signature without a name (Cachix's `cSig`).
    pub fn sign_base64(&self, msg: &[u8]) -> String {
        BASE64.encode(self.sign_raw(msg))
    }

    /// The raw 64-byte Ed25519 signature of `msg`.
    pub fn sign_raw(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }

    /// The matching public key, with the same name.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// The key in Nix's file format, `name:base64(seed ‖ public key)`, for writing a generated key file.
    pub fn to_nix_string(&self) -> Secret {
        Secret::new(format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        ))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Generates a fresh key named `name` from the OS random number generator.
pub fn generate(name: &str) -> SecretKey {
    use rand::RngCore as _;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    SecretKey {
        name: name.to_owned(),
        key: SigningKey::from_bytes(&seed),
    }
}

/// An Ed25519 public key with its Nix key name, as listed in `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Parses `name:base64(32 bytes)`, tolerating surrounding whitespace.
    pub fn parse(text: &str) -> Result<PublicKey, Error> {
        let text = text.trim();
        let invalid = |reason: &str| Error::InvalidPublicKey {
            key: excerpt(text),
            reason: reason.to_owned(),
        };
        let (name, b64) = text
            .split_once(':')
            .ok_or_else(|| invalid("expected NAME:BASE64"))?;
        validate_name(name).map_err(invalid)?;
        let bytes = BASE64
            .decode(b64)
            .map_err(|_| invalid("the part after the colon is not base64"))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| invalid(&format!("decodes to {} bytes, expected 32", b.len())))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| invalid("not a valid Ed25519 public key"))?;
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Base64 of the 32 key bytes without the name (what Cachix's `POST …/key` takes).
    pub fn key_base64(&self) -> String {
        BASE64.encode(self.key.to_bytes())
    }

    /// Whether `sig` (`name:base64`) is this key's signature of `msg`. A different name is `false`.
    pub fn verify(&self, msg: &[u8], sig: &str) -> bool {
        match sig.split_once(':') {
            Some((name, b64)) if name == self.name => self.verify_base64(msg, b64),
            _ => false,
        }
    }

    /// Whether `b64` (a bare base64 signature) is this key's signature of `msg`.
    pub fn verify_base64(&self, msg: &[u8], b64: &str) -> bool {
        let Ok(bytes) = BASE64.decode(b64) else {
            return false;
        };
        let Ok(bytes) = <[u8; 64]>::try_from(bytes) else {
            return false;
        };
        // Strict verification rejects malleable signatures and weak keys, as libsodium (used by Nix) does.
        self.key
            .verify_strict(msg, &Signature::from_bytes(&bytes))
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    /// `name:base64`, the form `trusted-public-keys` takes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.key_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("the key name before the colon is empty");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the key name contains whitespace or control characters");
    }
    Ok(())
}

fn signing_key_from_base64(b64: &str) -> Result<SigningKey, Error> {
    let bytes = BASE64
        .decode(b64)
        .map_err(|_| secret_error("the key is not valid base64"))?;
    let bytes: [u8; 64] = bytes.try_into().map_err(|b: Vec<u8>| {
        let hint = if b.len() == 32 {
            " (this is a public key; the file must hold the secret key that \
                 nix-store --generate-binary-cache-key wrote beside it)"
        } else {
            ""
        };
        secret_error(format!("decodes to {} bytes, expected 64{hint}", b.len()))
    })?;
    // `from_keypair_bytes` checks that the public half is the one derived from the seed.
    SigningKey::from_keypair_bytes(&bytes)
        .map_err(|_| secret_error("the public half does not match the seed (corrupt key?)"))
}

fn read_key_file(path: &Path) -> Result<Secret, Error> {
    let read_error = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    warn_if_exposed(path, &meta);
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    if let Some((_, key)) = text.split_once(':') {
        crate::secret::remember(key);
    }
    Ok(Secret::new(text))
}

#[cfg(unix)]
fn warn_if_exposed(path: &Path, meta: &std::fs::Metadata) {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{:o}", mode & 0o777),
            "secret key file is readable by group or others; restrict it with chmod 600"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_exposed(_path: &Path, _meta: &std::fs::Metadata) {}

fn in_file(e: Error, path: &Path) -> Error {
    match e {
        Error::InvalidSecretKey { reason, .. } => Error::InvalidSecretKey {
            origin: Some(path.to_owned()),
            reason,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: &str = include_str!("../tests/fixtures/vectors/test-key.sec");
    const PUB: &str = include_str!("../tests/fixtures/vectors/test-key.pub");

    #[test]
    fn nix_key_pair_matches() {
        let sk = SecretKey::parse(SEC).unwrap();
        assert_eq!(sk.name(), "nixpush-test-1");
        assert_eq!(sk.public_key().to_string(), PUB);
        assert_eq!(PublicKey::parse(PUB).unwrap(), sk.public_key());
        assert_eq!(sk.to_nix_string().expose(), SEC);
    }

    #[test]
    fn trailing_whitespace_tolerated() {
        assert!(SecretKey::parse(&format!("{SEC}\n")).is_ok());
        assert!(PublicKey::parse(&format!("  {PUB} \n")).is_ok());
    }

    #[test]
    fn sign_and_verify() {
        let sk = SecretKey::parse(SEC).unwrap();
        let pk = sk.public_key();
        let sig = sk.sign(b"msg");
        assert!(sig.starts_with("nixpush-test-1:"));
        assert!(pk.verify(b"msg", &sig));
        assert!(!pk.verify(b"msh", &sig));
        assert!(!pk.verify(b"msg", &sig.replace("nixpush-test-1", "other")));
        assert!(!pk.verify(b"msg", "nixpush-test-1:AAAA"));
        assert!(!pk.verify(b"msg", "garbage"));
        assert!(pk.verify_base64(b"msg", &sk.sign_base64(b"msg")));
        let other = generate("nixpush-test-1");
        assert!(!other.public_key().verify(b"msg", &sig));
    }

    #[test]
    fn cachix_bare_base64() {
        let b64 = SEC.split_once(':').unwrap().1;
        let sk = SecretKey::parse_cachix(&format!(" {b64}\n"), "mycache.cachix.org-1").unwrap();
        assert_eq!(sk.name(), "mycache.cachix.org-1");
        let nix = SecretKey::parse(SEC).unwrap();
        assert_eq!(sk.sign_raw(b"x"), nix.sign_raw(b"x"));
        // The Nix form keeps its own name.
        assert_eq!(
            SecretKey::parse_cachix(SEC, "mycache.cachix.org-1")
                .unwrap()
                .name(),
            "nixpush-test-1"
        );
        assert!(SecretKey::parse_cachix("", "n").is_err());
        assert!(SecretKey::parse_cachix(&format!("{b64}!"), "n").is_err());
        assert!(SecretKey::parse_cachix(&b64[..40], "n").is_err());
    }

    #[test]
    fn errors_never_contain_key_material() {
        let b64 = SEC.split_once(':').unwrap().1;
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        bytes[40] ^= 1;
        let mangled = format!(
            "n:{}",
            base64::engine::general_purpose::STANDARD.encode(&bytes)
        );
        for bad in [
            mangled.as_str(),
            b64,
            &format!(":{b64}"),
            &format!("n:{}", &b64[..50]),
            &format!("n:{b64}x"),
        ] {
            let msg = SecretKey::parse(bad).unwrap_err().to_string();
            assert!(!msg.contains(&b64[..20]), "{msg}");
            assert!(!msg.contains(&bad[bad.len().min(10)..]), "{msg}");
        }
        let sk = SecretKey::parse(SEC).unwrap();
        assert_eq!(
            format!("{sk:?}"),
            "SecretKey { name: \"nixpush-test-1\", .. }"
        );
    }

    #[test]
    fn load_names_file_and_checks_content() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.sec");
        std::fs::write(&path, SEC).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(SecretKey::load(&path).unwrap().name(), "nixpush-test-1");
        std::fs::write(&path, "n:bm90IGEga2V5").unwrap();
        let msg = SecretKey::load(&path).unwrap_err().to_string();
        assert!(msg.contains("key.sec"), "{msg}");
        assert!(!msg.contains("bm90IGEga2V5"), "{msg}");
        let missing = SecretKey::load(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"));
    }

    #[test]
    fn exposed_key_file_warns_naming_file_only() {
        use std::os::unix::fs::PermissionsExt as _;
        use std::sync::{Arc, Mutex};

        #[derive(Clone, Default)]
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exposed.sec");
        std::fs::write(&path, SEC).unwrap();
        for (mode, warns) in [(0o640, true), (0o604, true), (0o600, false), (0o400, false)] {
            let capture = Capture::default();
            let writer = capture.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            tracing::subscriber::with_default(subscriber, || {
                SecretKey::load(&path).unwrap();
            });
            let log = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
            assert_eq!(log.contains("exposed.sec"), warns, "mode {mode:o}: {log}");
            assert!(!log.contains(&SEC[20..40]), "{log}");
        }
    }

    #[test]
    fn public_key_errors() {
        for bad in [
            "",
            "nokey",
            ":AAAA",
            "n:AAAA",
            "n:!!!!",
            &format!("n:{}", BASE64.encode([0u8; 31])),
        ] {
            assert!(PublicKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_keys_round_trip() {
        let sk = generate("k-1");
        let back = SecretKey::parse(sk.to_nix_string().expose()).unwrap();
        assert_eq!(back.public_key(), sk.public_key());
        assert_ne!(generate("k-1").public_key(), sk.public_key());
    }
}
