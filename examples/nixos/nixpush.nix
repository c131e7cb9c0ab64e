# nixpush for a Cachix cache, with the secrets in sops-nix. Before: a `cachix push mycache ./result` by hand
# after each switch, and the cache added to substituters in core.nix. After: this file.
#
# secrets/nixpush.yaml (sops-encrypted) holds two keys:
#   cachix-token: <a write token for the cache>
#   cachix-signing-key: <the cache's secret key, from `cachix generate-keypair mycache`>
{ config, ... }:

{
  sops.secrets = {
    # Root-only (sops-nix's default owner and mode): systemd hands copies to the service with LoadCredential=,
    # so the user nixpush never reads /run/secrets itself.
    "cachix-token" = {
      sopsFile = ./secrets/nixpush.yaml;
      # Credentials are copied at service start, so a rotated secret takes effect on restart. Restarting is
      # safe: the queue is on disk and the socket stays open meanwhile.
      restartUnits = [ "nixpush.service" ];
    };
    "cachix-signing-key" = {
      sopsFile = ./secrets/nixpush.yaml;
      restartUnits = [ "nixpush.service" ];
    };
  };

  services.nixpush = {
    enable = true;
    settings = {
      target.url = "cachix://mycache";
      # Flake inputs and fetched sources: quick to fetch again, rarely wanted from the cache.
      exclude = [ "*-source" ];
    };
    authTokenFile = config.sops.secrets."cachix-token".path;
    signingKeyFile = config.sops.secrets."cachix-signing-key".path;

    # Replaces the hand-written substituters / trusted-public-keys lines for this cache.
    addToSubstituters = true;
    publicKey = "mycache.cachix.org-1:REPLACE-WITH-THE-PUBLIC-KEY-CACHIX-SHOWS=";

    # Lets `nixpush push --via-daemon ./result` queue by hand as well.
    allowedUsers = [ "alice" ];
  };
}
