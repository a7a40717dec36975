#define _GNU_SOURCE
#include "qlora_file_ops.h"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

int qlora_rename_noreplace(const char *from, const char *to) {
#ifdef SYS_renameat2
    // The raw system call: glibc's renameat2 wrapper exists from 2.28 on, the call from Linux 3.15.
    if (syscall(SYS_renameat2, AT_FDCWD, from, AT_FDCWD, to, 1 /* RENAME_NOREPLACE */) == 0) return 0;
    if (errno != EINVAL && errno != ENOSYS) return -1;
#endif
    struct stat st;
    if (lstat(from, &st) != 0) return -1;
    if (S_ISDIR(st.st_mode)) { errno = EINVAL; return -1; }
    if (link(from, to) != 0) return -1;  // EEXIST when taken
    return unlink(from);
}
