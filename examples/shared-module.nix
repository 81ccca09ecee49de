# The half of the NixOS and the nix-darwin module that is the same on both systems, imported by
# each: the options they share, which of nix-daemon's doors lead to nix-lazy-builder (`door`)
# and the nix.conf settings that open them, /etc/nix/lazy-builder.toml, and the packages. Each
# system's module adds its builders (`builders`), its supervisor service and the daemon's
# environment (`daemonNixConfig`).
#
# The doors:
# - "build-hook" (the default): nix-lazy-builder is nix-daemon's build hook, any Nix version.
# - "external-builders": Nix 2.32 and newer run `nix-lazy-builder external-build` as the build
#   user for the derivations of `externalBuilders.systems` they would build locally (the
#   experimental `external-builders` setting). The build hook stays Nix's own when it has
#   machines (`externalBuilders.keepNixHook`); without any it is switched off (`build-hook =`),
#   since it would only be started to decline (BENCHMARKS.md, P8). The program asks
#   the supervisor over its build socket (`<stateDir>.build.sock`, for root and Nix's build-users
#   group only), so the supervisor service must run.
# - "both": the hook first (nix-daemon always asks it first), the external builder for what
#   the hook left.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkEnableOption mkIf mkOption types;
  cfg = config.services.nix-lazy-builder;
  common = import ./common.nix { inherit lib pkgs; };
  toml = pkgs.formats.toml { };
  tomlValue = lib.recursiveUpdate {
    supervisor.state-dir = cfg.stateDir;
    inherit (cfg) builders;
  } cfg.settings;
  hookDoor = cfg.door != "external-builders";
  externalDoor = cfg.door != "build-hook";
  nixVersion = lib.getVersion config.nix.package;
  # build-hook: ours for the hook door; for the external door alone, Nix's own (its default)
  # when it has machines, else off (empty).
  buildHook =
    if hookDoor then
      common.hookLine cfg.package config.nix.package
    else if cfg.externalBuilders.keepNixHook then
      "${config.nix.package}/bin/nix __build-remote"
    else
      "";
in
{
  options.services.nix-lazy-builder = {
    enable = mkEnableOption "nix-lazy-builder for nix-daemon (through `door`: its build hook, its external builder, or both)";

    package = mkOption {
      type = types.package;
      description = "The nix-lazy-builder package.";
    };

    door = mkOption {
      type = types.enum [ "build-hook" "external-builders" "both" ];
      default = "build-hook";
      example = "external-builders";
      description = ''
        How nix-daemon reaches nix-lazy-builder: as its `build-hook` (every Nix version), as an
        `external-builders` program (Nix 2.32 and newer, experimental: the daemon runs it as
        the build user for the systems of `externalBuilders.systems`), or both (the daemon asks
        the hook first; the external builder gets what the hook left).
      '';
    };

    externalBuilders.systems = mkOption {
      type = types.listOf types.str;
      # Never this machine's own system: nix-daemon would send every local build of it there.
      default = lib.subtractLists [ pkgs.stdenv.hostPlatform.system ] (
        lib.unique (lib.concatMap (b: b.systems or [ ]) (lib.attrValues (tomlValue.builders or { })))
      );
      defaultText = "Every system a builder in /etc/nix/lazy-builder.toml takes, except this machine's own (nix-daemon would send every local build of it to the external builder).";
      example = [ "aarch64-linux" ];
      description = "The systems nix-daemon sends to nix-lazy-builder through `external-builders`.";
    };

    externalBuilders.keepNixHook = mkOption {
      type = types.bool;
      default = (config.nix.distributedBuilds or false) && (config.nix.buildMachines or [ ]) != [ ];
      defaultText = "Whether Nix's own hook has machines: nix.distributedBuilds with nix.buildMachines.";
      description = ''
        With `door = "external-builders"`: keep Nix's own build hook, for remote builders of its
        own (set it when those come from nix.settings.builders). Otherwise `build-hook` is
        switched off: nix-daemon would start Nix's hook for every client only for it to decline.
      '';
    };

    stateDir = mkOption {
      type = types.str;
      description = "The supervisor's state directory (socket, locks, logs, console logs); the build socket of `external-builders` is beside it, `<stateDir>.build.sock`.";
    };

    dataDir = mkOption {
      type = types.str;
      default = "/var/lib/nix-lazy-builder";
      description = "Where the builders' keys, disks and runner TMPDIRs live (root-only).";
    };

    settings = mkOption {
      type = toml.type;
      default = { };
      description = ''
        Extra contents of /etc/nix/lazy-builder.toml (merged over what the module generates),
        e.g. always-on builders the machines table cannot describe, or `command`/`darling`
        builders.
      '';
    };

    builders = mkOption {
      type = types.attrsOf toml.type;
      internal = true;
      default = { };
      description = "The builders the system's module generates: the TOML's `builders`, before `settings`.";
    };

    daemonNixConfig = mkOption {
      type = types.str;
      internal = true;
      readOnly = true;
      description = "What the system's module puts into nix-daemon's NIX_CONFIG: the `build-hook` line.";
    };
  };

  config = mkIf cfg.enable {
    assertions = lib.optionals externalDoor [
      {
        assertion = !lib.versionOlder nixVersion "2.32";
        message = "services.nix-lazy-builder.door = \"${cfg.door}\" needs Nix 2.32 or newer (the external-builders setting); nix.package is Nix ${nixVersion}.";
      }
      {
        assertion = cfg.externalBuilders.systems != [ ];
        message = "services.nix-lazy-builder.door = \"${cfg.door}\": no builder takes any system, so external-builders would send nothing; set services.nix-lazy-builder.externalBuilders.systems.";
      }
      {
        # The supervisor's service makes dataDir root-only (umask 0077).
        assertion = !lib.hasPrefix "${cfg.dataDir}/" cfg.stateDir;
        message = "services.nix-lazy-builder.door = \"${cfg.door}\": the build socket ${cfg.stateDir}.build.sock would be inside dataDir (${cfg.dataDir}), which is root-only, so the build users could not reach it; put stateDir outside it (NixOS's default is /nix/var/nix/lazy-builder).";
      }
    ];

    services.nix-lazy-builder.daemonNixConfig = common.daemonNixConfig buildHook;

    nix.settings = lib.mkMerge [
      { build-hook = buildHook; }
      (mkIf externalDoor {
        # `extra-`: added to whatever experimental features the machine has.
        extra-experimental-features = [ "external-builders" ];
        external-builders = builtins.toJSON [
          {
            inherit (cfg.externalBuilders) systems;
            program = "${cfg.package}/bin/nix-lazy-builder";
            args = [ "external-build" ];
          }
        ];
      })
    ];

    environment.etc."nix/lazy-builder.toml".source = toml.generate "lazy-builder.toml" tomlValue;

    environment.systemPackages = [
      cfg.package
      (common.docs cfg.package)
    ];
  };
}
