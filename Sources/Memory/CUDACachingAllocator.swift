/// PyTorch's CUDA caching allocator, replayed: what `torch.cuda.memory_allocated` and
/// `memory_reserved` (and their peaks) read for a sequence of allocations and frees on one stream,
/// and whether the sequence runs out of memory on a device that lets the allocator have
/// `capacity` bytes. No GPU is involved: the rules are PyTorch's, read from
/// c10/cuda/CUDACachingAllocator.cpp (the same in torch 2.4 through 2.10 at default settings:
/// `max_split_size` unlimited, `roundup_power2_divisions` off, no garbage-collection threshold):
/// - a request is rounded up to a multiple of 512 B (`round_size`, `kMinBlockSize`);
/// - up to 1 MiB (`kSmallSize`) it is served from the small pool, above from the large pool;
/// - a cached free block is reused by best fit: the smallest free block of the pool at least as
///   large, the lowest address among equals (`get_free_block`, blocks ordered by size, address);
/// - failing that a segment is cudaMalloc'd (`get_allocation_size`): 2 MiB (`kSmallBuffer`) for a
///   small request, 20 MiB (`kLargeBuffer`) for one under 10 MiB (`kMinLargeAlloc`), else the
///   request rounded up to 2 MiB (`kRoundLarge`);
/// - the front of the block is handed out and the rest split off when it is at least 512 B (small
///   pool) or more than 1 MiB (large pool; `should_split`); otherwise the whole block counts as
///   allocated;
/// - a freed block merges with free neighbours inside its segment (`free_block`,
///   `try_merge_blocks`); segments never merge;
/// - when cudaMalloc fails the allocator frees every cached segment that is wholly free
///   (`release_cached_blocks`, what `empty_cache` does) and tries once more; only then is it out
///   of memory;
/// - allocated counts the blocks handed out at their (rounded or whole-block) size; reserved
///   counts the segments.
/// With `expandable_segments:True` each pool is one segment whose pages (2 MiB small, 20 MiB large)
/// are mapped as needed: a block that no cached block fits goes at the lowest free address that
/// can hold it, the pages under it are mapped, leftovers of 512 B or more split off; when mapping
/// fails, the pages wholly inside free blocks are unmapped and it is tried once more. Reserved
/// counts the mapped pages.
public struct CUDACachingAllocator: Sendable {
    public static let minBlockSize = 512            // kMinBlockSize
    public static let smallSize = 1 << 20           // kSmallSize: the largest small-pool request
    public static let smallBuffer = 2 << 20         // kSmallBuffer: a small-pool segment (and expandable page)
    public static let largeBuffer = 20 << 20        // kLargeBuffer: the segment of a 1–10 MiB request (and expandable page)
    public static let minLargeAlloc = 10 << 20      // kMinLargeAlloc
    public static let roundLarge = 2 << 20          // kRoundLarge

    public struct Settings: Sendable, Codable, Equatable {
        /// `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`.
        public var expandableSegments = false
        /// Bytes cudaMalloc (or mapping) can hand the allocator before it fails: the device's memory
        /// less the CUDA context and whatever else holds it; nil: never fails.
        public var capacity: Int?

        public init(expandableSegments: Bool = false, capacity: Int? = nil) {
            (self.expandableSegments, self.capacity) = (expandableSegments, capacity)
        }
    }

    /// Out of memory: the request, and what was reserved and allocated when it failed.
    public struct OutOfMemory: Error, Sendable, CustomStringConvertible {
        public var requested: Int
        public var reserved: Int
        public var allocated: Int
        public var description: String {
            "CUDA out of memory: tried to allocate \(requested) B with \(reserved) B reserved, \(allocated) B allocated"
        }
    }

    /// A handle to an allocation, for `free`.
    public struct Allocation: Hashable, Sendable { let id: Int }

    struct Block {
        var address: Int
        var size: Int
        var segment: Int
        var small: Bool
        var allocated = false
        var prev: Int?
        var next: Int?
    }

    public let settings: Settings
    private var blocks: [Int: Block] = [:]
    /// Free blocks by pool (small, large).
    private var free: [Bool: Set<Int>] = [true: [], false: []]
    private var nextID = 0
    private var nextAddress = 0
    /// Expandable segments: per pool, the segment's base address and which pages are mapped.
    private var expandableBase: [Bool: Int] = [:]
    private var mappedPages: [Bool: Set<Int>] = [true: [], false: []]
    private var segmentSizes: [Int: Int] = [:]
    private var nextSegment = 0

    public private(set) var allocated = 0
    public private(set) var reserved = 0
    public private(set) var peakAllocated = 0
    public private(set) var peakReserved = 0
    /// cudaMalloc retries after freeing cached segments (torch's `num_alloc_retries`).
    public private(set) var retries = 0

    public init(_ settings: Settings = Settings()) {
        self.settings = settings
    }

    /// `round_size`: a multiple of 512 B, at least 512.
    public static func roundSize(_ n: Int) -> Int { n < minBlockSize ? minBlockSize : (n + minBlockSize - 1) / minBlockSize * minBlockSize }

    /// `get_allocation_size`: the segment cudaMalloc'd for a rounded request no cached block fits.
    public static func segmentSize(_ size: Int) -> Int {
        if size <= smallSize { return smallBuffer }
        if size < minLargeAlloc { return largeBuffer }
        return (size + roundLarge - 1) / roundLarge * roundLarge
    }

    /// Allocates `bytes`; throws `OutOfMemory` as torch would.
    public mutating func malloc(_ bytes: Int) throws -> Allocation {
        let size = Self.roundSize(bytes)
        let small = size <= Self.smallSize
        if settings.expandableSegments { return try mallocExpandable(size, small: small) }
        var id = bestFit(size, small: small)
        if id == nil {
            id = newSegment(Self.segmentSize(size), small: small)
            if id == nil, releaseCachedSegments() {
                retries += 1
                id = newSegment(Self.segmentSize(size), small: small)
            }
        }
        guard let id else { throw OutOfMemory(requested: bytes, reserved: reserved, allocated: allocated) }
        return hand(id, size: size, small: small, split: { remaining in small ? remaining >= Self.minBlockSize : remaining > Self.smallSize })
    }

    /// Frees an allocation: its block goes back to its pool, merged with free neighbours.
    public mutating func free(_ a: Allocation) {
        guard var b = blocks[a.id], b.allocated else { preconditionFailure("free of a block not allocated") }
        b.allocated = false
        allocated -= b.size
        blocks[a.id] = b
        var id = a.id
        if let p = b.prev, let pb = blocks[p], !pb.allocated { id = merge(p, id) }
        if let n = blocks[id]!.next, let nb = blocks[n], !nb.allocated { id = merge(id, n) }
        free[blocks[id]!.small]!.insert(id)
    }

    /// `torch.cuda.empty_cache()`: every wholly free segment (expandable: every wholly free page)
    /// goes back to the driver.
    public mutating func emptyCache() { _ = releaseCachedSegments() }

    /// Starts the peaks again from the current values (`torch.cuda.reset_peak_memory_stats`).
    public mutating func resetPeaks() { (peakAllocated, peakReserved) = (allocated, reserved) }

    // MARK: the block pools

    private func bestFit(_ size: Int, small: Bool) -> Int? {
        var best: Int?
        for id in free[small]! {
            let b = blocks[id]!
            guard b.size >= size else { continue }
            if let c = best.map({ blocks[$0]! }), (c.size, c.address) <= (b.size, b.address) { continue }
            best = id
        }
        return best
    }

    /// cudaMalloc of a segment: one free block, or nil when it does not fit the capacity.
    private mutating func newSegment(_ bytes: Int, small: Bool) -> Int? {
        if let cap = settings.capacity, reserved + bytes > cap { return nil }
        reserved += bytes
        peakReserved = max(peakReserved, reserved)
        let seg = nextSegment
        nextSegment += 1
        segmentSizes[seg] = bytes
        let id = newBlock(Block(address: nextAddress, size: bytes, segment: seg, small: small))
        nextAddress += bytes
        free[small]!.insert(id)
        return id
    }

    private mutating func newBlock(_ b: Block) -> Int {
        let id = nextID
        nextID += 1
        blocks[id] = b
        return id
    }

    /// `alloc_found_block`: the front of free block `id` is handed out; the rest is split off and
    /// stays free when `split` says so.
    private mutating func hand(_ id: Int, size: Int, small: Bool, split: (Int) -> Bool) -> Allocation {
        free[small]!.remove(id)
        var b = blocks[id]!
        let remaining = b.size - size
        if split(remaining) {
            let rest = newBlock(Block(address: b.address + size, size: remaining, segment: b.segment, small: small, prev: id, next: b.next))
            if let n = b.next { blocks[n]!.prev = rest }
            b.next = rest
            b.size = size
            free[small]!.insert(rest)
        }
        b.allocated = true
        blocks[id] = b
        allocated += b.size
        peakAllocated = max(peakAllocated, allocated)
        return Allocation(id: id)
    }

    /// Merges free block `b` into its left neighbour `a`; returns `a`.
    private mutating func merge(_ a: Int, _ b: Int) -> Int {
        let small = blocks[a]!.small
        free[small]!.remove(a)
        free[small]!.remove(b)
        let right = blocks.removeValue(forKey: b)!
        blocks[a]!.size += right.size
        blocks[a]!.next = right.next
        if let n = right.next { blocks[n]!.prev = a }
        return a
    }

    /// `release_cached_blocks`: cudaFree of every segment that is one free block (expandable:
    /// unmapping every page wholly inside a free block). Whether anything was released.
    private mutating func releaseCachedSegments() -> Bool {
        var released = false
        for small in [false, true] {
            for id in free[small]! {
                let b = blocks[id]!
                if settings.expandableSegments {
                    released = unmapPages(inside: b) || released
                } else if b.prev == nil && b.next == nil {
                    free[small]!.remove(id)
                    blocks[id] = nil
                    reserved -= segmentSizes.removeValue(forKey: b.segment)!
                    released = true
                }
            }
        }
        return released
    }

    // MARK: expandable segments

    private static func pageSize(small: Bool) -> Int { small ? smallBuffer : largeBuffer }

    /// The pool's one segment: a single free block covering an address range far larger than any
    /// device (the reserved address space), mapped page by page.
    private mutating func expandableSegment(small: Bool) {
        guard expandableBase[small] == nil else { return }
        let span = 1 << 50
        expandableBase[small] = nextAddress
        let id = newBlock(Block(address: nextAddress, size: span, segment: nextSegment, small: small))
        nextSegment += 1
        nextAddress += span
        free[small]!.insert(id)
    }

    private func pages(_ address: Int, _ size: Int, small: Bool) -> ClosedRange<Int> {
        let page = Self.pageSize(small: small), base = expandableBase[small]!
        return (address - base) / page...((address - base + size - 1) / page)
    }

    private func isMapped(_ address: Int, _ size: Int, small: Bool) -> Bool {
        pages(address, size, small: small).allSatisfy { mappedPages[small]!.contains($0) }
    }

    private mutating func mallocExpandable(_ size: Int, small: Bool) throws -> Allocation {
        expandableSegment(small: small)
        func place() -> Int? {
            // A cached block whose pages are all mapped, by best fit; else the lowest free address
            // that can hold it, mapping what is missing under it.
            let candidates = free[small]!.map { (id: $0, b: blocks[$0]!) }.filter { $0.b.size >= size }
            if let fit = candidates.filter({ isMapped($0.b.address, size, small: small) }).min(by: { ($0.b.size, $0.b.address) < ($1.b.size, $1.b.address) }) {
                return fit.id
            }
            guard let low = candidates.min(by: { $0.b.address < $1.b.address }) else { return nil }
            let missing = pages(low.b.address, size, small: small).filter { !mappedPages[small]!.contains($0) }
            let bytes = missing.count * Self.pageSize(small: small)
            if let cap = settings.capacity, reserved + bytes > cap { return nil }
            mappedPages[small]!.formUnion(missing)
            reserved += bytes
            peakReserved = max(peakReserved, reserved)
            return low.id
        }
        var id = place()
        if id == nil, releaseCachedSegments() {
            retries += 1
            id = place()
        }
        guard let id else { throw OutOfMemory(requested: size, reserved: reserved, allocated: allocated) }
        return hand(id, size: size, small: small, split: { $0 >= Self.minBlockSize })
    }

    /// Unmaps the pages wholly inside free block `b`; whether any was mapped.
    private mutating func unmapPages(inside b: Block) -> Bool {
        let page = Self.pageSize(small: b.small), base = expandableBase[b.small]!
        let first = (b.address - base + page - 1) / page, end = (b.address - base + b.size) / page
        guard first < end else { return false }
        var any = false
        for p in mappedPages[b.small]! where p >= first && p < end {
            mappedPages[b.small]!.remove(p)
            reserved -= page
            any = true
        }
        return any
    }
}
