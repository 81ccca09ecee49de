# Stand-in for nixpkgs' nixos/lib/eval-config.nix: evaluates NixOS modules (here against the
# stub option set, ../../../nixos.nix) with `modulesPath` pointing at the stub modules. Same
# arguments; `system = null` means "take nixpkgs.hostPlatform from the modules".
{
  system ? null,
  modules,
  specialArgs ? { },
  lib ? import ../../../lib.nix,
  ...
}:

let
  eval = lib.evalModules {
    modules = [
      ../../../nixos.nix
    ] ++ lib.optional (system != null) { nixpkgs.hostPlatform = lib.mkDefault system; } ++ modules;
    specialArgs = {
      modulesPath = ../modules;
    } // specialArgs;
  };
in
eval // { pkgs = eval.config._module.args.pkgs; }
