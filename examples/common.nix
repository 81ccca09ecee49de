# What the NixOS and the nix-darwin module share: the build-hook line, the runner wrapper that
# keeps a NixOS VM runner from leaking its store image, the man pages and completions, and the
# declarations of the options every lazy VM builder has, with the builder TOML they make. Pure
# functions of `lib` and `pkgs`; it declares no options itself (shared-module.nix does).
{ lib, pkgs }:

rec {
  # The build-hook value for `nix`: Nix 2.8 and 2.9 take one bare path (they run it with the
  # verbosity as its only argument); newer Nix split the setting into words.
  hookLine =
    package: nix:
    if lib.versionOlder (lib.getVersion nix) "2.10" then
      "${package}/bin/nix-lazy-builder"
    else
      "${package}/bin/nix-lazy-builder hook";

  # Nix 2.25.0 through 2.33.x (58b03ef1cd; fixed in 2.34.0 by NixOS/nix#15083) read nix.conf
  # and then reset build-hook to their default, silently; NIX_CONFIG in the daemon's
  # environment is read later and wins. Every version since 2.4 reads it the same way, so the
  # modules set both.
  daemonNixConfig = line: "build-hook = ${line}";

  # The script the supervisor starts for a NixOS VM runner (`system.build.vm`, also inside
  # nixpkgs' darwin.linux-builder). With `virtualisation.useNixStoreImage` the runner writes
  # the guest's whole closure into $TMPDIR/store.img before QEMU starts and never deletes it;
  # it uses our TMPDIR only when USE_TMPDIR is set too (otherwise it makes a fresh
  # `mktemp -d` every boot). So: our own TMPDIR, emptied before and after every boot. A
  # SIGKILLed boot leaves it behind until the next one. Not `exec`: the shell stays to clean
  # up; the supervisor stops the VM through QMP and kills the whole process group at the end.
  runnerWrapper =
    { name, runner, tmpDir }:
    pkgs.writeShellScript "nix-lazy-builder-${name}-runner" ''
      set -eu
      export TMPDIR=${lib.escapeShellArg tmpDir} USE_TMPDIR=1
      ${pkgs.coreutils}/bin/rm -rf "$TMPDIR"
      ${pkgs.coreutils}/bin/mkdir -p -m 0700 "$TMPDIR"
      trap '${pkgs.coreutils}/bin/rm -rf "$TMPDIR"' EXIT
      trap 'exit 143' TERM
      trap 'exit 130' INT
      ${lib.escapeShellArg runner} "$@"
    '';

  # Man pages and shell completions, rendered by the binary itself (`man`, `completions`).
  docs =
    package:
    pkgs.runCommand "nix-lazy-builder-docs" { } ''
      exe=${package}/bin/nix-lazy-builder
      mkdir -p $out/share/man/man1 $out/share/bash-completion/completions \
        $out/share/zsh/site-functions $out/share/fish/vendor_completions.d
      "$exe" man --dir $out/share/man/man1
      "$exe" completions bash > $out/share/bash-completion/completions/nix-lazy-builder
      "$exe" completions zsh > $out/share/zsh/site-functions/_nix-lazy-builder
      "$exe" completions fish > $out/share/fish/vendor_completions.d/nix-lazy-builder.fish
    '';

  # The part of a builder's TOML that `vmOptions` make: a `qemu` boot of the VM's runner, with
  # `environment`, for each module to add its own keys to. The NixOS runner honours QEMU_OPTS
  # and QEMU_NET_OPTS, which is where the supervisor puts its QMP socket and the port forward.
  vmBuilder = vm: environment: {
    idle-timeout = vm.idleTimeout;
    boot-timeout = vm.bootTimeout;
    boot = {
      kind = "qemu";
      runner = "${vm.runner}";
      ssh-port = vm.sshPort;
      inherit environment;
    };
  };

  # The options of a lazy NixOS VM builder that both modules offer alike (their own VMs, and
  # nix-darwin's linux-builder), to put beside each module's own; `runner` is set by the
  # module, through `runnerWrapper`.
  vmOptions = with lib; {
    runner = mkOption {
      type = types.package;
      readOnly = true;
      description = ''
        What the supervisor starts: the guest's `system.build.vm` runner, with its TMPDIR
        (and so its Nix store image) emptied before and after every boot.
      '';
    };
    sshPort = mkOption {
      type = types.port;
      default = 0;
      description = "Host port forwarded to the guest's sshd on 127.0.0.1; 0 = a free one at each boot.";
    };
    idleTimeout = mkOption {
      type = types.str;
      default = "15m";
      description = "Power the VM off this long after its last build; \"0s\" = never.";
    };
    bootTimeout = mkOption {
      type = types.str;
      default = "5m";
      description = "How long a boot may take, including the runner building the guest's Nix store image before QEMU starts.";
    };
  };
}
