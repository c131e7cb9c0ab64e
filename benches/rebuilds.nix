# N small derivations for benches/rebuilds.sh, all new whenever `seed` changes (so every run really builds).
# Derivation i (i > 0) depends on derivation (i - 1) / 2: a binary tree about log2(N) deep, so Nix can build
# in parallel and most outputs reference another one (as real packages do). Each output is ~20 KB of text.
# Evaluates to the list of all N derivations; `nix-build` builds them all.
{ n ? 200, seed ? "0" }:
let
  drvs = builtins.genList mk n;
  mk = i:
    builtins.derivation {
      name = "rebuild-${seed}-${toString i}";
      system = builtins.currentSystem;
      builder = "/bin/sh";
      dep = if i == 0 then "" else builtins.elemAt drvs ((i - 1) / 2);
      args = [ "-c" ''
        /bin/mkdir $out
        echo "$dep" > $out/dep
        /usr/bin/seq -f "$name line %g" 1000 > $out/data
      '' ];
    };
in
drvs
