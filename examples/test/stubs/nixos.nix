# Stand-in for the NixOS option set, host and guest: declarations, with NixOS' types and
# defaults, of every option examples/nixos/*.nix and the stub qemu-vm.nix / nix-builder-vm.nix
# read or set, and nothing else, so that a misspelt or missing option fails as on NixOS. Taken
# from nixos/modules (misc/assertions.nix, misc/nixpkgs.nix, config/nix.nix,
# config/nix-remote-build.nix, system/boot/binfmt.nix, system/boot/systemd.nix with
# lib/systemd-unit-options.nix, system/etc/etc.nix, services/networking/ssh/sshd.nix,
# config/users-groups.nix, tasks/filesystems.nix, misc/version.nix, misc/documentation.nix,
# installer/tools/tools.nix). What NixOS builds from them (unit files, /etc) is modelled only as
# far as the test reads it: systemd services render to unit text, preStart to a script.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption types;

  # lib/systemd-unit-options.nix: lists concatenate, anything else must be defined once.
  unitOption = types.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.isList (lib.head defs').value then
        lib.concatMap (d: d.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };
  oneOfValues =
    key: allowed: attrs:
    !(attrs ? ${key}) || lib.elem attrs.${key} allowed;
  checkService =
    attrs:
    oneOfValues "Type" [ "exec" "simple" "forking" "oneshot" "dbus" "notify" "notify-reload" "idle" ] attrs
    && oneOfValues "Restart" [ "no" "on-success" "on-failure" "on-abnormal" "on-abort" "on-watchdog" "always" ] attrs;

  # systemd's unit syntax, as NixOS writes it (lib/systemd-lib.nix attrsToSection).
  toUnitValue =
    v:
    if lib.isBool v then
      lib.boolToString v
    else if lib.isList v then
      lib.concatMapStringsSep " " toString v
    else
      toString v;
  section =
    attrs:
    lib.concatStrings (
      lib.mapAttrsToList (
        k: v:
        if lib.isList v && k != "Environment" then
          lib.concatMapStrings (x: "${k}=${toUnitValue x}\n") v
        else
          "${k}=${toUnitValue v}\n"
      ) attrs
    );

  serviceModule =
    { name, config, ... }:
    {
      options = {
        enable = mkOption { type = types.bool; default = true; };
        description = mkOption { type = types.singleLineStr; default = ""; };
        wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
        requiredBy = mkOption { type = types.listOf types.str; default = [ ]; };
        after = mkOption { type = types.listOf types.str; default = [ ]; };
        before = mkOption { type = types.listOf types.str; default = [ ]; };
        wants = mkOption { type = types.listOf types.str; default = [ ]; };
        requires = mkOption { type = types.listOf types.str; default = [ ]; };
        unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
        environment = mkOption {
          type = with types; attrsOf (nullOr (oneOf [ str path package ]));
          default = { };
        };
        path = mkOption {
          type = with types; listOf (oneOf [ package str ]);
          default = [ ];
        };
        serviceConfig = mkOption {
          type = types.addCheck (types.attrsOf unitOption) checkService;
          default = { };
        };
        script = mkOption { type = types.lines; default = ""; };
        preStart = mkOption { type = types.lines; default = ""; };
        postStart = mkOption { type = types.lines; default = ""; };
        restartIfChanged = mkOption { type = types.bool; default = true; };
        stopIfChanged = mkOption { type = types.bool; default = true; };
        restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
        # NixOS': the job scripts (preStart, script) made for this unit.
        jobScripts = mkOption { type = types.listOf types.unspecified; default = [ ]; internal = true; };
        # Not NixOS': the unit file NixOS would write, for the test to read.
        unitText = mkOption { type = types.str; readOnly = true; internal = true; };
      };
      config =
        let
          # NixOS' makeJobScript: a bash script with `set -e`.
          job = suffix: text: pkgs.writeShellScript "unit-script-${name}-${suffix}" "set -e\n${text}";
          preStart = job "pre-start" config.preStart;
          start = job "start" config.script;
        in
        {
        jobScripts = lib.optional (config.preStart != "") preStart ++ lib.optional (config.script != "") start;
        serviceConfig.ExecStartPre = lib.mkIf (config.preStart != "") [ "${preStart}" ];
        serviceConfig.ExecStart = lib.mkIf (config.script != "") "${start}";
        unitText =
          let
            env =
              lib.filterAttrs (_: v: v != null) config.environment
              // lib.optionalAttrs (config.path != [ ]) {
                PATH = lib.concatMapStringsSep ":" (p: "${p}/bin:${p}/sbin") config.path;
              };
          in
          "[Unit]\n"
          + section (
            lib.filterAttrs (_: v: v != [ ] && v != "") {
              Description = config.description;
              After = config.after;
              Before = config.before;
              Wants = config.wants;
              Requires = config.requires;
            }
            // config.unitConfig
          )
          + "\n[Service]\n"
          + lib.concatStrings (lib.mapAttrsToList (k: v: "Environment=${builtins.toJSON "${k}=${toString v}"}\n") env)
          + section config.serviceConfig
          + lib.optionalString (config.wantedBy != [ ]) "\n[Install]\nWantedBy=${toString config.wantedBy}\n";
      };
    };

  etcModule =
    { name, config, options, ... }:
    {
      options = {
        enable = mkOption { type = types.bool; default = true; };
        target = mkOption { type = types.str; default = name; };
        text = mkOption { type = types.nullOr types.lines; default = null; };
        source = mkOption { type = types.path; };
        mode = mkOption { type = types.str; default = "symlink"; };
        uid = mkOption { type = types.int; default = 0; };
        gid = mkOption { type = types.int; default = 0; };
        user = mkOption { type = types.str; default = "+${toString config.uid}"; };
        group = mkOption { type = types.str; default = "+${toString config.gid}"; };
      };
      config.source = lib.mkIf (config.text != null) (
        lib.mkDerivedConfig options.text (pkgs.writeText ("etc-" + lib.replaceStrings [ "/" ] [ "-" ] name))
      );
    };

  # config/nix.nix: nix.conf settings, free-form atoms with a few declared options.
  confAtom = with types; nullOr (oneOf [ bool int float str path package ]) // { description = "Nix config atom"; };
  semanticConfType = with types; attrsOf (either confAtom (listOf confAtom));

  fileSystemModule =
    { name, ... }:
    {
      options = {
        mountPoint = mkOption { type = types.str; default = name; };
        device = mkOption { type = types.nullOr types.str; default = null; };
        fsType = mkOption { type = types.str; default = "auto"; };
        options = mkOption { type = types.nonEmptyListOf types.nonEmptyStr; default = [ "defaults" ]; };
        neededForBoot = mkOption { type = types.bool; default = false; };
        overlay = mkOption { type = types.attrsOf types.unspecified; default = { }; };
      };
    };
in
{
  imports = [ ./common.nix ];

  options = {
    nix.channel.enable = mkOption { type = types.bool; default = true; };
    nix.settings = mkOption {
      type = types.submodule {
        freeformType = semanticConfType;
        options = {
          trusted-users = mkOption { type = types.listOf types.str; default = [ "root" ]; };
          max-jobs = mkOption { type = types.either types.int (types.enum [ "auto" ]); default = "auto"; };
          experimental-features = mkOption { type = types.listOf types.str; default = [ ]; };
        };
      };
      default = { };
    };
    nix.distributedBuilds = mkOption { type = types.bool; default = false; };
    nix.buildMachines = mkOption {
      type = types.listOf (
        types.submodule {
          options = {
            hostName = mkOption { type = types.str; };
            system = mkOption { type = types.nullOr types.str; default = null; };
            systems = mkOption { type = types.listOf types.str; default = [ ]; };
          };
        }
      );
      default = [ ];
    };

    boot.binfmt.emulatedSystems = mkOption {
      type = types.listOf (types.enum [ "aarch64-linux" "x86_64-linux" "i686-linux" "riscv64-linux" "armv7l-linux" "powerpc64le-linux" "wasm32-wasi" ]);
      default = [ ];
    };

    systemd.services = mkOption {
      type = types.attrsOf (types.submodule serviceModule);
      default = { };
    };

    environment.etc = mkOption {
      type = types.attrsOf (types.submodule etcModule);
      default = { };
    };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };

    services.openssh = {
      enable = mkOption { type = types.bool; default = false; };
      hostKeys = mkOption {
        type = types.listOf types.attrs;
        default = [
          { type = "rsa"; bits = 4096; path = "/etc/ssh/ssh_host_rsa_key"; }
          { type = "ed25519"; path = "/etc/ssh/ssh_host_ed25519_key"; }
        ];
      };
      authorizedKeysFiles = mkOption { type = types.listOf types.str; default = [ ]; };
      settings = mkOption {
        type = types.submodule {
          freeformType = with types; attrsOf (nullOr (oneOf [ bool int str (listOf str) ]));
          options = {
            PermitRootLogin = mkOption {
              type = types.enum [ "yes" "without-password" "prohibit-password" "forced-commands-only" "no" ];
              default = "prohibit-password";
            };
            PasswordAuthentication = mkOption { type = types.bool; default = true; };
          };
        };
        default = { };
      };
    };

    services.getty.autologinUser = mkOption { type = types.nullOr types.str; default = null; };
    security.polkit.enable = mkOption { type = types.bool; default = false; };
    security.polkit.extraConfig = mkOption { type = types.lines; default = ""; };

    users.users = mkOption {
      type = types.attrsOf (
        types.submodule {
          options = {
            isNormalUser = mkOption { type = types.bool; default = false; };
            isSystemUser = mkOption { type = types.bool; default = false; };
          };
        }
      );
      default = { };
    };

    fileSystems = mkOption {
      type = types.attrsOf (types.submodule fileSystemModule);
      default = { };
    };

    documentation.enable = mkOption { type = types.bool; default = true; };
    networking.hostName = mkOption { type = types.str; default = "nixos"; };
    system.name = mkOption { type = types.str; default = config.networking.hostName; };
    system.stateVersion = mkOption { type = types.str; };
    system.disableInstallerTools = mkOption { type = types.bool; default = false; };
    system.build = mkOption { type = types.lazyAttrsOf types.unspecified; default = { }; internal = true; };
  };

  config._module.args.pkgs = import ./pkgs.nix { system = config.nixpkgs.hostPlatform.system; };
}
