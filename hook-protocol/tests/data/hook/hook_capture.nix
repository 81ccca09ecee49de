# The derivation hook_capture.sh asks real Nix to build through the capture hook.
let
  src = builtins.toFile "input.txt" "an input\n";
in
derivation {
  name = "captured";
  system = "x86_64-linux";
  builder = "/bin/sh";
  args = [ "-c" "cat ${src} > $out; echo > $dev" ];
  outputs = [ "out" "dev" ];
  requiredSystemFeatures = [ "kvm" ];
}
