//! S3 credentials as AWS users set them up, against a real SigV4-checking S3 server (`s3s-fs`) that accepts only
//! the key pair a loopback STS / instance-metadata stand-in hands out: web identity (GitHub Actions OIDC), IMDSv2,
//! profiles of the config file, keys refreshed before they expire and after the bucket refuses them as expired.
//! A proxy in front of the bucket records every request, so each test sees which session token signed it; no
//! key, secret or token may appear in what nixpush prints, logs or reports. See: #19
//!
//! s3s-fs checks the signature, which covers `X-Amz-Security-Token`, but keeps no list of valid session tokens;
//! that the right token was sent is what the proxy's log shows.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::faultproxy::{Fault, FaultProxy};
use crate::harness::aws::{apply, clean_env, expiration_of, AwsStandIn};
use crate::harness::cache::assert_nix_copies;
use crate::harness::process::{output, wait_until_within};
use crate::remote::{build_paths, nix_key};
use crate::s3s::S3sFs;
use crate::util::{TestDaemon, TestEnv, NIXPUSH};

const BUCKET: &str = "nixpush-creds";
/// The only keys the bucket takes, handed out by the stand-in.
const TEMP_KEY: &str = "ASIANIXPUSHTEMP";
const TEMP_SECRET: &str = "temp-s3cr3t-from-the-stand-in";
const ROLE: &str = "arn:aws:iam::123456789012:role/nixpush-cache-writer";

/// The `[target]` body for the bucket behind `proxy`, with `params` added to the URL.
fn target(proxy: &FaultProxy, signing_key: &Path, params: &str) -> String {
    format!(
        "url = \"s3://{BUCKET}?endpoint={}&region=us-east-1{params}\"\nsigning_key_file = \"{}\"",
        proxy.url(),
        signing_key.display()
    )
}

/// A clean AWS environment plus web identity through the stand-in, as GitHub Actions sets it up.
fn web_identity_env(env: &TestEnv, stand_in: &AwsStandIn) -> Vec<(String, String)> {
    let mut vars = clean_env(env.dir.path());
    for (name, value) in [
        (
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            stand_in.token_file.display().to_string(),
        ),
        ("AWS_ROLE_ARN", ROLE.to_owned()),
        ("AWS_ROLE_SESSION_NAME", "nixpush-ci-run".to_owned()),
        ("AWS_ENDPOINT_URL_STS", stand_in.sts_url()),
    ] {
        vars.push((name.to_owned(), value));
    }
    vars
}

/// `nixpush --config … ARGS` with `vars`; (success, stdout + stderr).
fn nixpush(env: &TestEnv, vars: &[(String, String)], args: &[&str]) -> (bool, String) {
    let out = output(apply(
        Command::new(NIXPUSH)
            .arg("--config")
            .arg(&env.config_path)
            .args(args)
            .env("TMPDIR", env.dir.path()),
        vars,
    ));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `nixpush push` of `paths`; fails the test unless every path went up.
fn push(env: &TestEnv, vars: &[(String, String)], paths: &[String]) -> String {
    let mut args = vec!["push", "--no-upstream", "--json"];
    args.extend(paths.iter().map(String::as_str));
    let (ok, text) = nixpush(env, vars, &args);
    assert!(ok, "push failed: {text}");
    text
}

/// The session token each request the bucket answered was signed with (`X-Amz-Security-Token`).
fn session_tokens(proxy: &FaultProxy) -> Vec<String> {
    proxy
        .stats
        .answered()
        .iter()
        .map(|(target, _)| {
            target
                .split(['?', '&'])
                .find_map(|p| p.strip_prefix("X-Amz-Security-Token="))
                .unwrap_or("(none)")
                .to_owned()
        })
        .collect()
}

/// The stand-in, the bucket that takes only its keys, the recording proxy in front of the bucket, and a test
/// environment whose `[target]` is that bucket, signed with a key of its own.
struct Creds {
    stand_in: AwsStandIn,
    server: S3sFs,
    proxy: FaultProxy,
    env: TestEnv,
    sec: PathBuf,
    public: String,
}

impl Creds {
    /// Keys that live `lifetime`; the proxy fails a share `rate` of requests with `faults` (see
    /// [`FaultProxy::start`]); the signing key is named `key_name`.
    fn start(key_name: &str, lifetime: Duration, rate: f64, faults: &[Fault]) -> Creds {
        let stand_in = AwsStandIn::start(TEMP_KEY, TEMP_SECRET, ROLE, lifetime);
        let server = S3sFs::start_with_keys(&[BUCKET], TEMP_KEY, TEMP_SECRET);
        let proxy = FaultProxy::start(server.port, rate, faults, Duration::ZERO, 1);
        let env = TestEnv::new();
        let (sec, public) = nix_key(env.dir.path(), key_name);
        env.write_config_with("", &target(&proxy, &sec, ""));
        Creds {
            stand_in,
            server,
            proxy,
            env,
            sec,
            public,
        }
    }

    /// Keys that last the hour, nothing faulted.
    fn healthy(key_name: &str) -> Creds {
        Creds::start(key_name, Duration::from_secs(3600), 0.0, &[])
    }

    /// Real Nix fetches every path in `paths` from the bucket under the signing key.
    fn assert_nix_reads(&self, paths: &[String]) {
        assert_nix_copies(&self.server.nix_url(BUCKET), &self.public, paths);
    }

    /// Every request the bucket answered was signed with session token `token`, and there was at least one.
    fn assert_signed_only_with(&self, token: &str) {
        let used = session_tokens(&self.proxy);
        assert!(
            !used.is_empty() && used.iter().all(|t| t == token),
            "{token}: {used:?}"
        );
    }
}

/// Fails the test if `text` holds any of `secrets`.
fn assert_no_secret(text: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(!text.contains(secret.as_str()), "{secret} leaked:\n{text}");
    }
}

/// The session tokens the stand-in issued.
fn issued_tokens(stand_in: &AwsStandIn) -> Vec<String> {
    stand_in
        .calls()
        .iter()
        .filter_map(|c| c["session_token"].as_str().map(str::to_owned))
        .collect()
}

/// `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`, as GitHub Actions OIDC sets them: nixpush asks STS with the
/// token and role, signs every request with the keys and session token it got, and `check-config` names the
/// source without a secret. See: #19
#[test]
fn web_identity_keys_from_sts_fill_a_bucket_nix_reads() {
    let creds = Creds::healthy("nixpush-creds-webid-1");
    let (env, stand_in) = (&creds.env, &creds.stand_in);
    let vars = web_identity_env(env, stand_in);
    let paths = build_paths(env.dir.path(), "credswebid", 1000);

    let text = push(env, &vars, &paths);
    let sts = stand_in.calls_of("sts");
    assert_eq!(sts.len(), 1, "{sts:?}");
    assert_eq!(sts[0]["status"], 200, "{sts:?}");
    assert_eq!(
        (sts[0]["role_arn"].as_str(), sts[0]["session_name"].as_str()),
        (Some(ROLE), Some("nixpush-ci-run"))
    );
    let issued = sts[0]["session_token"].as_str().unwrap().to_owned();
    creds.assert_signed_only_with(&issued);
    creds.assert_nix_reads(&paths);

    let (ok, check) = nixpush(env, &vars, &["check-config"]);
    assert!(ok, "{check}");
    assert!(
        check.contains(&format!(
            "AWS credentials from web identity (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN): role {ROLE}"
        )),
        "{check}"
    );
    let secrets = [
        TEMP_KEY.to_owned(),
        TEMP_SECRET.to_owned(),
        issued,
        stand_in.token(),
    ];
    assert_no_secret(&format!("{text}{check}"), &secrets);
}

/// On EC2 nothing else is set: the keys come from IMDSv2 (token PUT, role, credentials), every metadata
/// request carrying the session token the stand-in requires. See: #19
#[test]
fn instance_metadata_keys_fill_a_bucket() {
    let creds = Creds::healthy("nixpush-creds-imds-1");
    let (env, stand_in) = (&creds.env, &creds.stand_in);
    // Like the real service, the stand-in refuses a GET without the token.
    let (status, _) = stand_in.get("/latest/meta-data/iam/security-credentials/", &[]);
    assert_eq!(status, 401);
    let mut vars = clean_env(env.dir.path());
    vars.push(("AWS_EC2_METADATA_DISABLED".into(), String::new()));
    vars.push((
        "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
        stand_in.imds_url(),
    ));
    let paths = build_paths(env.dir.path(), "credsimds", 1000);

    let text = push(env, &vars, &paths);
    let calls = stand_in.calls();
    let kinds: Vec<(&str, u64)> = calls
        .iter()
        .map(|c| (c["kind"].as_str().unwrap(), c["status"].as_u64().unwrap()))
        .collect();
    // The test's own refused GET, then nixpush's three requests, each accepted.
    assert_eq!(
        kinds,
        [
            ("imds-role", 401),
            ("imds-token", 200),
            ("imds-role", 200),
            ("imds-credentials", 200)
        ],
        "{calls:?}"
    );
    let issued = calls[3]["session_token"].as_str().unwrap().to_owned();
    creds.assert_signed_only_with(&issued);
    creds.assert_nix_reads(&paths);
    assert_no_secret(&text, &[TEMP_SECRET.to_owned(), issued]);
}

/// Profiles of the config file: `[profile ci]` with keys, chosen by `AWS_PROFILE`; `[profile oidc]` with
/// `role_arn` and `web_identity_token_file`, chosen by `profile=` in the URL (as Nix's S3 store takes it). See: #19
#[test]
fn profiles_of_the_config_file() {
    let creds = Creds::healthy("nixpush-creds-profile-1");
    let (env, stand_in, proxy, sec) = (&creds.env, &creds.stand_in, &creds.proxy, &creds.sec);
    let config_file = env.dir.path().join("aws-config");
    std::fs::write(
        &config_file,
        format!(
            "[default]\nregion = us-east-1\n\n[profile ci]\naws_access_key_id = {TEMP_KEY}\n\
             aws_secret_access_key = {TEMP_SECRET}\n\n[profile oidc]\nrole_arn = {ROLE}\n\
             web_identity_token_file = {}\nrole_session_name = from-profile\n",
            stand_in.token_file.display()
        ),
    )
    .unwrap();
    let mut vars = clean_env(env.dir.path());
    vars.push(("AWS_CONFIG_FILE".into(), config_file.display().to_string()));
    vars.push(("AWS_ENDPOINT_URL_STS".into(), stand_in.sts_url()));

    let mut with_profile = vars.clone();
    with_profile.push(("AWS_PROFILE".into(), "ci".into()));
    let first = build_paths(env.dir.path(), "credsprofile", 1000);
    let text = push(env, &with_profile, &first);
    assert!(stand_in.calls_of("sts").is_empty());
    assert!(session_tokens(proxy).iter().all(|t| t == "(none)"));

    env.write_config_with("", &target(proxy, sec, "&profile=oidc"));
    let second = build_paths(env.dir.path(), "credsprofileoidc", 1000);
    let (ok, check) = nixpush(env, &vars, &["check-config"]);
    assert!(
        ok && check.contains("web identity (profile [oidc] of"),
        "{check}"
    );
    let more = push(env, &vars, &second);
    let sts = stand_in.calls_of("sts");
    assert_eq!(sts.len(), 1, "{sts:?}");
    assert_eq!(
        (sts[0]["status"].as_u64(), sts[0]["session_name"].as_str()),
        (Some(200), Some("from-profile"))
    );
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    creds.assert_nix_reads(&all);
    let mut secrets = issued_tokens(stand_in);
    secrets.extend([TEMP_SECRET.to_owned(), stand_in.token()]);
    assert_no_secret(&format!("{text}{check}{more}"), &secrets);
}

/// A daemon with short-lived web identity keys: they are refreshed before the next batch once they expire,
/// the rotated token file is read again, every path lands, and neither the log nor `status` shows a secret.
/// See: #19
#[test]
fn daemon_refreshes_expiring_keys_and_rereads_the_rotated_token() {
    let lifetime = Duration::from_secs(6);
    let Creds {
        stand_in,
        server,
        proxy,
        env,
        public,
        ..
    } = Creds::start("nixpush-creds-refresh-1", lifetime, 0.0, &[]);
    let vars = web_identity_env(&env, &stand_in);
    let first = build_paths(env.dir.path(), "credsrefresh", 1000);
    let second = build_paths(env.dir.path(), "credsrefreshb", 1000);
    let first_token = stand_in.token();
    let borrowed: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let daemon = TestDaemon::start_uploading_with_env(env, &borrowed);

    let refs: Vec<&str> = first.iter().map(String::as_str).collect();
    assert!(daemon.env.run_hook(&refs, None).status.success());
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}\n{}", daemon.log());
    // Every key STS handed out so far runs out while the daemon idles; the OIDC issuer rotates the token.
    wait_until_within(
        "the keys to expire",
        lifetime + Duration::from_secs(120),
        || {
            stand_in
                .calls_of("sts")
                .last()
                .is_some_and(|call| SystemTime::now() > expiration_of(call))
        },
    );
    let before_rotation = stand_in.calls_of("sts").len();
    let second_token = stand_in.rotate_token();

    let refs: Vec<&str> = second.iter().map(String::as_str).collect();
    assert!(daemon.env.run_hook(&refs, None).status.success());
    let status = daemon.wait_drained();
    assert_eq!(status["failed"], 0, "{status}\n{}", daemon.log());

    // New keys came with the new token: the stand-in accepts only the token now in the file.
    let sts = stand_in.calls_of("sts");
    assert!(sts.len() > before_rotation, "{sts:?}");
    assert!(sts.iter().all(|c| c["status"] == 200), "{sts:?}");
    // The last requests were signed with keys fetched after the rotation.
    let issued = issued_tokens(&stand_in);
    let used = session_tokens(&proxy);
    assert_ne!(used.first(), used.last(), "{used:?}");
    assert_eq!(used.last(), issued.last(), "{used:?} {issued:?}");
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    assert_nix_copies(&server.nix_url(BUCKET), &public, &all);

    let mut secrets = issued;
    secrets.extend([
        TEMP_KEY.to_owned(),
        TEMP_SECRET.to_owned(),
        first_token,
        second_token,
    ]);
    let log = daemon.log();
    assert!(log.contains("AWS credentials from web identity"), "{log}");
    assert_no_secret(&format!("{log}{}", daemon.status()), &secrets);
}

/// The bucket refuses the session token as expired (403 `ExpiredToken`) while nixpush still thinks it valid:
/// new keys are fetched and the request sent again; nothing fails and STS was asked exactly twice. See: #19
#[test]
fn an_expired_token_answer_refreshes_the_keys_and_retries() {
    let creds = Creds::start(
        "nixpush-creds-expired-1",
        Duration::from_secs(3600),
        1.0,
        &[Fault::ExpiredToken],
    );
    let (env, stand_in, proxy) = (&creds.env, &creds.stand_in, &creds.proxy);
    // Every request signed with the first session token is refused.
    proxy.only_matching("X-Amz-Security-Token=sts-session-1-");
    let vars = web_identity_env(env, stand_in);
    let paths = build_paths(env.dir.path(), "credsexpired", 1000);

    let text = push(env, &vars, &paths);
    let sts = stand_in.calls_of("sts");
    assert_eq!(sts.len(), 2, "{sts:?}");
    assert!(
        proxy.stats.faults.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "no request was refused"
    );
    let second = sts[1]["session_token"].as_str().unwrap().to_owned();
    creds.assert_signed_only_with(&second);
    creds.assert_nix_reads(&paths);
    let mut secrets = issued_tokens(stand_in);
    secrets.extend([TEMP_SECRET.to_owned(), stand_in.token()]);
    assert_no_secret(&text, &secrets);
}
