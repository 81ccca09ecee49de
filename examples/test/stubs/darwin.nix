# Stand-in for the nix-darwin option set: declarations, with nix-darwin's types and defaults, of
# what examples/nix-darwin/module.nix reads or sets. Taken from nix-darwin's
# modules/launchd/default.nix (daemons: environment, path, command, script, serviceConfig;
# `command` runs as `/bin/sh -c "/bin/wait4path /nix/store && exec …"`), modules/launchd/
# launchd.nix (the plist keys used, with their types; unknown keys are an error there too),
# modules/system/activation-scripts.nix (the order the fragments run in), modules/system/etc.nix
# and lib/write-text.nix, modules/environment, modules/security/pki (NIX_SSL_CERT_FILE),
# modules/nix/default.nix and modules/services/nix-daemon.nix. The plists are rendered with
# nixpkgs' real `lib.generators.toPlist { escape = true; }`, as nix-darwin does.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption types;
  nullOr = types.nullOr;

  textModule =
    { name, config, ... }:
    {
      options = {
        enable = mkOption { type = types.bool; default = true; };
        text = mkOption { type = types.lines; default = ""; };
        target = mkOption { type = types.str; default = name; };
        source = mkOption { type = types.path; };
        knownSha256Hashes = mkOption { type = types.listOf types.str; default = [ ]; internal = true; };
      };
      config.source = lib.mkDefault (pkgs.writeText "etc-${lib.last (lib.splitString "/" name)}" config.text);
    };

  launchdConfig = {
    options = {
      Label = mkOption { type = types.str; };
      Disabled = mkOption { type = nullOr types.bool; default = null; };
      Program = mkOption { type = nullOr types.path; default = null; };
      ProgramArguments = mkOption { type = nullOr (types.listOf types.str); default = null; };
      EnvironmentVariables = mkOption { type = nullOr (types.attrsOf types.str); default = null; };
      KeepAlive = mkOption {
        type = nullOr (
          types.either types.bool (
            types.submodule {
              options = {
                SuccessfulExit = mkOption { type = nullOr types.bool; default = null; };
                Crashed = mkOption { type = nullOr types.bool; default = null; };
                NetworkState = mkOption { type = nullOr types.bool; default = null; };
                PathState = mkOption { type = nullOr (types.attrsOf types.bool); default = null; };
              };
            }
          )
        );
        default = null;
      };
      RunAtLoad = mkOption { type = nullOr types.bool; default = null; };
      WorkingDirectory = mkOption { type = nullOr types.str; default = null; };
      Umask = mkOption { type = nullOr types.int; default = null; };
      TimeOut = mkOption { type = nullOr types.int; default = null; };
      ExitTimeOut = mkOption { type = nullOr types.int; default = null; };
      ThrottleInterval = mkOption { type = nullOr types.int; default = null; };
      StandardInPath = mkOption { type = nullOr types.path; default = null; };
      StandardOutPath = mkOption { type = nullOr types.path; default = null; };
      StandardErrorPath = mkOption { type = nullOr types.path; default = null; };
      ProcessType = mkOption {
        type = nullOr (types.enum [ "Background" "Standard" "Adaptive" "Interactive" ]);
        default = null;
      };
      LowPriorityIO = mkOption { type = nullOr types.bool; default = null; };
      SoftResourceLimits = mkOption {
        type = nullOr (types.submodule {
          options.NumberOfFiles = mkOption { type = nullOr types.int; default = null; };
        });
        default = null;
      };
    };
  };

  serviceOptions =
    { config, name, ... }:
    let
      env = config.environment // lib.optionalAttrs (config.path != "") { PATH = config.path; };
    in
    {
      options = {
        environment = mkOption {
          type = types.attrsOf (types.either types.str (types.listOf types.str));
          default = { };
          apply = lib.mapAttrs (_: v: if lib.isList v then lib.concatStringsSep ":" v else v);
        };
        path = mkOption {
          type = types.listOf (types.either types.path types.str);
          default = [ ];
          apply =
            ps:
            if lib.isList ps then
              lib.concatMapStringsSep ":" (p: if lib.isDerivation p then "${p}/bin" else p) ps
            else
              ps;
        };
        command = mkOption { type = types.either types.str types.path; default = ""; };
        script = mkOption { type = types.lines; default = ""; };
        serviceConfig = mkOption { type = types.submodule launchdConfig; default = { }; };
      };
      config = {
        command = lib.mkIf (config.script != "") (
          pkgs.writeScript "${name}-start" "#! ${pkgs.stdenv.shell}\n\n${config.script}"
        );
        serviceConfig.Label = lib.mkDefault "org.nixos.${name}";
        serviceConfig.ProgramArguments = lib.mkIf (config.command != "") [
          "/bin/sh"
          "-c"
          "/bin/wait4path /nix/store && exec ${config.command}"
        ];
        serviceConfig.EnvironmentVariables = lib.mkIf (env != { }) env;
      };
    };

  # The fragments nix-darwin's `activate` runs, in its order.
  activationOrder = [
    "preActivation" "checks" "createRun" "extraActivation" "groups" "users" "applications"
    "pam" "patches" "openssh" "etc" "defaults" "userDefaults" "launchd" "userLaunchd"
    "nix-daemon" "time" "networking" "power" "keyboard" "fonts" "nvram" "homebrew"
    "postActivation"
  ];

  confAtom = with types; nullOr (oneOf [ bool int float str path package ]) // { description = "Nix config atom"; };
in
{
  imports = [ ./common.nix ];

  options = {
    nix.envVars = mkOption { type = types.attrs; default = { }; internal = true; };
    nix.settings = mkOption {
      type = types.submodule {
        freeformType = with types; attrsOf (either confAtom (listOf confAtom));
        options.max-jobs = mkOption { type = types.either types.int (types.enum [ "auto" ]); default = "auto"; };
      };
      default = { };
    };

    environment.etc = mkOption { type = types.attrsOf (types.submodule textModule); default = { }; };
    environment.variables = mkOption {
      type = types.attrsOf (types.either types.str (types.listOf types.str));
      default = { };
      apply = lib.mapAttrs (_: v: if lib.isList v then lib.concatStringsSep ":" v else v);
    };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
    environment.launchDaemons = mkOption { type = types.attrsOf (types.submodule textModule); default = { }; };

    launchd.daemons = mkOption { type = types.attrsOf (types.submodule serviceOptions); default = { }; };

    system.activationScripts = mkOption {
      type = types.attrsOf (types.submodule textModule);
      default = { };
      internal = true;
    };
  };

  config = {
    _module.args.pkgs = import ./pkgs.nix { system = config.nixpkgs.hostPlatform.system; };
    environment.variables.NIX_SSL_CERT_FILE = lib.mkDefault "/etc/ssl/certs/ca-certificates.crt";

    environment.launchDaemons = lib.mapAttrs' (_: d: {
      name = "${d.serviceConfig.Label}.plist";
      value.text = lib.generators.toPlist { escape = true; } d.serviceConfig;
    }) config.launchd.daemons;

    # services/nix-daemon.nix
    launchd.daemons.nix-daemon = lib.mkIf config.nix.enable {
      command = "${config.nix.package}/bin/nix-daemon";
      serviceConfig.Label = "org.nixos.nix-daemon";
      serviceConfig.KeepAlive = true;
      serviceConfig.EnvironmentVariables = lib.mkMerge [
        config.nix.envVars
        {
          NIX_SSL_CERT_FILE = lib.mkIf (config.environment.variables ? NIX_SSL_CERT_FILE) (
            lib.mkDefault config.environment.variables.NIX_SSL_CERT_FILE
          );
          OBJC_DISABLE_INITIALIZE_FORK_SAFETY = lib.mkDefault "YES";
        }
      ];
    };

    system.activationScripts = lib.genAttrs activationOrder (_: { text = lib.mkDefault ""; }) // {
      script.text = lib.concatMapStringsSep "\n" (n: config.system.activationScripts.${n}.text) activationOrder;
    };
  };
}
