//! CUDA IPC memory handles: how a decode process lends its cache allocations to a prefill process on the same
//! host. The decode exports one handle per allocation; the prefill opens each once per GPU that writes through
//! it, and a process-wide count lets several connections share an opening (the driver maps a handle once per
//! process and device; a mapping made in one GPU's context is not one that another GPU's kernels can use).

use super::{check, Gpu};
use crate::error::{Error, Result};
use cudarc::driver::sys as cu;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// An allocation's IPC handle, as it travels in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpcHandle(pub [u8; 64]);

impl IpcHandle {
    /// Lowercase hex, for JSON.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`IpcHandle::to_hex`]'s output.
    pub fn from_hex(s: &str) -> Result<IpcHandle> {
        let bad = || Error::protocol(format!("bad CUDA IPC handle {s:?}"));
        if s.len() != 128 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 64];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(IpcHandle(out))
    }
}

/// The allocation holding device address `addr`: its base, size and IPC handle.
#[derive(Debug, Clone, Copy)]
pub struct Allocation {
    pub base: u64,
    pub size: u64,
    pub handle: IpcHandle,
}

/// Exports the allocation that holds `addr` (made by `cudaMalloc`/`cuMemAlloc`; memory from the virtual
/// memory API, such as PyTorch's expandable segments, has no legacy IPC handle and is refused here).
pub fn export(addr: u64) -> Result<Allocation> {
    let (base, size) = super::allocation_range(addr)?;
    let mut handle = std::mem::MaybeUninit::<cu::CUipcMemHandle>::zeroed();
    super::in_context_of(base, || {
        // SAFETY: `handle` is a 64-byte handle the driver fills; `base` is an allocation's start, and its
        // context is current.
        check(unsafe { cu::cuIpcGetMemHandle(handle.as_mut_ptr(), base) }, "exporting a CUDA IPC handle")
    })?;
    // SAFETY: zero-initialised and then written by the driver; any bit pattern is a valid byte array.
    let raw = unsafe { handle.assume_init() }.reserved;
    Ok(Allocation { base, size, handle: IpcHandle(raw.map(|c| c as u8)) })
}

/// Handles this process has open: (handle, GPU it is mapped on) → (address, size, users).
type Opened = HashMap<(IpcHandle, u32), (u64, u64, usize)>;

fn opened() -> &'static Mutex<Opened> {
    static OPENED: OnceLock<Mutex<Opened>> = OnceLock::new();
    OPENED.get_or_init(Default::default)
}

/// Another process's allocation, mapped into this one; unmapped when the last user drops it.
#[derive(Debug)]
pub struct IpcMapping {
    gpu: Arc<Gpu>,
    handle: IpcHandle,
    addr: u64,
    len: u64,
}

impl IpcMapping {
    /// Maps `handle` on `gpu` (with peer access enabled lazily when the allocation lives on another GPU).
    pub fn open(gpu: &Arc<Gpu>, handle: IpcHandle) -> Result<IpcMapping> {
        let mut map = opened().lock().unwrap();
        if let Some((addr, len, users)) = map.get_mut(&(handle, gpu.ordinal())) {
            *users += 1;
            return Ok(IpcMapping { gpu: gpu.clone(), handle, addr: *addr, len: *len });
        }
        gpu.bind()?;
        let mut addr = 0u64;
        let raw = cu::CUipcMemHandle { reserved: handle.0.map(|b| b as std::ffi::c_char) };
        // SAFETY: the context is current; the driver validates the handle and writes the mapped address.
        let rc = unsafe {
            cu::cuIpcOpenMemHandle_v2(&mut addr, raw, cu::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32)
        };
        check(rc, "opening the decode's CUDA IPC handle")?;
        // The allocation's size as the driver knows it, not as the peer says: every offset into it is checked
        // against this.
        let (mut base, mut size) = (0u64, 0usize);
        // SAFETY: the context is current and `addr` was just mapped in it; the driver writes the two locals.
        let sized = check(unsafe { cu::cuMemGetAddressRange_v2(&mut base, &mut size, addr) }, "sizing the decode's CUDA IPC allocation");
        if let Err(e) = sized {
            // SAFETY: mapped just above, and nobody else has it yet.
            unsafe { cu::cuIpcCloseMemHandle(addr) };
            return Err(e);
        }
        let len = (base + size as u64).saturating_sub(addr);
        map.insert((handle, gpu.ordinal()), (addr, len, 1));
        Ok(IpcMapping { gpu: gpu.clone(), handle, addr, len })
    }

    /// Where the allocation's first byte is mapped in this process.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The allocation's size in bytes, as the driver reports it for the mapping.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: the driver maps no empty allocation.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        let mut map = opened().lock().unwrap();
        let key = (self.handle, self.gpu.ordinal());
        let Some((addr, _, users)) = map.get_mut(&key) else { return };
        *users -= 1;
        if *users == 0 {
            let addr = *addr;
            map.remove(&key);
            if self.gpu.bind().is_ok() {
                // SAFETY: `addr` came from cuIpcOpenMemHandle and no user of it is left.
                unsafe { cu::cuIpcCloseMemHandle(addr) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_through_hex() {
        let mut raw = [0u8; 64];
        raw.iter_mut().enumerate().for_each(|(i, b)| *b = (i * 37) as u8);
        let h = IpcHandle(raw);
        assert_eq!(IpcHandle::from_hex(&h.to_hex()).unwrap(), h);
        assert!(IpcHandle::from_hex("zz").is_err());
        assert!(IpcHandle::from_hex(&"g".repeat(128)).is_err());
    }
}
