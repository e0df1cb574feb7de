//! virtio-9p: each descriptor chain carries one T-message (readable part) and room for the
//! R-message (writable part).

use std::io::{Read, Write};

use virtio_queue::Queue;

use super::server::{Server, ShareConfig, MAX_MSIZE};
use crate::{
    device_type, process_request_queue, Chain, Error, Memory, QueueDevice, COMMON_FEATURES,
};

const QUEUE_SIZES: &[u16] = &[128];
/// VIRTIO_9P_MOUNT_TAG: the config space holds the mount tag.
const F_MOUNT_TAG: u64 = 1;

pub struct Virtio9p {
    server: Server,
    tag: String,
}

impl Virtio9p {
    pub fn new(tag: &str, config: ShareConfig) -> std::io::Result<Virtio9p> {
        if tag.is_empty() || tag.len() > usize::from(u16::MAX) {
            return Err(std::io::Error::other(format!("bad mount tag `{tag}`")));
        }
        Ok(Virtio9p {
            server: Server::new(config)?,
            tag: tag.to_string(),
        })
    }

    fn handle(&mut self, chain: Chain, mem: &Memory) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem))
        else {
            return 0;
        };
        let len = reader.available_bytes().min(MAX_MSIZE as usize);
        let mut request = vec![0u8; len];
        if reader.read_exact(&mut request).is_err() {
            return 0;
        }
        let reply = self.server.handle(&request);
        if reply.len() > writer.available_bytes() || writer.write_all(&reply).is_err() {
            log::debug!("virtio-9p: no room for a {}-byte reply", reply.len());
            return 0;
        }
        reply.len() as u32
    }
}

impl QueueDevice for Virtio9p {
    fn device_type(&self) -> u32 {
        device_type::P9
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES | F_MOUNT_TAG
    }

    /// struct virtio_9p_config: tag_len, then the tag.
    fn config(&self) -> Vec<u8> {
        let mut config = (self.tag.len() as u16).to_le_bytes().to_vec();
        config.extend_from_slice(self.tag.as_bytes());
        config
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, Error> {
        process_request_queue(index, queue, mem, |chain| self.handle(chain, mem))
    }
}
