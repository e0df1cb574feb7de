# QEMU with nixvmm at its front door: everything of `qemu` (qemu-img and the rest) with
# bin/qemu-kvm and bin/qemu-system-x86_64 running nixvmm under those names. A boot nixvmm
# cannot serve (UEFI, a bootloader, another machine type) goes on to this same QEMU through
# NIXVMM_QEMU. This is what `virtualisation.qemu.package` takes.
{ lib, symlinkJoin, makeWrapper, nixvmm, qemu }:

symlinkJoin {
  name = "nixvmm-qemu-${qemu.version}";
  inherit (qemu) version;
  paths = [ qemu ];
  nativeBuildInputs = [ makeWrapper ];
  postBuild = lib.concatMapStrings (name: ''
    rm -f $out/bin/${name}
    makeWrapper ${lib.getExe nixvmm} $out/bin/${name} \
      --argv0 ${name} \
      --set-default NIXVMM_QEMU ${qemu}/bin/qemu-system-x86_64
  '') [ "qemu-kvm" "qemu-system-x86_64" ];
  passthru = { inherit nixvmm qemu; };
  meta = qemu.meta // { mainProgram = "qemu-system-x86_64"; };
}
