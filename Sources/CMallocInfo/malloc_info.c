#include "qlora_malloc_info.h"
#if defined(__GLIBC__)
#include <malloc.h>
#include <limits.h>
#endif

int64_t qlora_malloc_in_use(void) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
    struct mallinfo2 m = mallinfo2();
    return (int64_t)(m.uordblks + m.hblkhd);
#else
    return -1;
#endif
}

void qlora_malloc_trim(void) {
#if defined(__GLIBC__)
    malloc_trim(0);
#endif
}

void qlora_malloc_keep_freed(void) {
#if defined(__GLIBC__)
    mallopt(M_MMAP_MAX, 0);             // large blocks from the heap, reusable after free
    mallopt(M_TRIM_THRESHOLD, INT_MAX); // and the heap's top kept, not trimmed
#endif
}
