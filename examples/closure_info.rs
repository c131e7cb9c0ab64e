//! Prints the closure of store paths in upload order, as nixpush's local store reader sees it, in the JSON shape
//! of `nix path-info --json --recursive`. Used by `benches/closure_info.sh` to time and cross-check the
//! SQLite reader against its `nix path-info` fallback.
//!
//! ```text
//! cargo run --release --example closure_info -- [--nix-command] [--db /nix/var/nix/db/db.sqlite] PATH…
//! ```

use std::io::Write as _;
use std::path::PathBuf;

use nixpush::pathinfo::LocalStore;
use nixpush::store_path::StorePath;

fn main() -> anyhow::Result<()> {
    let mut nix_command = false;
    let mut db = PathBuf::from("/nix/var/nix/db/db.sqlite");
    let mut roots = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--nix-command" => nix_command = true,
            "--db" => {
                db = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or_else(|| anyhow::anyhow!("--db needs a path"))?
            }
            path => roots.push(StorePath::parse_containing(path, "/nix/store")?),
        }
    }
    let store = if nix_command {
        LocalStore::open_nix_command("/nix/store")
    } else {
        LocalStore::open_sqlite("/nix/store", &db)?
    };
    let started = std::time::Instant::now();
    let closure = store.closure(&roots)?;
    eprintln!(
        "closure of {} paths in {:.1} ms",
        closure.len(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    let json: Vec<serde_json::Value> = closure
        .iter()
        .map(|info| {
            serde_json::json!({
                "path": info.path,
                "narHash": info.nar_hash.to_sri(),
                "narSize": info.nar_size,
                "references": info.references,
                "deriver": info.deriver,
                "registrationTime": info.registration_time,
                "ultimate": info.ultimate,
                "signatures": info.sigs,
                "ca": info.ca,
            })
        })
        .collect();
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &json)?;
    writeln!(out)?;
    Ok(())
}
