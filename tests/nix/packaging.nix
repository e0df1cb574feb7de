# What of nixvmm's Nix packaging can be evaluated without nixpkgs (Debian's nix-bin has none):
# each file is called with the few functions it uses, written here with nixpkgs' meaning, and
# what it builds is checked. Evaluates to the list of failures (empty when all is well).
# `nixvmm` and `fakeQemu` are paths the test passes for the wrapper's build script.
{ nixvmm ? "/nix/store/00-nixvmm", fakeQemu ? "/nix/store/00-qemu" }:

let
  lib = {
    mkEnableOption = name: { type = "bool"; default = false; description = "Whether to enable ${name}."; };
    mkOption = attrs: attrs;
    types.package = "package";
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    concatMapStrings = f: list: builtins.concatStringsSep "" (map f list);
    getExe = package: "${package}/bin/${package.meta.mainProgram or "nixvmm"}";
    importTOML = path: builtins.fromTOML (builtins.readFile path);
    cleanSource = src: src;
    cleanSourceWith = { src, filter }: src;
    licenses.asl20 = "asl20";
  };
  called = path: args: { inherit path args; };
  pkgs = { callPackage = called; qemu_kvm = "pkgs.qemu_kvm"; };
  module = import ../../nix/module.nix;
  evaluate = enable: module {
    inherit lib pkgs;
    config.virtualisation.nixvmm = { inherit enable; package = "nixvmm-package"; fallbackQemu = "qemu-package"; };
  };
  on = evaluate true;
  off = evaluate false;
  qemu = {
    version = "9.2.0";
    meta = { description = "QEMU"; };
    outPath = fakeQemu;
  };
  wrapper = import ../../nix/qemu.nix {
    inherit lib qemu;
    symlinkJoin = attrs: attrs;
    makeWrapper = "makeWrapper";
    nixvmm = { outPath = nixvmm; meta.mainProgram = "nixvmm"; };
  };
  package = import ../../nix/package.nix {
    inherit lib;
    rustPlatform.buildRustPackage = attrs: attrs;
    pkg-config = "pkg-config";
    libslirp = "libslirp";
    xz = "xz";
    zstd = "zstd";
  };
  cargo = builtins.fromTOML (builtins.readFile ../../Cargo.toml);
  flake = import ../../flake.nix;
  checks = {
    "module: enable, package and fallbackQemu are options" =
      builtins.attrNames on.options.virtualisation.nixvmm == [ "enable" "fallbackQemu" "package" ];
    "module: off by default" = on.options.virtualisation.nixvmm.enable.default == false;
    "module: enabled, virtualisation.qemu.package is nixvmm's QEMU over fallbackQemu" =
      on.config.condition == true
      && on.config.content.virtualisation.qemu.package
        == called ../../nix/qemu.nix { nixvmm = "nixvmm-package"; qemu = "qemu-package"; };
    "module: disabled, nothing is set" = off.config.condition == false;
    "module: the default fallback is pkgs.qemu_kvm" =
      on.options.virtualisation.nixvmm.fallbackQemu.default == "pkgs.qemu_kvm";
    "qemu package: everything of QEMU" = wrapper.paths == [ qemu ] && wrapper.version == "9.2.0";
    "qemu package: both QEMU names wrapped" =
      builtins.all (name: builtins.match ".*makeWrapper ${nixvmm}/bin/nixvmm [$]out/bin/${name}[^\n]*\n[^\n]*--argv0 ${name}.*" wrapper.postBuild != null)
        [ "qemu-kvm" "qemu-system-x86_64" ];
    "qemu package: fallback to the same QEMU" =
      builtins.match ".*--set-default NIXVMM_QEMU ${fakeQemu}/bin/qemu-system-x86_64.*" wrapper.postBuild != null;
    "package: the workspace version" = package.version == cargo.workspace.package.version;
    "package: builds the vmm crate (the nixvmm binary)" = package.cargoBuildFlags == [ "--package" "vmm" ];
    "package: links Debian's and nixpkgs' libslirp" = builtins.elem "libslirp" package.buildInputs;
    "package: links liblzma and libzstd (bzImage payloads)" =
      builtins.all (lib: builtins.elem lib package.buildInputs) [ "xz" "zstd" ];
    "package: main program nixvmm" = package.meta.mainProgram == "nixvmm";
    "package: the lock file is there" = builtins.pathExists package.cargoLock.lockFile;
    "flake: takes nixpkgs" = builtins.attrNames flake.inputs == [ "nixpkgs" ];
  };
  failures = builtins.filter (name: !checks.${name}) (builtins.attrNames checks);
in
{ inherit failures; postBuild = wrapper.postBuild; }
