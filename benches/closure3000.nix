# A closure of N + 1 store paths with references, for benches/closure_info.sh.
# N text files are written at evaluation time (builtins.toFile, no builds); file i references files i/2 and
# (i*7)/11, so the graph has depth and sharing. One derivation then references all of them.
{ n ? 3000, nonce ? "1" }:
let
  files = builtins.genList mk n;
  mk = i:
    builtins.toFile "cl3k-${nonce}-${toString i}"
      (if i == 0 then "root\n"
       else "ref ${builtins.elemAt files (i / 2)} ${builtins.elemAt files ((i * 7) / 11)}\n");
in
derivation {
  name = "cl3k-${nonce}-top";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  # Too long for one argument or variable (128 KiB limit), so Nix passes it as a file.
  paths = builtins.concatStringsSep "\n" files;
  passAsFile = [ "paths" ];
  args = [ "-c" "while read -r line; do echo \"$line\"; done < $pathsPath > $out" ];
}
