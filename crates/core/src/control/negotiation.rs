//! The rules of the handshake, with no I/O: which transports a communicator sets up, whether a prefill's
//! hello fits this decode's cache, which transport a connection takes, and whether a decode's welcome can be
//! believed.

use crate::config::TransportChoice;
use crate::cuda::MemoryKind;
use crate::error::{Error, ErrorCode, Result};
use crate::memory::{CacheLayout, TensorSet};
use crate::plan::SliceGeometry;
use crate::transport;
use crate::wire::{Hello, Role, TransportKind, Welcome};

/// The transports a communicator whose cache lives in `location` tries to set up, preferred first. With
/// `auto`, every transport that can move such a cache (a same-host transport serves one kind of memory);
/// otherwise the one chosen, refused if it cannot.
pub fn candidates(choice: TransportChoice, location: MemoryKind) -> Result<Vec<TransportKind>> {
    let serves = |kind: TransportKind| transport::transport(kind).serves(location);
    match choice {
        TransportChoice::Auto => Ok(TransportKind::ALL.into_iter().filter(|&k| serves(k)).collect()),
        TransportChoice::Only(kind) if serves(kind) => Ok(vec![kind]),
        TransportChoice::Only(kind) => {
            let instead: Vec<&str> =
                TransportKind::ALL.iter().filter(|&&k| k.same_host_only() && serves(k)).map(|k| k.as_str()).collect();
            let place = match location {
                MemoryKind::Host => "host memory".to_string(),
                MemoryKind::Device { ordinal } => format!("the memory of GPU {ordinal}"),
            };
            Err(Error::new(
                ErrorCode::Unavailable,
                format!("KVCACHE_TRANSPORT={kind}: {kind} cannot move a cache in {place} (use {})", instead.join(" or ")),
            ))
        }
    }
}

/// What a decode agreed with one prefill: where its blocks land and which tensors it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    pub geometry: SliceGeometry,
    pub tensors: TensorSet,
}

/// Checks a prefill's hello against this decode's cache: a prefill, with the same layers and tensors, whose
/// blocks are exactly one slice of ours.
pub fn check_hello(hello: &Hello, cache: &CacheLayout) -> Result<Agreement> {
    if hello.role != Role::Prefill {
        return Err(Error::protocol(format!("a {} communicator cannot connect to a decode one", hello.role.as_str())));
    }
    if hello.layers != cache.layers() {
        return Err(Error::invalid(format!(
            "layer count mismatch: the prefill cache has {} layers, this decode cache has {}",
            hello.layers,
            cache.layers()
        )));
    }
    if hello.instance.as_ref().is_some_and(|id| id.is_empty() || id.len() > crate::config::MAX_INSTANCE_ID || id.chars().any(char::is_control)) {
        return Err(Error::protocol(format!("an instance id must be 1 to {} bytes without control characters", crate::config::MAX_INSTANCE_ID)));
    }
    let tensors = TensorSet::from_bits(hello.tensors).ok_or_else(|| Error::protocol("bad tensor mask"))?;
    if tensors != cache.tensors() {
        let names = |s: TensorSet| s.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ");
        return Err(Error::invalid(format!(
            "tensor mismatch: the prefill cache has [{}], this decode cache has [{}] (key-only on one side only?)",
            names(tensors),
            names(cache.tensors())
        )));
    }
    let geometry = SliceGeometry::for_ranks(hello.tp_size, hello.tp_idx, hello.dst_tp_size)?;
    let ratio = geometry.ratio as u64;
    for (what, theirs, ours) in [
        ("block bytes", hello.block_bytes, cache.kv_block_bytes()),
        ("scale block bytes", hello.scale_block_bytes, cache.scale_block_bytes()),
    ] {
        if theirs.checked_mul(ratio) != Some(ours) {
            return Err(Error::invalid(format!(
                "block geometry mismatch: prefill {what} {theirs} × {ratio} slice(s) per decode block \
                 (prefill tensor-parallel size {} / decode's {}) ≠ this decode's {what} {ours}",
                hello.tp_size, hello.dst_tp_size
            )));
        }
    }
    Ok(Agreement { geometry, tensors })
}

/// The transports a decode may take for a connection, to be tried in this order: the prefill's offers that
/// this decode has, a same-host transport only for a prefill of this host (and pid namespace). Never empty.
pub fn choose(offers: &[TransportKind], ours: &[TransportKind], same_host: bool) -> Result<Vec<TransportKind>> {
    let usable: Vec<TransportKind> =
        offers.iter().copied().filter(|k| ours.contains(k) && (same_host || !k.same_host_only())).collect();
    if !usable.is_empty() {
        return Ok(usable);
    }
    let names = |list: &[TransportKind]| list.iter().map(|k| k.as_str()).collect::<Vec<_>>();
    let hosts = match same_host {
        true => "",
        false => " (cuda-ipc and shm only between processes of one host and pid namespace)",
    };
    Err(Error::new(
        ErrorCode::Unavailable,
        format!("no common transport: the prefill offers {:?}, this decode has {:?}{hosts}", names(offers), names(ours)),
    ))
}

/// Checks a decode's welcome before anything is opened: a transport that was offered, and a cache of at least
/// one block. (What the transport's own details say is checked by that transport.)
pub fn check_welcome(welcome: &Welcome, offered: &[TransportKind]) -> Result<()> {
    if !offered.contains(&welcome.transport) {
        return Err(Error::protocol(format!("the decode peer chose transport {}, which was not offered", welcome.transport)));
    }
    if welcome.block_number == 0 {
        return Err(Error::protocol("the decode peer claims a cache of 0 blocks"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::CacheSpec;
    use crate::wire::tests::hello;
    use crate::wire::PROTOCOL_VERSION;
    use TransportKind::*;

    const GPU: MemoryKind = MemoryKind::Device { ordinal: 1 };

    #[test]
    fn auto_sets_up_every_transport_that_can_move_the_cache() {
        assert_eq!(candidates(TransportChoice::Auto, MemoryKind::Host).unwrap(), [Shm, Rdma, Tcp]);
        assert_eq!(candidates(TransportChoice::Auto, GPU).unwrap(), [CudaIpc, Rdma, Tcp]);
        assert_eq!(candidates(TransportChoice::Only(Tcp), GPU).unwrap(), [Tcp]);
        assert_eq!(candidates(TransportChoice::Only(Shm), MemoryKind::Host).unwrap(), [Shm]);
        let err = candidates(TransportChoice::Only(Shm), GPU).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Unavailable);
        assert!(err.message().contains("shm cannot move a cache in the memory of GPU 1 (use cuda-ipc)"), "{err}");
        let err = candidates(TransportChoice::Only(CudaIpc), MemoryKind::Host).unwrap_err();
        assert!(err.message().contains("(use shm)"), "{err}");
    }

    #[test]
    fn a_connection_tries_the_prefills_offers_that_the_decode_has_in_order() {
        assert_eq!(choose(&[Shm, Rdma, Tcp], &[Shm, Tcp], true).unwrap(), [Shm, Tcp]);
        assert_eq!(choose(&[Shm, Rdma, Tcp], &[Shm, Rdma, Tcp], false).unwrap(), [Rdma, Tcp], "shm only on one host");
        assert_eq!(choose(&[Tcp, Shm], &[Shm, Tcp], true).unwrap(), [Tcp, Shm], "the prefill's order wins");
        let err = choose(&[CudaIpc], &[CudaIpc, Tcp], false).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Unavailable);
        assert!(err.message().contains("no common transport") && err.message().contains("one host"), "{err}");
        assert!(choose(&[], &[Tcp], true).is_err());
    }

    fn cache(block_bytes: u64, tensors: usize) -> CacheLayout {
        let value = if tensors == 2 { vec![0x200000, 0x300000] } else { vec![] };
        let spec = CacheSpec { key: vec![0x10000, 0x20000], value, block_number: 8, block_bytes, ..CacheSpec::default() };
        // SAFETY: made-up addresses that nothing reads or writes: the negotiation only looks at the geometry.
        unsafe { CacheLayout::new(spec) }.unwrap()
    }

    #[test]
    fn a_hello_must_fit_the_decode_cache() {
        let agreed = check_hello(&hello(), &cache(64, 2)).unwrap();
        assert_eq!(agreed.geometry, SliceGeometry::WHOLE);
        assert_eq!(agreed.tensors.bits(), 0b11);
        // Two prefill ranks fill the halves of a decode block twice as large.
        let hetero = Hello { tp_size: 2, tp_idx: 1, ..hello() };
        assert_eq!(check_hello(&hetero, &cache(128, 2)).unwrap().geometry, SliceGeometry { ratio: 2, slot: 1 });
        let cases: [(Hello, u64, usize, &str); 5] = [
            (Hello { role: Role::Decode, ..hello() }, 64, 2, "a decode communicator cannot connect"),
            (Hello { layers: 3, ..hello() }, 64, 2, "layer count mismatch"),
            (hello(), 64, 1, "tensor mismatch"),
            (Hello { tensors: 0b10, ..hello() }, 64, 2, "bad tensor mask"),
            (hetero.clone(), 64, 2, "block geometry mismatch"),
        ];
        for (h, block_bytes, tensors, want) in cases {
            let err = check_hello(&h, &cache(block_bytes, tensors)).unwrap_err();
            assert!(err.message().contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn a_welcome_must_answer_what_was_offered() {
        let welcome = Welcome { protocol: PROTOCOL_VERSION, block_number: 8, transport: Shm, session: 1, details: serde_json::Value::Null, channel_port: 1, channel_token: 2 };
        check_welcome(&welcome, &[Shm, Tcp]).unwrap();
        let err = check_welcome(&welcome, &[Tcp]).unwrap_err();
        assert!(err.message().contains("shm, which was not offered"), "{err}");
        let err = check_welcome(&Welcome { block_number: 0, ..welcome }, &[Shm]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Protocol);
    }
}
