# A small build for trying nixpush: a library-like dependency and a program that refers to it, rebuilt whenever
# `nonce` changes (so the post-build hook really runs).
{ nonce ? "1" }:
let
  mk = name: script: builtins.derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    NONCE = nonce;
  };
  greeting = mk "nixpush-demo-greeting" ''
    /bin/mkdir -p $out/share
    echo "Hello from a binary cache filled by nixpush" > $out/share/greeting
  '';
in
mk "nixpush-demo-hello" ''
  /bin/mkdir -p $out/bin
  printf '#!/bin/sh\nexec /bin/cat ${greeting}/share/greeting\n' > $out/bin/hello
  /bin/chmod +x $out/bin/hello
''
