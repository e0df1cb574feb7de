//! nixpkgs' shell scripts that start a VM, with their logic as nixpkgs writes it and `$VAR`s
//! where Nix writes store paths: what the tier-4 tests and `nixvmm-bench vm-build` run with
//! nixvmm (or QEMU) as their QEMU.

/// The shell logic of qemu-vm.nix's `run-nixos-vm` (disk creation, TMPDIR and xchg,
/// SHARED_DIR, QEMU_OPTS, QEMU_KERNEL_PARAMS, QEMU_NET_OPTS), with `$STORE` and `$TOPLEVEL`
/// where Nix writes store paths, graphics off (`virtualisation.graphics = false`). `$SHARES`
/// is the share options: 9p by default, or the virtio-fs form.
pub const RUN_NIXOS_VM: &str = r#"#!/usr/bin/env bash
set -e
createEmptyFilesystemImage() {
  local name=$1
  local size=$2
  local temp=$(mktemp)
  qemu-img create -f raw "$temp" "$size"
  mkfs.ext4 -L nixos "$temp"
  qemu-img convert -f raw -O qcow2 "$temp" "$name"
  rm "$temp"
}
NIX_DISK_IMAGE=$(readlink -f "${NIX_DISK_IMAGE:-./nixos.qcow2}") || test -z "$NIX_DISK_IMAGE"
if test -n "$NIX_DISK_IMAGE" && ! test -e "$NIX_DISK_IMAGE"; then
    echo "Disk image do not exist, creating the virtualisation disk image..."
    createEmptyFilesystemImage "$NIX_DISK_IMAGE" "64M"
    echo "Virtualisation disk image created."
fi
if [ -z "$TMPDIR" ] || [ -z "$USE_TMPDIR" ]; then
    TMPDIR=$(mktemp -d nix-vm.XXXXXXXXXX --tmpdir)
fi
mkdir -p "$TMPDIR/xchg"
cd "$TMPDIR"
if [ "$SHARES" = virtiofs ]; then
  for tag in nix-store shared xchg; do
    case $tag in nix-store) dir=$STORE;; shared) dir=${SHARED_DIR:-$TMPDIR/xchg};; xchg) dir=$TMPDIR/xchg;; esac
    $VIRTIOFSD --socket-path="$TMPDIR/virtiofsd-$tag.sock" --shared-dir="$dir" --sandbox none --seccomp none &
  done
  SHARE_OPTS="-chardev socket,id=fs0,path=$TMPDIR/virtiofsd-nix-store.sock -device vhost-user-fs-pci,chardev=fs0,tag=nix-store
    -chardev socket,id=fs1,path=$TMPDIR/virtiofsd-shared.sock -device vhost-user-fs-pci,chardev=fs1,tag=shared
    -chardev socket,id=fs2,path=$TMPDIR/virtiofsd-xchg.sock -device vhost-user-fs-pci,chardev=fs2,tag=xchg
    -object memory-backend-memfd,id=mem,size=1024M,share=on -machine memory-backend=mem"
  qemu-kvm -machine accel=kvm:tcg -cpu max \
    -name nixos \
    -m 1024 \
    -smp 1 \
    -device virtio-rng-pci \
    -net nic,netdev=user.0,model=virtio -netdev user,id=user.0,"$QEMU_NET_OPTS" \
    $SHARE_OPTS \
    -drive cache=writeback,file="$NIX_DISK_IMAGE",id=drive1,if=none,index=1,werror=report \
    -device virtio-blk-pci,bootindex=1,drive=drive1,serial=root \
    -device virtio-keyboard \
    -usb \
    -device usb-tablet,bus=usb-bus.0 \
    -kernel $TOPLEVEL/kernel \
    -initrd $TOPLEVEL/initrd \
    -append "$(cat $TOPLEVEL/kernel-params) init=$TOPLEVEL/init regInfo=$STORE/registration console=tty0 console=ttyS0,115200n8 $QEMU_KERNEL_PARAMS" \
    $QEMU_OPTS \
    "$@"
  rc=$?
  wait
  exit $rc
fi
exec qemu-kvm -cpu max \
    -name nixos \
    -m 1024 \
    -smp 1 \
    -device virtio-rng-pci \
    -net nic,netdev=user.0,model=virtio -netdev user,id=user.0,"$QEMU_NET_OPTS" \
    -virtfs local,path=$STORE,security_model=none,mount_tag=nix-store \
    -virtfs local,path="${SHARED_DIR:-$TMPDIR/xchg}",security_model=none,mount_tag=shared \
    -virtfs local,path="$TMPDIR"/xchg,security_model=none,mount_tag=xchg \
    -drive cache=writeback,file="$NIX_DISK_IMAGE",id=drive1,if=none,index=1,werror=report \
    -device virtio-blk-pci,bootindex=1,drive=drive1,serial=root \
    -device virtio-keyboard \
    -usb \
    -device usb-tablet,bus=usb-bus.0 \
    -kernel $TOPLEVEL/kernel \
    -initrd $TOPLEVEL/initrd \
    -append "$(cat $TOPLEVEL/kernel-params) init=$TOPLEVEL/init regInfo=$STORE/registration console=tty0 console=ttyS0,115200n8 $QEMU_KERNEL_PARAMS" \
    $QEMU_OPTS \
    "$@"
"#;

/// vmTools.runInLinuxVM's `vm-run` (vmRunCommand and qemuCommandLinux), its shell logic as
/// nixpkgs writes it: xchg with the saved environment, a virtiofsd per share started at the
/// same moment as QEMU, the QEMU command from `./run-vm` sourced, the command's status read
/// back from `xchg/in-vm-exit`. `$VIRTIOFSD`, `$STORE`, `$KERNEL` and `$INITRD` stand where
/// Nix writes store paths; the job runs in an empty folder.
pub const VM_RUN: &str = r#"set -u
mkdir xchg
export > xchg/saved-env
cat > ./run-vm <<EOF
#! /bin/sh
$VIRTIOFSD --xattr --socket-path virtio-store.sock --sandbox none --seccomp none --shared-dir "$STORE" &
$VIRTIOFSD --xattr --socket-path virtio-xchg.sock --sandbox none --seccomp none --shared-dir xchg &
qemu-kvm -cpu max \
  -nographic -no-reboot \
  -device virtio-rng-pci \
  -chardev socket,id=store,path=virtio-store.sock \
  -device vhost-user-fs-pci,chardev=store,tag=store \
  -chardev socket,id=xchg,path=virtio-xchg.sock \
  -device vhost-user-fs-pci,chardev=xchg,tag=xchg \
  -kernel $KERNEL \
  -initrd $INITRD \
  -append "console=ttyS0 panic=1 command=/nix/store/builder out=/nix/store/out mountDisk=0 loglevel=4" \
  \$QEMU_OPTS
EOF
chmod +x ./run-vm
source ./run-vm
wait
if ! test -e xchg/in-vm-exit; then
  echo "Virtual machine didn't produce an exit code."
  exit 1
fi
echo IN_VM_EXIT=$(cat xchg/in-vm-exit)
echo RESULT=$(cat xchg/result)
"#;

/// runInLinuxVM's stage 1 in short: the store and xchg over virtio-fs, the `command=` from
/// the kernel command line run, its status written to xchg; the guest's uptime at the end.
pub const IN_VM_STAGE_1: &str = "mkdir -p /fs/nix/store /fs/tmp/xchg\n\
    mount -t virtiofs store /fs/nix/store && mount -t virtiofs xchg /fs/tmp/xchg\n\
    command=$(sed -n 's/.* command=\\([^ ]*\\).*/\\1/p' /proc/cmdline)\n\
    echo COMMAND=$command\n\
    sh /fs$command; echo $? > /fs/tmp/xchg/in-vm-exit\n\
    umount /fs/tmp/xchg /fs/nix/store\n\
    echo UPTIME_AT_POWEROFF=$(cut -d' ' -f1 /proc/uptime)";
