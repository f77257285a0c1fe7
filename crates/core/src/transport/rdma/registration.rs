//! Memory registration: a protection domain per communicator and one memory region per layer and tensor.

use super::device::{os_error, Device};
use crate::cuda::{self, MemoryKind};
use crate::error::{Error, Result};
use crate::metrics::{HeldResource, Raised, RESOURCES};
use std::os::fd::AsRawFd;
use crate::memory::{CacheLayout, Tensor};
use crate::plan;
use rdma_mummy_sys as ibv;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// An `ibv_pd`, deallocated on drop; holds its device open.
pub struct ProtectionDomain {
    pd: *mut ibv::ibv_pd,
    device: Arc<Device>,
}

// SAFETY: protection domains are thread-safe verbs objects; the pointer is only freed in Drop.
unsafe impl Send for ProtectionDomain {}
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    /// Allocates a protection domain on `device`.
    pub fn new(device: Arc<Device>) -> Result<Arc<ProtectionDomain>> {
        // SAFETY: the device's context is open for as long as `device` lives, and we keep it.
        let pd = unsafe { ibv::ibv_alloc_pd(device.raw()) };
        if pd.is_null() {
            return Err(os_error(&format!("allocating a protection domain on {}", device.name())));
        }
        Ok(Arc::new(ProtectionDomain { pd, device }))
    }

    /// The device.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    pub(super) fn raw(&self) -> *mut ibv::ibv_pd {
        self.pd
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: every MR and QP on this PD holds an Arc to it, so none is left.
        unsafe { ibv::ibv_dealloc_pd(self.pd) };
    }
}

/// What a region may be used for.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    /// Peers may write into it (a decode cache).
    pub remote_write: bool,
    /// Peers may read from it (the flush read targets a decode cache).
    pub remote_read: bool,
    /// `KVCACHE_RELAX_ORDERING`: let the PCIe fabric reorder the NIC's writes, where the device supports it.
    pub relaxed_ordering: bool,
}

impl Access {
    fn flags(self) -> i32 {
        let mut f = ibv::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        if self.remote_write {
            f |= ibv::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
        if self.remote_read {
            f |= ibv::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        }
        if self.relaxed_ordering {
            // An optional flag: libibverbs drops it on devices that lack it.
            f |= ibv::ibv_access_flags::IBV_ACCESS_RELAXED_ORDERING.0;
        }
        f as i32
    }
}

/// How a region was registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationPath {
    /// Host memory, with `ibv_reg_mr`.
    Host,
    /// GPU memory exported by the CUDA driver as a dma-buf (`ibv_reg_dmabuf_mr`).
    DmaBuf,
    /// GPU memory through the peer-memory kernel module (nvidia-peermem), with plain `ibv_reg_mr`.
    PeerMemory,
}

/// A registered memory region, deregistered on drop.
pub struct MemoryRegion {
    mr: *mut ibv::ibv_mr,
    path: RegistrationPath,
    _pd: Arc<ProtectionDomain>,
    _counted: HeldResource,
}

// SAFETY: an MR is immutable after registration; the pointer is only freed in Drop.
unsafe impl Send for MemoryRegion {}
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers `len` bytes at `addr`. Host memory registers as is. GPU memory (the CUDA driver says which
    /// is which) registers as a dma-buf where the driver and NIC support it, else through peer memory.
    ///
    /// # Safety
    ///
    /// `[addr, addr + len)` must be memory of this process that stays valid while the region exists: with remote
    /// access in `access`, a peer's NIC reads or writes it without any further check on this side.
    pub unsafe fn register(pd: &Arc<ProtectionDomain>, addr: u64, len: u64, access: Access) -> Result<MemoryRegion> {
        let what = || format!("registering {len} bytes at {addr:#x} with {}", pd.device().name());
        if let MemoryKind::Device { ordinal } = cuda::memory_kind(addr) {
            let dmabuf = cuda::export_dmabuf(addr, len).and_then(|buf| {
                // SAFETY: the fd is a live dma-buf covering [addr - offset, ...) and the range lies inside it;
                // the kernel takes its own reference, so the fd may close when this returns.
                let mr = unsafe {
                    ibv::ibv_reg_dmabuf_mr(pd.raw(), buf.offset, len as usize, addr, buf.fd.as_raw_fd(), access.flags())
                };
                match mr.is_null() {
                    true => Err(os_error("ibv_reg_dmabuf_mr")),
                    false => Ok(mr),
                }
            });
            return match dmabuf {
                Ok(mr) => Ok(MemoryRegion::counted(mr, RegistrationPath::DmaBuf, pd)),
                Err(dmabuf_error) => MemoryRegion::reg_mr(pd, addr, len, access, RegistrationPath::PeerMemory).map_err(|e| {
                    Error::new(
                        e.code(),
                        format!(
                            "{}: GPU {ordinal} memory registers neither as a dma-buf ({}) nor through peer memory \
                             ({}; is nvidia-peermem loaded?)",
                            what(),
                            dmabuf_error.message(),
                            e.message()
                        ),
                    )
                }),
            };
        }
        MemoryRegion::reg_mr(pd, addr, len, access, RegistrationPath::Host).map_err(|e| {
            Error::new(e.code(), format!("{}: {} (is the address mapped, and `ulimit -l` large enough?)", what(), e.message()))
        })
    }

    fn reg_mr(pd: &Arc<ProtectionDomain>, addr: u64, len: u64, access: Access, path: RegistrationPath) -> Result<MemoryRegion> {
        // SAFETY: registration only pins and maps the range; the kernel checks that it is mapped and fails
        // with EFAULT otherwise. `register`'s caller keeps the memory alive while the region exists.
        let mr = unsafe { ibv::ibv_reg_mr(pd.raw(), addr as *mut libc::c_void, len as usize, access.flags()) };
        if mr.is_null() {
            return Err(os_error("ibv_reg_mr"));
        }
        Ok(MemoryRegion::counted(mr, path, pd))
    }

    fn counted(mr: *mut ibv::ibv_mr, path: RegistrationPath, pd: &Arc<ProtectionDomain>) -> MemoryRegion {
        MemoryRegion { mr, path, _pd: pd.clone(), _counted: Raised::new(&RESOURCES, |r| &r.rdma_memory_regions) }
    }

    /// How the region was registered.
    pub fn path(&self) -> RegistrationPath {
        self.path
    }

    /// The key local work requests name this region by.
    pub fn lkey(&self) -> u32 {
        // SAFETY: mr is a live registration.
        unsafe { (*self.mr).lkey }
    }

    /// The key a peer names this region by.
    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.mr).rkey }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered by ibv_reg_mr; queue pairs using it are destroyed first (they are dropped
        // before the regions of the cache they write from or into).
        unsafe { ibv::ibv_dereg_mr(self.mr) };
    }
}

/// A region as a peer addresses it: sent over the control plane at connect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRegion {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

/// The registered cache: one region per layer of each tensor present.
pub struct CacheRegions {
    /// `regions[t][layer]`; empty for absent tensors.
    regions: [Vec<MemoryRegion>; 4],
    /// `lkeys[t][layer]`, kept flat for the hot path.
    lkeys: [Vec<u32>; 4],
    pd: Arc<ProtectionDomain>,
}

impl CacheRegions {
    /// Registers every tensor of every layer of `cache`.
    pub fn register(pd: &Arc<ProtectionDomain>, cache: &CacheLayout, access: Access) -> Result<CacheRegions> {
        let mut regions: [Vec<MemoryRegion>; 4] = Default::default();
        let mut lkeys: [Vec<u32>; 4] = Default::default();
        for t in cache.tensors().iter() {
            let len = cache.tensor_bytes(t).ok_or_else(|| Error::invalid("tensor size overflows"))?;
            for layer in 0..cache.layers() {
                // SAFETY: the cache layout's own promise (`CacheLayout::new`): each tensor is `len` bytes of this
                // process's memory, valid as long as the layout, which the regions' owner holds.
                let mr = unsafe { MemoryRegion::register(pd, cache.addr(t, layer), len, access) }.map_err(|e| {
                    Error::new(e.code(), format!("layer {layer} {}: {}", t.name(), e.message()))
                })?;
                lkeys[t as usize].push(mr.lkey());
                regions[t as usize].push(mr);
            }
        }
        Ok(CacheRegions { regions, lkeys, pd: pd.clone() })
    }

    /// The local key of tensor `t` of `layer`.
    #[inline]
    pub fn lkey(&self, t: Tensor, layer: u32) -> u32 {
        self.lkeys[t as usize][layer as usize]
    }

    /// How a peer addresses the cache, `[tensor][layer]`, with the addresses of `cache`.
    pub fn remote(&self, cache: &CacheLayout) -> Vec<Vec<RemoteRegion>> {
        Tensor::ALL
            .iter()
            .map(|&t| {
                self.regions[t as usize]
                    .iter()
                    .enumerate()
                    .map(|(layer, mr)| RemoteRegion {
                        addr: cache.addr(t, layer as u32),
                        len: cache.tensor_bytes(t).unwrap_or(0),
                        rkey: mr.rkey(),
                    })
                    .collect()
            })
            .collect()
    }

    /// How the cache was registered (every layer of one cache lives in one kind of memory).
    pub fn path(&self) -> RegistrationPath {
        self.regions[0].first().map(|r| r.path()).unwrap_or(RegistrationPath::Host)
    }

    /// The protection domain the regions belong to.
    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }
}

/// Checks the peer's regions against the geometry agreed in the handshake (`remote_blocks` blocks of
/// `ratio` slices each), so that no later write can be aimed outside them.
pub fn check_remote(regions: &[Vec<RemoteRegion>], cache: &CacheLayout, ratio: u32, remote_blocks: u32) -> Result<()> {
    let lens: Vec<Vec<u64>> = regions.iter().map(|list| list.iter().map(|r| r.len).collect()).collect();
    plan::check_remote_layout(&lens, cache, ratio, remote_blocks)
}
