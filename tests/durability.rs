//! Durability under a power cut: the state directory lives on a small ext4 filesystem in a loop device; right after
//! the hooks' acks the daemon is frozen (SIGSTOP) and the backing file is copied. Only what the loop device wrote
//! is in that file (the filesystem's page cache above it is not), which is what survives a power cut. The copy is
//! checked with e2fsck (replaying the journal as a mount after a crash would), mounted, and a daemon booted on it
//! must hold every acknowledged path.
//!
//! `NIXPUSH_POWER_CUT_TRIALS` sets the trials per moment (default 2). Each trial prints its acknowledged and lost
//! counts. See: #15

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::user::{test_user, TEST_USER};
use crate::util::{add_store_paths, send_signal, wait_until, TestDaemon, TestEnv, DEADLINE, HOOK};

/// An ext4 filesystem in a file, attached to a loop device and mounted; detached and removed on drop.
pub struct LoopFs {
    dir: TempDir,
    /// The backing file.
    pub image: PathBuf,
    device: String,
    /// Where it is mounted.
    pub mount: PathBuf,
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

impl LoopFs {
    /// A fresh filesystem of `size_mb`, or `None` (with the reason printed) where loop devices cannot be made.
    pub fn create(size_mb: u64) -> Option<LoopFs> {
        let dir = tempfile::Builder::new()
            .prefix("nixpush-loopfs")
            .tempdir()
            .unwrap();
        let image = dir.path().join("fs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size_mb * 1024 * 1024)
            .unwrap();
        let made = run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        assert!(
            made.status.success(),
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        LoopFs::attach(dir, image)
    }

    /// Mounts a copy of this filesystem's device as it is now, after e2fsck has replayed its journal.
    pub fn power_cut_copy(&self) -> LoopFs {
        let dir = tempfile::Builder::new()
            .prefix("nixpush-loopfs-copy")
            .tempdir()
            .unwrap();
        let image = dir.path().join("fs.img");
        // Through the page cache on purpose: it holds exactly what the loop device wrote to its backing file.
        std::fs::copy(&self.image, &image).unwrap();
        let checked = run("e2fsck", &["-f", "-y", image.to_str().unwrap()]);
        // 0: clean, 1: errors corrected (a replayed journal counts); anything else leaves a broken filesystem.
        assert!(
            matches!(checked.status.code(), Some(0 | 1)),
            "e2fsck of the power-cut copy: {}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
        LoopFs::attach(dir, image).expect("the loop device worked a moment ago")
    }

    fn attach(dir: TempDir, image: PathBuf) -> Option<LoopFs> {
        let attached = run("losetup", &["--find", "--show", image.to_str().unwrap()]);
        if !attached.status.success() {
            eprintln!(
                "SKIPPED: cannot attach a loop device ({}); the power-cut tests need root and /dev/loop*",
                String::from_utf8_lossy(&attached.stderr).trim()
            );
            return None;
        }
        let device = String::from_utf8(attached.stdout)
            .unwrap()
            .trim()
            .to_owned();
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        let mounted = run("mount", &[&device, mount.to_str().unwrap()]);
        if !mounted.status.success() {
            run("losetup", &["-d", &device]);
            panic!(
                "mount {device}: {}",
                String::from_utf8_lossy(&mounted.stderr)
            );
        }
        Some(LoopFs {
            dir,
            image,
            device,
            mount,
        })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        // A daemon that just exited may still be closing files; retry, then detach lazily.
        while !run("umount", &[self.mount.to_str().unwrap()])
            .status
            .success()
        {
            if Instant::now() > deadline {
                run("umount", &["-l", self.mount.to_str().unwrap()]);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        run("losetup", &["-d", &self.device]);
        let _ = self.dir.path();
    }
}

/// A test environment whose state directory is `fs`'s root.
pub fn env_on(fs: &LoopFs, extra: &str) -> TestEnv {
    let mut env = TestEnv::with_config(extra);
    env.state_dir = fs.mount.join("state");
    env.spool_dir = env.state_dir.join("spool");
    env.write_config(extra);
    env
}

/// A hook run in flight, one path each.
struct Burst {
    children: Vec<(String, Child)>,
    finished: Vec<(String, bool)>,
}

impl Burst {
    fn start(commands: Vec<(String, Command)>) -> Burst {
        let children = commands
            .into_iter()
            .map(|(path, mut command)| {
                command.stdout(Stdio::null()).stderr(Stdio::piped());
                (path, command.spawn().unwrap())
            })
            .collect();
        Burst {
            children,
            finished: Vec::new(),
        }
    }

    /// Collects the hooks that exited; each is acknowledged (silent) or spooled (one line on stderr).
    fn poll(&mut self) {
        let mut running = Vec::new();
        for (path, mut child) in self.children.drain(..) {
            if child.try_wait().unwrap().is_some() {
                let output = child.wait_with_output().unwrap();
                assert!(output.status.success(), "the hook failed: {output:?}");
                self.finished.push((path, output.stderr.is_empty()));
            } else {
                running.push((path, child));
            }
        }
        self.children = running;
    }

    fn wait_for(&mut self, count: usize) {
        let started = Instant::now();
        loop {
            self.poll();
            if self.finished.len() >= count {
                return;
            }
            assert!(started.elapsed() < DEADLINE, "hooks did not finish");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Paths whose hook finished (acknowledged or spooled), and how many of them were acknowledged.
    fn settled(&self) -> (BTreeSet<String>, usize) {
        let paths = self.finished.iter().map(|(p, _)| p.clone()).collect();
        let acked = self.finished.iter().filter(|(_, acked)| *acked).count();
        (paths, acked)
    }

    fn finish(mut self) {
        self.wait_for(self.finished.len() + self.children.len());
    }
}

/// When the power goes.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// Right after the last ack of a burst.
    AfterAcks,
    /// While a burst is still being enqueued: after its first ack, others mid-commit.
    DuringEnqueue,
    /// After the acks, while a daemon uploads.
    DuringUploads,
}

fn trials() -> usize {
    std::env::var("NIXPUSH_POWER_CUT_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// The paths a daemon booted on `fs` holds: queued (spool files included, once imported).
fn paths_after_boot(fs: &LoopFs, extra: &str) -> (BTreeSet<String>, String) {
    let daemon = TestDaemon::start_in(env_on(fs, extra));
    wait_until("the spool imported", || daemon.env.spool_files().is_empty());
    let queued = daemon.queued_paths().into_iter().collect();
    (queued, daemon.log())
}

fn uploaded(cache: &Path, path: &str) -> bool {
    let hash = &path["/nix/store/".len()..][..32];
    cache.join(format!("{hash}.narinfo")).exists()
}

/// One trial: a burst of `count` hooks, the power cut at `moment`; returns (settled, acknowledged, lost).
fn power_cut_trial(moment: Moment, count: usize) -> (usize, usize, Vec<String>) {
    let Some(fs) = LoopFs::create(64) else {
        return (0, 0, Vec::new());
    };
    let env = env_on(&fs, "");
    let cache = env.cache_dir();
    let daemon = match moment {
        Moment::DuringUploads => TestDaemon::start_uploading(env),
        Moment::AfterAcks | Moment::DuringEnqueue => TestDaemon::start_in(env),
    };
    let paths = add_store_paths(count);
    let commands = paths
        .iter()
        .map(|p| (p.clone(), daemon.env.hook_command(&[p], None)))
        .collect();
    let mut burst = Burst::start(commands);
    match moment {
        Moment::AfterAcks | Moment::DuringUploads => burst.wait_for(count),
        Moment::DuringEnqueue => burst.wait_for(1),
    }
    assert!(send_signal(daemon.pid(), "STOP"));
    burst.poll();
    let (settled, acked) = burst.settled();
    let copy = fs.power_cut_copy();
    assert!(send_signal(daemon.pid(), "CONT"));
    burst.finish();
    let (kept, log) = paths_after_boot(&copy, "");
    let lost: Vec<String> = settled
        .iter()
        .filter(|p| !kept.contains(*p) && !uploaded(&cache, p))
        .cloned()
        .collect();
    eprintln!(
        "power cut {moment:?}: {} hooks finished ({acked} acknowledged, the rest spooled), {} lost",
        settled.len(),
        lost.len()
    );
    if !lost.is_empty() {
        eprintln!("daemon booted on the copy:\n{log}");
    }
    drop(daemon);
    (settled.len(), acked, lost)
}

fn power_cut(moment: Moment) {
    let mut total = (0, 0, 0);
    for _ in 0..trials() {
        let (settled, acked, lost) = power_cut_trial(moment, 24);
        total.0 += settled;
        total.1 += acked;
        total.2 += lost.len();
    }
    eprintln!(
        "power cut {moment:?}, {} trials: {} finished hooks, {} acknowledged, {} paths lost",
        trials(),
        total.0,
        total.1,
        total.2
    );
    assert_eq!(
        total.2, 0,
        "acknowledged or spooled paths lost at {moment:?}"
    );
}

// See: #15
#[test]
fn durability_power_cut_right_after_the_acks_loses_nothing() {
    power_cut(Moment::AfterAcks);
}

// See: #15
#[test]
fn durability_power_cut_during_an_enqueue_burst_loses_nothing() {
    power_cut(Moment::DuringEnqueue);
}

// See: #15
#[test]
fn durability_power_cut_during_uploads_loses_nothing() {
    power_cut(Moment::DuringUploads);
}

// Spool files written by an allowed non-root user, who cannot open the 01733 spool directory to fsync it, while
// no daemon runs. See: #15
#[test]
fn durability_power_cut_keeps_spool_files_of_a_non_root_hook() {
    let (uid, gid) = test_user();
    let mut lost_total = 0;
    let mut spooled_total = 0;
    for _ in 0..trials() {
        let Some(fs) = LoopFs::create(64) else {
            return;
        };
        let extra = format!("allowed_users = [\"{TEST_USER}\"]");
        let mut daemon = TestDaemon::start_in(env_on(&fs, &extra));
        // The daemon made the spool directory; now it is down and hooks spool.
        daemon.stop();
        let paths = add_store_paths(12);
        let commands = paths
            .iter()
            .map(|p| {
                let mut command = Command::new("setpriv");
                command
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg(HOOK)
                    .envs(daemon.env.hook_env())
                    .env("OUT_PATHS", p)
                    .env("DRV_PATH", "")
                    .stdin(Stdio::null());
                (p.clone(), command)
            })
            .collect();
        let mut burst = Burst::start(commands);
        burst.wait_for(paths.len());
        let (settled, acked) = burst.settled();
        assert_eq!(acked, 0, "no daemon runs, so every hook spools");
        let copy = fs.power_cut_copy();
        let (kept, log) = paths_after_boot(&copy, &extra);
        let lost: Vec<&String> = settled.iter().filter(|p| !kept.contains(*p)).collect();
        eprintln!(
            "power cut after non-root spooling: {} spooled, {} lost",
            settled.len(),
            lost.len()
        );
        if !lost.is_empty() {
            eprintln!("daemon booted on the copy:\n{log}");
        }
        spooled_total += settled.len();
        lost_total += lost.len();
    }
    eprintln!(
        "power cut after non-root spooling, {} trials: {spooled_total} spooled, {lost_total} lost",
        trials()
    );
    assert_eq!(lost_total, 0);
}

/// Damages `db` in one of several ways; the name says how.
fn damage(name: &str, original: &[u8]) -> Vec<u8> {
    let mut bytes = original.to_vec();
    let len = bytes.len();
    match name {
        "truncated to half" => bytes.truncate(len / 2),
        "truncated to one page" => bytes.truncate(4096),
        "empty" => bytes.clear(),
        "zeroed" => bytes.iter_mut().for_each(|b| *b = 0),
        "a page zeroed in the middle" => {
            let page = (len / 4096 / 2) * 4096;
            bytes[page..page + 4096].iter_mut().for_each(|b| *b = 0);
        }
        "8 bytes flipped in the header" => flip(&mut bytes, 24),
        "8 bytes flipped in the middle" => flip(&mut bytes, len / 2),
        "8 bytes flipped near the end" => flip(&mut bytes, len - 200),
        "8 bytes flipped in the last record" => {
            let at = bytes
                .windows(8)
                .rposition(|w| w == b"{\"path\":")
                .expect("a record in the file");
            flip(&mut bytes, at + 30)
        }
        other => panic!("unknown damage {other}"),
    }
    bytes
}

fn flip(bytes: &mut [u8], at: usize) {
    for b in &mut bytes[at..at + 8] {
        *b ^= 0xa5;
    }
}

// A damaged queue file never starts silently with fewer entries: the daemon logs an error naming the file,
// `status` shows `queue_damage`, the damaged files are kept aside, and what can be read is queued again.
// See: #15
#[test]
fn durability_a_damaged_queue_is_loud_and_salvaged() {
    let mut daemon = TestDaemon::start();
    let paths = add_store_paths(50);
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let hook = daemon.env.run_hook(&refs, None);
    assert!(hook.stderr.is_empty(), "{hook:?}");
    assert_eq!(daemon.queued_paths().len(), 50);
    daemon.stop();
    // The cost of a group commit on this disk, for the README's design notes.
    if let Some(line) = daemon.log().lines().find(|l| l.contains("queue commits")) {
        eprintln!("{line}");
    }
    let queue_dir = daemon.env.state_dir.join("queue");
    let db = queue_dir.join("queue.sqlite3");
    let original = std::fs::read(&db).unwrap();
    assert!(
        original.len() > 3 * 4096,
        "all 50 entries are in the database file after a clean stop"
    );
    let cases = [
        "truncated to half",
        "truncated to one page",
        "empty",
        "zeroed",
        "a page zeroed in the middle",
        "8 bytes flipped in the header",
        "8 bytes flipped in the middle",
        "8 bytes flipped near the end",
        "8 bytes flipped in the last record",
    ];
    for case in cases {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(queue_dir.join(format!("queue.sqlite3{suffix}")));
        }
        std::fs::write(&db, damage(case, &original)).unwrap();
        let log_before = daemon.log().len();
        daemon.restart();
        let status = daemon.status();
        let log = daemon.log()[log_before..].to_owned();
        let queued: BTreeSet<String> = daemon.queued_paths().into_iter().collect();
        let kept = paths.iter().filter(|p| queued.contains(*p)).count();
        let reported = &status["queue_damage"];
        eprintln!("damage {case:?}: {kept} of 50 queued after restart; queue_damage = {reported}");
        if kept < 50 {
            assert!(
                reported.is_object(),
                "{case}: {kept} of 50 entries and no queue_damage in status: {status}"
            );
        }
        if reported.is_object() {
            assert!(
                log.contains("ERROR") && log.contains(&db.display().to_string()),
                "{case}: the error names the file:\n{log}"
            );
            let kept_at = Path::new(reported["kept_at"].as_str().unwrap());
            assert!(kept_at.join("queue.sqlite3").exists(), "{case}: kept aside");
            assert_eq!(
                reported["requeued"].as_u64().unwrap() as usize,
                queued.len(),
                "{case}: every recovered path is queued"
            );
            let text = daemon.env.nixpush(&["status"]);
            let text = String::from_utf8_lossy(&text.stdout);
            assert!(text.contains("DAMAGED QUEUE"), "{case}: {text}");
        }
        match case {
            // Nothing readable is left: the damage is reported, nothing is invented.
            "empty" | "zeroed" => assert!(reported.is_object(), "{case}: {status}"),
            // Some records survive these, in the pages that are left; the salvage must find them.
            "truncated to half" | "a page zeroed in the middle" => {
                assert!(kept > 0, "{case}: nothing recovered")
            }
            _ => {}
        }
        daemon.stop();
    }
}
