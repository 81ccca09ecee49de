# The nixpkgs `lib` the evaluation runs on: the directory in NLB_NIXPKGS_LIB, which
# tests/examples.rs finds on NIX_PATH (it is never part of this repository).
let
  dir = builtins.getEnv "NLB_NIXPKGS_LIB";
in
if dir == "" then
  throw "NLB_NIXPKGS_LIB is not set: point it at a nixpkgs `lib` directory (tests/examples.rs does)"
else
  import (/. + dir)
