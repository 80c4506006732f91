//! Sector-aligned heap buffers for direct reads, and the read itself.
//!
//! Reads do not use glommio's `read_at_aligned`: on this project's reference machine
//! (Linux 6.18) io_uring reads into glommio's registered buffer arena fail with
//! EOPNOTSUPP, while writes from it work. Reads therefore run `pread(2)` on the
//! same O_DIRECT descriptor, on glommio's blocking thread pool so the shard's
//! executor never blocks. Reads are the cold path (the tail cache serves recent
//! data; recovery reads in multi-MiB chunks).

use std::alloc::{alloc, dealloc, Layout};
use std::ops::Deref;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use crate::limits::SECTOR_BYTES;

/// An owned, `SECTOR_BYTES`-aligned byte buffer.
pub struct AlignedBuffer {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: the buffer exclusively owns its allocation; nothing aliases it.
unsafe impl Send for AlignedBuffer {}

impl AlignedBuffer {
    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity.max(SECTOR_BYTES as usize), SECTOR_BYTES as usize)
            .expect("valid layout")
    }

    /// A zeroed-length buffer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> AlignedBuffer {
        let layout = Self::layout(capacity);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuffer {
            ptr,
            len: 0,
            capacity,
        }
    }
}

impl Deref for AlignedBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were written by pread.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `with_capacity` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
    }
}

/// Reads up to `bytes` at `position` (both aligned) from an O_DIRECT descriptor;
/// fewer bytes at end of file.
pub fn pread_aligned(fd: RawFd, position: u64, bytes: usize) -> std::io::Result<AlignedBuffer> {
    debug_assert!(
        position.is_multiple_of(SECTOR_BYTES) && (bytes as u64).is_multiple_of(SECTOR_BYTES)
    );
    let mut buffer = AlignedBuffer::with_capacity(bytes);
    while buffer.len < bytes {
        let offset = position + buffer.len as u64;
        // SAFETY: the destination range lies inside the allocation.
        let read = unsafe {
            libc::pread(
                fd,
                buffer.ptr.as_ptr().add(buffer.len).cast(),
                bytes - buffer.len,
                offset as libc::off_t,
            )
        };
        if read < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if read == 0 {
            break;
        }
        buffer.len += read as usize;
        if !buffer.len.is_multiple_of(SECTOR_BYTES as usize) {
            // A short read ends at EOF (files are not always sector-sized).
            break;
        }
    }
    Ok(buffer)
}
