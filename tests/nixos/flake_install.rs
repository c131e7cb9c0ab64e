//! The flake package installs shell completions and manual pages (#19): its `postInstall` run with the binary
//! under test as `$out/bin/nixpush` and small stand-ins for nixpkgs' installShellFiles hooks.

use std::fs;
use std::process::Command;

use serde_json::Value;

use super::{fixtures, output, strings, succeed, NIXPUSH};

/// installShellFiles' two functions, reduced to where they put files.
const INSTALL_SHELL_FILES: &str = r#"
installShellCompletion() {
  local name=
  while [ $# -gt 0 ]; do
    case "$1" in
      --cmd) name=$2; shift 2 ;;
      --bash) install -Dm644 "$2" "$out/share/bash-completion/completions/$name.bash"; shift 2 ;;
      --zsh) install -Dm644 "$2" "$out/share/zsh/site-functions/_$name"; shift 2 ;;
      --fish) install -Dm644 "$2" "$out/share/fish/vendor_completions.d/$name.fish"; shift 2 ;;
      *) echo "installShellCompletion: unexpected $1" >&2; return 1 ;;
    esac
  done
}
installManPage() { for page in "$@"; do install -Dm644 "$page" "$out/share/man/man1/$(basename "$page")"; done; }
"#;

// See: #19
#[test]
fn flake_package_installs_completions_and_man_pages() {
    let flake: Value = serde_json::from_str(&succeed(
        Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json"])
            .arg(fixtures().join("eval-flake.nix")),
    ))
    .unwrap();
    let package = &flake["package"];
    assert_eq!(
        strings(&package["nativeBuildInputs"]),
        ["install-shell-files"]
    );
    // check-config at build time runs the build platform's nixpush.
    assert_eq!(flake["module"]["buildPackageName"], package["name"]);
    let post_install = package["postInstall"].as_str().unwrap();
    assert!(!post_install.is_empty(), "a native build installs them");

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir_all(out.join("bin")).unwrap();
    fs::copy(NIXPUSH, out.join("bin/nixpush")).unwrap();
    let build = tmp.path().join("build");
    fs::create_dir(&build).unwrap();
    let run = output(
        Command::new("bash")
            .args([
                "-eo",
                "pipefail",
                "-c",
                &format!("{INSTALL_SHELL_FILES}\n{post_install}"),
            ])
            .current_dir(&build)
            .env("out", &out),
    );
    assert!(
        run.status.success(),
        "postInstall failed:\n{post_install}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for file in [
        "share/bash-completion/completions/nixpush.bash",
        "share/zsh/site-functions/_nixpush",
        "share/fish/vendor_completions.d/nixpush.fish",
        "share/man/man1/nixpush.1",
        "share/man/man1/nixpush-push.1",
        "share/man/man1/nixpush-status.1",
    ] {
        let meta = fs::metadata(out.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(meta.len() > 100, "{file} is nearly empty");
    }
    succeed(
        Command::new("bash")
            .arg("-n")
            .arg(out.join("share/bash-completion/completions/nixpush.bash")),
    );
}
