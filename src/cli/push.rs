//! `nixpush push PATH…`: upload store paths (with their closures) now, in this process, with the daemon's
//! engine and configuration. What CI jobs and `nix run .#cachix-push` use; `--via-daemon` queues instead.
//!
//! On a terminal it draws progress bars; otherwise (CI logs) it prints one plain line per finished path and a
//! summary every ten seconds. It ends with a summary (`--json` for scripts) and exits 1 if anything failed, 3 if
//! the target's filters held a requested path back.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Target};
use crate::config::{Compression, Config, DEFAULT_CONFIG_PATH};
use crate::pathinfo::LocalStore;
use crate::protocol::{Request, Response};
use crate::rate_schedule::Rate;
use crate::store_path::StorePath;
use crate::upload::{Engine, MemoryPresentCache, RootOutcome, Settings};

use super::push_progress::{tick, Progress};
use super::push_summary::Tally;
pub use super::push_summary::{render_summary, Failure, Summary};

/// Rounds of whole-path retries for transient failures before `push` gives up.
const PUSH_ROUNDS: u32 = 3;

/// Arguments of `push`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store paths, or links to them such as ./result. As with `cachix push CACHE PATH…`, the first may name the
    /// cache: a Cachix cache name (the configured target when it is cachix://CACHE) or a URL. Without paths,
    /// they are read from standard input when it is a pipe or a file.
    #[arg(value_name = "[CACHE] PATH")]
    paths: Vec<PathBuf>,
    /// Also read paths from standard input, one per line (`nix path-info -r … | nixpush push --stdin`).
    #[arg(long)]
    stdin: bool,
    /// Push only the named paths, not their closures.
    #[arg(long)]
    no_closure: bool,
    /// Push to this cache instead of every configured target: a URL (file://, http(s)://, s3://, cachix://) or
    /// the name of a configured target (`default` for [target]). Repeat it to push to several at once.
    #[arg(long, value_name = "URL|NAME")]
    target: Vec<String>,
    /// Sign with this secret key (Nix `name:base64` format, or Cachix's bare base64).
    #[arg(long, value_name = "FILE")]
    signing_key_file: Option<PathBuf>,
    /// Read the auth token from this file (otherwise CACHIX_AUTH_TOKEN / NIXPUSH_AUTH_TOKEN).
    #[arg(long, value_name = "FILE")]
    auth_token_file: Option<PathBuf>,
    /// NAR compression.
    #[arg(long, value_enum)]
    compression: Option<CompressionArg>,
    /// Parallel uploads.
    #[arg(short = 'j', long)]
    workers: Option<usize>,
    /// Skip paths these caches serve (repeatable; replaces the configured list).
    #[arg(long, value_name = "URL")]
    upstream: Vec<String>,
    /// Do not ask upstream caches; upload everything the target lacks.
    #[arg(long, conflicts_with = "upstream")]
    no_upstream: bool,
    /// Queue the paths with the running daemon and return at once.
    #[arg(long)]
    via_daemon: bool,
    /// Print the summary as JSON on standard output.
    #[arg(long)]
    json: bool,
    /// Ignore the filters (`exclude`, and the target's `include`, `exclude` and `max_nar_size`): push every path.
    #[arg(long)]
    no_filter: bool,
    /// Upload at most this fast, over all workers ("4MiB/s", "40Mbit/s", "unlimited"); replaces the target's
    /// max_upload_rate and rate_schedule for this push.
    #[arg(long, value_name = "RATE", value_parser = Rate::parse)]
    max_upload_rate: Option<Rate>,
}

/// `--compression` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CompressionArg {
    Zstd,
    Xz,
    None,
}

impl From<CompressionArg> for Compression {
    fn from(c: CompressionArg) -> Compression {
        match c {
            CompressionArg::Zstd => Compression::Zstd,
            CompressionArg::Xz => Compression::Xz,
            CompressionArg::None => Compression::None,
        }
    }
}

/// Exit status when nothing failed but the filters held a requested path back.
const EXIT_HELD_BACK: u8 = 3;

/// The exit codes, for `push --help`.
pub(super) const EXIT_CODES_HELP: &str = "\
Exit status:
  0  every path is in the cache (uploaded now, already there, or served upstream), or left out by the filters
  1  a path failed, or the push could not start (the summary or message says why)
  2  the command line is wrong
  3  nothing failed, but a requested path was held back: a reference of it is filtered out (include, exclude,
     max_nar_size) and neither the target nor an upstream has it, so uploading it would leave the cache with
     a narinfo whose references it lacks. The summary names the reference. Change the filters, push the
     reference elsewhere, set allow_incomplete_closures = true, or pass --no-filter
  130  interrupted by Ctrl-C (the summary says what landed; a second Ctrl-C exits at once)";

pub(super) fn run(config_path: Option<&Path>, mut args: Args) -> anyhow::Result<ExitCode> {
    let cache = leading_cache(&args.paths);
    if let Some(cache) = &cache {
        if !args.target.is_empty() {
            bail!(
                "{cache}: name the cache either as the first argument or with --target, not both"
            );
        }
        args.target = vec![cache_target(cache, config_path)];
        args.paths.remove(0);
    }
    let configs = push_configs(config_path, &args)?;
    let config = configs[0].clone();
    let mut inputs = args.paths.clone();
    if args.stdin || (inputs.is_empty() && stdin_is_pipe_or_file()) {
        for line in std::io::stdin().lock().lines() {
            let line = line.context("reading paths from standard input")?;
            let line = line.trim();
            if !line.is_empty() {
                inputs.push(PathBuf::from(line));
            }
        }
    }
    if inputs.is_empty() {
        let taken = cache
            .map(|c| format!("; `{c}` was taken as the cache, since no such file exists"))
            .unwrap_or_default();
        bail!(
            "no paths given (pass store paths, ./result links, or pipe them in: `… | nixpush push`){taken}"
        );
    }
    let roots = inputs
        .iter()
        .map(|p| resolve_store_path(p, config.store_dir_str()))
        .collect::<anyhow::Result<Vec<_>>>()?;

    if args.via_daemon {
        return enqueue_via_daemon(&config, &roots);
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(push(configs, roots, !args.no_closure, args.json))
}

/// The cache named by the first argument, `cachix push CACHE PATH…` style: a URL, or a word that is neither a
/// path nor an existing file (`result` in the current directory stays a path).
fn leading_cache(args: &[PathBuf]) -> Option<String> {
    let first = args.first()?.to_str()?;
    let is_url = first.contains("://");
    let is_name = !first.is_empty()
        && !first.contains('/')
        && !first.starts_with('.')
        && std::fs::symlink_metadata(first).is_err();
    (is_url || is_name).then(|| first.to_owned())
}

/// The `--target` for a cache named on the command line: the name of the configured target it is (so that
/// target's token and key files apply), or else its URL.
fn cache_target(cache: &str, config_path: Option<&Path>) -> String {
    let url = crate::backend::Kind::url_of_named_cache(cache);
    let file = config_path
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let configured = std::fs::read_to_string(file)
        .ok()
        .and_then(|text| toml::from_str::<Config>(&text).ok())
        .unwrap_or_default();
    configured
        .target_names()
        .into_iter()
        .find(|name| {
            let configured_url = configured
                .named_target(name)
                .map(|t| t.url.as_str())
                .unwrap_or_default();
            configured_url == url
                || (!cache.contains("://")
                    && crate::backend::cachix::cache_name(configured_url) == Some(cache))
        })
        .unwrap_or(url)
}

/// Whether standard input is a pipe or a file (`… | nixpush push`), not a terminal or /dev/null.
fn stdin_is_pipe_or_file() -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata("/proc/self/fd/0")
        .map(|m| m.file_type().is_fifo() || m.file_type().is_file())
        .unwrap_or(false)
}

/// The configuration of each target a push goes to (see [`Config::for_target`]): the file (if any), with
/// command-line overrides.
fn push_configs(config_path: Option<&Path>, args: &Args) -> anyhow::Result<Vec<Config>> {
    let file = config_path
        .map(Path::to_owned)
        .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()));
    let base = match &file {
        Some(path) => Config::load(path)
            .or_else(|e| match &e {
                // A one-off `--target` may fill in the only thing a partial file lacks.
                crate::config::Error::Invalid { field, .. }
                    if field == "target.url" && !args.target.is_empty() =>
                {
                    let text = std::fs::read_to_string(path)?;
                    Ok(toml::from_str::<Config>(&text)?)
                }
                _ => Err(anyhow::Error::from(e)),
            })
            .with_context(|| format!("loading {}", path.display()))?,
        None if !args.target.is_empty() => Config::default(),
        None => bail!(
            "no target: pass --target URL, or --config FILE (or create {DEFAULT_CONFIG_PATH})"
        ),
    };
    let mut configs = Vec::new();
    if args.target.is_empty() {
        configs.extend(base.each_target().into_iter().map(|(_, config)| config));
    }
    for wanted in &args.target {
        let named = base
            .for_target(wanted)
            .or_else(|| base.for_target(&base.target_named_by_url(wanted)?));
        let config = match named {
            Some(config) => config,
            None if wanted.contains("://") => {
                // A cache the file does not name: the [target] table's settings, with this URL.
                let mut config = base.clone();
                config.targets.clear();
                config.target.url = wanted.clone();
                config
            }
            None => bail!(
                "--target {wanted}: not a URL (file://, http(s)://, s3://, cachix://), and no configured target \
                 has that name (configured: {})",
                match base.target_names() {
                    names if names.is_empty() => "none".to_owned(),
                    names => names.join(", "),
                }
            ),
        };
        configs.push(config);
    }
    for config in &mut configs {
        apply_overrides(config, args);
        config.validate()?;
    }
    Ok(configs)
}

/// The command line's settings, over one target's configuration.
fn apply_overrides(config: &mut Config, args: &Args) {
    if let Some(file) = &args.signing_key_file {
        config.target.signing_key_file = Some(file.clone());
    }
    if let Some(file) = &args.auth_token_file {
        config.target.auth_token_file = Some(file.clone());
    }
    if let Some(c) = args.compression {
        config.target.compression = c.into();
        config.target.compression_level = None;
    }
    if let Some(w) = args.workers {
        config.target.workers = Some(w);
    }
    if let Some(rate) = args.max_upload_rate {
        config.target.max_upload_rate = rate;
        config.target.rate_schedule.clear();
    }
    if args.no_filter {
        config.exclude.clear();
        config.target.include.clear();
        config.target.exclude.clear();
        config.target.max_nar_size = None;
    }
    if args.no_upstream {
        config.upstream.clear();
    } else if !args.upstream.is_empty() {
        config.upstream = args.upstream.clone();
    }
    if !config.state_dir.exists()
        || std::fs::metadata(&config.state_dir).is_ok_and(|m| m.permissions().readonly())
    {
        // A CI runner has no /var/lib/nixpush; temporary NARs go to the system's temporary directory instead.
        config.state_dir = std::env::temp_dir().join("nixpush");
    }
}

/// Turns `./result`, a store path, or a path inside one into the top-level store path, following links only
/// until they reach the store (a store path may itself be a symlink).
pub fn resolve_store_path(input: &Path, store_dir: &str) -> anyhow::Result<StorePath> {
    let mut current = input.to_owned();
    for _ in 0..40 {
        if let Some(text) = current.to_str() {
            if let Ok(path) = StorePath::parse_containing(text, store_dir) {
                return Ok(path);
            }
        }
        let target = std::fs::read_link(&current)
            .with_context(|| format!("{} is not a store path or a link to one", input.display()))?;
        current = match current.parent() {
            Some(parent) if target.is_relative() => parent.join(target),
            _ => target,
        };
    }
    bail!("{}: too many levels of symbolic links", input.display())
}

fn enqueue_via_daemon(config: &Config, roots: &[StorePath]) -> anyhow::Result<ExitCode> {
    let request = Request::Enqueue {
        drv_path: None,
        out_paths: roots.iter().map(|p| p.as_str().to_owned()).collect(),
        source: "push".to_owned(),
    };
    match super::ask(config, &request)? {
        Response::Ack {
            accepted,
            duplicate,
            refused,
        } => {
            eprintln!(
                "queued {} path(s) with the daemon ({} already queued)",
                accepted.len(),
                duplicate
            );
            for line in &refused {
                eprintln!("{line}");
            }
            Ok(if refused.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// Pushes to every target at once (each with its own engine, rate and retries, so a slow one holds up no
/// other), then prints the summary and picks the exit status.
async fn push(
    configs: Vec<Config>,
    roots: Vec<StorePath>,
    closure: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    // Several sets of progress bars would draw over each other: one line per finished path instead.
    let bars = configs.len() == 1 && std::io::stderr().is_terminal();
    let pushes = configs
        .into_iter()
        .map(|config| push_to(config, roots.clone(), closure, bars));
    let mut done = Vec::new();
    for result in futures_util::future::join_all(pushes).await {
        done.push(result?);
    }
    let held_back = done.iter().any(|(_, held)| *held);
    let mut summaries: Vec<Summary> = done.into_iter().map(|(summary, _)| summary).collect();
    let summary = if summaries.len() == 1 {
        summaries.remove(0)
    } else {
        Summary::sum(summaries)
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if summary.targets.is_empty() {
        eprint!("{}", render_summary(&summary));
    } else {
        for one in &summary.targets {
            eprint!("{}", render_summary(one));
        }
    }
    Ok(if summary.interrupted {
        ExitCode::from(130)
    } else if !summary.failed.is_empty() || !summary.gone.is_empty() {
        ExitCode::FAILURE
    } else if held_back {
        ExitCode::from(EXIT_HELD_BACK)
    } else {
        ExitCode::SUCCESS
    })
}

/// Pushes `roots` to the one target of `config`; returns its summary and whether a requested path was held back.
async fn push_to(
    config: Config,
    roots: Vec<StorePath>,
    closure: bool,
    bars: bool,
) -> anyhow::Result<(Summary, bool)> {
    let started = Instant::now();
    let target = Target::from_config(&config)?;
    let store = LocalStore::open(config.store_dir_str(), &config.nix_db)?;
    let settings = Settings::from_config(&config)?;
    let limiter = Arc::clone(&settings.rate);
    let progress = Arc::new(Progress::new(bars, Arc::clone(&limiter)));
    let engine = Arc::new(Engine::new(
        Arc::new(target.backend),
        Arc::new(store),
        settings,
        target.signing_key,
        Arc::new(MemoryPresentCache::default()),
        progress.clone(),
    )?);
    engine.set_extra_signing_keys(target.extra_signing_keys);
    engine
        .backend()
        .prepare()
        .await
        .with_context(|| format!("preparing {}", target.display_name))?;

    let ticker = tokio::spawn(tick(Arc::clone(&progress), Arc::clone(&engine)));
    let cancel = CancellationToken::new();
    let schedule = (
        config.target.max_upload_rate,
        config.target.rate_schedule.clone(),
    );
    let governor = tokio::spawn(crate::upload::rate::govern(
        Arc::clone(&limiter),
        move || schedule.clone(),
        |_| {},
        cancel.child_token(),
    ));
    let interrupted = Arc::new(AtomicBool::new(false));
    let interrupt = tokio::spawn(interrupt_on_ctrl_c(
        Arc::clone(&interrupted),
        cancel.clone(),
        Arc::clone(&limiter),
        Arc::clone(&progress),
    ));
    let mut summary = Summary {
        target: target.display_name,
        ..Summary::default()
    };
    let mut pending = roots;
    let mut tally = Tally::default();
    let mut root_failures = Vec::new();
    let mut roots_held_back = 0;
    for round in 1..=PUSH_ROUNDS {
        let report = engine.push_paths(&pending, closure, &cancel).await;
        for path in &report.paths {
            tally.add(path);
        }
        // Transient failures are tried again (the rest of the closure is known present by then); the others
        // are final.
        let mut retry = Vec::new();
        for (root, outcome) in report.roots {
            match outcome {
                RootOutcome::Done => {}
                RootOutcome::Gone => summary.gone.push(root),
                // Final for this push: only other filters or caches change the answer.
                RootOutcome::HeldBack(_) => roots_held_back += 1,
                RootOutcome::Failed(e) if e.is_retryable() && round < PUSH_ROUNDS => {
                    retry.push(root)
                }
                RootOutcome::Failed(e) => root_failures.push((root, e)),
            }
        }
        if retry.is_empty() || interrupted.load(Ordering::SeqCst) {
            root_failures.extend(retry.into_iter().map(|root| {
                (
                    root,
                    Arc::new(crate::upload::Error::Cancelled) as Arc<crate::upload::Error>,
                )
            }));
            break;
        }
        let delay = Duration::from_secs(2u64.pow(round));
        progress.note(&format!(
            "{} path(s) failed with transient errors; trying again in {} s",
            retry.len(),
            delay.as_secs()
        ));
        tokio::time::sleep(delay).await;
        pending = retry;
    }
    ticker.abort();
    governor.abort();
    interrupt.abort();
    progress.finish();
    summary.interrupted = interrupted.load(Ordering::SeqCst);
    tally.fill(&mut summary);
    // A root that failed before any of its paths was tried (e.g. its closure could not be read).
    for (root, e) in root_failures {
        if !summary.failed.iter().any(|f| f.path == root) {
            summary.failed.push(Failure {
                path: root,
                reason: e.to_string(),
            });
        }
    }
    summary.wall_time_ms = started.elapsed().as_millis() as u64;
    Ok((summary, roots_held_back > 0))
}

/// On Ctrl-C: start nothing new and abort what is in flight (bodies and `file://` writers fail at their next
/// piece, so backends run their own cleanup: temporary files removed, multipart uploads aborted). The push then
/// ends normally and its summary says what landed. A second Ctrl-C exits at once.
async fn interrupt_on_ctrl_c(
    interrupted: Arc<AtomicBool>,
    cancel: CancellationToken,
    limiter: Arc<crate::backend::rate::RateLimiter>,
    progress: Arc<Progress>,
) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    interrupted.store(true, Ordering::SeqCst);
    cancel.cancel();
    limiter.abort();
    progress.note(
        "interrupted: stopping uploads and removing temporary files (Ctrl-C again to quit now)",
    );
    if tokio::signal::ctrl_c().await.is_ok() {
        std::process::exit(130);
    }
}
