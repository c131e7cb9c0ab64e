# NixOS VM test of the module: a file:// target signed with a fixed test key, a derivation built inside the VM,
# and the assertion that it reaches the cache and Nix substitutes it from there. Needs KVM and nixpkgs, so it
# runs on a NixOS (or other Linux with Nix and /dev/kvm) host, not in the project's CI:
#
#   nix build .#checks.x86_64-linux.vm -L
{ pkgs, module }:

let
  cacheDir = "/var/cache/nixpush";
  publicKey = pkgs.lib.fileContents ../tests/fixtures/nixos/vm-test-key.pub;
in
pkgs.testers.runNixOSTest {
  name = "nixpush";

  nodes.machine =
    { lib, ... }:
    {
      imports = [ module ];

      # Stands in for a sops-nix secret: a root-only file outside the store.
      environment.etc."nixpush-test/signing-key" = {
        source = ../tests/fixtures/nixos/vm-test-key.sec;
        mode = "0400";
      };
      # A derivation that only this test builds; the VM has no network, so it cannot be substituted.
      environment.etc."nixpush-test/hello.nix".text = ''
        { nonce }:
        derivation {
          name = "nixpush-vm-test";
          system = builtins.currentSystem;
          builder = "/bin/sh";
          args = [ "-c" "echo hello from the nixpush VM test $nonce > $out" ];
          inherit nonce;
        }
      '';

      services.nixpush = {
        enable = true;
        settings = {
          target.url = "file://${cacheDir}";
          # No network in the VM, so no upstream cache to ask.
          upstream = [ ];
        };
        signingKeyFile = "/etc/nixpush-test/signing-key";
        addToSubstituters = true;
        inherit publicKey;
      };

      # cache.nixos.org is unreachable here; give up on it at once.
      nix.settings.connect-timeout = 1;
    };

  testScript = ''
    machine.wait_for_unit("nixpush.socket")
    machine.wait_for_unit("nixpush.service")

    with subtest("the module wired Nix to nixpush"):
        machine.succeed("grep -E '^post-build-hook = /nix/store/.*/bin/nixpush-hook$' /etc/nix/nix.conf")
        machine.succeed("grep -E '^substituters = .*file://${cacheDir}' /etc/nix/nix.conf")
        machine.succeed("grep -F '${publicKey}' /etc/nix/nix.conf")
        machine.succeed("nixpush check-config")

    with subtest("a build inside the VM reaches the cache"):
        out = machine.succeed(
            "nix-build --no-out-link /etc/nixpush-test/hello.nix --argstr nonce $(date +%s%N)"
        ).strip()
        hash_part = out.removeprefix("/nix/store/")[:32]
        machine.wait_until_succeeds(f"test -e ${cacheDir}/{hash_part}.narinfo", timeout=120)
        machine.succeed(f"grep '^Sig: nixpush-vm-test-1:' ${cacheDir}/{hash_part}.narinfo")
        machine.succeed("nixpush status --json")
        # Uploaded: its GC root goes (right after the narinfo), so Nix may collect the path again.
        machine.wait_until_succeeds(
            f"test ! -L /nix/var/nix/gcroots/nixpush/{out.removeprefix('/nix/store/')}", timeout=60
        )
        machine.succeed("nixpush status --json | grep -F '\"dir\":\"/nix/var/nix/gcroots/nixpush\"'")
        machine.succeed("nixpush status --json | grep -F '\"error\":null,\"warning\":null'")

    with subtest("the cache verifies with the public key and only with it"):
        machine.succeed(
            f"nix --extra-experimental-features nix-command copy --from file://${cacheDir} "
            f"--to 'local?root=/tmp/fresh-store' --option trusted-public-keys '${publicKey}' {out}"
        )
        machine.fail(
            f"nix --extra-experimental-features nix-command copy --from file://${cacheDir} "
            f"--to 'local?root=/tmp/other-store' "
            f"--option trusted-public-keys 'cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=' {out}"
        )

    with subtest("Nix substitutes the path back from the cache"):
        machine.succeed(f"nix-store --delete {out}")
        machine.succeed(f"nix-store --realise {out}")
        machine.succeed(f"grep 'hello from the nixpush VM test' {out}")
  '';
}
