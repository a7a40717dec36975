import CMallocInfo

/// Keeps freed memory in the process for the next allocation instead of returning it to the OS.
///
/// glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and
/// unmaps it on free, so a training step's large activations (a [2048, 11008] fp32 array is 90 MB)
/// came back as new pages every step: the kernel zeroed and mapped them again on first touch.
/// Measured on one llama-2-7b layer at 2048 tokens (`qlora bench --step-tokens 2048`, AMD EPYC,
/// 2 cores): 425 tokens/s before, 613 after (README "Speed of a training step"). The cost: the process's resident set stays at its peak
/// (the step's peak is reached every step anyway). Training and `qlora bench` call it once.
public enum HeapReuse {
    public static func keepFreedMemory() {
        qlora_malloc_keep_freed()
    }
}
