//! GC roots against a queue in memory: protect, finish, reconcile, heal and the bound.

use super::*;
use crate::queue::SqliteQueue;

struct Fixture {
    _tmp: tempfile::TempDir,
    store: PathBuf,
    config: Config,
    queue: Arc<dyn Queue>,
}

/// A store in a temporary directory with a Nix-like database recording each path's NAR size.
fn fixture(max_bytes: u64) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let config = Config {
        store_dir: store.clone(),
        nix_db: tmp.path().join("var/nix/db/db.sqlite"),
        gc_roots_dir: tmp.path().join("var/nix/gcroots/nixpush"),
        gc_roots_max_bytes: ByteSize(max_bytes),
        ..Config::default()
    };
    std::fs::create_dir_all(config.nix_db.parent().unwrap()).unwrap();
    rusqlite::Connection::open(&config.nix_db)
        .unwrap()
        .execute_batch(
            "CREATE TABLE ValidPaths (id integer primary key, path text unique not null, narSize integer);",
        )
        .unwrap();
    Fixture {
        queue: Arc::new(SqliteQueue::temporary().unwrap()),
        _tmp: tmp,
        store,
        config,
    }
}

impl Fixture {
    fn add(&self, name: &str, nar_size: u64) -> StorePath {
        let hash = format!("{:0>32}", name.len() * 7 + name.as_bytes()[0] as usize);
        let full = self.store.join(format!("{hash}-{name}"));
        std::fs::write(&full, b"").unwrap();
        let path = StorePath::parse(full.to_str().unwrap(), self.config.store_dir_str()).unwrap();
        rusqlite::Connection::open(&self.config.nix_db)
            .unwrap()
            .execute(
                "INSERT INTO ValidPaths (path, narSize) VALUES (?1, ?2)",
                rusqlite::params![path.as_str(), nar_size as i64],
            )
            .unwrap();
        path
    }

    fn link(&self, path: &StorePath) -> PathBuf {
        links::link_path(&self.config.gc_roots_dir, path)
    }

    fn fail(&self, path: &StorePath, at_ms: u64) {
        let mut entry = self.queue.get(path).unwrap().unwrap();
        entry.state = State::Failed;
        entry.updated_at_ms = at_ms;
        self.queue.set(&entry).unwrap();
    }
}

fn rooted(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

#[tokio::test]
async fn protect_and_finish_follow_the_queue() {
    let f = fixture(1 << 30);
    let roots = GcRoots::from_config(&f.config);
    assert_eq!(roots.status().warning, None);
    let a = f.add("a", 100);
    f.queue
        .enqueue(std::slice::from_ref(&a), "test", 1)
        .unwrap();
    roots.protect(std::slice::from_ref(&a));
    assert!(std::fs::symlink_metadata(f.link(&a))
        .unwrap()
        .file_type()
        .is_file());
    // Still queued (queued again meanwhile): the root stays.
    roots.entry_finished(&a, &*f.queue);
    assert!(rooted(&f.link(&a)));
    f.queue.remove(&a).unwrap();
    roots.entry_finished(&a, &*f.queue);
    assert!(!rooted(&f.link(&a)));
    assert_eq!(roots.status().rooted_paths, 0);
}

#[tokio::test]
async fn reconcile_recreates_missing_roots_removes_stale_ones_and_skips_gone_paths() {
    let f = fixture(1 << 30);
    let (a, b, stale) = (f.add("a", 100), f.add("bb", 200), f.add("stale", 5));
    let gone = StorePath::parse(
        &format!("{}/{:0>32}-gone", f.config.store_dir_str(), 9),
        f.config.store_dir_str(),
    )
    .unwrap();
    f.queue
        .enqueue(&[a.clone(), b.clone(), gone.clone()], "test", 1)
        .unwrap();
    links::create(&f.config.gc_roots_dir, &a).unwrap();
    links::create(&f.config.gc_roots_dir, &stale).unwrap();
    let foreign = f.config.gc_roots_dir.join("someone-else");
    std::os::unix::fs::symlink(stale.as_path(), &foreign).unwrap();
    let roots = Arc::new(GcRoots::from_config(&f.config));
    let done = roots
        .reconcile(f.queue.clone(), &f.config.nix_db)
        .await
        .unwrap();
    assert_eq!(
        done,
        Reconciled {
            kept: 1,
            created: 1,
            removed: 1,
            gone: 1,
            released: 0
        }
    );
    assert!(rooted(&f.link(&a)) && rooted(&f.link(&b)));
    assert!(!rooted(&f.link(&stale)) && !rooted(&f.link(&gone)));
    assert!(
        rooted(&foreign),
        "a link the daemon did not make is left alone"
    );
    let status = roots.status();
    assert_eq!((status.rooted_paths, status.rooted_bytes), (2, 300));
    assert_eq!(status.error, None);
}

#[tokio::test]
async fn the_bound_releases_the_oldest_failed_roots_and_retry_restores_them() {
    let f = fixture(250);
    let (old, new, queued) = (f.add("old", 100), f.add("new", 100), f.add("queued", 100));
    f.queue
        .enqueue(&[old.clone(), new.clone(), queued.clone()], "test", 1)
        .unwrap();
    f.fail(&old, 10);
    f.fail(&new, 20);
    let roots = Arc::new(GcRoots::from_config(&f.config));
    let done = roots
        .reconcile(f.queue.clone(), &f.config.nix_db)
        .await
        .unwrap();
    assert_eq!(done.released, 1);
    assert!(!rooted(&f.link(&old)) && rooted(&f.link(&new)) && rooted(&f.link(&queued)));
    let status = roots.status();
    assert_eq!((status.rooted_paths, status.rooted_bytes), (2, 200));
    assert_eq!(status.over_limit_unrooted, 1);

    // Retried while still in the store: rooted again.
    f.queue
        .retry_failed(Some(std::slice::from_ref(&old)), 30)
        .unwrap();
    let gone = roots
        .restore(std::slice::from_ref(&old), &f.config.nix_db)
        .await;
    assert!(gone.is_empty());
    assert!(rooted(&f.link(&old)));
    assert_eq!(roots.status().over_limit_unrooted, 0);

    // Its size looked up, the total is over the bound again: the only failed path left gives way.
    roots.maintenance_pass(&f.queue, &f.config.nix_db).await;
    assert!(!rooted(&f.link(&new)));
    assert_eq!(roots.status().over_limit_unrooted, 1);

    // Collected while unrooted: retry reports it gone and leaves no root.
    std::fs::remove_file(new.as_path()).unwrap();
    rusqlite::Connection::open(&f.config.nix_db)
        .unwrap()
        .execute("DELETE FROM ValidPaths WHERE path = ?1", [new.as_str()])
        .unwrap();
    let gone = roots
        .restore(std::slice::from_ref(&new), &f.config.nix_db)
        .await;
    assert_eq!(gone, vec![new.clone()]);
    assert!(!rooted(&f.link(&new)));
}

#[tokio::test]
async fn an_unwritable_directory_is_an_error_in_status_not_a_failure() {
    let f = fixture(1 << 30);
    let a = f.add("a", 1);
    // A file where the directory should be: neither root creation nor the directory can succeed.
    std::fs::create_dir_all(f.config.gc_roots_dir.parent().unwrap()).unwrap();
    std::fs::write(&f.config.gc_roots_dir, b"").unwrap();
    let roots = GcRoots::from_config(&f.config);
    roots.protect(std::slice::from_ref(&a));
    let status = roots.status();
    assert_eq!(status.rooted_paths, 0);
    let error = status.error.unwrap();
    assert!(error.contains("cannot create GC roots in"), "{error}");
    // Fixed: the next path is rooted, the error clears, and healing roots the path that missed out.
    std::fs::remove_file(&f.config.gc_roots_dir).unwrap();
    let b = f.add("bb", 1);
    f.queue.enqueue(&[a.clone(), b.clone()], "test", 1).unwrap();
    roots.protect(std::slice::from_ref(&b));
    let status = roots.status();
    assert_eq!((status.rooted_paths, status.error), (1, None));
    roots.heal(&*f.queue);
    assert_eq!(roots.status().rooted_paths, 2);
    assert!(rooted(&f.link(&a)));
}

#[test]
fn a_directory_outside_nix_gcroots_is_warned_about() {
    let config = Config {
        gc_roots_dir: PathBuf::from("/var/lib/nixpush/roots"),
        ..Config::default()
    };
    let warning = GcRoots::from_config(&config).status().warning.unwrap();
    assert!(
        warning.contains("outside /nix/var/nix/gcroots"),
        "{warning}"
    );
    assert_eq!(
        GcRoots::from_config(&Config::default()).status().warning,
        None
    );
    let off = Config {
        gc_roots_dir: PathBuf::new(),
        ..Config::default()
    };
    assert_eq!(GcRoots::from_config(&off).status().dir, None);
}
