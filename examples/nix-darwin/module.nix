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
# Host key: nixpkgs' linux-builder ships a fixed host key whose private half is public (it is in
# the nixpkgs source), so pinning it proves nothing. This module replaces it with a key
# generated on this Mac at activation, shared into the guest at boot and never put in the store;
# nix-lazy-builder refuses the well-known key unless told otherwise.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkEnableOption mkIf mkOption types;
  cfg = config.services.nix-lazy-builder;
  lb = cfg.linuxBuilder;
  toml = pkgs.formats.toml { };
  dir = "/var/lib/nix-lazy-builder/linux-builder";

  vm = (pkgs.darwin.linux-builder.override {
    modules = [
      ({ lib, ... }: {
        # Drop the well-known host key; use the one generated on this machine.
        environment.etc."ssh/ssh_host_ed25519_key".enable = lib.mkForce false;
        environment.etc."ssh/ssh_host_ed25519_key.pub".enable = lib.mkForce false;
        services.openssh.hostKeys = lib.mkForce [
          { path = "/var/nlb-hostkey/ssh_host_ed25519_key"; type = "ed25519"; }
        ];
        virtualisation.sharedDirectories.nlb-hostkey = {
          source = "\"$NLB_HOST_KEY_DIR\"";
          target = "/var/nlb-hostkey";
        };
        # The supervisor adds the port forward (and its QMP socket) through QEMU_NET_OPTS /
        # QEMU_OPTS.
        virtualisation.forwardPorts = lib.mkForce [ ];
        virtualisation.darwin-builder = {
          memorySize = lb.memoryMiB;
          diskSize = lb.diskMiB;
          workingDirectory = dir;
        };
        virtualisation.cores = lb.cores;
      })
    ];
  }).nixosConfig.system.build.vm;
in
{
  options.services.nix-lazy-builder = {
    enable = mkEnableOption "nix-lazy-builder as nix-daemon's build hook";
    package = mkOption { type = types.package; description = "The nix-lazy-builder package."; };
    settings = mkOption {
      type = toml.type;
      default = { };
      description = "Extra contents of /etc/nix/lazy-builder.toml.";
    };
    linuxBuilder = {
      enable = mkEnableOption "a lazily booted darwin.linux-builder VM";
      systems = mkOption {
        type = types.listOf types.str;
        default = [ "${pkgs.stdenv.hostPlatform.uname.processor}-linux" ];
        example = [ "aarch64-linux" ];
      };
      sshPort = mkOption { type = types.port; default = 31022; };
      maxJobs = mkOption { type = types.ints.positive; default = 4; };
      cores = mkOption { type = types.ints.positive; default = 4; };
      memoryMiB = mkOption { type = types.ints.positive; default = 6144; };
      diskMiB = mkOption { type = types.ints.positive; default = 40960; };
      idleTimeout = mkOption { type = types.str; default = "15m"; };
    };
  };

  config = mkIf cfg.enable {
    nix.settings.build-hook = "${cfg.package}/bin/nix-lazy-builder hook";

    environment.etc."nix/lazy-builder.toml".source = toml.generate "lazy-builder.toml"
      (lib.recursiveUpdate
        {
          supervisor.state-dir = "/var/lib/nix-lazy-builder/state";
          builders = lib.optionalAttrs lb.enable {
            linux-builder = {
              uri = "ssh-ng://builder@127.0.0.1:${toString lb.sshPort}";
              systems = lb.systems;
              features = [ "big-parallel" "benchmark" ];
              max-jobs = lb.maxJobs;
              ssh-key = "${dir}/keys/builder_ed25519";
              host-key-file = "${dir}/hostkey/ssh_host_ed25519_key.pub";
              idle-timeout = lb.idleTimeout;
              boot-timeout = "5m";
              boot = {
                kind = "qemu";
                runner = lib.getExe vm;
                ssh-port = lb.sshPort;
                environment = {
                  KEYS = "${dir}/keys";
                  NLB_HOST_KEY_DIR = "${dir}/hostkey";
                  TMPDIR = "${dir}/tmp";
                };
              };
            };
          };
        }
        cfg.settings);

    # Per-install keys, made once, outside the store.
    system.activationScripts.postActivation.text = lib.mkIf lb.enable (lib.mkAfter ''
      install -d -m 0700 ${dir} ${dir}/keys ${dir}/hostkey ${dir}/tmp
      [ -e ${dir}/keys/builder_ed25519 ] || \
        ${pkgs.openssh}/bin/ssh-keygen -q -t ed25519 -N "" -C builder@localhost -f ${dir}/keys/builder_ed25519
      [ -e ${dir}/hostkey/ssh_host_ed25519_key ] || \
        ${pkgs.openssh}/bin/ssh-keygen -q -t ed25519 -N "" -C linux-builder -f ${dir}/hostkey/ssh_host_ed25519_key
    '');

    launchd.daemons.nix-lazy-builder = {
      path = [ pkgs.qemu pkgs.coreutils ];
      serviceConfig = {
        ProgramArguments = [ "${cfg.package}/bin/nix-lazy-builder" "supervise" ];
        RunAtLoad = true;
        KeepAlive = true;
        StandardErrorPath = "/var/log/nix-lazy-builder.log";
      };
    };
  };
}
