# nixvmm itself, built from this checkout. Its tests boot guests under KVM (and, on hosts
# without VMX/SVM, nested KVM under QEMU), which a Nix build sandbox cannot give them; the
# repository's scripts/test runs them.
{ lib, rustPlatform, pkg-config, libslirp, xz, zstd }:

rustPlatform.buildRustPackage {
  pname = "nixvmm";
  version = (lib.importTOML ../Cargo.toml).workspace.package.version;
  src = lib.cleanSourceWith {
    src = lib.cleanSource ../.;
    filter = path: type: baseNameOf path != "target";
  };
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "--package" "vmm" ];
  nativeBuildInputs = [ pkg-config ];
  # libslirp for user networking; xz's liblzma and zstd for unpacking bzImage payloads.
  buildInputs = [ libslirp xz zstd ];
  doCheck = false;
  meta = {
    description = "A small, fast KVM virtual machine monitor for NixOS VMs and tests";
    license = lib.licenses.asl20;
    platforms = [ "x86_64-linux" ];
    mainProgram = "nixvmm";
  };
}
