import Foundation

/// Work split between threads, the one way every kernel here splits it: `parts` contiguous parts
/// of near-equal size, run concurrently (on the calling thread alone when there is one part),
/// each part writing only its own outputs, so no result depends on the scheduling.
public enum Parallel {
    /// Runs `body(p)` for p in 0..<parts, concurrently when parts > 1.
    public static func run(parts: Int, _ body: @Sendable (Int) -> Void) {
        if parts <= 1 { body(0) } else { DispatchQueue.concurrentPerform(iterations: parts, execute: body) }
    }

    /// Part `p` of `count` items cut into `parts` contiguous ranges.
    @inline(__always)
    public static func range(_ p: Int, of parts: Int, count: Int) -> Range<Int> { (count * p / parts)..<(count * (p + 1) / parts) }
}
