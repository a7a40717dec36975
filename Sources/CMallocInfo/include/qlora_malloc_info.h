// glibc's allocator statistics, which Swift's Glibc module does not import (mallinfo2).
#ifndef QLORA_MALLOC_INFO_H
#define QLORA_MALLOC_INFO_H
#include <stdint.h>

/// Bytes malloc has handed out and not had back: arena bytes in use plus mmapped chunks
/// (mallinfo2 uordblks + hblkhd); -1 where glibc's mallinfo2 is not available.
int64_t qlora_malloc_in_use(void);

/// Gives every free page of malloc's heap back to the kernel (glibc malloc_trim(0)), so that the
/// resident set counts live allocations only. A no-op elsewhere.
void qlora_malloc_trim(void);

/// Keeps freed memory for reuse: no mmap for large blocks, no trimming of the heap's top
/// (glibc mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD INT_MAX). A no-op elsewhere.
void qlora_malloc_keep_freed(void);

#endif
