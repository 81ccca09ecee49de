# Stand-in for nixpkgs' nixos/modules/profiles/nix-builder-vm.nix, the guest behind
# darwin.linux-builder, as read from its source: its options and the settings it makes. The
# host key entry's private half is a placeholder (the real one is published in nixpkgs; it is
# not copied here); the public half, keys/ssh_host_ed25519_key.pub, is the real public key.
{ config, lib, options, ... }:

let
  inherit (lib) mkOption types;
  cfg = config.virtualisation.darwin-builder;
  hostPkgs = config.virtualisation.host.pkgs;
in
{
  imports = [ ../virtualisation/qemu-vm.nix ];

  options.virtualisation.darwin-builder = {
    diskSize = mkOption { type = types.int; default = 20 * 1024; };
    memorySize = mkOption { type = types.int; default = 3 * 1024; };
    min-free = mkOption { type = types.int; default = 1024 * 1024 * 1024; };
    max-free = mkOption { type = types.int; default = 3 * 1024 * 1024 * 1024; };
    workingDirectory = mkOption { type = types.str; default = "."; };
    hostPort = mkOption { type = types.int; default = 31022; };
  };

  config = {
    documentation.enable = false;
    environment.etc = {
      "ssh/ssh_host_ed25519_key" = {
        mode = "0600";
        source = "/nix/store/00000000000000000000000000000000-ssh_host_ed25519_key";
      };
      "ssh/ssh_host_ed25519_key.pub" = {
        mode = "0644";
        source = ./keys/ssh_host_ed25519_key.pub;
      };
    };
    nix.channel.enable = false;
    system.disableInstallerTools = true;
    nix.settings = {
      min-free = cfg.min-free;
      max-free = cfg.max-free;
      trusted-users = [ "builder" ];
    };
    services.getty.autologinUser = "builder";
    services.openssh = {
      enable = true;
      authorizedKeysFiles = [ "/var/keys/%u_ed25519.pub" ];
    };

    # create-builder: `cd workingDirectory`, make ./keys, then run the VM runner with KEYS set.
    system.build.macos-builder-installer =
      (hostPkgs.writeScript "create-builder" ''
        ${lib.optionalString (cfg.workingDirectory != ".") "cd ${cfg.workingDirectory}"}
        KEYS="''${KEYS:-./keys}"
        exec ${lib.getExe config.system.build.vm}
      '')
      // {
        nixosConfig = config;
        nixosOptions = options;
      };

    system.stateVersion = "24.05";
    users.users.builder.isNormalUser = true;
    security.polkit.enable = true;
    security.polkit.extraConfig = "polkit.addRule(…power-off for builder…)";

    virtualisation = {
      diskSize = cfg.diskSize;
      memorySize = cfg.memorySize;
      forwardPorts = [
        {
          from = "host";
          guest.port = 22;
          host.port = cfg.hostPort;
        }
      ];
      graphics = false;
      sharedDirectories.keys = {
        source = "\"$KEYS\"";
        target = "/var/keys";
      };
      useNixStoreImage = true;
      writableStore = true;
      writableStoreUseTmpfs = false;
      useHostCerts = true;
    };
  };
}
