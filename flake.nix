{
  description = "nixpush: push every Nix build to a binary cache in the background";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      # Linux only: the daemon relies on SO_PEERCRED, systemd and Linux's Unix socket semantics.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      cargoToml = builtins.fromTOML (builtins.readFile ./Cargo.toml);

      mkNixpush =
        pkgs:
        pkgs.rustPlatform.buildRustPackage {
          pname = "nixpush";
          inherit (cargoToml.package) version;
          # Only what cargo reads, so editing docs or examples does not rebuild the package.
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./Cargo.toml
              ./Cargo.lock
              ./src
              ./tests
              (lib.fileset.maybeMissing ./benches)
            ];
          };
          cargoLock.lockFile = ./Cargo.lock;
          nativeBuildInputs = [ pkgs.installShellFiles ];
          # Completions and manual pages come from the binary itself, which a cross build cannot run.
          postInstall = lib.optionalString (pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform) ''
            installShellCompletion --cmd nixpush \
              --bash <($out/bin/nixpush completions bash) \
              --zsh <($out/bin/nixpush completions zsh) \
              --fish <($out/bin/nixpush completions fish)
            $out/bin/nixpush man --dir man
            installManPage man/*.1
          '';
          # The integration tests (tests/) drive a real nix-daemon, nginx and loopback servers, which the
          # build sandbox does not have; they run in CI (scripts/test). The unit tests are pure.
          cargoTestFlags = [ "--lib" ];
          meta = {
            description = cargoToml.package.description;
            license = [
              lib.licenses.mit
              lib.licenses.asl20
            ];
            mainProgram = "nixpush";
            platforms = lib.platforms.linux;
          };
        };

      # The seed's `nix run .#cachix-push`, done with nixpush: build, then push the closure.
      mkCachixPush =
        pkgs:
        pkgs.writeShellApplication {
          name = "cachix-push";
          # `nix` is the caller's own, with its configuration.
          runtimeInputs = [ (mkNixpush pkgs) ];
          text = ''
            usage() {
              cat <<'EOF'
            Usage: cachix-push [INSTALLABLE...] [-- NIXPUSH-PUSH-OPTIONS...]

            Builds each INSTALLABLE (default: this host's NixOS system from the flake in the current
            directory, .#nixosConfigurations.<hostname>.config.system.build.toplevel) and pushes the
            closures with `nixpush push`, configured by NIXPUSH_CONFIG or /etc/nixpush/config.toml.
            EOF
            }

            installables=()
            while [ "$#" -gt 0 ]; do
              case "$1" in
                -h|--help) usage; exit 0 ;;
                --) shift; break ;;
                *) installables+=("$1"); shift ;;
              esac
            done
            if [ "''${#installables[@]}" -eq 0 ]; then
              installables=(".#nixosConfigurations.$HOSTNAME.config.system.build.toplevel")
            fi

            # An assignment, not a process substitution, so a failed build stops the script.
            built=$(
              nix --extra-experimental-features 'nix-command flakes' \
                build --no-link --print-out-paths "''${installables[@]}"
            )
            mapfile -t outputs <<<"$built"
            exec nixpush push "$@" "''${outputs[@]}"
          '';
        };
    in
    {
      overlays.default = final: _prev: { nixpush = mkNixpush final; };

      packages = forAllSystems (pkgs: {
        default = mkNixpush pkgs;
        nixpush = mkNixpush pkgs;
        cachix-push = mkCachixPush pkgs;
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
        cachix-push = {
          type = "app";
          program = lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.cachix-push;
        };
      });

      # The module, with nixpush built from this flake against the host's own nixpkgs.
      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nixos-module ];
          services.nixpush.package = lib.mkDefault (mkNixpush pkgs);
          # check-config runs at build time, on the build platform.
          services.nixpush.buildPackage = lib.mkDefault (mkNixpush pkgs.buildPackages);
        };

      checks.x86_64-linux = {
        package = self.packages.x86_64-linux.default;
        # Needs KVM: runs on a NixOS host, not in this repository's CI (see docs/nixos-and-systemd.md).
        vm = import ./nixos-module/test.nix {
          pkgs = nixpkgs.legacyPackages.x86_64-linux;
          module = self.nixosModules.default;
        };
      };
    };
}
