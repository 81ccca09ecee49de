# Derivations for hook-protocol's golden ATerm tests (tests/drv_golden.rs).
# Instantiated with real Nix 2.8 by generate.sh; nothing here is ever built.
let
  sh = "/bin/sh";
  sys = "x86_64-linux";

  # A derivation NAME that runs `sh -c SCRIPT` on x86_64-linux, with ATTRS on top.
  mk =
    name: script: attrs:
    derivation (
      {
        inherit name;
        system = sys;
        builder = sh;
        args = [ "-c" script ];
      }
      // attrs
    );

  # Two outputs, plain args.
  twoOutputs = mk "two-outputs" "echo out > $out; echo dev > $dev" {
    outputs = [ "out" "dev" ];
  };

  # A source that becomes an inputSrc.
  src = builtins.toFile "input.txt" "hello from an input source\n";

  # Depends on both outputs of twoOutputs (one inputDrv, two wanted outputs) and on a source.
  withInputs = mk "with-inputs" "cat ${src} ${twoOutputs.dev} ${twoOutputs.out} > $out" {
    system = "aarch64-linux";
    requiredSystemFeatures = [ "big-parallel" "kvm" ];
  };

  # Fixed-output, recursive sha256.
  fixedRecursive = mk "fixed-recursive" "mkdir $out" {
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    outputHash = "1b0b1n5fk5h3vqdlg5lmfwfy3zlqqb3lm5n3y1njbxz4v3v2h1jr";
  };

  # Fixed-output, flat sha1 given in base16, with an input derivation.
  fixedFlat = mk "fixed-flat" "cp ${twoOutputs.out} $out" {
    outputHashAlgo = "sha1";
    outputHash = "da39a3ee5e6b4b0d3255bfef95601890afd80709";
  };

  # Every escape Nix's printer knows, plus non-ASCII and non-UTF-8 bytes.
  escapes = derivation {
    name = "escapes";
    system = sys;
    builder = sh;
    args = [ "-c" "printf '%s\\n' \"$quoted\" > $out" "tab\there" "" ];
    quoted = "she said \"hi\"";
    backslashes = "C:\\path\\to\\thing \\n is not a newline";
    newlines = "line one\nline two\n\nline four\r\nwith CRLF";
    tabs = "a\tb\t\tc";
    unicode = "grüße, 日本語, emoji 🦀, nbsp end";
    rawBytes = builtins.readFile ./drv_raw_bytes.bin;
    empty = "";
    "weird key \"with\" quotes" = "value";
    preferLocalBuild = true;
    allowSubstitutes = false;
    number = 42;
    list = [ "a" "b c" 3 ];
  };

  # Structured attrs: everything travels in the __json env entry.
  structured = mk "structured" "true" {
    __structuredAttrs = true;
    nested = { a = [ 1 2 3 ]; b = "x\ny"; };
  };

  # Floating content-addressed (needs the ca-derivations experimental feature): no output path.
  floatingCa = mk "floating-ca" "echo ca > $out" {
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
  };

  # Input-addressed but depending on a floating CA derivation: its output is deferred.
  deferred = mk "deferred" "cat ${floatingCa} > $out" { };
in
{
  inherit twoOutputs withInputs fixedRecursive fixedFlat escapes structured floatingCa deferred;
}
