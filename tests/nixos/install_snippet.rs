//! README.md's "On other distributions" snippet, run as pasted into a scratch root (#19): the commands come from
//! README.md itself, so the README and this test cannot drift apart. Absolute paths are moved under the scratch
//! root, `systemd-sysusers`/`systemd-tmpfiles` get `--root`, and only what needs a running system (`systemctl`,
//! `nixpush doctor`) or a release build (`cargo build`) is stood in for.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use nixpush::config::Config;

use super::{output, repo, succeed, NIXPUSH, NIXPUSH_HOOK};

/// The shell block under README.md's "### On other distributions".
fn readme_snippet() -> String {
    let readme = fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split("### On other distributions")
        .nth(1)
        .expect("README.md has an \"On other distributions\" section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the section has a ```sh block");
    block.to_owned()
}

/// Moves every absolute path of the system (`/etc/…`, `/usr/…`, `/var/…`) under `$ROOT`.
fn under_root(snippet: &str) -> String {
    let mut out = String::new();
    for line in snippet.lines() {
        let mut moved = String::new();
        let mut previous = ' ';
        let mut rest = line;
        while let Some(c) = rest.chars().next() {
            let at_path = c == '/'
                && (previous.is_whitespace() || previous == '\'' || previous == '"')
                && ["/etc/", "/usr/", "/var/"]
                    .iter()
                    .any(|p| rest.starts_with(p));
            if at_path {
                moved.push_str("$ROOT");
            }
            moved.push(c);
            previous = c;
            rest = &rest[c.len_utf8()..];
        }
        out.push_str(&moved);
        out.push('\n');
    }
    out
}

/// Stand-ins for what needs a running system, and `install -g NAME` resolved in the scratch root's group file.
const PRELUDE: &str = r#"
cargo() { echo "cargo $*" >> "$ROOT/stood-in.log"; }
systemctl() { echo "systemctl $*" >> "$ROOT/stood-in.log"; }
systemd-sysusers() { command systemd-sysusers --root="$ROOT" "$@"; }
systemd-tmpfiles() { command systemd-tmpfiles --root="$ROOT" "$@"; }
nixpush() {
  if [ "$1" = doctor ]; then echo "nixpush $*" >> "$ROOT/stood-in.log"; else command "$NIXPUSH" "$@"; fi
}
install() {
  local args=() group=
  while [ $# -gt 0 ]; do
    case "$1" in
      -g) group=$(awk -F: -v n="$2" '$1 == n { print $3 }' "$ROOT/etc/group"); args+=(-g "$group"); shift 2 ;;
      *) args+=("$1"); shift ;;
    esac
  done
  command install "${args[@]}"
}
"#;

fn id_of(root: &Path, file: &str, name: &str) -> u32 {
    let text = fs::read_to_string(root.join(file)).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {file}:\n{text}"));
    line.split(':').nth(2).unwrap().parse().unwrap()
}

/// The credential names the service gets from its `LoadCredential=` lines, read in the scratch root the way
/// systemd reads them: a file gives its ID, a directory `ID_FILE` per file; a missing source is an error.
fn loaded_credentials(root: &Path, service: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for line in service.lines() {
        let Some(value) = line.strip_prefix("LoadCredential=") else {
            continue;
        };
        let (id, source) = value.split_once(':').unwrap();
        let path = root.join(source.trim_start_matches('/'));
        if path.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                names.push(format!(
                    "{id}_{}",
                    entry.unwrap().file_name().to_string_lossy()
                ));
            }
        } else if path.is_file() {
            names.push(id.to_owned());
        } else {
            return Err(format!(
                "LoadCredential={value}: {source} does not exist, so the unit would not start"
            ));
        }
    }
    Ok(names)
}

// See: #19
#[test]
fn readme_install_snippet_places_working_files() {
    let scratch = tempfile::tempdir().unwrap();
    // Traversable, so the service user can reach the config as it would at /etc.
    fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let root = scratch.path().join("root");
    for dir in ["etc/systemd/system", "etc/nix", "usr/local/bin", "var/lib"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    // A checkout: the systemd/ directory and a release build (the binaries under test).
    let checkout = scratch.path().join("checkout");
    fs::create_dir_all(checkout.join("target/release")).unwrap();
    succeed(
        Command::new("cp")
            .arg("-r")
            .arg(repo().join("systemd"))
            .arg(&checkout),
    );
    for (name, binary) in [("nixpush", NIXPUSH), ("nixpush-hook", NIXPUSH_HOOK)] {
        fs::copy(binary, checkout.join("target/release").join(name)).unwrap();
    }

    let snippet = readme_snippet();
    assert!(snippet.contains("systemctl enable"), "{snippet}");
    let script = format!("set -euo pipefail\n{PRELUDE}\n{}", under_root(&snippet));
    let out = output(
        Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(&checkout)
            .env("ROOT", &root)
            .env("NIXPUSH", NIXPUSH),
    );
    assert!(
        out.status.success(),
        "the README snippet failed:\n{script}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The binaries are where the unit runs them.
    for name in ["nixpush", "nixpush-hook"] {
        let meta = fs::metadata(root.join("usr/local/bin").join(name)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o755, "{name}");
    }

    // The config is readable by the service user (and nobody else), and valid.
    let uid = id_of(&root, "etc/passwd", "nixpush");
    let gid = id_of(&root, "etc/group", "nixpush");
    let config_path = root.join("etc/nixpush/config.toml");
    let meta = fs::metadata(&config_path).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o640, gid));
    let as_service = output(
        Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
            ])
            .arg(NIXPUSH)
            // The key files exist only inside the service (its credentials); they are checked above.
            .args(["check-config", "--skip-files"])
            .arg(&config_path),
    );
    assert!(
        as_service.status.success(),
        "the service user cannot use its config: {}",
        String::from_utf8_lossy(&as_service.stderr)
    );
    let config = Config::load(&config_path).unwrap();

    // The signing key was generated, root-only, and is what the config's signing_key_file will receive.
    let key = root.join("etc/nixpush/credentials/signing-key");
    assert_eq!(
        fs::metadata(&key).unwrap().mode() & 0o077,
        0,
        "the key is readable by others"
    );
    nixpush::signing::SecretKey::load(&key).expect("a valid Nix secret key");
    assert!(fs::read_to_string(root.join("etc/nixpush/signing-key.pub"))
        .unwrap()
        .contains(":"));
    let service = fs::read_to_string(root.join("etc/systemd/system/nixpush.service")).unwrap();
    let credentials = loaded_credentials(&root, &service).unwrap();
    let signing = config
        .target
        .signing_key_file
        .expect("the sample config signs");
    assert_eq!(
        signing.parent(),
        Some(Path::new("/run/credentials/nixpush.service"))
    );
    let name = signing.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        credentials.contains(&name),
        "{name} is not among the credentials {credentials:?}"
    );

    // Without a key (a target that needs none), the unit still has every credential source it names.
    fs::remove_file(&key).unwrap();
    assert_eq!(loaded_credentials(&root, &service), Ok(vec![]));

    // The units, pointing at the installed binaries, pass systemd-analyze verify.
    let units = scratch.path().join("units");
    fs::create_dir(&units).unwrap();
    fs::write(
        units.join("nixpush.service"),
        service.replace(
            "/usr/local/bin/",
            &format!("{}/usr/local/bin/", root.display()),
        ),
    )
    .unwrap();
    fs::copy(
        root.join("etc/systemd/system/nixpush.socket"),
        units.join("nixpush.socket"),
    )
    .unwrap();
    let verify = output(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no", "--generators=no"])
            .arg(units.join("nixpush.socket"))
            .arg(units.join("nixpush.service")),
    );
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && !stderr.lines().any(|l| l.contains("nixpush")),
        "{stderr}"
    );

    // Nix runs the hook, and the stood-in steps were the ones that need a running system.
    let nix_conf = fs::read_to_string(root.join("etc/nix/nix.conf")).unwrap();
    assert!(
        nix_conf.trim_end().ends_with("/usr/local/bin/nixpush-hook"),
        "{nix_conf}"
    );
    let stood_in = fs::read_to_string(root.join("stood-in.log")).unwrap();
    assert!(
        stood_in.contains("systemctl enable --now nixpush.socket nixpush.service"),
        "{stood_in}"
    );
}
