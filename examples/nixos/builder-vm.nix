# The guest side of a lazy NixOS builder VM; module.nix evaluates it for each VM (with the VM's
# `config` on top). It takes its SSH host key and the authorized client key from a directory
# the host shares read-only at boot ($NLB_GUEST_KEYS, generated per install by module.nix), so
# no key is ever in the Nix store, no two installs share one, and root in the guest cannot
# rewrite the key the host pins. Settings a builder wants are taken from nixpkgs' own
# nix-builder-vm.nix profile (the one behind darwin.linux-builder).
{ lib, modulesPath, ... }:

{
  imports = [ (modulesPath + "/virtualisation/qemu-vm.nix") ];

  virtualisation = {
    graphics = false;
    memorySize = lib.mkDefault 2048;
    cores = lib.mkDefault 2;
    diskSize = lib.mkDefault (20 * 1024);
    # The guest's store is an image of its closure (not the host's store over 9p, whose lock
    # files the guest would see), with a writable layer on the disk that survives reboots.
    useNixStoreImage = true;
    writableStore = true;
    writableStoreUseTmpfs = false;
    # qemu-vm.nix writes a share as `-virtfs local,path=SOURCE,security_model=…,mount_tag=NAME`
    # and uses only the tag and the target for the guest's mount, so QEMU's `readonly=on`
    # rides in `source`.
    sharedDirectories.nlb-keys = {
      source = ''"$NLB_GUEST_KEYS",readonly=on'';
      target = "/var/nlb-keys";
      # The host's owner and modes as they are (root, 0600), which sshd insists on.
      securityModel = "none";
    };
    fileSystems."/var/nlb-keys".options = [ "ro" ];
    # The supervisor adds its own hostfwd through QEMU_NET_OPTS (ssh-port in the TOML).
  };

  services.openssh = {
    enable = true;
    hostKeys = [
      {
        path = "/var/nlb-keys/ssh_host_ed25519_key";
        type = "ed25519";
      }
    ];
    authorizedKeysFiles = [ "/var/nlb-keys/authorized_keys" ];
    settings.PermitRootLogin = "prohibit-password";
    settings.PasswordAuthentication = false;
  };

  nix.settings = {
    trusted-users = [ "root" ];
    experimental-features = [ "nix-command" ];
    # Collect garbage when the disk runs low, as nix-builder-vm.nix does.
    min-free = lib.mkDefault (1024 * 1024 * 1024);
    max-free = lib.mkDefault (3 * 1024 * 1024 * 1024);
  };
  # A builder is deployed by image and never evaluates: no channel, no installer tools.
  nix.channel.enable = false;
  system.disableInstallerTools = true;

  # Powered off by the supervisor through QMP system_powerdown (ACPI power button; logind's
  # default answer is to power off) or `poweroff` over SSH.
  documentation.enable = false;
  system.stateVersion = "24.05";
}
