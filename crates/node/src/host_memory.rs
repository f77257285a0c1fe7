//! The host memory this binding allocated (`HostBuffer`), by address. A communicator given an address inside
//! one holds that allocation until it closes ([`hold_for`]), however it was handed over (the seed API takes bare
//! addresses): memory JavaScript let go of is not given back to the system while a communicator may still read
//! or write it, and `free()` of memory an open communicator holds is refused ([`check_free`]).

use kvtransfer::memory::{CacheLayout, HostAllocation};
use kvtransfer::{Error, ErrorCode};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

/// Live allocations by their first byte. An entry whose allocation is gone is pruned when one is added.
static LIVE: Mutex<BTreeMap<u64, Weak<HostAllocation>>> = Mutex::new(BTreeMap::new());

fn live() -> std::sync::MutexGuard<'static, BTreeMap<u64, Weak<HostAllocation>>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records `memory`, which a `Buffer` (whose finaliser holds the one other reference) now views.
pub fn register(memory: &Arc<HostAllocation>) {
    let mut live = live();
    live.retain(|_, m| m.strong_count() > 0);
    live.insert(memory.addr(), Arc::downgrade(memory));
}

/// The live allocation that `addr` lies in, if any.
fn containing(addr: u64) -> Option<Arc<HostAllocation>> {
    let live = live();
    let (_, memory) = live.range(..=addr).next_back()?;
    memory.upgrade().filter(|m| addr < m.addr() + m.len() as u64)
}

/// Makes `cache` hold each allocation of this binding that one of its tensors lies in; a tensor that starts in
/// one and runs past its end is an `INVALID_ARGUMENT` error.
pub fn hold_for(cache: &CacheLayout) -> kvtransfer::Result<()> {
    for t in cache.tensors().iter() {
        let len = cache.tensor_bytes(t).ok_or_else(|| Error::invalid("blockNumber * blockBytes overflows"))?;
        for (layer, &addr) in cache.addrs(t).iter().enumerate() {
            let Some(memory) = containing(addr) else { continue };
            let end = memory.addr() + memory.len() as u64;
            if addr + len > end {
                return Err(Error::invalid(format!(
                    "the {} tensor of layer {layer} ({len} bytes from {addr:#x}) runs {} bytes past the end of its HostBuffer \
                     ({} bytes): blockNumber * blockBytes must fit in it",
                    t.name(),
                    addr + len - end,
                    memory.len()
                )));
            }
            cache.hold(memory);
        }
    }
    Ok(())
}

/// `IN_USE` where the allocation at `addr` is held by an open communicator (more than the `Buffer`'s own
/// reference is alive).
pub fn check_free(addr: u64) -> kvtransfer::Result<()> {
    match containing(addr) {
        // This lookup's reference, the buffer's, and any communicator's.
        Some(memory) if Arc::strong_count(&memory) > 2 => Err(Error::new(
            ErrorCode::InUse,
            "this HostBuffer's memory is used by an open communicator: close the communicator first",
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtransfer::memory::CacheSpec;

    #[test]
    fn a_cache_in_host_buffers_holds_them_until_released() {
        let memory = Arc::new(HostAllocation::new(4 * 4096).unwrap());
        register(&memory);
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
