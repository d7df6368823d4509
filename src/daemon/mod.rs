//! Deployment helpers shared by the daemons (`vhost-dirtylog-blk`, and the net daemon to come).
//!
//! What a vhost-user backend program needs around its device once real users run it, following
//! the vhost-user specification's "Backend program conventions" and what qemu-storage-daemon and
//! virtiofsd do:
//!
//! - [`socket`]: listening on `--socket-path` with an owner group and mode (libvirt runs QEMU as
//!   its own user), a lock file next to the socket so a second daemon cannot take a live socket
//!   path over, adopting an inherited `--fd`, and refusing a second frontend with a log line
//!   while one is served (instead of leaving it hanging in the listen backlog);
//! - [`lock`]: the disk image lock (open-file-description locks, as QEMU's `file-posix` uses);
//! - [`sandbox`]: the seccomp allow-list (rust-vmm's `seccompiler`) and the Landlock rules (the
//!   `landlock` crate) applied before the first frontend is accepted;
//! - [`signals`]: statistics on `SIGUSR1`, clean exit on `SIGINT` / `SIGTERM`, one thread
//!   taking them with `sigwait`;
//! - [`default_num_queues`]: how many queues to offer when the user does not say.

pub mod lock;
pub mod sandbox;
pub mod signals;
pub mod socket;

/// Fewest queues offered by default (see [`default_num_queues`]).
pub const DEFAULT_MIN_QUEUES: u16 = 16;

/// The number of queues offered when `--num-queues` is not given: the host's CPU count
/// (`std::thread::available_parallelism`, which honours the CPU affinity mask and cgroup quota),
/// but at least `min` and at most `max`.
///
/// QEMU's `vhost-user-blk-pci` asks for one queue per vCPU when its `num-queues` property is
/// not set (`VHOST_USER_BLK_AUTO_NUM_QUEUES`, resolved by `virtio_pci_optimal_num_queues()` in
/// hw/virtio/virtio-pci.c: the vCPU count) and refuses to start when the backend offers fewer
/// (`vhost_user_blk_realize`: "The maximum number of queues supported by the backend is N").
/// Guests often have more vCPUs than a small host has CPUs (4 vCPUs on a 2-CPU CI machine), so
/// the floor `min` (16 in the daemons) covers ordinary guests on any host and the CPU count
/// covers large guests on large hosts. Queues the guest never uses cost no I/O; what each
/// offered queue costs while a frontend is connected is described in the README ("Deploying").
pub fn default_num_queues(min: u16, max: u16) -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = max.max(1);
    u16::try_from(cpus)
        .unwrap_or(u16::MAX)
        .max(min)
        .clamp(1, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_queues_follow_cpus_within_bounds() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(usize::from(default_num_queues(1, 1024)), cpus.min(1024));
        assert_eq!(usize::from(default_num_queues(16, 64)), cpus.clamp(16, 64));
        assert_eq!(default_num_queues(1, 1), 1);
        assert_eq!(default_num_queues(0, 0), 1);
    }
}
