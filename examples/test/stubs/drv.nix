# Stand-in derivations. Nothing is built: each is an attribute set that passes
# `lib.isDerivation`, has an `outPath` under FAKESTORE (a directory the test owns, so it can
# write the scripts there and run them), the `system` it would be built for, and its content
# (`text`: a file's text, or a runCommand's build script) for the test to read.
{ lib, fakeStore, system }:

{
  mk =
    {
      name,
      kind, # "file", "script" (executable file) or "dir" (runCommand)
      text ? "",
      meta ? { },
      passthru ? { },
    }:
    let
      hash = builtins.substring 0 32 (builtins.hashString "sha256" (builtins.toJSON [ name system kind text ]));
    in
    passthru
    // {
      type = "derivation";
      inherit name system kind text meta;
      outPath = "${fakeStore}/${hash}-${name}";
      drvPath = "${fakeStore}/${hash}-${name}.drv";
    };

  # A package whose files are this machine's (openssh → /usr/bin/ssh-keygen): what the
  # generated scripts call must exist when the test runs them.
  tool = name: version: {
    type = "derivation";
    inherit name version system;
    pname = name;
    outPath = "/usr";
    meta = { };
  };
}
