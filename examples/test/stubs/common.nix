# The options the NixOS and the nix-darwin stand-ins (./nixos.nix, ./darwin.nix) declare alike,
# with the types and defaults both systems give them: assertions and warnings
# (nixos/modules/misc/assertions.nix; nix-darwin's modules/system/checks.nix has the same),
# nixpkgs.hostPlatform, nix.enable and nix.package.
{ lib, pkgs, ... }:

let
  inherit (lib) mkOption types;
in
{
  options = {
    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; internal = true; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; internal = true; };

    nixpkgs.hostPlatform = mkOption {
      type = types.either types.str types.attrs;
      apply = lib.systems.elaborate;
    };

    nix.enable = mkOption { type = types.bool; default = true; };
    nix.package = mkOption { type = types.package; default = pkgs.nix; };
  };
}
