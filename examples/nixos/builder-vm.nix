# The guest side of a lazy NixOS builder VM (import it into the VM's configuration). It takes
# its SSH host key and the authorized client key from a directory the host shares at boot
# ($NLB_GUEST_KEYS, generated per install by module.nix), so no key is ever in the Nix store
# and no two installs share one.
{ lib, ... }:
{
  imports = [ <nixpkgs/nixos/modules/virtualisation/qemu-vm.nix> ];

  virtualisation = {
    graphics = false;
    memorySize = 2048;
    cores = 2;
    diskSize = 20 * 1024;
    writableStore = true;
    writableStoreUseTmpfs = false;
    useNixStoreImage = true;
    sharedDirectories.nlb-keys = {
      source = "\"$NLB_GUEST_KEYS\"";
      target = "/var/nlb-keys";
    };
    # The supervisor adds its own hostfwd through QEMU_NET_OPTS (ssh-port in the TOML).
  };

  services.openssh = {
    enable = true;
    hostKeys = [{ path = "/var/nlb-keys/ssh_host_ed25519_key"; type = "ed25519"; }];
    authorizedKeysFiles = [ "/var/nlb-keys/authorized_keys" ];
    settings.PermitRootLogin = "prohibit-password";
    settings.PasswordAuthentication = false;
  };

  nix.settings = {
    trusted-users = [ "root" ];
    experimental-features = [ "nix-command" ];
  };

  # Powered off by the supervisor (QMP system_powerdown through ACPI, or `poweroff` over SSH).
  services.logind.settings.Login.HandlePowerKey = lib.mkDefault "poweroff";
  documentation.enable = false;
  system.stateVersion = "24.05";
}
