//! Real Nix: the build options the tests need, builds through the hook, fresh store paths, and store paths
//! prepared the way the engine hands them to a backend.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use nixpush::backend::NarFile;
use nixpush::config::Compression;
use nixpush::hash::Sha256Hash;
use nixpush::narinfo::{self, NarInfo};
use nixpush::signing::SecretKey;
use nixpush::store_path::StorePath;

use super::daemon::{TestEnv, HOOK};
use super::process::output;

/// Options every Nix build in the tests needs when run as root without a daemon.
pub const NIX_OPTIONS: [&str; 6] = [
    "--option",
    "build-users-group",
    "",
    "--option",
    "sandbox",
    "false",
];

/// A string no earlier test run has used, so that Nix really builds.
pub fn fresh_nonce() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `tests/fixtures/hooktest.nix`.
pub fn hooktest_nix() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hooktest.nix")
}

/// A real build of `hooktest.nix` (two derivations, three outputs) with `nixpush-hook` as post-build-hook.
pub struct HookBuild {
    /// nix-build's output.
    pub output: Output,
    /// All outputs of both derivations, as Nix reports them.
    pub outputs: Vec<String>,
}

impl HookBuild {
    /// nix-build's stderr.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
}

/// Builds `hooktest.nix` with a fresh nonce, running the hook with `env`'s socket and spool.
pub fn nix_build_with_hook(env: &TestEnv) -> HookBuild {
    let nonce = fresh_nonce();
    let output = output(
        Command::new("nix-build")
            .arg(hooktest_nix())
            .args(["--argstr", "nonce", &nonce])
            .args(NIX_OPTIONS)
            .args(["--option", "substituters", ""])
            .args(["--option", "post-build-hook", HOOK])
            .arg("--no-out-link")
            .envs(env.hook_env()),
    );
    let drv = nix(&[
        "nix-instantiate",
        hooktest_nix().to_str().unwrap(),
        "--argstr",
        "nonce",
        &nonce,
    ]);
    let drvs: Vec<String> = nix(&["nix-store", "--query", "--requisites", drv.trim()])
        .lines()
        .filter(|l| l.ends_with(".drv"))
        .map(str::to_owned)
        .collect();
    assert_eq!(drvs.len(), 2, "{drvs:?}");
    let mut args = vec!["nix-store", "--query", "--outputs"];
    args.extend(drvs.iter().map(String::as_str));
    let outputs = nix(&args).lines().map(str::to_owned).collect();
    HookBuild { output, outputs }
}

/// Runs a Nix command that must succeed and returns its stdout.
pub fn nix(args: &[&str]) -> String {
    let output = output(Command::new(args[0]).args(&args[1..]));
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The store path the Nix expression `expr` evaluates to, with what it makes (`builtins.toFile`) written to the
/// store.
pub fn eval_to_store(expr: &str) -> String {
    let out = nix(&["nix-instantiate", "--eval", "--read-write-mode", "-E", expr]);
    out.trim().trim_matches('"').to_owned()
}

/// `nix-store --query FLAG PATH` (`--requisites`, `--references`, ...), one path an element.
pub fn store_query(flag: &str, path: &str) -> Vec<String> {
    nix(&["nix-store", "--query", flag, path])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `count` new, distinct, real store paths (`nix-store --add` of small files).
pub fn add_store_paths(count: usize) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let nonce = fresh_nonce();
    let files: Vec<PathBuf> = (0..count)
        .map(|i| {
            let file = dir.path().join(format!("nixpush-test-{i}"));
            fs::write(&file, format!("{nonce} {i}\n")).unwrap();
            file
        })
        .collect();
    let mut args = vec!["nix-store".to_owned(), "--add".to_owned()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let paths: Vec<String> = nix(&args).lines().map(str::to_owned).collect();
    assert_eq!(paths.len(), count);
    paths
}

/// A store path that is well-formed but does not exist.
pub fn missing_store_path() -> String {
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    let seed = fresh_nonce();
    let hash: String = (0..32)
        .map(|i| {
            let byte = seed.as_bytes()[i % seed.len()] as usize + i * 7;
            alphabet[byte % 32] as char
        })
        .collect();
    format!("/nix/store/{hash}-nixpush-test-missing")
}

/// Runs `cmd`, which must succeed, and returns its trimmed stdout.
fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Builds a fresh two-derivation closure (`<tag>-dep` ← `<tag>-top`, with a deriver and references) plus an
/// added file of `big_bytes` random bytes, and returns every path, references first.
pub fn build_paths(dir: &Path, tag: &str, big_bytes: usize) -> Vec<String> {
    let nonce: u64 = rand::random();
    let expr = dir.join(format!("{tag}.nix"));
    std::fs::write(
        &expr,
        format!(
            "let dep = derivation {{ name = \"{tag}-dep\"; system = builtins.currentSystem; builder = \"/bin/sh\";\n\
             args = [\"-c\" \"echo {nonce} > $out\"]; }};\n\
             in derivation {{ name = \"{tag}-top\"; system = builtins.currentSystem; builder = \"/bin/sh\";\n\
             args = [\"-c\" \"echo ${{dep}} > $out\"]; }}\n"
        ),
    )
    .unwrap();
    let top = run(Command::new("nix-build")
        .arg(&expr)
        .arg("--no-out-link")
        .args(NIX_OPTIONS)
        .args(["--option", "substituters", ""]));
    let top = top.lines().last().unwrap().to_owned();
    let mut paths: Vec<String> = run(Command::new("nix-store").args(["-q", "--requisites", &top]))
        .lines()
        .map(str::to_owned)
        .collect();
    let big = dir.join(format!("{tag}-big-{nonce}"));
    let bytes: Vec<u8> = (0..big_bytes).map(|_| rand::random::<u8>()).collect();
    std::fs::write(&big, bytes).unwrap();
    paths.push(run(Command::new("nix-store").arg("--add").arg(&big)));
    paths
}

/// A path ready to upload: what the engine would hand a backend.
pub struct Prepared {
    pub narinfo: NarInfo,
    pub file: tempfile::NamedTempFile,
    pub size: u64,
    pub sha256: Sha256Hash,
}

impl Prepared {
    pub fn nar(&self) -> NarFile<'_> {
        NarFile {
            path: self.file.path(),
            size: self.size,
            sha256: self.sha256,
        }
    }
}

/// The NAR of `path` from `nix-store --dump`, compressed, described by a narinfo built from `nix-store -q` and
/// signed with `key`.
pub fn prepare(path: &str, compression: Compression, key: Option<&SecretKey>) -> Prepared {
    let nar = output(Command::new("nix-store").args(["--dump", path])).stdout;
    let nar_hash = Sha256Hash::of(&nar);
    assert_eq!(
        nar_hash.to_typed_base32(),
        run(Command::new("nix-store").args(["-q", "--hash", path]))
    );
    let compressed = match compression {
        Compression::Zstd => zstd::encode_all(&nar[..], 3).unwrap(),
        Compression::Xz => {
            let mut out = Vec::new();
            let mut encoder = xz2::write::XzEncoder::new(&mut out, 6);
            std::io::Write::write_all(&mut encoder, &nar).unwrap();
            encoder.finish().unwrap();
            out
        }
        Compression::None => nar.clone(),
    };
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &compressed).unwrap();
    let sha256 = Sha256Hash::of(&compressed);
    let store_path = StorePath::parse(path, "/nix/store").unwrap();
    let references = run(Command::new("nix-store").args(["-q", "--references", path]))
        .lines()
        .map(|r| StorePath::parse(r, "/nix/store").unwrap())
        .collect();
    let deriver = run(Command::new("nix-store").args(["-q", "--deriver", path]));
    let mut narinfo = NarInfo {
        store_path,
        url: narinfo::nar_url(&sha256, compression),
        compression: compression.narinfo_name().to_owned(),
        file_hash: Some(sha256),
        file_size: Some(compressed.len() as u64),
        nar_hash,
        nar_size: nar.len() as u64,
        references,
        deriver: (deriver != "unknown-deriver")
            .then(|| StorePath::parse(&deriver, "/nix/store").unwrap()),
        sigs: Vec::new(),
        ca: None,
    };
    if let Some(key) = key {
        narinfo.sign(key);
    }
    Prepared {
        narinfo,
        file,
        size: compressed.len() as u64,
        sha256,
    }
}

/// [`prepare`] for each of `paths`.
pub fn prepare_all(
    paths: &[String],
    compression: Compression,
    key: Option<&SecretKey>,
) -> Vec<Prepared> {
    paths.iter().map(|p| prepare(p, compression, key)).collect()
}
