//! Complete caches (#20): NAR listings, build logs, realisations, nix-cache-info fields and signatures, each read
//! back by real Nix 2.8 and compared with what Nix's own `nix copy` / `nix store copy-log` write for the same
//! paths.
// See: #20

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::harness::cache::{hash_part, narinfo_file};
use crate::remote::nix_key;
use crate::util::{fresh_nonce, nix, TestEnv, NIX_OPTIONS};

const FEATURES: [&str; 4] = [
    "--extra-experimental-features",
    "nix-command",
    "--extra-experimental-features",
    "ca-derivations",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Runs `nix ARGS` with the experimental features these tests need, substituters off.
fn nix_cmd(args: &[&str]) -> Output {
    Command::new("nix")
        .args(FEATURES)
        .args(["--option", "substituters", ""])
        .args(args)
        .output()
        .unwrap()
}

fn nix_ok(args: &[&str]) -> String {
    let out = nix_cmd(args);
    assert!(
        out.status.success(),
        "nix {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Builds `fixture` with a fresh nonce; returns (derivation of the top, every output of the closure, the
/// derivations).
fn build(fixture_name: &str) -> (String, Vec<String>, Vec<String>) {
    let nonce = fresh_nonce();
    let expr = fixture(fixture_name);
    let out = Command::new("nix-build")
        .arg(&expr)
        .args(["--argstr", "nonce", &nonce])
        .args(NIX_OPTIONS)
        .args(FEATURES)
        .args(["--option", "substituters", "", "--no-out-link"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix-build {fixture_name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let drv = nix(&[
        "nix-instantiate",
        expr.to_str().unwrap(),
        "--argstr",
        "nonce",
        &nonce,
        "--extra-experimental-features",
        "ca-derivations",
    ])
    .trim()
    .to_owned();
    let outputs: Vec<String> = nix(&["nix-store", "--query", "--requisites", &top])
        .lines()
        .filter(|p| p.contains("complete-"))
        .map(str::to_owned)
        .collect();
    let drvs = nix(&["nix-store", "--query", "--requisites", &drv])
        .lines()
        .filter(|p| p.ends_with(".drv") && p.contains("complete-"))
        .map(str::to_owned)
        .collect();
    (drv, outputs, drvs)
}

fn push(env: &TestEnv, target: &str, paths: &[&str]) -> Output {
    env.write_config_with("", target);
    let mut args = vec!["push"];
    args.extend_from_slice(paths);
    let out = env.nixpush(&args);
    assert!(
        out.status.success(),
        "nixpush push: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The output of `outputs` whose name ends with `name`.
fn output<'a>(outputs: &'a [String], name: &str) -> &'a str {
    outputs
        .iter()
        .find(|p| p.ends_with(name))
        .unwrap_or_else(|| panic!("no {name} in {outputs:?}"))
}

/// What Nix itself writes for `paths` (with NAR listings) and the logs of `drvs`, in `env`'s `reference/`.
fn nix_reference(env: &TestEnv, paths: &[&str], drvs: &[String]) -> PathBuf {
    let reference = env.dir.path().join("reference");
    let reference_url = format!("file://{}?write-nar-listing=true", reference.display());
    let mut args = vec!["copy", "--to", &reference_url];
    args.extend_from_slice(paths);
    nix_ok(&args);
    for d in drvs {
        nix_ok(&["store", "copy-log", "--to", &reference_url, d]);
    }
    reference
}

/// A realisation document without its signatures, which differ by key.
fn unsigned(mut doc: serde_json::Value) -> serde_json::Value {
    doc.as_object_mut().unwrap().remove("signatures");
    doc
}

/// `nix store verify` of `top`'s closure in the cache at `url` passes with `public` as the only trusted key.
fn assert_verifies_under(url: &str, public: &str, top: &str) {
    let out = nix_cmd(&[
        "store",
        "verify",
        "--store",
        url,
        "--sigs-needed",
        "1",
        "--option",
        "trusted-public-keys",
        public.trim(),
        "-r",
        top,
    ]);
    assert!(
        out.status.success(),
        "verify with {public}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh store under `dir` that has only the derivation `drv` substitutes `top` from `url`, which without
/// building (max-jobs 0) it can only do through the realisations.
fn assert_substitutes_through_realisations(
    dir: &Path,
    url: &str,
    public: &str,
    drv: &str,
    top: &str,
) {
    let fresh = dir.join("fresh");
    let fresh_store = fresh.to_str().unwrap();
    nix_ok(&["copy", "--to", fresh_store, "--derivation", drv]);
    let mut args = vec![
        "build",
        "--store",
        fresh_store,
        "--option",
        "substituters",
        url,
        "--option",
        "trusted-public-keys",
        public.trim(),
        "--max-jobs",
        "0",
        "--no-link",
        drv,
    ];
    args.extend(NIX_OPTIONS);
    let out = Command::new("nix")
        .args(FEATURES)
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix build from {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fresh.join(&top[1..]).exists(), "{top} not substituted");
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

#[test]
fn listings_and_logs_are_what_nix_writes_and_nix_reads_them() {
    let env = TestEnv::new();
    let (drv, outputs, drvs) = build("complete.nix");
    assert_eq!(outputs.len(), 2, "{outputs:?}");
    let top = output(&outputs, "complete-top");
    let cache = env.cache_dir();
    push(
        &env,
        &format!(
            "url = \"file://{}\"\nwrite_nar_listing = true\nupload_logs = true",
            cache.display()
        ),
        &[top],
    );

    // The reference: what Nix itself writes for the same paths.
    let reference = nix_reference(&env, &[top], &drvs);

    for path in &outputs {
        let name = format!("{}.ls", hash_part(path));
        assert_eq!(
            json(&cache.join(&name)),
            json(&reference.join(&name)),
            "listing of {path}"
        );
        // Nix reads the tree back from the cache.
        let listed = nix_ok(&[
            "store",
            "ls",
            "--store",
            &format!("file://{}", cache.display()),
            "-R",
            path,
        ]);
        assert!(!listed.is_empty(), "{path}");
    }
    let tree = output(&outputs, "complete-tree");
    let listing = json(&cache.join(format!("{}.ls", hash_part(tree))));
    assert_eq!(listing["root"]["entries"]["file"]["executable"], true);
    assert_eq!(listing["root"]["entries"]["link"]["target"], "file");

    assert_eq!(drvs.len(), 2, "{drvs:?}");
    for d in &drvs {
        let base = Path::new(d).file_name().unwrap();
        let ours = fs::read(cache.join("log").join(base)).unwrap();
        let nixs = fs::read(reference.join("log").join(base)).unwrap();
        assert_eq!(ours, nixs, "log of {d}");
        assert!(
            String::from_utf8_lossy(&ours).contains("building the"),
            "{d}"
        );
    }
    // `nix log --store` follows the output's Deriver to the log (Nix 2.8 cannot read a .drv the cache lacks,
    // so it is asked by output path).
    let log = nix_ok(&[
        "log",
        "--store",
        &format!("file://{}", cache.display()),
        top,
    ]);
    assert!(log.contains("building the top"), "{log}");
    assert!(drv.ends_with("complete-top.drv"));
}

#[test]
fn narinfos_keep_nix_signatures_and_add_one_per_key() {
    let env = TestEnv::new();
    let keys = env.dir.path();
    let (main_sec, main_pub) = nix_key(keys, "complete-main-1");
    let (extra_sec, extra_pub) = nix_key(keys, "complete-extra-1");
    let (nix_sec, nix_pub) = nix_key(keys, "complete-nix-1");
    let (_, outputs, _) = build("complete.nix");
    let top = output(&outputs, "complete-top");
    // A signature in Nix's database (ValidPaths.sigs), as a path substituted from a signed cache has.
    nix_ok(&[
        "store",
        "sign",
        "--key-file",
        nix_sec.to_str().unwrap(),
        "-r",
        top,
    ]);
    let cache = env.cache_dir();
    let url = format!("file://{}", cache.display());
    push(
        &env,
        &format!(
            "url = \"{url}\"\nsigning_key_file = \"{}\"\nsigning_key_files = [\"{}\"]",
            main_sec.display(),
            extra_sec.display()
        ),
        &[top],
    );
    for path in &outputs {
        let sigs = nix_ok(&["path-info", "--sigs", "--store", &url, path]);
        for name in ["complete-main-1:", "complete-extra-1:", "complete-nix-1:"] {
            assert!(sigs.contains(name), "{path}: {name} missing in {sigs}");
        }
    }
    // Each key alone is enough for Nix to trust every path.
    for public in [&main_pub, &extra_pub, &nix_pub] {
        assert_verifies_under(&url, public, top);
    }
}

#[test]
fn resign_existing_adds_our_signature_and_leaves_the_nar_alone() {
    let env = TestEnv::new();
    let (sec, public) = nix_key(env.dir.path(), "complete-resign-1");
    let (_, outputs, _) = build("complete.nix");
    let top = output(&outputs, "complete-top");
    let cache = env.cache_dir();
    let url = format!("file://{}", cache.display());
    // Nix wrote the cache, unsigned.
    nix_ok(&["copy", "--to", &format!("{url}?compression=zstd"), top]);
    let nar_files = |dir: &Path| -> BTreeMap<String, (u64, i64, Vec<u8>)> {
        fs::read_dir(dir.join("nar"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    (meta.ino(), meta.mtime_nsec(), fs::read(e.path()).unwrap()),
                )
            })
            .collect()
    };
    let nars_before = nar_files(&cache);
    let target = format!("url = \"{url}\"\nsigning_key_file = \"{}\"", sec.display());

    // Without resign_existing, a present path is left as it is.
    push(&env, &target, &[top]);
    let sigs = nix_ok(&["path-info", "--sigs", "--store", &url, top]);
    assert!(!sigs.contains("complete-resign-1:"), "{sigs}");

    push(&env, &format!("{target}\nresign_existing = true"), &[top]);
    for path in &outputs {
        let sigs = nix_ok(&["path-info", "--sigs", "--store", &url, path]);
        assert!(sigs.contains("complete-resign-1:"), "{path}: {sigs}");
    }
    assert_eq!(nar_files(&cache), nars_before, "NARs were rewritten");
    assert_verifies_under(&url, &public, top);
}

#[test]
fn realisations_let_nix_substitute_content_addressed_builds() {
    let env = TestEnv::new();
    let (sec, public) = nix_key(env.dir.path(), "complete-ca-1");
    let (drv, outputs, _) = build("complete-ca.nix");
    assert_eq!(outputs.len(), 2, "{outputs:?}");
    let top = output(&outputs, "complete-ca-top");
    let cache = env.cache_dir();
    let url = format!("file://{}", cache.display());
    push(
        &env,
        &format!("url = \"{url}\"\nsigning_key_file = \"{}\"", sec.display()),
        &[top],
    );

    // Every realisation Nix's `nix copy` writes for the build, nixpush wrote too, identical but for the
    // signatures, which verify with our key.
    let reference = env.dir.path().join("reference");
    nix_ok(&[
        "copy",
        "--to",
        &format!("file://{}", reference.display()),
        &drv,
    ]);
    let key = nixpush::signing::PublicKey::parse(public.trim()).unwrap();
    let docs: Vec<PathBuf> = fs::read_dir(reference.join("realisations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(docs.len(), 2, "{docs:?}");
    for doc in docs {
        let name = doc.file_name().unwrap();
        let theirs = json(&doc);
        let ours = json(&cache.join("realisations").join(name));
        let realisation: nixpush::realisation::Realisation =
            serde_json::from_value(ours.clone()).unwrap();
        assert!(
            realisation.verify(&key),
            "{name:?} is not signed by our key"
        );
        assert_eq!(unsigned(ours), unsigned(theirs), "{name:?}");
    }
    assert_substitutes_through_realisations(env.dir.path(), &url, &public, &drv, top);
}

#[test]
fn nix_cache_info_fields_are_written_once_and_a_different_one_is_reported() {
    let env = TestEnv::new();
    let paths = crate::util::add_store_paths(1);
    let cache = env.cache_dir();
    let url = format!("file://{}", cache.display());
    let target = format!("url = \"{url}\"\npriority = 30\nwant_mass_query = true");
    push(&env, &target, &[&paths[0]]);
    let written = fs::read_to_string(cache.join("nix-cache-info")).unwrap();
    assert_eq!(
        written,
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
    );

    // Someone else's nix-cache-info is left alone, and doctor says how it differs.
    let theirs = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";
    fs::write(cache.join("nix-cache-info"), theirs).unwrap();
    let more = crate::util::add_store_paths(1);
    push(&env, &target, &[&more[0]]);
    assert_eq!(
        fs::read_to_string(cache.join("nix-cache-info")).unwrap(),
        theirs
    );
    let doctor = env.nixpush(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout).into_owned()
        + &String::from_utf8_lossy(&doctor.stderr);
    assert!(
        text.contains("Priority is 40 but target.priority asks for 30"),
        "{text}"
    );
    assert_eq!(
        fs::read_to_string(cache.join("nix-cache-info")).unwrap(),
        theirs
    );
}

#[test]
fn cachix_targets_say_what_their_api_cannot_take() {
    let env = TestEnv::new();
    env.write_config_with(
        "",
        "url = \"cachix://demo\"\ncachix_api = \"http://127.0.0.1:1\"\nupload_logs = true\n\
         write_nar_listing = true",
    );
    let out = env.nixpush(&["check-config", env.config_path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for phrase in [
        "cannot take",
        "build logs (asked for by target.upload_logs: ignored)",
        "NAR listings (asked for by target.write_nar_listing: ignored)",
        "realisations",
    ] {
        assert!(stderr.contains(phrase), "{phrase}: {stderr}");
    }
    let doctor = env.nixpush(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(text.contains("cannot take build logs"), "{text}");
}

/// Pushes both fixtures with every document switched on to `target` (the body of `[target]`, `envs` for the
/// daemon's environment), then has Nix read each kind of document back through `read_url`.
fn remote_cache_is_complete(read_url: &str, target: &str, envs: &[(&str, &str)]) {
    let env = TestEnv::new();
    let (sec, public) = nix_key(env.dir.path(), "complete-remote-1");
    let (_, outputs, drvs) = build("complete.nix");
    let (ca_drv, ca_outputs, _) = build("complete-ca.nix");
    let top = output(&outputs, "complete-top");
    let tree = output(&outputs, "complete-tree");
    let ca_top = output(&ca_outputs, "complete-ca-top");
    env.write_config_with(
        "",
        &format!(
            "{target}\nsigning_key_file = \"{}\"\nwrite_nar_listing = true\nupload_logs = true",
            sec.display()
        ),
    );
    let out = Command::new(crate::util::NIXPUSH)
        .arg("--config")
        .arg(&env.config_path)
        .args(["push", top, ca_top])
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nixpush push: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let log = nix_ok(&["log", "--store", read_url, top]);
    assert!(log.contains("building the top"), "{log}");
    let listed = nix_ok(&["store", "ls", "--store", read_url, "-R", tree]);
    assert!(
        listed.contains("link") && listed.contains("empty"),
        "{listed}"
    );
    let sigs = nix_ok(&["path-info", "--sigs", "--store", read_url, top]);
    assert!(sigs.contains("complete-remote-1:"), "{sigs}");

    // The documents as served equal what Nix writes for the same paths.
    let reference = nix_reference(&env, &[top, &ca_drv], &drvs);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let get = |key: &str| -> Vec<u8> {
        runtime.block_on(async {
            let response = reqwest::get(format!("{read_url}/{key}")).await.unwrap();
            assert!(
                response.status().is_success(),
                "{key}: {}",
                response.status()
            );
            response.bytes().await.unwrap().to_vec()
        })
    };
    for path in &outputs {
        let key = format!("{}.ls", hash_part(path));
        let served: serde_json::Value = serde_json::from_slice(&get(&key)).unwrap();
        assert_eq!(served, json(&reference.join(&key)), "{key}");
    }
    for d in &drvs {
        let key = format!(
            "log/{}",
            Path::new(d).file_name().unwrap().to_string_lossy()
        );
        assert_eq!(get(&key), fs::read(reference.join(&key)).unwrap(), "{key}");
    }
    for doc in fs::read_dir(reference.join("realisations")).unwrap() {
        let doc = doc.unwrap().path();
        let key = format!(
            "realisations/{}",
            doc.file_name().unwrap().to_string_lossy()
        );
        let served: serde_json::Value = serde_json::from_slice(&get(&key)).unwrap();
        assert_eq!(unsigned(served), unsigned(json(&doc)), "{key}");
    }

    assert_substitutes_through_realisations(env.dir.path(), read_url, &public, &ca_drv, ca_top);
}

#[test]
fn an_http_cache_holds_every_document_and_nix_reads_them() {
    let root = tempfile::tempdir().unwrap();
    let nginx = crate::nginx::Nginx::start(root.path(), "");
    remote_cache_is_complete(&nginx.url(), &format!("url = \"{}\"", nginx.url()), &[]);
}

#[test]
fn an_s3_bucket_holds_every_document_and_nix_reads_them() {
    let bucket = "nixpush-complete";
    let server = crate::remote::PyServer::start("s3_server.py", &["--bucket", bucket]);
    remote_cache_is_complete(
        &format!("{}/{bucket}", server.base()),
        &format!(
            "url = \"s3://{bucket}?endpoint={}&region=us-east-1\"",
            server.base()
        ),
        &[
            ("AWS_ACCESS_KEY_ID", "AKCOMPLETE"),
            ("AWS_SECRET_ACCESS_KEY", "complete-s3cr3t"),
        ],
    );
}

#[test]
fn resign_existing_without_a_key_is_refused_naming_the_field() {
    let env = TestEnv::new();
    env.write_config_with(
        "",
        &format!(
            "url = \"file://{}\"\nresign_existing = true",
            env.cache_dir().display()
        ),
    );
    let out = env.nixpush(&["check-config", env.config_path.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("target.resign_existing") && stderr.contains("signing_key_file"),
        "{stderr}"
    );
}

#[test]
fn resign_existing_leaves_a_narinfo_that_differs_from_the_store_alone_and_says_so() {
    let env = TestEnv::new();
    let (sec, _) = nix_key(env.dir.path(), "complete-mismatch-1");
    let paths = crate::util::add_store_paths(1);
    let cache = env.cache_dir();
    let url = format!("file://{}", cache.display());
    nix_ok(&["copy", "--to", &url, &paths[0]]);
    let narinfo = narinfo_file(&cache, &paths[0]);
    // A narinfo that claims another size: signing it would vouch for bytes nobody checked.
    let damaged: String = fs::read_to_string(&narinfo)
        .unwrap()
        .lines()
        .map(|l| match l.strip_prefix("NarSize: ") {
            Some(n) => format!("NarSize: {}\n", n.parse::<u64>().unwrap() + 8),
            None => format!("{l}\n"),
        })
        .collect();
    fs::write(&narinfo, &damaged).unwrap();
    env.write_config_with(
        "",
        &format!(
            "url = \"{url}\"\nsigning_key_file = \"{}\"\nresign_existing = true",
            sec.display()
        ),
    );
    let out = env.nixpush(&["push", &paths[0]]);
    assert!(
        !out.status.success(),
        "a damaged narinfo must not pass silently"
    );
    assert_eq!(fs::read_to_string(&narinfo).unwrap(), damaged);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("does not match the local store") && said.contains("NarSize"),
        "{said}"
    );
}
