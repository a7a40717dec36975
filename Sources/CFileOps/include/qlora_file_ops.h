// File operations Swift's Glibc module does not import.
#ifndef QLORA_FILE_OPS_H
#define QLORA_FILE_OPS_H

/// Renames `from` to `to` only if `to` does not exist (renameat2 RENAME_NOREPLACE): of two runs
/// committing to one name, one fails with EEXIST and nothing is replaced. Returns 0 or -1 with
/// errno set. Where the kernel or file system lacks RENAME_NOREPLACE (EINVAL, ENOSYS), a file
/// falls back to link-then-unlink, which is as exclusive; a directory fails with EINVAL.
int qlora_rename_noreplace(const char *from, const char *to);

#endif
