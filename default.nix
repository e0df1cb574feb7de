# `nix-build` here builds nixvmm; `nix-build -A qemu` the QEMU-shaped package a run script or
# `virtualisation.qemu.package` takes; `module` is the NixOS module (virtualisation.nixvmm).
{ pkgs ? import <nixpkgs> { } }:

rec {
  nixvmm = pkgs.callPackage ./nix/package.nix { };
  qemu = pkgs.callPackage ./nix/qemu.nix { inherit nixvmm; };
  module = ./nix/module.nix;
}
