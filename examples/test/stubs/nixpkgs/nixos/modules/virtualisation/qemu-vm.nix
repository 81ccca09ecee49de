# Stand-in for nixpkgs' nixos/modules/virtualisation/qemu-vm.nix (read from its source): the
# options examples/ and nix-builder-vm.nix use, with their types and defaults, and the split
# that matters here, between
#  - the runner (`system.build.vm`): a script built with `virtualisation.host.pkgs` that makes
#    the disk and the Nix store image and starts QEMU. memorySize, cores, diskSize,
#    forwardPorts, qemu.*, and each share's source and securityModel only end up here.
#  - the guest's system (`system.build.toplevel`), built for the guest: everything the guest
#    itself sees. A share reaches it only by tag and target (its 9p mount).
# The runner here keeps the real one's environment contract (NIX_DISK_IMAGE, TMPDIR with
# USE_TMPDIR, $TMPDIR/store.img, $TMPDIR/xchg and certs, QEMU_OPTS, QEMU_NET_OPTS, the -virtfs
# lines) but, instead of exec'ing QEMU, writes the arguments QEMU would get, one per line, to
# $NLB_STUB_QEMU_ARGS. The toplevel is a stand-in whose hash covers what the guest sees.
{ config, lib, pkgs, options, ... }:

let
  inherit (lib) mkOption types;
  cfg = config.virtualisation;
  hostPkgs = cfg.host.pkgs;

  forwardingOptions = lib.concatMapStrings (
    f:
    if f.from == "host" then
      "hostfwd=${f.proto}:${f.host.address}:${toString f.host.port}-${f.guest.address}:${toString f.guest.port},"
    else
      "'guestfwd=${f.proto}:${f.guest.address}:${toString f.guest.port}-cmd:nc ${f.host.address} ${toString f.host.port}',"
  ) cfg.forwardPorts;

  startVM = ''
    #! ${hostPkgs.runtimeShell}
    set -e
    NIX_DISK_IMAGE=$(readlink -f "''${NIX_DISK_IMAGE:-${toString cfg.diskImage}}") || test -z "$NIX_DISK_IMAGE"
    if test -n "$NIX_DISK_IMAGE" && ! test -e "$NIX_DISK_IMAGE"; then
        echo "Disk image do not exist, creating the virtualisation disk image..."
        : > "$NIX_DISK_IMAGE"
    fi
    if [ -z "$TMPDIR" ] || [ -z "$USE_TMPDIR" ]; then
        TMPDIR=$(mktemp -d nix-vm.XXXXXXXXXX --tmpdir)
    fi
    ${lib.optionalString cfg.useNixStoreImage ''
      echo "Creating Nix store image..."
      head -c 1048576 /dev/zero > "$TMPDIR"/store.img
      echo "Created Nix store image."
    ''}
    mkdir -p "$TMPDIR/xchg"
    ${lib.optionalString cfg.useHostCerts ''
      mkdir -p "$TMPDIR/certs"
      if [ -e "$NIX_SSL_CERT_FILE" ]; then
        cp -L "$NIX_SSL_CERT_FILE" "$TMPDIR"/certs/ca-certificates.crt
      else
        echo \$NIX_SSL_CERT_FILE should point to a valid file if virtualisation.useHostCerts is enabled.
      fi
    ''}
    cd "$TMPDIR"
    set -- ${cfg.qemu.package}/bin/qemu-system-${pkgs.stdenv.hostPlatform.qemuArch} \
        -name ${config.system.name} \
        -m ${toString cfg.memorySize} \
        -smp ${toString cfg.cores} \
        ${lib.concatStringsSep " " cfg.qemu.networkingOptions} \
        ${lib.concatStringsSep " \\\n    " (
          lib.mapAttrsToList (
            tag: share: "-virtfs local,path=${share.source},security_model=${share.securityModel},mount_tag=${tag}"
          ) cfg.sharedDirectories
        )} \
        ${lib.optionalString (cfg.diskImage != null) ''-drive file="$NIX_DISK_IMAGE",if=virtio''} \
        ${lib.optionalString cfg.useNixStoreImage ''-drive file="$TMPDIR"/store.img,if=virtio,format=raw''} \
        ${lib.concatStringsSep " \\\n    " cfg.qemu.options} \
        $QEMU_OPTS \
        "$@"
    printf '%s\n' "$@" > "''${NLB_STUB_QEMU_ARGS:-/dev/null}"
  '';

  mkSharedDir = tag: share: {
    name = share.target;
    value = {
      device = tag;
      fsType = "9p";
      neededForBoot = true;
      options = [
        "trans=virtio"
        "version=9p2000.L"
        "msize=${toString cfg.msize}"
        "x-systemd.requires=modprobe@9pnet_virtio.service"
      ] ++ lib.optional (tag == "nix-store") "cache=loose";
    };
  };

  # What the guest's system is made of (everything it sees; nothing only the runner reads).
  guestView = {
    etc = lib.mapAttrs (_: e: {
      inherit (e) target mode;
      source = toString e.source;
    }) (lib.filterAttrs (_: e: e.enable) config.environment.etc);
    openssh = {
      inherit (config.services.openssh) enable hostKeys authorizedKeysFiles settings;
    };
    nix = {
      inherit (config.nix) settings;
      channel = config.nix.channel.enable;
      package = "${config.nix.package}";
    };
    users = config.users.users;
    fileSystems = config.fileSystems;
    getty = config.services.getty.autologinUser;
    polkit = { inherit (config.security.polkit) enable extraConfig; };
    inherit (config.networking) hostName;
    inherit (config.system) stateVersion disableInstallerTools;
    documentation = config.documentation.enable;
    services = lib.mapAttrs (_: s: s.unitText) config.systemd.services;
    store = { inherit (cfg) useNixStoreImage writableStore writableStoreUseTmpfs useHostCerts; };
  };
in
{
  options.virtualisation = {
    fileSystems = options.fileSystems;
    memorySize = mkOption { type = types.ints.positive; default = 1024; };
    msize = mkOption { type = types.ints.positive; default = 16384; };
    diskImage = mkOption {
      type = types.nullOr types.str;
      default = "./${config.system.name}.qcow2";
    };
    # disk-size-option.nix
    diskSize = mkOption {
      type = types.either (types.enum [ "auto" ]) types.ints.positive;
      default = 1024;
    };
    graphics = mkOption { type = types.bool; default = true; };
    cores = mkOption { type = types.ints.positive; default = 1; };
    sharedDirectories = mkOption {
      type = types.attrsOf (
        types.submodule {
          options.source = mkOption { type = types.str; };
          options.target = mkOption { type = types.path; };
          options.securityModel = mkOption {
            type = types.enum [ "passthrough" "mapped-xattr" "mapped-file" "none" ];
            default = "mapped-xattr";
          };
        }
      );
      default = { };
    };
    additionalPaths = mkOption { type = types.listOf types.path; default = [ ]; };
    forwardPorts = mkOption {
      type = types.listOf (
        types.submodule {
          options.from = mkOption { type = types.enum [ "host" "guest" ]; default = "host"; };
          options.proto = mkOption { type = types.enum [ "tcp" "udp" ]; default = "tcp"; };
          options.host.address = mkOption { type = types.str; default = ""; };
          options.host.port = mkOption { type = types.port; };
          options.guest.address = mkOption { type = types.str; default = ""; };
          options.guest.port = mkOption { type = types.port; };
        }
      );
      default = [ ];
    };
    restrictNetwork = mkOption { type = types.bool; default = false; };
    writableStore = mkOption { type = types.bool; default = cfg.mountHostNixStore; };
    writableStoreUseTmpfs = mkOption { type = types.bool; default = true; };
    host.pkgs = mkOption { type = types.pkgs; default = pkgs; };
    qemu = {
      package = mkOption {
        type = types.package;
        default =
          if hostPkgs.stdenv.hostPlatform.qemuArch == pkgs.stdenv.hostPlatform.qemuArch then
            hostPkgs.qemu_kvm
          else
            hostPkgs.qemu;
      };
      options = mkOption { type = types.listOf types.str; default = [ ]; };
      networkingOptions = mkOption { type = types.listOf types.str; default = [ ]; };
    };
    useNixStoreImage = mkOption { type = types.bool; default = false; };
    mountHostNixStore = mkOption {
      type = types.bool;
      default = !cfg.useNixStoreImage && !cfg.useBootLoader;
    };
    useBootLoader = mkOption { type = types.bool; default = false; };
    useHostCerts = mkOption { type = types.bool; default = false; };
  };

  config = {
    virtualisation.sharedDirectories = {
      nix-store = lib.mkIf cfg.mountHostNixStore {
        source = builtins.storeDir;
        target = "/nix/.ro-store";
        securityModel = "none";
      };
      xchg = {
        source = ''"$TMPDIR"/xchg'';
        securityModel = "none";
        target = "/tmp/xchg";
      };
      shared = {
        source = ''"''${SHARED_DIR:-$TMPDIR/xchg}"'';
        target = "/tmp/shared";
        securityModel = "none";
      };
      certs = lib.mkIf cfg.useHostCerts {
        source = ''"$TMPDIR"/certs'';
        target = "/etc/ssl/certs";
        securityModel = "none";
      };
    };

    virtualisation.qemu.networkingOptions = [
      "-net nic,netdev=user.0,model=virtio"
      "-netdev user,id=user.0,${forwardingOptions}${lib.optionalString cfg.restrictNetwork "restrict=on,"}\"$QEMU_NET_OPTS\""
    ];

    fileSystems = lib.mkIf (cfg.fileSystems != { }) (lib.mkOverride 10 cfg.fileSystems);
    virtualisation.fileSystems = lib.mkMerge [
      (lib.mapAttrs' mkSharedDir cfg.sharedDirectories)
      {
        "/nix/.ro-store" = lib.mkIf cfg.useNixStoreImage {
          device = "/dev/disk/by-label/nix-store";
          fsType = "erofs";
          neededForBoot = true;
          options = [ "ro" ];
        };
      }
    ];

    system.build.toplevel = pkgs.runCommand "nixos-system-${config.system.name}" { } (builtins.toJSON guestView);

    system.build.vm =
      let
        script = hostPkgs.writeScript "run-nixos-vm" startVM;
      in
      hostPkgs.runCommand "nixos-vm" { meta.mainProgram = "run-${config.system.name}-vm"; } ''
        mkdir -p $out/bin
        ln -s ${script} $out/bin/run-${config.system.name}-vm
      ''
      // {
        inherit script;
      };
  };
}
