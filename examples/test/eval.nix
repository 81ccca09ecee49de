# Evaluates examples/nixos/module.nix or examples/nix-darwin/module.nix with nixpkgs' real
# `lib.evalModules` against the stub option sets in ./stubs, for one of the cases below, and
# returns every output the module makes (TOML, units or plists, nix.conf and the daemon's
# environment, activation scripts, the guests) as plain data; `files` lists the scripts and
# build commands, in dependency order, for the test to write under the fake store and run.
#
#   NLB_NIXPKGS_LIB=… NLB_FAKE_STORE=… nix-instantiate --eval --strict --json eval.nix \
#     --argstr case nixos --argstr dataDir /tmp/d --argstr package /tmp/pkg
{
  case,
  dataDir,
  package,
}:

let
  lib = import ./stubs/lib.nix;
  pkgDrv = {
    type = "derivation";
    name = "nix-lazy-builder-0.1.0";
    outPath = package;
    meta.mainProgram = "nix-lazy-builder";
  };
  fileOf = d: { path = d.outPath; inherit (d) kind text; };
  failed = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  oldNix = pkgs: pkgs.nix // { name = "nix-2.8.1"; version = "2.8.1"; };
  newNix = pkgs: pkgs.nix // { name = "nix-2.34.0"; version = "2.34.0"; };
  # What the modules write into nix.conf for the doors (absent: null or empty).
  doorSettings = config: {
    buildHook = config.nix.settings.build-hook or null;
    externalBuilders = config.nix.settings.external-builders or null;
    experimentalFeatures = config.nix.settings.extra-experimental-features or [ ];
  };

  nixosCases = {
    # Two VMs: an aarch64 guest (binfmt builds its system) and a native one with extra config.
    nixos = { pkgs, ... }: {
      boot.binfmt.emulatedSystems = [ "aarch64-linux" ];
      services.nix-lazy-builder.vms = {
        aarch64.system = "aarch64-linux";
        native = {
          system = "x86_64-linux";
          # The runner is named after the guest: bin/run-native-builder-vm.
          config.networking.hostName = "native-builder";
          config.virtualisation.memorySize = 4096;
          maxJobs = 4;
        };
      };
    };
    # Two VMs on one fixed port.
    nixos-clash = { ... }: {
      services.nix-lazy-builder.vms = {
        a = { system = "x86_64-linux"; sshPort = 2222; };
        b = { system = "x86_64-linux"; sshPort = 2222; };
        c = { system = "x86_64-linux"; sshPort = 2223; };
      };
    };
    # An aarch64 guest and nothing that could build its system.
    nixos-no-binfmt = { ... }: { services.nix-lazy-builder.vms.aarch64.system = "aarch64-linux"; };
    # A Nix 2.8 daemon takes build-hook as one bare path.
    nixos-nix28 = { pkgs, ... }: {
      nix.package = oldNix pkgs;
      services.nix-lazy-builder.vms.native.system = "x86_64-linux";
    };
    # The external-builders door alone, on Nix 2.34: the systems of a VM and of a builder
    # from `settings`.
    nixos-external = { pkgs, ... }: {
      nix.package = newNix pkgs;
      boot.binfmt.emulatedSystems = [ "aarch64-linux" ];
      services.nix-lazy-builder = {
        door = "external-builders";
        # Beside the data directory, not in it: the build users must reach the build socket.
        stateDir = lib.mkForce "${dataDir}-state";
        vms.aarch64.system = "aarch64-linux";
        # It also takes this machine's own system, which the default leaves out.
        settings.builders.always-on = {
          uri = "ssh://root@192.0.2.1";
          systems = [ "aarch64-linux" "riscv64-linux" "x86_64-linux" ];
        };
      };
    };
    # The external door alone beside Nix's own remote builds: Nix's hook stays.
    nixos-external-nix-machines = { pkgs, ... }: {
      nix.package = newNix pkgs;
      nix.distributedBuilds = true;
      nix.buildMachines = [ { hostName = "builder.example"; systems = [ "x86_64-linux" ]; } ];
      boot.binfmt.emulatedSystems = [ "aarch64-linux" ];
      services.nix-lazy-builder = {
        door = "external-builders";
        stateDir = lib.mkForce "${dataDir}-state";
        vms.aarch64.system = "aarch64-linux";
      };
    };
    # Both doors, the systems given.
    nixos-both = { pkgs, ... }: {
      nix.package = newNix pkgs;
      services.nix-lazy-builder = {
        door = "both";
        stateDir = lib.mkForce "${dataDir}-state";
        vms.native.system = "x86_64-linux";
        externalBuilders.systems = [ "x86_64-linux" "i686-linux" ];
      };
    };
    # external-builders on a Nix without it (the stubs' 2.28), with the state directory (and so
    # the build socket) inside the root-only data directory.
    nixos-external-old-nix = { ... }: {
      boot.binfmt.emulatedSystems = [ "aarch64-linux" ];
      services.nix-lazy-builder = {
        door = "external-builders";
        vms.aarch64.system = "aarch64-linux";
      };
    };
  };

  darwinCases = {
    darwin = { services.nix-lazy-builder.linuxBuilder.enable = true; };
    darwin-own-host-key = {
      services.nix-lazy-builder.linuxBuilder = {
        enable = true;
        ownHostKey = true;
      };
    };
    darwin-x86 = { services.nix-lazy-builder.linuxBuilder.enable = true; };
    darwin-external = { pkgs, ... }: {
      nix.package = newNix pkgs;
      services.nix-lazy-builder = {
        linuxBuilder.enable = true;
        door = "external-builders";
      };
    };
  };

  nixos =
    caseModule:
    let
      eval = lib.evalModules {
        modules = [
          ./stubs/nixos.nix
          ../nixos/module.nix
          {
            nixpkgs.hostPlatform = "x86_64-linux";
            services.nix-lazy-builder = {
              enable = true;
              package = pkgDrv;
              inherit dataDir;
              stateDir = "${dataDir}/state";
            };
          }
          caseModule
        ];
      };
      config = eval.config;
      cfg = config.services.nix-lazy-builder;
      svc = config.systemd.services.nix-lazy-builder;
      docs = lib.elemAt config.environment.systemPackages 1;
      toml = config.environment.etc."nix/lazy-builder.toml".source;
    in
    doorSettings config
    // {
      failedAssertions = failed config;
      inherit (config) warnings;
      toml = toml.value;
      daemonEnvironment = config.systemd.services.nix-daemon.environment;
      unit = svc.unitText;
      serviceConfig = svc.serviceConfig;
      systemPackages = map toString config.environment.systemPackages;
      vms = lib.mapAttrs (_: vm: {
        guestSystem = vm.nixos.nixpkgs.hostPlatform.system;
        toplevelSystem = vm.nixos.system.build.toplevel.system;
        runnerSystem = vm.nixos.system.build.vm.system;
        runnerScript = vm.nixos.system.build.vm.script.text;
        runner = "${vm.runner}";
        inherit (vm.nixos.fileSystems."/var/nlb-keys") device fsType options;
        openssh = { inherit (vm.nixos.services.openssh) hostKeys authorizedKeysFiles; };
        nixSettings = vm.nixos.nix.settings;
        channel = vm.nixos.nix.channel.enable;
        disableInstallerTools = vm.nixos.system.disableInstallerTools;
      }) cfg.vms;
      files =
        lib.concatMap (vm: [
          (fileOf vm.nixos.system.build.vm.script)
          (fileOf vm.nixos.system.build.vm)
          (fileOf vm.runner)
        ]) (lib.attrValues cfg.vms)
        ++ map fileOf svc.jobScripts
        ++ [
          (fileOf docs)
          (fileOf toml)
        ];
    };

  darwin =
    system: caseModule:
    let
      eval = lib.evalModules {
        modules = [
          ./stubs/darwin.nix
          ../nix-darwin/module.nix
          {
            nixpkgs.hostPlatform = system;
            services.nix-lazy-builder = {
              enable = true;
              package = pkgDrv;
              inherit dataDir;
            };
          }
          caseModule
        ];
      };
      config = eval.config;
      lb = config.services.nix-lazy-builder.linuxBuilder;
      guest = lb.nixosConfig;
      stock = lb.package.nixosConfig;
      docs = lib.elemAt config.environment.systemPackages 1;
      toml = config.environment.etc."nix/lazy-builder.toml".source;
      shares = guest.virtualisation.sharedDirectories;
    in
    doorSettings config
    // {
      failedAssertions = failed config;
      inherit (config) warnings;
      toml = toml.value;
      daemonEnvironment = config.launchd.daemons.nix-daemon.serviceConfig.EnvironmentVariables or { };
      plist = config.environment.launchDaemons."org.nixos.nix-lazy-builder.plist".text;
      daemonPlist = config.environment.launchDaemons."org.nixos.nix-daemon.plist".text;
      serviceConfig = config.launchd.daemons.nix-lazy-builder.serviceConfig;
      activation = config.system.activationScripts.script.text;
      preActivation = config.system.activationScripts.preActivation.text;
      systemPackages = map toString config.environment.systemPackages;
      guest = {
        system = guest.nixpkgs.hostPlatform.system;
        toplevel = "${guest.system.build.toplevel}";
        stockToplevel = "${stock.system.build.toplevel}";
        runnerSystem = guest.system.build.vm.system;
        runnerScript = guest.system.build.vm.script.text;
        forwardPorts = guest.virtualisation.forwardPorts;
        shares = lib.mapAttrs (_: s: { inherit (s) source target securityModel; }) shares;
        hostKeys = guest.services.openssh.hostKeys;
      };
      files = [
        (fileOf guest.system.build.vm.script)
        (fileOf guest.system.build.vm)
        (fileOf lb.runner)
        (fileOf docs)
        (fileOf toml)
      ];
    };
in
if nixosCases ? ${case} then
  nixos nixosCases.${case}
else if case == "darwin-x86" then
  darwin "x86_64-darwin" darwinCases.${case}
else if darwinCases ? ${case} then
  darwin "aarch64-darwin" darwinCases.${case}
else
  throw "eval.nix: no case '${case}' (cases: ${toString (lib.attrNames nixosCases ++ lib.attrNames darwinCases)})"
