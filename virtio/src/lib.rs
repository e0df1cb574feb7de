//! virtio transports and device models (virtio-pci, blk, rng, net, 9p, fs) arrive with the
//! virtio issues; the foundation boots with legacy devices only.
