# virtualisation.nixvmm.enable: this VM (run-<name>-vm, `nixos-rebuild build-vm`, a NixOS
# test machine) runs on nixvmm instead of QEMU. qemu-vm.nix keeps writing its QEMU command
# line; nixvmm takes it, and hands the boots it cannot serve to `fallbackQemu` unchanged.
{ config, lib, pkgs, ... }:

let
  cfg = config.virtualisation.nixvmm;
in
{
  options.virtualisation.nixvmm = {
    enable = lib.mkEnableOption "nixvmm as the QEMU of this virtual machine";
    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "nixvmm built from its repository";
      description = "The nixvmm package.";
    };
    fallbackQemu = lib.mkOption {
      type = lib.types.package;
      default = pkgs.qemu_kvm;
      defaultText = lib.literalExpression "pkgs.qemu_kvm";
      description = ''
        The real QEMU: its qemu-img creates the VM's disks, and it runs the boots nixvmm
        hands on (UEFI, a bootloader, other machine types).
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    virtualisation.qemu.package = pkgs.callPackage ./qemu.nix {
      nixvmm = cfg.package;
      qemu = cfg.fallbackQemu;
    };
  };
}
