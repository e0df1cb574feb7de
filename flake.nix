{
  description = "nixvmm: a small, fast KVM VMM that takes the place of QEMU for NixOS VMs and tests";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      built = import ./default.nix { inherit pkgs; };
    in
    {
      packages.${system} = {
        inherit (built) nixvmm qemu;
        default = built.nixvmm;
      };
      overlays.default = final: prev: {
        nixvmm = final.callPackage ./nix/package.nix { };
        nixvmm-qemu = final.callPackage ./nix/qemu.nix { };
      };
      nixosModules.default = ./nix/module.nix;
    };
}
