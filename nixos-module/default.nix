# NixOS module for nixpush: every build on this machine is queued by nixpush-hook and uploaded in the
# background by a socket-activated daemon.
#
# From the flake, `nixpush.nixosModules.default` brings this module with the package built by the flake. Imported
# directly (`imports = [ ./nixos-module ];`, e.g. from a checkout), it takes `pkgs.nixpush`, so add the flake's
# `overlays.default` too, or set `services.nixpush.package`.
#
#   services.nixpush = {
#     enable = true;
#     settings.target.url = "cachix://mycache";
#     authTokenFile = config.sops.secrets.cachix-token.path;
#     signingKeyFile = config.sops.secrets.cachix-signing-key.path;
#   };
#
# tests/nixos.rs evaluates this file without nixpkgs (tests/fixtures/nixos/eval-module.nix); keep to the lib
# functions that harness stands in for, or add the new ones there.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    optional
    optionalAttrs
    types
    ;

  cfg = config.services.nixpush;

  noPackage = throw ''
    services.nixpush.package: pkgs.nixpush does not exist. Import the module from the nixpush flake
    (nixpush.nixosModules.default, which brings its own package), add the flake's overlays.default to
    nixpkgs.overlays, or set services.nixpush.package.
  '';
  # For check-config, which runs at build time: on a cross build the host's binary cannot run there.
  isCross = pkgs.stdenv.buildPlatform.system != pkgs.stdenv.hostPlatform.system;
  settingsFormat = pkgs.formats.toml { };

  defaultSocket = "/run/nixpush/nixpush.sock";
  defaultStateDir = "/var/lib/nixpush";
  socketPath = cfg.settings.socket;
  stateDir = cfg.settings.state_dir;
  # "" turns the roots off.
  gcRootsDir = cfg.gcRootsDir;

  # systemd copies each LoadCredential= file here at service start, readable by the service alone, so the user
  # nixpush never needs access to the original (a sops-nix secret is root-only). Config values are literal paths.
  credentialsDir = "/run/credentials/nixpush.service";

  targetUrl = cfg.settings.target.url;
  namedTargets = cfg.settings.targets;
  stripQuery = url: builtins.head (lib.splitString "?" url);
  fileDirOf =
    url: if url != null && lib.hasPrefix "file://" url then stripQuery (lib.removePrefix "file://" url) else null;
  # Every file:// target's directory: the service may write there and nowhere else in the cache's filesystem.
  fileTargetDirs = builtins.filter (dir: dir != null) (
    [ (fileDirOf targetUrl) ] ++ lib.mapAttrsToList (_: t: fileDirOf t.url) namedTargets
  );
  cachixName =
    if targetUrl != null && lib.hasPrefix "cachix://" targetUrl then
      stripQuery (lib.removePrefix "cachix://" targetUrl)
    else
      null;
  substituterUrl =
    if cfg.substituterUrl != null then
      cfg.substituterUrl
    else if cachixName != null then
      "https://${cachixName}.cachix.org"
    else
      targetUrl;
  # `settings.target` and each of `settings.targets`: the keys nixpush reads from a target table.
  targetType = types.submodule {
    freeformType = settingsFormat.type;
    options = {
      url = mkOption {
        # Null only for a `target` left out because `targets` names every cache (asserted below).
        type = types.nullOr (types.strMatching "(file|https?|s3|cachix)://.+");
        default = null;
        example = "cachix://mycache";
        description = "`file:///dir`, `http(s)://host/prefix`, `s3://bucket?region=…&endpoint=…` or `cachix://NAME`.";
      };
      compression = mkOption {
        type = types.enum [
          "zstd"
          "xz"
          "none"
        ];
        default = "zstd";
        description = "NAR compression.";
      };
      workers = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "Parallel uploads; the number of CPUs when null.";
      };
    };
  };
  # LoadCredential= names of a named target's secrets.
  credentialOf = name: kind: "${kind}-${name}";

  # TOML has no null: unset optional keys (e.g. target.workers) are left out and nixpush uses its default.
  finalSettings = lib.filterAttrsRecursive (_: value: value != null) (
    cfg.settings
    // {
      allowed_users = cfg.allowedUsers ++ (cfg.settings.allowed_users or [ ]);
      metrics_listen = if cfg.metrics.enable then cfg.metrics.listen else cfg.settings.metrics_listen or null;
      gc_roots_dir = gcRootsDir;
      target =
        if targetUrl == null then
          null
        else
          cfg.settings.target
          // optionalAttrs (cfg.signingKeyFile != null) {
            signing_key_file = "${credentialsDir}/signing-key";
          }
          // optionalAttrs (cfg.authTokenFile != null) {
            auth_token_file = "${credentialsDir}/auth-token";
          };
      targets = lib.mapAttrs (
        name: target:
        let
          secrets = cfg.targetSecrets.${name} or { };
        in
        target
        // optionalAttrs ((secrets.signingKeyFile or null) != null) {
          signing_key_file = "${credentialsDir}/${credentialOf name "signing-key"}";
        }
        // optionalAttrs ((secrets.authTokenFile or null) != null) {
          auth_token_file = "${credentialsDir}/${credentialOf name "auth-token"}";
        }
      ) namedTargets;
    }
  );
  # The config file has no empty tables: no `[targets]` without targets.
  finalSettingsFile = lib.filterAttrs (name: value: !(name == "targets" && value == { })) finalSettings;

  rawConfigFile = settingsFormat.generate "nixpush.toml" finalSettingsFile;

  # Checked at build time, as RFC 42 modules do: a typo fails `nixos-rebuild`, not the running service.
  configFile =
    if cfg.checkConfig then
      pkgs.runCommand "nixpush-checked.toml" { raw = rawConfigFile; } ''
        # Secrets are absent from the build sandbox; the service checks them when it starts.
        ${cfg.buildPackage}/bin/nixpush check-config --skip-files "$raw" > /dev/null
        cp "$raw" "$out"
      ''
    else
      rawConfigFile;

  # Credentials in a URL would be copied into nix.conf and the store, both world-readable.
  urlHasPassword = url: builtins.match "[A-Za-z0-9+.-]+://[^/@?#]*:[^/@?#]*@.*" url != null;
  urlHasSecretQuery =
    url: builtins.match ".*[?&][^=&]*([Ss]ecret|[Tt]oken|[Pp]assword|[Ss]ignature)[^=&]*=.*" url != null;
  urlAssertions =
    name: url:
    optional (url != null) {
      assertion = !(urlHasPassword url || urlHasSecretQuery url);
      message = "services.nixpush.${name} holds a credential (user:password@ or a secret query parameter); it would be copied into nix.conf and the world-readable Nix store. Remove it from the URL and use services.nixpush.authTokenFile (a bearer token for HTTP and Cachix) or services.nixpush.environmentFile (a credentials file, e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for S3).";
    };

  # The hook runs these after nixpush-hook has handed over the build; nix-daemon passes the variable on.
  hookChain = builtins.concatStringsSep ":" (map toString cfg.hook.chain);

  # Where secrets must not come from: a Nix path literal is copied into the world-readable store.
  secretPathAssertions =
    name: value:
    optional (value != null) {
      assertion = lib.hasPrefix "/" value && !(lib.hasPrefix "${builtins.storeDir}/" value);
      message = "services.nixpush.${name} must be an absolute path outside the Nix store (e.g. a sops-nix secret's path), got ${value}.";
    };
in
{
  options.services.nixpush = {
    enable = mkEnableOption "nixpush, which uploads every Nix build on this machine to a binary cache";

    # mkPackageOption's semantics (default pkgs.nixpush), with an error that says what to do when it is missing.
    package = mkOption {
      type = types.package;
      default = pkgs.nixpush or noPackage;
      defaultText = literalExpression "pkgs.nixpush";
      description = ''
        The nixpush package. The flake's `nixosModules.default` sets it to the flake's own build; imported
        directly, the module needs the flake's overlay (or this option set).
      '';
    };

    buildPackage = mkOption {
      type = types.package;
      default =
        if isCross then pkgs.buildPackages.nixpush or noPackage else cfg.package;
      defaultText = literalExpression "if cross-compiling then pkgs.buildPackages.nixpush else config.services.nixpush.package";
      description = ''
        nixpush for the build platform, which runs `check-config` at build time (on a cross build the host's
        package cannot run there). The flake's `nixosModules.default` sets it to the flake's own build.
      '';
    };

    settings = mkOption {
      description = ''
        Contents of /etc/nixpush/config.toml. Any key nixpush knows may be set here (see systemd/config.toml);
        the common ones are typed below. Secrets are never set here: use `signingKeyFile` and `authTokenFile`.
      '';
      default = { };
      example = literalExpression ''
        {
          target.url = "s3://my-cache?region=eu-central-1";
          target.compression = "zstd";
          exclude = [ "*-source" ];
        }
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          socket = mkOption {
            type = types.str;
            default = defaultSocket;
            description = "The hook socket. The socket unit listens here; nix-daemon is told when it is not the default.";
          };
          socket_mode = mkOption {
            type = types.str;
            default = "0666";
            description = "Mode of the socket. Anyone may connect; only root and `allowedUsers` may enqueue.";
          };
          socket_group = mkOption {
            type = types.nullOr types.str;
            default = null;
            description = "Group owning the socket, for a tighter `socket_mode`.";
          };
          state_dir = mkOption {
            type = types.str;
            default = defaultStateDir;
            description = "The queue and the hook's spool live here.";
          };
          upstream = mkOption {
            type = types.listOf types.str;
            default = [ "https://cache.nixos.org" ];
            description = "Caches whose paths are never uploaded. `[ ]` uploads everything.";
          };
          exclude = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [ "*-source" "*.iso" ];
            description = "Glob patterns over store path names (`<hash>-<name>`) that are never uploaded.";
          };
          target = mkOption {
            description = "The cache every build goes to (the target named `default`). May be left out when `targets` names every cache.";
            # So that a missing URL is reported as settings.target.url.
            default = { };
            type = targetType;
          };
          targets = mkOption {
            description = ''
              More caches, each uploaded to on its own with the keys of `target` (`[targets.NAME]`): every build
              lands in each; a target that is down or refuses its token holds up no other. Their secrets go in
              `targetSecrets.NAME`.
            '';
            default = { };
            example = lib.literalExpression ''
              { offsite = { url = "s3://offsite-cache?region=eu-central-1"; max_upload_rate = "2MiB/s"; }; }
            '';
            type = types.attrsOf targetType;
          };
        };
      };
    };

    targetSecrets = mkOption {
      default = { };
      example = lib.literalExpression ''
        { offsite.signingKeyFile = config.sops.secrets.offsite-key.path; }
      '';
      description = ''
        Secret files of the `settings.targets.NAME` caches, passed with LoadCredential= like `signingKeyFile` and
        `authTokenFile` (which belong to `settings.target`).
      '';
      type = types.attrsOf (
        types.submodule {
          options = {
            signingKeyFile = mkOption {
              type = types.nullOr types.str;
              default = null;
              description = "Secret key that signs this target's narinfos.";
            };
            authTokenFile = mkOption {
              type = types.nullOr types.str;
              default = null;
              description = "Bearer token for this target (HTTP, Cachix).";
            };
          };
        }
      );
    };

    signingKeyFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/nixpush/signing-key";
      description = ''
        Secret key (`nix-store --generate-binary-cache-key` or `cachix generate-keypair` format) that signs every
        narinfo. Passed to the service with LoadCredential=, so it stays readable by root only. Give a path as a
        string (e.g. `config.sops.secrets.nixpush-key.path`), never a Nix path literal.
      '';
    };

    authTokenFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/cachix-token";
      description = "Bearer token for HTTP and Cachix targets, passed with LoadCredential= like `signingKeyFile`.";
    };

    environmentFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/nixpush-s3.env";
      description = "`KEY=value` lines for the service's environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY for S3), read by systemd as root.";
    };

    gcRootsDir = mkOption {
      type = types.str;
      default = "/nix/var/nix/gcroots/nixpush";
      example = "";
      description = ''
        Directory of the garbage-collector roots that keep queued, uploading and failed paths from
        `nix-collect-garbage` until they are uploaded (settings.gc_roots_dir). It must lie under
        /nix/var/nix/gcroots for Nix to see the roots; the service may write there and nowhere else in /nix.
        `""` turns the roots off. Bound them with `settings.gc_roots_max_bytes` (default "20GiB").
      '';
    };

    allowedUsers = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "alice" ];
      description = "Users besides root (the hook runs as root inside nix-daemon) who may enqueue paths through the socket.";
    };

    hook.enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Set `nix.settings.post-build-hook` to nixpush-hook, so every build on this machine is queued. Nix has one
        post-build-hook: to keep another one, list it in `hook.chain` rather than setting it twice (which NixOS
        reports as conflicting definitions). With `false`, nothing is queued automatically; `nixpush push`
        still works.
      '';
    };

    hook.chain = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = literalExpression ''[ "''${pkgs.writeShellScript "notify" "echo built $OUT_PATHS"}" ]'';
      description = ''
        Other post-build hooks (programs, run with the environment Nix gives the hook) that nixpush-hook runs
        one after the other once it has handed the build to the daemon. Their exit status does not fail the
        build; a non-zero one is reported in the build log. A hook that hangs still holds the build up, as it
        would on its own.
      '';
    };

    addToSubstituters = mkOption {
      type = types.bool;
      default = false;
      description = "Add the target's read URL to `nix.settings.substituters` and `publicKey` to `trusted-public-keys`.";
    };

    substituterUrl = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "https://cache.example.org";
      description = "URL Nix reads the cache from. When null: https://NAME.cachix.org for cachix://NAME, else the target URL.";
    };

    publicKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "mycache.cachix.org-1:AAAA…=";
      description = "Public half of `signingKeyFile` (or the Cachix cache's key), trusted when `addToSubstituters` is set.";
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = "Run `nixpush check-config` on the generated configuration at build time.";
    };

    metrics.enable = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Serve Prometheus metrics at `/metrics` on `metrics.listen` (sets `metrics_listen`). No firewall port is
        opened: for a scraper on another host, listen on an address it can reach and open the port yourself
        (`networking.firewall.allowedTCPPorts`). examples/prometheus/ has a scrape job and alert rules.
      '';
    };

    metrics.listen = mkOption {
      type = types.str;
      default = "127.0.0.1:9464";
      example = "/run/nixpush/metrics.sock";
      description = ''
        `IP:PORT`, or an absolute Unix socket path (mode 0660, group nixpush; /run/nixpush is writable by the
        service). Changed with a reload, without a restart.
      '';
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = !(cfg.addToSubstituters && cfg.publicKey == null);
          message = "services.nixpush.addToSubstituters needs services.nixpush.publicKey, or Nix will refuse the cache's signatures.";
        }
        {
          assertion = !(cfg.signingKeyFile != null && cfg.settings.target ? signing_key_file);
          message = "Set either services.nixpush.signingKeyFile or settings.target.signing_key_file, not both.";
        }
        {
          assertion = !(cfg.metrics.enable && cfg.settings ? metrics_listen);
          message = "Set either services.nixpush.metrics.enable (with metrics.listen) or settings.metrics_listen, not both.";
        }
        {
          assertion = !(cfg.authTokenFile != null && cfg.settings.target ? auth_token_file);
          message = "Set either services.nixpush.authTokenFile or settings.target.auth_token_file, not both.";
        }
      ]
      ++ [
        {
          assertion = targetUrl != null || namedTargets != { };
          message = "services.nixpush.settings.target.url is not set: name the cache every build goes to (or name caches in settings.targets.NAME.url).";
        }
        {
          assertion = targetUrl != null || (cfg.signingKeyFile == null && cfg.authTokenFile == null);
          message = "services.nixpush.signingKeyFile and authTokenFile belong to settings.target, which has no url; use targetSecrets.NAME for settings.targets.NAME.";
        }
      ]
      ++ lib.concatLists (
        lib.mapAttrsToList (name: target: [
          {
            assertion = target.url != null;
            message = "services.nixpush.settings.targets.${name}.url is not set.";
          }
          {
            assertion = name != "default" || targetUrl == null;
            message = "services.nixpush.settings.targets.default names the target of settings.target; give it another name.";
          }
        ]) namedTargets
      )
      ++ lib.mapAttrsToList (name: _: {
        assertion = namedTargets ? ${name};
        message = "services.nixpush.targetSecrets.${name} names no target in settings.targets.";
      }) cfg.targetSecrets
      ++ secretPathAssertions "signingKeyFile" cfg.signingKeyFile
      ++ secretPathAssertions "authTokenFile" cfg.authTokenFile
      ++ lib.concatLists (
        lib.mapAttrsToList (
          name: secrets:
          secretPathAssertions "targetSecrets.${name}.signingKeyFile" secrets.signingKeyFile
          ++ secretPathAssertions "targetSecrets.${name}.authTokenFile" secrets.authTokenFile
        ) cfg.targetSecrets
      )
      ++ urlAssertions "settings.target.url" targetUrl
      ++ lib.concatLists (
        lib.mapAttrsToList (name: target: urlAssertions "settings.targets.${name}.url" target.url) namedTargets
      )
      ++ urlAssertions "substituterUrl" cfg.substituterUrl;

      environment.systemPackages = [ cfg.package ];
      # The default path, so `nixpush status` and `nixpush doctor` need no --config.
      environment.etc."nixpush/config.toml".source = configFile;

      # A static user rather than DynamicUser=: the hook (root, inside nix-daemon) writes the spool under
      # state_dir, which DynamicUser would move behind /var/lib/private, and a fixed uid keeps the queue's
      # ownership stable across reboots.
      users.users.nixpush = {
        isSystemUser = true;
        group = "nixpush";
        home = stateDir;
        description = "nixpush binary cache uploader";
      };
      users.groups.nixpush = { };

      # Made at boot, before nix-daemon, so the hook can spool before the daemon first starts. spool/ must be
      # the daemon's (a directory the root-run hook created would be root's, and the daemon could neither set
      # its mode nor delete what it imported); 01733 as the daemon sets it: anyone's hook may drop a file,
      # nobody else may list. state_dir is traversable for that, not listable.
      systemd.tmpfiles.rules = [
        "d ${stateDir} 0711 nixpush nixpush - -"
        "d ${stateDir}/spool 1733 nixpush nixpush - -"
      ]
      ++ map (dir: "d ${dir} 0755 nixpush nixpush - -") fileTargetDirs
      # The daemon's GC roots; /nix is read-only to it but for this directory (ReadWritePaths= below).
      ++ optional (gcRootsDir != "") "d ${gcRootsDir} 0755 nixpush nixpush - -";

      # The socket exists from early boot, so a hook never misses the daemon: systemd holds connections until
      # the service is up.
      systemd.sockets.nixpush = {
        description = "nixpush hook socket";
        wantedBy = [ "sockets.target" ];
        listenStreams = [ socketPath ];
        socketConfig = {
          SocketMode = cfg.settings.socket_mode;
        }
        // optionalAttrs (cfg.settings.socket_group != null) { SocketGroup = cfg.settings.socket_group; };
      };

      systemd.services.nixpush = {
        description = "nixpush: upload every Nix build to a binary cache";
        # Also started at boot, to drain what was queued before a reboot without waiting for the next build.
        wantedBy = [ "multi-user.target" ];
        requires = [ "nixpush.socket" ];
        after = [
          "nixpush.socket"
          "network.target"
          "nix-daemon.socket"
        ];
        # `nix path-info` through nix-daemon is the fallback when the database cannot be read directly.
        path = [ config.nix.package ];
        # glibc keeps a malloc arena per busy thread, and freed memory stays in them: two keep memory flat.
        environment.MALLOC_ARENA_MAX = "2";
        # A changed configuration is applied with SIGHUP; the queue keeps running.
        reloadTriggers = [ configFile ];
        # Restart a crash-looping daemon forever (every RestartSec) instead of giving up after systemd's default
        # five starts in ten seconds: builds keep queueing through the hook, and a fixed target drains them.
        startLimitIntervalSec = 0;
        serviceConfig = {
          Type = "notify";
          ExecStart = "${cfg.package}/bin/nixpush daemon";
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          WatchdogSec = "30s";
          Restart = "on-failure";
          RestartSec = "2s";
          TimeoutStopSec = "30s";
          # No CPUSchedulingPolicy = "idle" (nor Nice, IOSchedulingClass): acks would wait behind builds, and
          # every build waits for its hook. The daemon lowers only its hashing and compression threads
          # (settings.upload_priority).
          User = "nixpush";
          Group = "nixpush";
          RuntimeDirectory = "nixpush";
          # The socket unit's socket lives in /run/nixpush: removing the directory on stop would cut the hook
          # off until the socket unit is restarted.
          RuntimeDirectoryPreserve = "yes";
          LoadCredential =
            optional (cfg.signingKeyFile != null) "signing-key:${cfg.signingKeyFile}"
            ++ optional (cfg.authTokenFile != null) "auth-token:${cfg.authTokenFile}"
            ++ lib.concatLists (
              lib.mapAttrsToList (
                name: secrets:
                optional (secrets.signingKeyFile != null) "${credentialOf name "signing-key"}:${secrets.signingKeyFile}"
                ++ optional (secrets.authTokenFile != null) "${credentialOf name "auth-token"}:${secrets.authTokenFile}"
              ) cfg.targetSecrets
            );
          EnvironmentFile = optional (cfg.environmentFile != null) cfg.environmentFile;
          ReadWritePaths =
            fileTargetDirs
            ++ optional (!lib.hasPrefix "/var/lib/" stateDir) stateDir
            # "-": a missing directory (tmpfiles not run yet) must not keep the service from starting; the
            # daemon then reports the roots' error in `nixpush status` and keeps acknowledging builds.
            ++ optional (gcRootsDir != "") "-${gcRootsDir}";

          # Reads the store (read-only under ProtectSystem=strict, as is /nix/var/nix/db), writes only its state
          # directory and a file:// target. Connecting to nix-daemon's socket still works on a read-only mount.
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          NoNewPrivileges = true;
          CapabilityBoundingSet = "";
          AmbientCapabilities = "";
          RestrictAddressFamilies = [
            "AF_UNIX"
            "AF_INET"
            "AF_INET6"
          ];
          SystemCallFilter = [ "@system-service" ];
          SystemCallErrorNumber = "EPERM";
          SystemCallArchitectures = "native";
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          RemoveIPC = true;
          # No PrivateUsers=: inside a user namespace the hook's uid 0 would read back from SO_PEERCRED as
          # nobody, and the daemon would refuse every build.
        }
        // (
          if lib.hasPrefix "/var/lib/" stateDir then
            {
              StateDirectory = lib.removePrefix "/var/lib/" stateDir;
              StateDirectoryMode = "0711";
            }
          else
            { }
        );
      };
    }

    (mkIf cfg.hook.enable {
      nix.settings.post-build-hook = "${cfg.package}/bin/nixpush-hook";
      # The hook reads no configuration, only these two variables, so a moved socket or state directory is
      # announced to the nix-daemon that runs it.
      systemd.services.nix-daemon.environment =
        optionalAttrs (socketPath != defaultSocket) { NIXPUSH_SOCKET = socketPath; }
        // optionalAttrs (stateDir != defaultStateDir) { NIXPUSH_SPOOL = "${stateDir}/spool"; }
        // optionalAttrs (cfg.hook.chain != [ ]) { NIXPUSH_HOOK_CHAIN = hookChain; };
    })

    (mkIf (cfg.addToSubstituters && substituterUrl != null) {
      nix.settings.substituters = [ substituterUrl ];
      nix.settings.trusted-public-keys = [ cfg.publicKey ];
    })
  ]);
}
