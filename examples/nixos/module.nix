# NixOS module: nix-lazy-builder behind nix-daemon (as its build hook, its external builder or
# both: `door`, examples/shared-module.nix), with lazy NixOS builder VMs. A VM (an
# aarch64-linux guest on an x86_64 host, or any other pair QEMU can run) is booted when a build
# needs it and powered off when idle.
#
#   imports = [ ./module.nix ];
#   services.nix-lazy-builder = {
#     enable = true;
#     package = nix-lazy-builder;                  # e.g. from this repository's build
#     door = "build-hook";          # or "external-builders" / "both" (Nix 2.32 and newer)
#     vms.aarch64 = {
#       system = "aarch64-linux";
#       config = { virtualisation.memorySize = 4096; };   # optional, on top of builder-vm.nix
#       maxJobs = 2;
#     };
#   };
#   boot.binfmt.emulatedSystems = [ "aarch64-linux" ];    # see "Building the guest" below
#
# The guest is builder-vm.nix plus `config`, evaluated here for `system`; its runner (QEMU and
# the scripts around it) is built for this host (`virtualisation.host.pkgs`), so an aarch64
# guest runs under this machine's qemu-system-aarch64.
#
# Building the guest: its system (etc, initrd, toplevel) is made from your configuration, so it
# is never on the binary cache, although the packages in it are. For a guest of another
# architecture those few derivations must be built before the VM exists: list the guest's
# system in `boot.binfmt.emulatedSystems` (QEMU user emulation builds them, slowly, once), or
# have another builder for it in `nix.buildMachines`. The module warns when it sees neither.
#
# Keys: the supervisor unit's first start generates, per VM, a client key and a guest host key
# under DATADIR/vms/NAME (never in the Nix store, never the same twice). The guest reads its
# host key and the client's public key from DATADIR/vms/NAME/guest, shared read-only; the
# client's private key is not shared. The host pins the guest's public key.
#
# Ports: each VM's sshd is forwarded from a free port on 127.0.0.1 that QEMU picks at each boot
# (`sshPort = 0`, the default; the supervisor reads it back), so VMs never collide. Fixed ports
# must be unique, which is asserted.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkIf mkOption types;
  cfg = config.services.nix-lazy-builder;
  common = import ../common.nix { inherit lib pkgs; };
  hostSystem = pkgs.stdenv.hostPlatform.system;
  vmDir = name: "${cfg.dataDir}/vms/${name}";

  vmOptions =
    { name, config, ... }:
    {
      options = common.vmOptions // {
        system = mkOption {
          type = types.str;
          example = "aarch64-linux";
          description = "The guest's system: what builds it takes (`nixpkgs.hostPlatform`).";
        };
        config = mkOption {
          type = types.deferredModule;
          default = { };
          example = lib.literalExpression "{ virtualisation.memorySize = 4096; virtualisation.cores = 4; }";
          description = "NixOS configuration of the guest, on top of builder-vm.nix.";
        };
        nixos = mkOption {
          type = types.unspecified;
          readOnly = true;
          description = "The guest's evaluated NixOS configuration (`config`), to inspect.";
        };
        maxJobs = mkOption {
          type = types.ints.positive;
          default = 2;
          description = "Builds at a time on this VM (`max-jobs`).";
        };
        speedFactor = mkOption {
          type = types.ints.positive;
          default = 1;
          description = "Nix's speed factor: a higher one is preferred (`speed-factor`).";
        };
        features = mkOption {
          type = types.listOf types.str;
          default = [ "big-parallel" ];
          description = "Supported system features (`features`).";
        };
        mandatoryFeatures = mkOption {
          type = types.listOf types.str;
          default = [ ];
          description = "Features a derivation must require to be built here (`mandatory-features`).";
        };
        bootForLocal = mkOption {
          type = types.bool;
          default = false;
          description = "Boot the VM even for derivations this machine could build itself.";
        };
      };
      config = {
        nixos =
          (import (pkgs.path + "/nixos/lib/eval-config.nix") {
            system = null;
            modules = [
              ./builder-vm.nix
              config.config
              {
                nixpkgs.hostPlatform = config.system;
                # The runner (QEMU, the image tools) for this machine, not for the guest.
                virtualisation.host.pkgs = pkgs;
              }
            ];
          }).config;
        runner = common.runnerWrapper {
          inherit name;
          runner = lib.getExe config.nixos.system.build.vm;
          tmpDir = "${vmDir name}/tmp";
        };
      };
    };

  vmBuilder =
    name: vm:
    common.vmBuilder vm {
      NIX_DISK_IMAGE = "${vmDir name}/disk.qcow2";
      NLB_GUEST_KEYS = "${vmDir name}/guest";
    }
    // {
      uri = "ssh-ng://root@127.0.0.1";
      systems = [ vm.nixos.nixpkgs.hostPlatform.system ];
      features = vm.features;
      mandatory-features = vm.mandatoryFeatures;
      max-jobs = vm.maxJobs;
      speed-factor = vm.speedFactor;
      ssh-key = "${vmDir name}/client_ed25519_key";
      # Generated on this machine by the supervisor unit's preStart, never the same twice.
      host-key-file = "${vmDir name}/guest/ssh_host_ed25519_key.pub";
      boot-for-local = vm.bootForLocal;
    };

  # Fixed ports used by more than one VM: { port = [ names ]; }.
  portClashes = lib.filterAttrs (_: names: lib.length names > 1) (
    lib.zipAttrs (
      lib.mapAttrsToList (name: vm: { ${toString vm.sshPort} = name; }) (
        lib.filterAttrs (_: vm: vm.sshPort != 0) cfg.vms
      )
    )
  );

  # A guest of another architecture needs something to build its own system first.
  unbuildable =
    name: vm:
    let
      sys = vm.nixos.nixpkgs.hostPlatform.system;
    in
    sys != hostSystem
    && !(lib.elem sys (config.boot.binfmt.emulatedSystems or [ ]))
    && !(lib.any (m: lib.elem sys (m.systems ++ lib.optional (m.system != null) m.system)) config.nix.buildMachines);
in
{
  imports = [ ../shared-module.nix ];

  options.services.nix-lazy-builder.vms = mkOption {
    default = { };
    description = "Lazy NixOS VM builders, by name.";
    type = types.attrsOf (types.submodule vmOptions);
  };

  config = mkIf cfg.enable {
    assertions = lib.mapAttrsToList (port: names: {
      assertion = false;
      message = "services.nix-lazy-builder.vms: ${lib.concatStringsSep " and " names} all use sshPort = ${port}; give each VM its own port, or 0 (the default) for a free one at each boot.";
    }) portClashes;

    warnings = lib.mapAttrsToList (
      name: vm:
      let
        sys = vm.nixos.nixpkgs.hostPlatform.system;
      in
      "services.nix-lazy-builder.vms.${name}: the guest is ${sys} and this host ${hostSystem}. The guest's own system (etc, initrd, toplevel) is not on the binary cache and nothing here builds ${sys} derivations before the VM runs: add \"${sys}\" to boot.binfmt.emulatedSystems, or another builder for ${sys} to nix.buildMachines."
    ) (lib.filterAttrs unbuildable cfg.vms);

    services.nix-lazy-builder = {
      stateDir = lib.mkDefault "/nix/var/nix/lazy-builder";
      builders = lib.mapAttrs vmBuilder cfg.vms;
    };
    systemd.services.nix-daemon.environment.NIX_CONFIG = cfg.daemonNixConfig;

    systemd.services.nix-lazy-builder = {
      description = "nix-lazy-builder supervisor (boots lazy builders, stops idle ones)";
      wantedBy = [ "multi-user.target" ];
      before = [ "nix-daemon.service" ];
      path = [ pkgs.coreutils ];
      preStart = lib.concatStrings (
        lib.mapAttrsToList (
          name: _:
          let
            d = lib.escapeShellArg (vmDir name);
          in
          ''
            install -d -m 0700 ${d} ${d}/guest
            [ -e ${d}/client_ed25519_key ] || \
              ${pkgs.openssh}/bin/ssh-keygen -q -t ed25519 -N "" -C "nix-lazy-builder@${name}" -f ${d}/client_ed25519_key
            [ -e ${d}/guest/ssh_host_ed25519_key ] || \
              ${pkgs.openssh}/bin/ssh-keygen -q -t ed25519 -N "" -C "${name}" -f ${d}/guest/ssh_host_ed25519_key
            install -m 0600 ${d}/client_ed25519_key.pub ${d}/guest/authorized_keys
          ''
        ) cfg.vms
      );
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/nix-lazy-builder supervise --config /etc/nix/lazy-builder.toml";
        # A changed /etc/nix/lazy-builder.toml is picked up without this too (the supervisor
        # notices the new file); `systemctl reload` makes it reread at once.
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        # SIGTERM to the supervisor only: it powers every VM down (bounded); SIGKILL for the
        # rest of the cgroup only after TimeoutStopSec.
        KillMode = "mixed";
        TimeoutStopSec = 120;
        Restart = "on-failure";
        RestartSec = 5;
        # Keys, disks, sockets, logs: everything it creates is root-only.
        UMask = "0077";
      };
    };
  };
}
