# A stand-in for the nixpkgs package set, for one `system`: the few functions and packages the
# modules use, with nixpkgs' signatures. `lib` is the real one; `path` is this stub tree, so
# `pkgs.path + "/nixos/lib/eval-config.nix"` evaluates a guest against the stub NixOS options.
{ system }:

let
  lib = import ./lib.nix;
  fakeStore =
    let
      dir = builtins.getEnv "NLB_FAKE_STORE";
    in
    if dir == "" then "/nix-lazy-builder-fake-store" else dir;
  nixVersion = "2.28.3";
  drv = import ./drv.nix { inherit lib fakeStore system; };
  platform = lib.systems.elaborate system;
  toGuest = builtins.replaceStrings [ "darwin" ] [ "linux" ];
  pkgs = rec {
    # What `lib.types.pkgs` checks for (nixpkgs' top level sets it too).
    _type = "pkgs";
    inherit lib;
    path = ./nixpkgs;
    stdenv = {
      hostPlatform = platform;
      buildPlatform = platform;
      inherit system;
      shell = runtimeShell;
    };
    runtimeShell = "/usr/bin/bash";

    # nixpkgs' formats.toml: the value type it accepts and `generate`, which writes the value
    # as JSON and converts it to TOML in a build; here the value is kept for the test, which
    # converts it the same way (a null, which TOML cannot hold, fails there as in nixpkgs).
    formats.toml =
      { }:
      {
        type =
          let
            valueType =
              lib.types.nullOr (
                lib.types.oneOf [
                  lib.types.bool
                  lib.types.int
                  lib.types.float
                  lib.types.str
                  lib.types.path
                  (lib.types.attrsOf valueType)
                  (lib.types.listOf valueType)
                ]
              )
              // {
                description = "TOML value";
              };
          in
          valueType;
        generate =
          name: value:
          drv.mk {
            inherit name;
            kind = "file";
            text = builtins.toJSON value;
            passthru = { inherit value; };
          };
      };

    writeText = name: text: drv.mk { inherit name text; kind = "file"; };
    writeScript = name: text: drv.mk { inherit name text; kind = "script"; };
    writeShellScript = name: text: writeScript name "#!${runtimeShell}\n${text}";
    runCommand =
      name: env: text:
      drv.mk {
        inherit name text;
        kind = "dir";
        meta = env.meta or { };
      };

    coreutils = drv.tool "coreutils" "9.1";
    openssh = drv.tool "openssh" "9.2p1";
    gnutar = drv.tool "gnutar" "1.34";
    qemu = drv.mk { name = "qemu-9.2.0"; kind = "dir"; };
    qemu_kvm = drv.mk { name = "qemu-kvm-9.2.0"; kind = "dir"; };
    nix = drv.mk { name = "nix-${nixVersion}"; kind = "dir"; passthru = { version = nixVersion; pname = "nix"; }; };

    # pkgs/top-level/darwin-packages.nix: nixpkgs' Linux builder for this Mac, overridable in
    # its `modules`; the guest is for the same CPU (darwin → linux) with its runner built for
    # this Mac (`virtualisation.host.pkgs`).
    darwin = lib.optionalAttrs platform.isDarwin {
      linux-builder = lib.makeOverridable (
        { modules }:
        (import ./nixpkgs/nixos/lib/eval-config.nix {
          system = null;
          modules = [
            ./nixpkgs/nixos/modules/profiles/nix-builder-vm.nix
            {
              virtualisation.host = { inherit pkgs; };
              nixpkgs.hostPlatform = lib.mkDefault (toGuest system);
            }
          ] ++ modules;
        }).config.system.build.macos-builder-installer
      ) { modules = [ ]; };
    };
  };
in
pkgs
