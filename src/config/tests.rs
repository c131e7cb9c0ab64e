//! Parsing, defaults, validation messages and redaction.

use super::*;

#[test]
fn redact_url_keeps_the_form_the_user_wrote() {
    for plain in [
        "https://cache.example.org",
        "https://cache.example.org/",
        "https://cache.example.org/prefix",
        "file:///var/cache/nix",
        "s3://bucket?region=eu-west-1&endpoint=http://127.0.0.1:9000",
        "cachix://mycache",
    ] {
        assert_eq!(redact_url(plain), plain);
    }
    assert_eq!(
        redact_url("https://user:hunter2@cache.example.org"),
        "https://user:***@cache.example.org"
    );
    assert_eq!(
        redact_url("https://user:hunter2@cache.example.org/"),
        "https://user:***@cache.example.org/"
    );
    assert_eq!(
        redact_url("https://user:hunter2@cache.example.org:8443?token=abc&x=1"),
        "https://user:***@cache.example.org:8443?token=***&x=1"
    );
    assert_eq!(
        redact_url("https://u:p@cache.example.org/a/b"),
        "https://u:***@cache.example.org/a/b"
    );
}

fn parse(text: &str) -> Result<Config, Error> {
    Config::parse(text, Path::new("test.toml"))
}

#[test]
fn minimal_config_fills_defaults() {
    let c = parse("[target]\nurl = \"file:///tmp/cache\"\n").unwrap();
    assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
    assert_eq!(c.upstream, vec!["https://cache.nixos.org".to_owned()]);
    assert_eq!(c.target.max_attempts, 10);
    assert_eq!(c.target.compression, Compression::Zstd);
    assert_eq!(c.compression_level(), 3);
}

#[test]
fn unknown_key_names_key_and_line() {
    let err = parse("socket = \"/tmp/s\"\nworkerz = 3\n[target]\nurl = \"file:///x\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("workerz"), "{err}");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn unknown_key_in_target_is_an_error() {
    let err = parse("[target]\nurl = \"file:///x\"\ncompresion = \"xz\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("compresion"), "{err}");
    assert!(err.contains("line 3"), "{err}");
}

#[test]
fn named_targets_each_get_their_own_view_with_the_shared_settings() {
    let c = parse(
        "upstream = []\n[target]\nurl = \"file:///a\"\nworkers = 2\n\
         [targets.backup]\nurl = \"https://cache.example.org\"\nmax_attempts = 3\n\
         [targets.s3]\nurl = \"s3://bucket?region=eu-west-1\"\n",
    )
    .unwrap();
    assert_eq!(c.target_names(), ["default", "backup", "s3"]);
    let backup = c.for_target("backup").unwrap();
    assert_eq!(backup.target.url, "https://cache.example.org");
    assert_eq!(backup.target.max_attempts, 3);
    assert!(backup.targets.is_empty());
    assert!(backup.upstream.is_empty(), "daemon-wide keys are kept");
    assert_eq!(c.for_target("default").unwrap().target.workers, Some(2));
    assert!(c.for_target("nope").is_none());
    assert_eq!(
        c.target_named_by_url("https://cache.example.org")
            .as_deref(),
        Some("backup")
    );
    // Only named targets: no `[target]` needed, and none is called `default`.
    let c = parse("[targets.one]\nurl = \"file:///one\"\n").unwrap();
    assert_eq!(c.target_names(), ["one"]);
    assert!(c.for_target("default").is_none());
    let shown = c.to_effective_toml();
    assert!(
        shown.contains("[targets.one]") && !shown.contains("[target]\n"),
        "{shown}"
    );
    assert_eq!(parse(&shown).unwrap().target_names(), ["one"]);
}

#[test]
fn a_named_target_is_checked_like_target_and_errors_name_its_table() {
    let err = parse("[targets.backup]\nurl = \"file:///x\"\nworkers = 0\n").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("`targets.backup.workers`") && text.contains("line 3"),
        "{text}"
    );
    let err = parse("[targets.backup]\ncompression = \"xz\"\n").unwrap_err();
    assert!(
        err.to_string().contains("`targets.backup.url` is required"),
        "{err}"
    );
    let err = parse("[targets.b]\nurl = \"file:///x?compression=xz\"\n").unwrap_err();
    assert!(err.to_string().contains("belong in [targets.b]"), "{err}");
    let err = parse("[target]\nurl = \"file:///a\"\n[targets.default]\nurl = \"file:///b\"\n")
        .unwrap_err();
    assert!(err.to_string().contains("`targets.default`"), "{err}");
    let err = parse("[targets.\"no good\"]\nurl = \"file:///b\"\n").unwrap_err();
    assert!(err.to_string().contains("invalid name"), "{err}");
    let err = parse("socket = \"/tmp/s\"\n").unwrap_err();
    assert!(err.to_string().contains("[targets.NAME]"), "{err}");
}

#[test]
fn validation_names_the_field() {
    let err = parse("[target]\nurl = \"file:///x\"\nworkers = 0\n").unwrap_err();
    assert!(err.to_string().contains("target.workers"), "{err}");
    let err = parse("[target]\nurl = \"ftp://x\"\n").unwrap_err();
    assert!(err.to_string().contains("target.url"), "{err}");
    let err = parse("").unwrap_err();
    assert!(err.to_string().contains("target.url"), "{err}");
    let err = parse("socket_mode = \"999\"\n[target]\nurl = \"file:///x\"\n").unwrap_err();
    assert!(err.to_string().contains("socket_mode"), "{err}");
    let err =
        parse("[target]\nurl = \"file:///x\"\ncompression = \"xz\"\ncompression_level = 12\n")
            .unwrap_err();
    assert!(err.to_string().contains("compression_level"), "{err}");
}

// See: #15
#[test]
fn target_urls_without_an_absolute_path_or_with_unused_parameters_are_refused() {
    let err = parse("[target]\nurl = \"file://relative/dir\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("absolute path") && err.contains("line 2"),
        "{err}"
    );
    let err = parse("[target]\nworkers = 2\nurl = \"file:///c?compression=xz\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"compression\"") && err.contains("line 3"),
        "{err}"
    );
    assert!(err.contains("take no query parameters"), "{err}");
    let err = parse("[target]\nurl = \"s3://bucket?regoin=eu-west-1\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"regoin\""), "{err}");
    assert!(
        err.contains("region, endpoint, scheme, addressing, profile"),
        "{err}"
    );
    let err = parse("[target]\nurl = \"cachix://c?apii=http://x\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("take only api"), "{err}");
    for good in [
        "file:///c",
        "file://localhost/c",
        "s3://bucket?region=eu-west-1&endpoint=http://127.0.0.1:9000",
        "cachix://c?api=http://127.0.0.1:1",
        "https://cache.example.org/prefix",
    ] {
        parse(&format!("[target]\nurl = \"{good}\"\n")).unwrap();
    }
}

// See: #18
#[test]
fn filter_keys_live_in_the_target_and_bad_values_name_key_value_and_line() {
    let c = parse(
        "exclude = [\"*-source\"]\n[target]\nurl = \"file:///x\"\ninclude = [\"app-*\"]\n\
         exclude = [\"*-doc\"]\nmax_nar_size = \"2GiB\"\nallow_incomplete_closures = true\n",
    )
    .unwrap();
    assert_eq!(c.exclude, vec!["*-source".to_owned()]);
    assert_eq!(c.target.include, vec!["app-*".to_owned()]);
    assert_eq!(c.target.exclude, vec!["*-doc".to_owned()]);
    assert_eq!(c.target.max_nar_size_bytes(), Some(2 << 30));
    assert!(c.target.allow_incomplete_closures);
    let back = parse(&c.to_effective_toml()).unwrap();
    assert_eq!(back.target.max_nar_size_bytes(), Some(2 << 30));
    assert_eq!(
        parse("[target]\nurl = \"file:///x\"\nmax_nar_size = 1000\n")
            .unwrap()
            .target
            .max_nar_size_bytes(),
        Some(1000)
    );

    let err = parse("[target]\nurl = \"file:///x\"\nmax_nar_size = \"2 gigs\"\n")
        .unwrap_err()
        .to_string();
    // Refused by the TOML parser (ByteSize checks its unit while parsing): its message quotes the line, so
    // the key and value, and gives the line number.
    assert!(
        err.contains("max_nar_size = \"2 gigs\"")
            && err.contains("unknown unit")
            && err.contains("line 3"),
        "{err}"
    );
    let err = parse("[target]\nurl = \"file:///x\"\n\ninclude = [\"app-[\"]\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("target.include") && err.contains("app-[") && err.contains("line 4"),
        "{err}"
    );
    let err = parse("[target]\nurl = \"file:///x\"\nexclude = [\"{a\"]\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("target.exclude") && err.contains("line 3"),
        "{err}"
    );
    let err = parse("exclude = [\"[\"]\n[target]\nurl = \"file:///x\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`exclude`") && err.contains("line 1"), "{err}");
}

#[test]
fn metrics_listen_is_off_by_default_and_checked() {
    assert_eq!(
        parse("[target]\nurl = \"file:///x\"\n")
            .unwrap()
            .metrics_listen,
        None
    );
    for good in ["127.0.0.1:9464", "[::1]:9464", "/run/nixpush/metrics.sock"] {
        let c = parse(&format!(
            "metrics_listen = \"{good}\"\n[target]\nurl = \"file:///x\"\n"
        ))
        .unwrap();
        assert_eq!(c.metrics_listen.as_deref(), Some(good));
    }
    let err = parse("metrics_listen = \"localhost\"\n[target]\nurl = \"file:///x\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("metrics_listen") && err.contains("line 1"),
        "{err}"
    );
}

#[test]
fn gc_roots_keys_have_defaults_take_sizes_and_turn_off_with_an_empty_dir() {
    let c = parse("[target]\nurl = \"file:///c\"\n").unwrap();
    assert_eq!(c.gc_roots_dir(), Some(Path::new(DEFAULT_GC_ROOTS_DIR)));
    assert_eq!(c.gc_roots_max_bytes.0, 20 << 30);
    let c = parse(
        "gc_roots_dir = \"\"\ngc_roots_max_bytes = \"512 MiB\"\n[target]\nurl = \"file:///c\"\n",
    )
    .unwrap();
    assert_eq!(c.gc_roots_dir(), None);
    assert_eq!(c.gc_roots_max_bytes.0, 512 << 20);
    let back = parse(&c.to_effective_toml()).unwrap();
    assert_eq!(back.gc_roots_max_bytes, c.gc_roots_max_bytes);
    assert_eq!(back.gc_roots_dir(), None);
    let err = parse("gc_roots_dir = \"roots\"\n[target]\nurl = \"file:///c\"\n").unwrap_err();
    assert!(
        err.to_string()
            .contains("`gc_roots_dir` must be an absolute path"),
        "{err}"
    );
    let err = parse("gc_roots_max_bytes = \"20 GB please\"\n[target]\nurl = \"file:///c\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gc_roots_max_bytes") && err.contains("unknown unit"),
        "{err}"
    );
}

// See: #18
#[test]
fn upload_rates_parse_and_bad_ones_name_the_key() {
    let c = parse(
        "[target]\nurl = \"file:///x\"\nmax_upload_rate = \"4MiB/s\"\n\
         rate_schedule = [{ from = \"09:00\", to = \"18:00\", rate = \"512KiB/s\" },\
         { from = \"22:00\", to = \"06:00\", rate = \"0\" }]\n",
    )
    .unwrap();
    assert_eq!(
        c.target.max_upload_rate,
        crate::rate_schedule::Rate::BytesPerSec(4 << 20)
    );
    assert_eq!(c.target.rate_schedule.len(), 2);
    let back = parse(&c.to_effective_toml()).unwrap();
    assert_eq!(back.target.rate_schedule, c.target.rate_schedule);
    assert_eq!(back.target.max_upload_rate, c.target.max_upload_rate);
    let err = parse("[target]\nurl = \"file:///x\"\nmax_upload_rate = \"4 MiBps\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_upload_rate") && err.contains("line 3"),
        "{err}"
    );
    let err = parse(
        "[target]\nurl = \"file:///x\"\nrate_schedule = [{ from = \"9\", to = \"18:00\", rate = \"0\" }]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("rate_schedule") && err.contains("HH:MM"),
        "{err}"
    );
    let err = parse(
        "[target]\nurl = \"file:///x\"\nrate_schedule = [{ from = \"09:00\", to = \"18:00\", rate = \"0\" },\
         { from = \"17:00\", to = \"20:00\", rate = \"1MiB/s\" }]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("target.rate_schedule")
            && err.contains("09:00–18:00")
            && err.contains("17:00–20:00"),
        "{err}"
    );
}

#[test]
fn line_of_finds_keys_in_their_table() {
    let text = "socket = \"/s\"\n[target]\nurl = \"x\"\n  workers=3\n";
    assert_eq!(line_of(text, "socket"), Some(1));
    assert_eq!(line_of(text, "target.url"), Some(3));
    assert_eq!(line_of(text, "target.workers"), Some(4));
    assert_eq!(line_of(text, "url"), None);
    assert_eq!(line_of("target.url = \"x\"\n", "target.url"), Some(1));
}

#[test]
fn effective_toml_round_trips_and_hides_passwords() {
    let c = parse("[target]\nurl = \"https://user:hunter2@cache.example/x\"\n").unwrap();
    let shown = c.to_effective_toml();
    assert!(!shown.contains("hunter2"), "{shown}");
    let back = parse(&shown).unwrap();
    assert_eq!(back.workers(), c.workers());
    assert_eq!(back.state_dir, c.state_dir);
}
