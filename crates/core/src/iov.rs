//! Byte ranges on raw addresses, as system calls take them (`readv`, `writev`, `process_vm_writev`): cache
//! memory is handed to the kernel, never turned into Rust references.

/// A byte range of the cache, as the kernel sees it.
pub type IoVec = libc::iovec;

/// The range `[addr, addr + len)`.
#[inline]
pub fn iovec(addr: u64, len: u64) -> IoVec {
    libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len as usize }
}

/// A reusable list of ranges, rebuilt for every call.
#[derive(Debug, Default)]
pub struct IoVecs(pub Vec<IoVec>);

// SAFETY: the pointers in an iovec are plain addresses that Rust code never dereferences; only the kernel
// reads or writes through them, during a call made by whichever thread owns the list.
unsafe impl Send for IoVecs {}

/// Drops what the kernel already moved (`done` bytes) from the front of `iov`.
pub fn advance(iov: &mut [IoVec], mut done: usize) -> usize {
    let mut first = 0;
    while first < iov.len() && done >= iov[first].iov_len {
        done -= iov[first].iov_len;
        first += 1;
    }
    if done > 0 {
        iov[first].iov_base = (iov[first].iov_base as usize + done) as *mut libc::c_void;
        iov[first].iov_len -= done;
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_handles_partial_ranges() {
        let mut v = [iovec(100, 10), iovec(200, 10), iovec(300, 10)];
        assert_eq!(advance(&mut v, 15), 1);
        assert_eq!((v[1].iov_base as usize, v[1].iov_len), (205, 5));
        assert_eq!(advance(&mut v, 0), 0);
    }
}
