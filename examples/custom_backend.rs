//! A minimal custom vhost-user backend made migratable by `DirtyLogBackend`.
//!
//! The device ("filler") has one virtqueue; for every descriptor chain the driver posts, it fills
//! each device-writable buffer with a byte pattern and returns it. Nothing in the device code
//! mentions dirty logging: the buffers are written through vm-memory and the used ring through
//! virtio-queue, and both go through `GuestDirtyBitmap`. Wrapping the device in
//! `DirtyLogBackend` is the only change a backend needs.
//!
//! Run: `cargo run --example custom_backend -- /tmp/filler.sock` and connect a vhost-user
//! frontend (for a full migration check of a block device, see `vhost-dirtylog-check`).

use std::io::{Error, ErrorKind, Result};
use std::sync::Mutex;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_dirtylog::backend::{DirtyGuestMemory, DirtyLogBackend};
use vhost_dirtylog::log::GuestDirtyBitmap;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// The device: fills buffers with `pattern`.
struct Filler {
    pattern: u8,
    mem: Mutex<Option<DirtyGuestMemory>>,
}

impl VhostUserBackend for Filler {
    type Bitmap = GuestDirtyBitmap;
    type Vring = VringRwLock<DirtyGuestMemory>;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, mem: DirtyGuestMemory) -> Result<()> {
        *self.mem.lock().unwrap() = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Lets the daemon stop the worker thread when the frontend goes away.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> Result<()> {
        let vring = vrings
            .get(device_event as usize)
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "unknown queue"))?;
        let Some(atomic) = self.mem.lock().unwrap().clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let mut filled = Vec::new();
        {
            let mut state = vring.get_mut();
            let chains: Vec<_> = state
                .get_queue_mut()
                .iter(&*mem)
                .map_err(|e| Error::new(ErrorKind::InvalidData, e.to_string()))?
                .collect();
            for chain in chains {
                let head = chain.head_index();
                let mut written = 0u32;
                for desc in chain.writable() {
                    let buf = vec![self.pattern; desc.len() as usize];
                    // vm-memory marks these pages in the dirty log while logging is on.
                    if mem.write_slice(&buf, desc.addr()).is_ok() {
                        written = written.saturating_add(desc.len());
                    }
                }
                filled.push((head, written));
            }
        }
        for (head, len) in filled {
            // virtio-queue writes the used ring through vm-memory: logged as well.
            vring
                .add_used(head, len)
                .map_err(|e| Error::new(ErrorKind::InvalidData, e.to_string()))?;
        }
        vring.signal_used_queue()
    }
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let socket = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/filler.sock".into());
    let device = std::sync::Arc::new(Filler {
        pattern: 0xf1,
        mem: Mutex::new(None),
    });
    // The one line that makes it migratable.
    let backend = DirtyLogBackend::new(device);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<GuestDirtyBitmap>::new());
    let mut daemon =
        VhostUserDaemon::new("filler".into(), backend, mem).map_err(|e| e.to_string())?;
    println!("filler: serving one frontend on {socket}");
    daemon.serve(&socket).map_err(|e| e.to_string())?;
    Ok(())
}
