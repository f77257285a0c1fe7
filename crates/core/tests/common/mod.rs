//! Test caches shared by the integration tests.
#![allow(dead_code)]

use kvtransfer::memory::{CacheLayout, CacheSpec, HostAllocation};
use kvtransfer::wire::{Hello, Offer, Role, TransportKind, PROTOCOL_VERSION};
use kvtransfer::{Config, TransportChoice};
use std::time::Duration;

/// The RDMA device to test on, where one is given (`KVTRANSFER_TEST_RDMA_NIC`, as in the Soft-RoCE VM).
pub fn rdma_nic() -> Option<String> {
    std::env::var("KVTRANSFER_TEST_RDMA_NIC").ok().filter(|n| !n.is_empty())
}

/// The transports a suite runs over: RDMA where a device is given, else TCP and shared memory.
pub fn kinds() -> Vec<TransportKind> {
    match rdma_nic() {
        Some(_) => vec![TransportKind::Rdma],
        None => vec![TransportKind::Tcp, TransportKind::Shm],
    }
}

/// A configuration of `kind` only, with 5 s timeouts, and the RDMA device and GID index under test for RDMA.
pub fn config(kind: TransportKind) -> Config {
    let config = Config { transport: TransportChoice::Only(kind), timeouts: kvtransfer::Timeouts::all(Duration::from_secs(5)), ..Config::default() };
    match (kind, rdma_nic()) {
        (TransportKind::Rdma, Some(nic)) => Config {
            rdma_nics: vec![nic],
            gid_index: std::env::var("KVTRANSFER_TEST_RDMA_GID_INDEX").ok().and_then(|v| v.parse().ok()).unwrap_or(1),
            ..config
        },
        _ => config,
    }
}

/// The hello of a prefill with `layers` layers of keys and values, 8 blocks of `block_bytes`, offering TCP: what
/// a peer that speaks the handshake by hand sends.
pub fn hello(layers: u32, block_bytes: u64) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        role: Role::Prefill,
        layers,
        tensors: 0b11,
        block_bytes,
        scale_block_bytes: 0,
        block_number: 8,
        tp_size: 1,
        tp_idx: 0,
        dst_tp_size: 1,
        offers: vec![Offer { transport: TransportKind::Tcp, details: serde_json::Value::Null }],
        host: None,
        pid: None,
        dropped: Vec::new(),
        instance: None,
        dialed: None,
    }
}

/// The layout of a test cache.
pub fn layout(spec: CacheSpec) -> CacheLayout {
    // SAFETY: every test keeps its `Cache` (whose allocations the spec names) alive past its communicators.
    unsafe { CacheLayout::new(spec) }.unwrap()
}

/// One side's cache: `layers` × tensors, each `blocks × block_bytes`, filled with a pattern unique to
/// (seed, tensor, layer, byte).
pub struct Cache {
    tensors: Vec<Vec<HostAllocation>>, // [tensor][layer]
    blocks: u32,
    block_bytes: u64,
}

impl Cache {
    pub fn new(tensor_count: usize, layers: usize, blocks: u32, block_bytes: u64, seed: u8) -> Cache {
        let tensors = (0..tensor_count)
            .map(|t| {
                (0..layers)
                    .map(|l| {
                        let mut a = HostAllocation::new((blocks as u64 * block_bytes) as usize).unwrap();
                        // Every byte from a hash of (seed, tensor, layer, offset): no two blocks alike, so a block
                        // that lands in the wrong place, or too late, is seen.
                        let salt = ((seed as u64) << 48) ^ ((t as u64) << 40) ^ ((l as u64) << 32);
                        for (i, b) in a.as_mut_slice().iter_mut().enumerate() {
                            *b = ((salt ^ i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8;
                        }
                        a
                    })
                    .collect()
            })
            .collect();
        Cache { tensors, blocks, block_bytes }
    }
    pub fn addrs(&self, t: usize) -> Vec<u64> {
        self.tensors.get(t).map(|v| v.iter().map(|a| a.addr()).collect()).unwrap_or_default()
    }
    pub fn spec(&self) -> CacheSpec {
        CacheSpec { key: self.addrs(0), value: self.addrs(1), block_number: self.blocks, block_bytes: self.block_bytes, ..CacheSpec::default() }
    }
    pub fn block(&self, t: usize, layer: usize, b: u32) -> &[u8] {
        let n = self.block_bytes as usize;
        &self.tensors[t][layer].as_slice()[b as usize * n..(b as usize + 1) * n]
    }
    pub fn snapshot(&self) -> Vec<Vec<Vec<u8>>> {
        self.tensors.iter().map(|ls| ls.iter().map(|a| a.as_slice().to_vec()).collect()).collect()
    }
}


