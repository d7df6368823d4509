//! The relay in front of vhost-user-backend (`backend::relay`): QEMU's virtio-net sends
//! `SET_VRING_ENABLE` before `SET_FEATURES`; the stock crates end the connection on it (the
//! negative control shows the flaw), through the relay the connection survives and the ring
//! state reaches the device after `SET_FEATURES`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_dirtylog::backend::relay::Relay;
use vhost_dirtylog::backend::DirtyLogBackend;
use vhost_dirtylog::test_utils::NullDevice;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const VERSION: u32 = 1;
const NEED_REPLY: u32 = 8;

fn send(s: &mut UnixStream, request: u32, flags: u32, payload: &[u8]) {
    let mut m = request.to_le_bytes().to_vec();
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m).unwrap();
}

/// Reads a reply: `Some((request, u64 payload))`, or `None` if the backend closed.
fn reply(s: &mut UnixStream) -> Option<(u32, u64)> {
    let mut h = [0u8; 12];
    s.read_exact(&mut h).ok()?;
    let size = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    let mut p = vec![0u8; size];
    s.read_exact(&mut p).ok()?;
    let v = u64::from_le_bytes(p.get(..8)?.try_into().unwrap());
    Some((u32::from_le_bytes(h[0..4].try_into().unwrap()), v))
}

/// QEMU 10's opening for a vhost-user-net peer, up to the early `SET_VRING_ENABLE` and its
/// reply; `None` if the connection ended there.
fn qemu_net_opening(s: &mut UnixStream) -> Option<u64> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    send(s, GET_FEATURES, VERSION, &[]);
    let (_, features) = reply(s)?;
    send(s, GET_PROTOCOL_FEATURES, VERSION, &[]);
    let (_, protocol) = reply(s)?;
    let want = protocol & VhostUserProtocolFeatures::REPLY_ACK.bits();
    send(s, SET_PROTOCOL_FEATURES, VERSION, &want.to_le_bytes());
    let mut st = 0u32.to_le_bytes().to_vec();
    st.extend_from_slice(&1u32.to_le_bytes());
    send(s, SET_VRING_ENABLE, VERSION | NEED_REPLY, &st);
    let (req, status) = reply(s)?;
    assert_eq!((req, status), (SET_VRING_ENABLE, 0));
    Some(features)
}

fn daemon() -> VhostUserDaemon<DirtyLogBackend<NullDevice>> {
    let dev = NullDevice::new(VhostUserProtocolFeatures::REPLY_ACK);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    VhostUserDaemon::new("relay-test".into(), DirtyLogBackend::new(dev), mem).unwrap()
}

#[test]
fn early_set_vring_enable_keeps_the_connection_through_the_relay() {
    let relay = Relay::new().unwrap();
    let mut d = daemon();
    let (mut fe, theirs) = UnixStream::pair().unwrap();
    let conn = relay.start(&mut d, theirs).unwrap();
    let features = qemu_net_opening(&mut fe).expect("the relay answers the early enable");
    // The connection is alive and the features can now be acked; the remembered enable is
    // replayed after them (a failure there would end the connection).
    send(
        &mut fe,
        SET_FEATURES,
        VERSION | NEED_REPLY,
        &features.to_le_bytes(),
    );
    assert_eq!(reply(&mut fe), Some((SET_FEATURES, 0)));
    send(&mut fe, GET_FEATURES, VERSION, &[]);
    assert_eq!(reply(&mut fe), Some((GET_FEATURES, features)));
    drop(fe);
    d.wait().ok();
    conn.join();
}

/// Negative control: the stock crates, served directly, end the connection at the early
/// `SET_VRING_ENABLE` (the flaw the relay exists for). If this starts failing, an upstream
/// release accepted the message and the relay can go.
#[test]
fn stock_crates_end_the_connection_on_an_early_set_vring_enable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vu.sock");
    let mut listener = Listener::new(&path, true).unwrap();
    let mut d = daemon();
    let mut fe = std::thread::scope(|s| {
        let c = s.spawn(|| UnixStream::connect(&path).unwrap());
        d.start(&mut listener).unwrap();
        c.join().unwrap()
    });
    assert_eq!(
        qemu_net_opening(&mut fe),
        None,
        "the stock handler answered"
    );
    assert!(d.wait().is_err());
}
