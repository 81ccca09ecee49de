# nix-darwin module: a LAZY `darwin.linux-builder` on macOS. Instead of nix-darwin's always-on
# launchd job, nix-lazy-builder's supervisor runs nixpkgs' linux-builder VM under its `qemu`
# backend when a Linux build needs it, and powers it off when idle, giving its memory back.
#
#   imports = [ ./module.nix ];
#   services.nix-lazy-builder = {
#     enable = true;
#     package = nix-lazy-builder;
#     linuxBuilder.enable = true;   # instead of nix.linux-builder.enable
#   };
#
# The guest is nixpkgs' own, unchanged: the one the official binary cache has, so nothing Linux
# is built to get it (a Mac without a Linux builder could not build a changed one). Only the
# runner (the host-side script that starts QEMU) is adjusted: memory, cores, disk size, no port
# forward of its own (the supervisor forwards a free port on 127.0.0.1 through QEMU_NET_OPTS),
# and the key share exported read-only. None of these reach the guest's system.
#
# Keys: a client key is generated on this Mac at activation (never in the store); the guest
# gets only its public half, through the runner's read-only `keys` share, where nixpkgs' guest
# looks for it.
#
# Host key: nixpkgs' guest has a fixed host key whose private half is public (it is in the
# nixpkgs source), so pinning it proves only that the peer knows nixpkgs. It is accepted here
# (`allow-well-known-host-key`) because the only way to it is the supervisor's own forward: a
# port QEMU holds on 127.0.0.1 for as long as the VM runs, chosen afresh at each boot, that no
# other process can bind meanwhile. What remains is the moment after QEMU died and before the
# supervisor noticed: a local user who grabs that port then could answer a build. On a Mac with
# local users you do not trust, set `linuxBuilder.ownHostKey = true`: the guest then takes a
# host key generated here, through a second read-only share. That changes the guest, so it is
# no longer the cached one and must be built: switch first without it, so that the cached
# builder is running, then with it (the bootstrap nix-darwin documents for
# `nix.linux-builder.config`); the cached builder builds its successor.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkEnableOption mkIf mkOption types;
  cfg = config.services.nix-lazy-builder;
  lb = cfg.linuxBuilder;
  common = import ../common.nix { inherit lib pkgs; };
  dir = "${cfg.dataDir}/linux-builder";
  hasCerts = config.environment.variables ? NIX_SSL_CERT_FILE;
  certEnv = lib.optionalAttrs hasCerts { inherit (config.environment.variables) NIX_SSL_CERT_FILE; };

  builder = lb.package.override (old: {
    modules = old.modules ++ [
      (
        { lib, ... }:
        {
          # Runner only (qemu-vm.nix puts these into the script that starts QEMU).
          virtualisation.darwin-builder = {
            memorySize = lb.memoryMiB;
            diskSize = lb.diskMiB;
          };
          virtualisation.cores = lb.cores;
          virtualisation.forwardPorts = lib.mkForce [ ];
          # qemu-vm.nix writes a share as `-virtfs local,path=SOURCE,security_model=…,
          # mount_tag=NAME` and mounts it in the guest by tag and target only, so QEMU's
          # `readonly=on` rides in `source`.
          virtualisation.sharedDirectories.keys.source = lib.mkForce ''"$KEYS",readonly=on'';
        }
      )
    ] ++ lib.optional lb.ownHostKey (
      { lib, ... }:
      {
        # Changes the guest: see "Host key" above.
        environment.etc."ssh/ssh_host_ed25519_key".enable = false;
        environment.etc."ssh/ssh_host_ed25519_key.pub".enable = false;
        services.openssh.hostKeys = lib.mkForce [
          {
            path = "/var/nlb-hostkey/ssh_host_ed25519_key";
            type = "ed25519";
          }
        ];
        virtualisation.sharedDirectories.nlb-hostkey = {
          source = ''"$NLB_HOST_KEY_DIR",readonly=on'';
          target = "/var/nlb-hostkey";
          securityModel = "none";
        };
        virtualisation.fileSystems."/var/nlb-hostkey".options = [ "ro" ];
      }
    );
  });
  nixos = builder.nixosConfig;
  wellKnownHostKey = lib.removeSuffix "\n" (
    builtins.readFile nixos.environment.etc."ssh/ssh_host_ed25519_key.pub".source
  );
in
{
  imports = [ ../shared-module.nix ];

  options.services.nix-lazy-builder = {
    linuxBuilder = common.vmOptions // {
      enable = mkEnableOption "a lazily booted darwin.linux-builder VM";
      package = mkOption {
        type = types.package;
        default = pkgs.darwin.linux-builder;
        defaultText = lib.literalExpression "pkgs.darwin.linux-builder";
        description = "nixpkgs' linux-builder (its `nixosConfig` is the guest).";
      };
      nixosConfig = mkOption {
        type = types.unspecified;
        readOnly = true;
        description = "The guest's evaluated NixOS configuration, as run (to inspect).";
      };
      ownHostKey = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Give the guest a host key generated on this Mac instead of nixpkgs' public one. The
          guest is then not the cached one: enable this only once the cached builder runs.
        '';
      };
      systems = mkOption {
        type = types.listOf types.str;
        default = [ nixos.nixpkgs.hostPlatform.system ];
        defaultText = "The guest's `nixpkgs.hostPlatform.system`.";
        example = [ "aarch64-linux" ];
        description = "The systems the builder takes (`systems`).";
      };
      maxJobs = mkOption {
        type = types.ints.positive;
        default = nixos.virtualisation.cores;
        defaultText = "The guest's `virtualisation.cores`.";
        description = "Builds at a time (`max-jobs`).";
      };
      cores = mkOption {
        type = types.ints.positive;
        default = 4;
        description = "The VM's CPUs (runner only: the guest stays the cached one).";
      };
      memoryMiB = mkOption {
        type = types.ints.positive;
        default = 6144;
        description = "The VM's memory in MiB (runner only).";
      };
      diskMiB = mkOption {
        type = types.ints.positive;
        default = 40960;
        description = "The size of the VM's disk image in MiB when it is made (runner only).";
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = config.nix.enable;
        message = "services.nix-lazy-builder needs nix.enable: it sets nix-daemon's build-hook through nix-darwin.";
      }
      {
        # The external-builders door has only ever run on Linux (the build socket's peer check,
        # the build users' group lookup and the unpack journal were never tried on macOS).
        assertion = cfg.door == "build-hook";
        message = "services.nix-lazy-builder.door = \"${cfg.door}\" is not supported on macOS yet: the external-builders door has only been run on Linux. Use door = \"build-hook\".";
      }
    ];

    launchd.daemons.nix-daemon = mkIf config.nix.enable {
      serviceConfig.EnvironmentVariables.NIX_CONFIG = cfg.daemonNixConfig;
    };

    services.nix-lazy-builder = {
      linuxBuilder = {
        nixosConfig = nixos;
        runner = common.runnerWrapper {
          name = "linux-builder";
          runner = lib.getExe nixos.system.build.vm;
          tmpDir = "${dir}/tmp";
        };
      };
      stateDir = lib.mkDefault "${cfg.dataDir}/state";
      builders = lib.optionalAttrs lb.enable {
        linux-builder =
          common.vmBuilder lb (
            {
              # The guest reads /var/keys/builder_ed25519.pub; this directory has nothing else.
              KEYS = "${dir}/guest-keys";
              NIX_DISK_IMAGE = "${dir}/disk.qcow2";
            }
            // lib.optionalAttrs lb.ownHostKey { NLB_HOST_KEY_DIR = "${dir}/hostkey"; }
            # The runner copies it into the guest (useHostCerts), which has no CA bundle else.
            // certEnv
          )
          // {
            uri = "ssh-ng://builder@127.0.0.1";
            systems = lb.systems;
            features = [ "big-parallel" "benchmark" ];
            max-jobs = lb.maxJobs;
            ssh-key = "${dir}/keys/builder_ed25519";
          }
          // (
          if lb.ownHostKey then
            { host-key-file = "${dir}/hostkey/ssh_host_ed25519_key.pub"; }
          else
            {
              host-key = wellKnownHostKey;
              allow-well-known-host-key = true;
            }
        );
      };
    };

    # Per-install keys, made once, outside the store, before launchd (re)starts the job.
    system.activationScripts.preActivation.text = mkIf lb.enable ''
      install -d -m 0700 ${dir} ${dir}/keys ${dir}/guest-keys
      [ -e ${dir}/keys/builder_ed25519 ] || \
        ${pkgs.openssh}/bin/ssh-keygen -q -t ed25519 -N "" -C builder@localhost -f ${dir}/keys/builder_ed25519
      install -m 0644 ${dir}/keys/builder_ed25519.pub ${dir}/guest-keys/builder_ed25519.pub
      ${lib.optionalString lb.ownHostKey ''
        install -d -m 0700 ${dir}/hostkey
        [ -e ${dir}/hostkey/ssh_host_ed25519_key ] || \
          ${pkgs.openssh}/bin/ssh-keygen -q -t ed25519 -N "" -C linux-builder -f ${dir}/hostkey/ssh_host_ed25519_key
      ''}
    '';

    launchd.daemons.nix-lazy-builder = {
      # nix-darwin runs a `command` as `/bin/sh -c "/bin/wait4path /nix/store && exec …"`: at
      # boot the store's volume may not be mounted yet.
      command = "${cfg.package}/bin/nix-lazy-builder supervise --config /etc/nix/lazy-builder.toml";
      path = [ pkgs.coreutils "/usr/bin" "/bin" "/usr/sbin" "/sbin" ];
      environment = { NIX_LAZY_BUILDER_LOG = "info"; } // certEnv;
      serviceConfig = {
        RunAtLoad = true;
        # Restart it if it dies; a clean exit (status 0) is left alone.
        KeepAlive.SuccessfulExit = false;
        # On SIGTERM it powers the VM down (90 s at most): launchd's default 20 s would kill
        # QEMU mid-shutdown.
        ExitTimeOut = 120;
        # 0077: everything it creates is root-only.
        Umask = 63;
        StandardOutPath = "/var/log/nix-lazy-builder.log";
        StandardErrorPath = "/var/log/nix-lazy-builder.log";
      };
    };
  };
}
