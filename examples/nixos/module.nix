# NixOS module: nix-lazy-builder as the build hook, with lazy builder VMs on an x86_64 (or any)
# Linux host. An aarch64-linux (or x86_64-linux) NixOS VM is booted when a build needs it and
# powered off when idle.
#
#   imports = [ ./module.nix ];
#   services.nix-lazy-builder = {
#     enable = true;
#     package = nix-lazy-builder;                  # e.g. from this repository's build
#     vms.aarch64 = {
#       system = "aarch64-linux";
#       vm = (import <nixpkgs/nixos> {
#         system = "aarch64-linux";
#         configuration = { imports = [ ./builder-vm.nix ]; };
#       }).config.system.build.vm;                 # a NixOS `system.build.vm` runner
#       maxJobs = 2;
#     };
#   };
#
# Keys: the first start of the supervisor generates, per VM, a client key and a guest host key
# in /var/lib/nix-lazy-builder/keys/NAME (never in the Nix store). The guest reads its host key
# from a shared directory (see builder-vm.nix); the host pins the matching public key.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkEnableOption mkIf mkOption types mapAttrs' nameValuePair concatStrings
    mapAttrsToList;
  cfg = config.services.nix-lazy-builder;
  toml = pkgs.formats.toml { };
  keysDir = name: "/var/lib/nix-lazy-builder/keys/${name}";

  vmBuilder = name: vm: {
    uri = "ssh-ng://root@127.0.0.1:${toString vm.sshPort}";
    systems = [ vm.system ];
    features = vm.features;
    mandatory-features = vm.mandatoryFeatures;
    max-jobs = vm.maxJobs;
    speed-factor = vm.speedFactor;
    ssh-key = "${keysDir name}/client_ed25519_key";
    # Generated on this machine by the supervisor unit's ExecStartPre, never the same twice.
    host-key-file = "${keysDir name}/guest/ssh_host_ed25519_key.pub";
    idle-timeout = vm.idleTimeout;
    boot-timeout = vm.bootTimeout;
    boot-for-local = vm.bootForLocal;
    boot = {
      kind = "qemu";
      # The NixOS runner honours QEMU_OPTS / QEMU_NET_OPTS, which is where the supervisor puts
      # its QMP socket and the port forward.
      runner = if vm.runner != null then vm.runner else "${vm.vm}/bin/run-nixos-vm";
      ssh-port = vm.sshPort;
      environment = {
        # Where the runner keeps the VM's disk image (NIX_DISK_IMAGE) and the shared key dir.
        NIX_DISK_IMAGE = "/var/lib/nix-lazy-builder/${name}.qcow2";
        NLB_GUEST_KEYS = "${keysDir name}/guest";
      };
    };
  };
in
{
  options.services.nix-lazy-builder = {
    enable = mkEnableOption "nix-lazy-builder as nix-daemon's build hook";

    package = mkOption {
      type = types.package;
      description = "The nix-lazy-builder package.";
    };

    stateDir = mkOption {
      type = types.str;
      default = "/nix/var/nix/lazy-builder";
      description = "The supervisor's state directory (socket, locks, logs, console logs).";
    };

    vms = mkOption {
      default = { };
      description = "Lazy NixOS VM builders, by name.";
      type = types.attrsOf (types.submodule {
        options = {
          system = mkOption { type = types.str; example = "aarch64-linux"; };
          vm = mkOption {
            type = types.package;
            description = "A NixOS `config.system.build.vm` whose guest imports builder-vm.nix.";
          };
          runner = mkOption {
            type = types.nullOr types.str;
            default = null;
            description = "The runner script in `vm` (default: bin/run-nixos-vm; it is named after the guest's hostName).";
          };
          sshPort = mkOption { type = types.port; default = 31022; };
          maxJobs = mkOption { type = types.ints.positive; default = 2; };
          speedFactor = mkOption { type = types.ints.positive; default = 1; };
          features = mkOption { type = types.listOf types.str; default = [ "big-parallel" ]; };
          mandatoryFeatures = mkOption { type = types.listOf types.str; default = [ ]; };
          idleTimeout = mkOption { type = types.str; default = "15m"; };
          bootTimeout = mkOption { type = types.str; default = "3m"; };
          bootForLocal = mkOption { type = types.bool; default = false; };
        };
      });
    };

    settings = mkOption {
      type = toml.type;
      default = { };
      description = ''
        Extra contents of /etc/nix/lazy-builder.toml (merged over what `vms` generates), e.g.
        always-on builders the machines table cannot describe, or `command`/`darling` builders.
      '';
    };
  };

  config = mkIf cfg.enable {
    # Nix >= 2.10 splits build-hook into words; the daemon appends the verbosity.
    nix.settings.build-hook = "${cfg.package}/bin/nix-lazy-builder hook";

    environment.etc."nix/lazy-builder.toml".source = toml.generate "lazy-builder.toml"
      (lib.recursiveUpdate
        {
          supervisor.state-dir = cfg.stateDir;
          builders = lib.mapAttrs vmBuilder cfg.vms;
        }
        cfg.settings);

    environment.systemPackages = [ cfg.package ];

    systemd.services.nix-lazy-builder = {
      description = "nix-lazy-builder supervisor (boots lazy builders, stops idle ones)";
      wantedBy = [ "multi-user.target" ];
      before = [ "nix-daemon.service" ];
      path = [ pkgs.openssh pkgs.qemu pkgs.coreutils ];
      preStart = concatStrings (mapAttrsToList (name: _: ''
        install -d -m 0700 ${keysDir name} ${keysDir name}/guest
        [ -e ${keysDir name}/client_ed25519_key ] || \
          ssh-keygen -q -t ed25519 -N "" -C "nix-lazy-builder@${name}" -f ${keysDir name}/client_ed25519_key
        [ -e ${keysDir name}/guest/ssh_host_ed25519_key ] || \
          ssh-keygen -q -t ed25519 -N "" -C "${name}" -f ${keysDir name}/guest/ssh_host_ed25519_key
        cp ${keysDir name}/client_ed25519_key.pub ${keysDir name}/guest/authorized_keys
      '') cfg.vms);
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/nix-lazy-builder supervise";
        # A changed /etc/nix/lazy-builder.toml is picked up without this too (the supervisor
        # notices the new file); `systemctl reload` makes it reread at once.
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        KillMode = "mixed";
        TimeoutStopSec = 120;
        Restart = "on-failure";
      };
    };
  };
}
