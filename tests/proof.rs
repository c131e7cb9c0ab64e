//! Nothing is lost: the daemon killed at random moments under a burst of hooks, a target that fails 30% of
//! requests, and a state directory that fills up or turns read-only. Every check ends by verifying each narinfo
//! in the cache against its NAR's bytes and the signing key.
//!
//! `NIXPUSH_PROOF_CYCLES` sets the crash loop's length (default 10); `scripts/proof-long` runs 100 cycles in a
//! release build. `NIXPUSH_PROOF_SEED` replays a run (the seed is printed).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use nixpush::hash::Sha256Hash;
use nixpush::narinfo::NarInfo;
use nixpush::signing::PublicKey;

use crate::harness::cache::{assert_nix_verifies, hash_part};
use crate::harness::faultproxy::Fault;
use crate::harness::keys::public_key;
use crate::harness::nix::{eval_to_store, store_query};
use crate::harness::process::{output, Guard};
use crate::harness::setup::{configure_signed_target, file_url, signed_target, HttpCache};
use crate::harness::tmpfs::Tmpfs;
use crate::util::{fresh_nonce, nix, TestDaemon, TestEnv};

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

/// Store paths a test made; deleted from the store on drop so long runs do not fill the disk.
struct StorePaths(Vec<String>);

impl Drop for StorePaths {
    fn drop(&mut self) {
        for chunk in self.0.chunks(200) {
            // Best effort: a path still referenced elsewhere stays.
            let _ = std::process::Command::new("nix-store")
                .arg("--delete")
                .args(chunk)
                .output();
        }
    }
}

/// Adds one file per size to the store; the contents are unique to this run and compress moderately.
fn add_sized_paths(dir: &Path, sizes: &[usize], rng: &mut StdRng) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let nonce = fresh_nonce();
    let files: Vec<String> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let mut text = String::with_capacity(size + 64);
            while text.len() < size {
                text.push_str(&format!("{nonce} {i} {:016x}\n", rng.gen::<u64>()));
            }
            let file = dir.join(format!("proof-{i}"));
            std::fs::write(&file, text).unwrap();
            file.display().to_string()
        })
        .collect();
    let mut args = vec!["nix-store", "--add"];
    args.extend(files.iter().map(String::as_str));
    let paths: Vec<String> = nix(&args).lines().map(str::to_owned).collect();
    assert_eq!(paths.len(), sizes.len());
    for file in &files {
        let _ = std::fs::remove_file(file);
    }
    paths
}

/// What the hook reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HookResult {
    /// Silent exit 0: the daemon acknowledged a durable enqueue.
    Acked,
    /// "saved the request to …": written to the spool.
    Spooled,
}

/// Classifies a finished hook; anything but an ack or a spool (a lost or refused request) fails the test.
fn hook_result(output: &Output, what: &str) -> HookResult {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "hook for {what} failed: {stderr}");
    if stderr.trim().is_empty() {
        HookResult::Acked
    } else if stderr.contains("saved the request to") {
        HookResult::Spooled
    } else {
        panic!("hook for {what} neither acknowledged nor spooled: {stderr}");
    }
}

/// Checks every narinfo in `dir`: its NAR exists, FileSize/FileHash match the file, NarSize/NarHash match the
/// decompressed bytes and the local store path, and the signature verifies under `key`. Returns the store paths.
fn verify_cache(dir: &Path, key: &PublicKey) -> BTreeSet<String> {
    let mut landed = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "narinfo") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let info = NarInfo::parse(&text, "/nix/store")
            .unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()));
        let name = path.file_stem().unwrap().to_str().unwrap();
        assert_eq!(info.store_path.hash_part(), name, "{text}");
        let file = std::fs::read(dir.join(&info.url))
            .unwrap_or_else(|e| panic!("{}: NAR {}: {e}", path.display(), info.url));
        assert_eq!(
            info.file_size,
            Some(file.len() as u64),
            "FileSize of {name}"
        );
        assert_eq!(
            info.file_hash,
            Some(Sha256Hash::of(&file)),
            "FileHash of {name}"
        );
        let nar = match info.compression.as_str() {
            "zstd" => zstd::decode_all(&file[..]).unwrap(),
            "none" => file,
            other => panic!("{name}: unexpected compression {other}"),
        };
        assert_eq!(info.nar_size, nar.len() as u64, "NarSize of {name}");
        assert_eq!(info.nar_hash, Sha256Hash::of(&nar), "NarHash of {name}");
        assert!(info.verify(key), "bad signature on {name}:\n{text}");
        if info.store_path.as_path().exists() {
            let (local_hash, local_size) =
                nixpush::nar::dump_hash(info.store_path.as_path()).unwrap();
            assert_eq!(
                (local_hash, local_size),
                (info.nar_hash, info.nar_size),
                "{name} differs from the local store"
            );
        }
        landed.insert(info.store_path.as_str().to_owned());
    }
    landed
}

/// When a cycle's SIGKILL comes, counted from the moment the hooks start.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// 0–15 ms: hooks are connecting, the daemon is writing and flushing their entries.
    Enqueue,
    /// 15–150 ms: hooks are done or finishing, workers stream, compress and write NARs and narinfos.
    Upload,
    /// 150–1300 ms: sled's periodic flush (every second) and the scheduler's end-of-batch flush.
    Flush,
}

#[test]
fn crash_loop_loses_nothing_acknowledged_or_spooled() {
    let cycles = env_number("NIXPUSH_PROOF_CYCLES", 10);
    let seed = env_number("NIXPUSH_PROOF_SEED", 0x5eed_0009);
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let env = TestEnv::new();
    configure_signed_target(&env, &file_url(&env), "");
    let key = PublicKey::parse(&public_key()).unwrap();
    let mut made = StorePaths(Vec::new());
    let mut handed_over: Vec<(String, HookResult)> = Vec::new();
    let mut kills = [0u32; 3];

    // Started once to create the state, then restarted at the top of every cycle.
    let mut daemon = TestDaemon::start_uploading(env);
    daemon.kill();
    let scratch = daemon.env.dir.path().join("scratch");
    for cycle in 0..cycles {
        // Fresh paths first, so that the kill timing is about the daemon, not about Nix.
        let hooks = rng.gen_range(4..=10);
        let sizes: Vec<usize> = (0..hooks)
            .map(|i| {
                if i == 0 {
                    rng.gen_range(512 << 10..=2 << 20)
                } else {
                    rng.gen_range(100..=64 << 10)
                }
            })
            .collect();
        let paths = add_sized_paths(&scratch, &sizes, &mut rng);
        made.0.extend(paths.iter().cloned());
        daemon.restart();
        let (point, delay) = match rng.gen_range(0..3) {
            0 => (KillPoint::Enqueue, rng.gen_range(0..15)),
            1 => (KillPoint::Upload, rng.gen_range(15..150)),
            _ => (KillPoint::Flush, rng.gen_range(150..1300)),
        };
        kills[point as usize] += 1;
        let children: Vec<_> = paths
            .iter()
            .map(|p| {
                Guard::spawn(
                    daemon
                        .env
                        .hook_command(&[p], None)
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped()),
                    "nixpush-hook",
                )
            })
            .collect();
        // The delay is the experiment (where the kill lands), not a wait for anything.
        std::thread::sleep(Duration::from_millis(delay));
        daemon.kill();
        for (child, path) in children.into_iter().zip(&paths) {
            let output = child.wait_with_output(crate::util::DEADLINE);
            handed_over.push((path.clone(), hook_result(&output, path)));
        }
        eprintln!(
            "proof: cycle {cycle}: {hooks} hooks, SIGKILL at {delay} ms ({point:?}), {} spool file(s) waiting",
            daemon.env.spool_files().len()
        );
    }

    // The final run: everything acknowledged or spooled must land.
    daemon.restart();
    let status = daemon.wait_drained();
    for field in ["queued", "in_flight", "failed", "spooled"] {
        assert_eq!(status[field], 0, "{field}: {status}");
    }
    daemon.stop();
    let landed = verify_cache(&daemon.env.cache_dir(), &key);
    let missing: Vec<_> = handed_over
        .iter()
        .filter(|(path, _)| !landed.contains(path))
        .collect();
    assert!(
        missing.is_empty(),
        "handed over but not in the cache: {missing:?}\n{}",
        daemon.log()
    );
    let cache_url = format!("file://{}", daemon.env.cache_dir().display());
    assert_nix_verifies(
        &cache_url,
        &public_key(),
        &landed.iter().cloned().collect::<Vec<_>>(),
    );
    let acked = handed_over
        .iter()
        .filter(|(_, r)| *r == HookResult::Acked)
        .count();
    let spooled = handed_over.len() - acked;
    // Where the kills landed, as the restarts saw it.
    let log = daemon.log();
    let interrupted: u64 = log
        .lines()
        .filter(|l| l.contains("requeued paths whose upload was interrupted"))
        .filter_map(|l| l.rsplit("requeued=").next()?.trim().parse::<u64>().ok())
        .sum();
    let imported = log.matches("imported spool file").count();
    eprintln!(
        "proof: crash loop: seed {seed:#x}, {cycles} cycles (SIGKILL during enqueue {}, upload {}, flush {}), \
         {} hooks: {acked} acked, {spooled} spooled; restarts requeued {interrupted} interrupted upload(s) and \
         imported {imported} spool file(s); {} paths landed and verified; {:.1} s",
        kills[0],
        kills[1],
        kills[2],
        handed_over.len(),
        landed.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        acked > 0,
        "no hook was ever acknowledged: the loop tested nothing"
    );
}

/// A closure of `leaves + 1` paths made without building: `leaves` text files, and a top file referring to all.
fn closure_of_text_files(leaves: usize) -> (String, Vec<String>) {
    let nonce = fresh_nonce();
    let expr = format!(
        r#"let
             leaf = i: builtins.toFile "proof-leaf-${{toString i}}"
               (builtins.concatStringsSep "" (builtins.genList (j: "${{toString j}} {nonce} ${{toString i}}\n") (200 * (i + 1))));
             leaves = builtins.genList leaf {leaves};
           in builtins.toFile "proof-top" (builtins.concatStringsSep "\n" leaves)"#
    );
    let top = eval_to_store(&expr);
    let closure = store_query("--requisites", &top);
    assert_eq!(closure.len(), leaves + 1, "{closure:?}");
    (top, closure)
}

#[test]
fn faults_on_the_wire_delay_but_lose_nothing() {
    let started = Instant::now();
    let env = TestEnv::new();
    let seed = env_number("NIXPUSH_PROOF_SEED", 0x5eed_0009);
    let faults = [
        Fault::ServerError,
        Fault::TooManyRequests,
        Fault::ResetMidBody,
        Fault::Stall,
    ];
    let http = HttpCache::with_faults(env.dir.path(), 0.3, &faults, Duration::from_secs(3), seed);
    // A stall outlasts the 1 s request timeout; per-path retries start at 100 ms so the test stays short.
    configure_signed_target(
        &env,
        &http.url(),
        "timeout_secs = 1\nretry_base_ms = 100\nmax_attempts = 50",
    );
    let (top, closure) = closure_of_text_files(24);
    let _made = StorePaths(closure.clone());
    let daemon = TestDaemon::start_uploading(env);
    assert_acked(&daemon, &top);
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");

    let key = PublicKey::parse(&public_key()).unwrap();
    let cache = http.dir();
    let landed = verify_cache(&cache, &key);
    for path in &closure {
        assert!(landed.contains(path), "{path} not in the cache");
    }
    assert_nix_verifies(
        &format!("file://{}", cache.display()),
        &public_key(),
        &closure,
    );
    // Attempts per path, from what the proxy saw: PUTs of the NAR and of the narinfo.
    let stats = &http.proxy.stats;
    let mut total_puts = 0;
    eprintln!("proof: attempts per path (PUT NAR + PUT narinfo; injected faults in brackets):");
    for path in &closure {
        let hash = hash_part(path);
        let info = NarInfo::parse(
            &std::fs::read_to_string(cache.join(format!("{hash}.narinfo"))).unwrap(),
            "/nix/store",
        )
        .unwrap();
        let (nar_puts, nar_faults) = stats.for_target(&format!("PUT /cache/{}", info.url));
        let (info_puts, info_faults) = stats.for_target(&format!("PUT /cache/{hash}.narinfo"));
        assert!(nar_puts >= 1 && info_puts >= 1, "{path}: no PUT seen");
        total_puts += nar_puts + info_puts;
        eprintln!(
            "proof:   {:>2} + {:>2} [{} + {}]  {}",
            nar_puts,
            info_puts,
            nar_faults,
            info_faults,
            info.store_path.name()
        );
    }
    let by_fault = stats.by_fault.lock().unwrap().clone();
    eprintln!(
        "proof: faults on the wire: {} paths landed and verified; {} requests, {} failed on purpose {by_fault:?}; \
         {total_puts} PUTs for {} paths; {:.1} s",
        closure.len(),
        stats.requests.load(std::sync::atomic::Ordering::SeqCst),
        stats.faults.load(std::sync::atomic::Ordering::SeqCst),
        2 * closure.len(),
        started.elapsed().as_secs_f64()
    );
    for fault in ["ServerError", "TooManyRequests", "ResetMidBody", "Stall"] {
        assert!(
            by_fault.get(fault).is_some_and(|n| *n > 0),
            "no {fault} injected: {by_fault:?}"
        );
    }
    assert!(
        total_puts > 2 * closure.len() as u64,
        "no PUT was ever retried"
    );
}

/// An environment whose state directory is `state`, with a signed `file://` target.
fn env_with_state_dir(state: &Path) -> TestEnv {
    let mut env = TestEnv::new();
    env.state_dir = state.join("state");
    env.spool_dir = env.state_dir.join("spool");
    env.write_config_with("", &signed_target(&env, &file_url(&env), ""));
    env
}

/// Restarts the stopped `daemon` uploading, waits until it drained, verifies the cache, and asserts that every
/// path in `expected` landed. Returns what landed.
fn upload_and_verify(daemon: &mut TestDaemon, expected: &[&String]) -> BTreeSet<String> {
    daemon.set_hold(false);
    daemon.restart();
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}");
    let landed = verify_cache(
        &daemon.env.cache_dir(),
        &PublicKey::parse(&public_key()).unwrap(),
    );
    for path in expected {
        assert!(landed.contains(*path), "{path} did not land: {landed:?}");
    }
    landed
}

/// A held daemon whose state directory is on a 32 MiB tmpfs of its own, and three fresh store paths for its hooks.
/// Fields drop in order: the daemon stops before the paths go and the tmpfs is unmounted.
struct SmallStateDir {
    daemon: TestDaemon,
    paths: Vec<String>,
    _made: StorePaths,
    tmpfs: Tmpfs,
}

impl SmallStateDir {
    fn start() -> SmallStateDir {
        let tmpfs = Tmpfs::mount("32m").expect("mount a tmpfs (the proof suite runs as root)");
        let env = env_with_state_dir(tmpfs.path());
        let paths = crate::util::add_store_paths(3);
        let made = StorePaths(paths.clone());
        SmallStateDir {
            daemon: TestDaemon::start_in(env),
            paths,
            _made: made,
            tmpfs,
        }
    }
}

/// The hook hands `path` to `daemon`, which acknowledges it.
fn assert_acked(daemon: &TestDaemon, path: &str) {
    assert_eq!(
        hook_result(&daemon.env.run_hook(&[path], None), path),
        HookResult::Acked
    );
}

/// Asserts that `text` names `cause` exactly once: a clear error says why, and only once.
fn assert_says_once(text: &str, cause: &str) {
    assert_eq!(
        text.matches(cause).count(),
        1,
        "{cause:?} not said exactly once in: {text}"
    );
}

#[test]
fn full_state_dir_refuses_new_work_and_loses_nothing_queued() {
    let started = Instant::now();
    let mut fixture = SmallStateDir::start();
    let (daemon, paths, tmpfs) = (&mut fixture.daemon, &fixture.paths, &fixture.tmpfs);
    assert_acked(daemon, &paths[0]);

    let fill = tmpfs.fill();
    let refused = daemon.env.run_hook(&[&paths[1]], None);
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        refused.status.success(),
        "the build must not fail: {stderr}"
    );
    assert_says_once(&stderr, "is full");
    assert!(
        stderr.contains(&paths[1]) && stderr.contains("will not be pushed"),
        "{stderr}"
    );
    assert!(daemon.log().contains("is full"), "{}", daemon.log());
    let status = daemon.status();
    assert_eq!(status["queued"], 1, "{status}");
    assert_says_once(
        status["state_dir_error"].as_str().unwrap_or_default(),
        "is full",
    );
    let human = daemon.env.nixpush(&["status"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.starts_with("NOT taking new builds: the state directory"),
        "{human}"
    );

    // Operator commands that write are refused the same way.
    let retry = daemon.env.nixpush(&["retry", "--all"]);
    assert!(!retry.status.success());
    assert_says_once(&String::from_utf8_lossy(&retry.stderr), "is full");

    // Space returns: the same daemon takes work again, without a restart.
    std::fs::remove_file(fill).unwrap();
    assert_acked(daemon, &paths[2]);
    assert_eq!(daemon.status()["state_dir_error"], serde_json::Value::Null);
    daemon.stop();
    let landed = upload_and_verify(daemon, &[&paths[0], &paths[2]]);
    eprintln!(
        "proof: disk full: refused with {stderr:?}; {} queued paths landed and verified; {:.1} s",
        landed.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn read_only_state_dir_refuses_to_start_and_loses_nothing_queued() {
    let started = Instant::now();
    let mut fixture = SmallStateDir::start();
    let (daemon, paths, tmpfs) = (&mut fixture.daemon, &fixture.paths, &fixture.tmpfs);
    for path in &paths[..2] {
        assert_acked(daemon, path);
    }
    daemon.stop();

    // A running daemon keeps its queue open for writing, which makes the kernel refuse a read-only remount; the
    // filesystem turns read-only while it is down.
    tmpfs.remount("ro");
    let output = output(
        std::process::Command::new(crate::util::NIXPUSH)
            .arg("--config")
            .arg(&daemon.env.config_path)
            .arg("daemon"),
    );
    let error = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{error}");
    assert_says_once(&error, "Read-only file system");
    assert!(
        error.contains(&daemon.env.state_dir.display().to_string()),
        "{error}"
    );

    let hook = daemon.env.run_hook(&[&paths[2]], None);
    let stderr = String::from_utf8_lossy(&hook.stderr).into_owned();
    assert!(hook.status.success(), "the build must not fail: {stderr}");
    assert_says_once(&stderr, "Read-only file system");
    assert!(stderr.contains("will not be pushed"), "{stderr}");

    tmpfs.remount("rw");
    let landed = upload_and_verify(daemon, &[&paths[0], &paths[1]]);
    eprintln!(
        "proof: disk read-only: daemon said {:?}, hook said {stderr:?}; {} queued paths landed and verified; {:.1} s",
        error.trim(),
        landed.len(),
        started.elapsed().as_secs_f64()
    );
}
