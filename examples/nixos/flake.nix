# A flake-based NixOS configuration that pushes every build to Cachix with nixpush, the token and signing key
# kept with sops-nix. Switch as usual (`nh os switch`, `nixos-rebuild switch --flake .#myhost`): from then on
# every build on the machine, the switch's own included, lands in the cache.
#
# `nix run .#cachix-push` builds this host's system and pushes its closure (what `cachix push` did by hand).
#
# Before the first use: set the nixpush input's URL below, then `nix flake lock` (it needs network access) and
# commit the flake.lock it writes, so every machine and CI run builds the same revisions.
{
  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    sops-nix = {
      url = "github:Mic92/sops-nix";
      inputs.nixpkgs.follows = "nixpkgs";
    };
    nixpush = {
      # Replace OWNER with the account that publishes nixpush (or use git+https://…, or path:/src/nixpush for
      # a local checkout); `nix flake lock` then records the exact revision in flake.lock.
      url = "github:OWNER/nixpush";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      nixpkgs,
      sops-nix,
      nixpush,
      ...
    }:
    {
      nixosConfigurations.myhost = nixpkgs.lib.nixosSystem {
        system = "x86_64-linux";
        modules = [
          sops-nix.nixosModules.sops
          nixpush.nixosModules.default
          ./configuration.nix # the host's existing configuration
          ./nixpush.nix
        ];
      };

      # CI runs `nix run .#cachix-push` too (examples/github-actions/nixpush-push.yml).
      apps.x86_64-linux.cachix-push = nixpush.apps.x86_64-linux.cachix-push;
      packages.x86_64-linux.nixpush = nixpush.packages.x86_64-linux.default;
    };
}
