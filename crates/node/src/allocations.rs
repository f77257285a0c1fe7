//! The memory this binding allocated (`HostBuffer`, `DeviceBuffer`), by address. A communicator given an address
//! inside one holds that allocation until it closes ([`hold_for`]), however it was handed over (the seed API takes
//! bare addresses): memory JavaScript let go of is not given back while a communicator may still read or write
//! it, and `free()` of memory an open communicator holds is refused ([`check_free`]). Host and device addresses
//! share one map: CUDA's unified addressing never gives a device allocation an address of host memory.

use kvtransfer::memory::CacheLayout;
use kvtransfer::{Error, ErrorCode};
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

/// One allocation: its size, what it is (for messages), and its owner, which holds the memory.
struct Live {
    len: u64,
    kind: &'static str,
    owner: Weak<dyn Any + Send + Sync>,
}

/// Live allocations by their first byte. An entry whose owner is gone is pruned when one is added.
static LIVE: Mutex<BTreeMap<u64, Live>> = Mutex::new(BTreeMap::new());

fn live() -> std::sync::MutexGuard<'static, BTreeMap<u64, Live>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records `owner`, whose memory is `len` bytes from `addr`, and which JavaScript now holds one reference to
/// (a `Buffer`'s finaliser, a `DeviceBuffer`'s object). `kind` names it in messages (`HostBuffer`).
pub fn register<T: Any + Send + Sync>(addr: u64, len: usize, kind: &'static str, owner: &Arc<T>) {
    let owner: Arc<dyn Any + Send + Sync> = owner.clone();
    let mut live = live();
    live.retain(|_, m| m.owner.strong_count() > 0);
    live.insert(addr, Live { len: len as u64, kind, owner: Arc::downgrade(&owner) });
}

/// The live allocation that `addr` lies in, if any: its first byte, size, kind and owner.
fn containing(addr: u64) -> Option<(u64, u64, &'static str, Arc<dyn Any + Send + Sync>)> {
    let live = live();
    let (&start, m) = live.range(..=addr).next_back()?;
    let owner = m.owner.upgrade()?;
    (addr < start + m.len).then_some((start, m.len, m.kind, owner))
}

/// Makes `cache` hold each allocation of this binding that one of its tensors lies in; a tensor that starts in
/// one and runs past its end is an `INVALID_ARGUMENT` error.
pub fn hold_for(cache: &CacheLayout) -> kvtransfer::Result<()> {
    for t in cache.tensors().iter() {
        let len = cache.tensor_bytes(t).ok_or_else(|| Error::invalid("blockNumber * blockBytes overflows"))?;
        for (layer, &addr) in cache.addrs(t).iter().enumerate() {
            let Some((start, size, kind, owner)) = containing(addr) else { continue };
            let end = start + size;
            if addr + len > end {
                return Err(Error::invalid(format!(
                    "the {} tensor of layer {layer} ({len} bytes from {addr:#x}) runs {} bytes past the end of its {kind} \
                     ({size} bytes): blockNumber * blockBytes must fit in it",
                    t.name(),
                    addr + len - end,
                )));
            }
            cache.hold(owner);
        }
    }
    Ok(())
}

/// `IN_USE` where the allocation at `addr` is held by an open communicator (more than JavaScript's own
/// reference is alive).
pub fn check_free(addr: u64) -> kvtransfer::Result<()> {
    match containing(addr) {
        // This lookup's reference, JavaScript's, and any communicator's.
        Some((_, _, kind, owner)) if Arc::strong_count(&owner) > 2 => Err(Error::new(
            ErrorCode::InUse,
            format!("this {kind}'s memory is used by an open communicator: close the communicator first"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtransfer::memory::{CacheSpec, HostAllocation};

    #[test]
    fn a_cache_in_host_buffers_holds_them_until_released() {
        let memory = Arc::new(HostAllocation::new(4 * 4096).unwrap());
        register(memory.addr(), memory.len(), "HostBuffer", &memory);
        let spec = |offset: u64, blocks: u32| CacheSpec { key: vec![memory.addr() + offset], block_number: blocks, block_bytes: 1024, ..CacheSpec::default() };
        // SAFETY: the memory is live for the whole test; nothing reads or writes through the layout.
        let cache = unsafe { CacheLayout::new(spec(4096, 8)) }.unwrap();
        hold_for(&cache).unwrap();
        assert_eq!(check_free(memory.addr()).unwrap_err().code(), ErrorCode::InUse);
        cache.release_owners();
        check_free(memory.addr()).unwrap();
        // Past the end of its allocation.
        // SAFETY: as above.
        let cache = unsafe { CacheLayout::new(spec(4096, 13)) }.unwrap();
        let err = hold_for(&cache).unwrap_err();
        assert!(err.message().contains("runs 1024 bytes past the end"), "{err}");
    }
}
