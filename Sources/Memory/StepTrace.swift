/// A training step as the device sees it: tensors allocated and freed in order, and the moments
/// (the timeline's points) at which the live bytes are read. `StepTimeline` builds one; the
/// live bytes at each moment are the timeline's points, and the same sequence replayed through
/// `CUDACachingAllocator` gives what CUDA reserves (`StepTimeline.onCUDA`).
public struct StepTrace: Sendable {
    public enum Event: Sendable {
        case alloc(id: Int, bytes: Int)
        case free(id: Int)
        /// The live bytes are read here: point `index` of the timeline.
        case mark(index: Int)
        /// `torch.cuda.empty_cache()`.
        case emptyCache
    }

    /// Who a tensor belongs to, for the timeline's columns.
    public enum Component: Int, Sendable, CaseIterable {
        case weights, adapters, activations, transient, gradients, optimizerStates

        public var name: String { StepTimeline.componentOrder[rawValue] }
    }

    /// A handle to an allocated tensor.
    public struct Tensor: Hashable, Sendable { let id: Int }

    public private(set) var events: [Event] = []
    public private(set) var points: [StepTimeline.Point] = []
    private var bytes: [Int] = []
    private var component: [Component] = []
    private var isLive: [Bool] = []
    private var live = [Int](repeating: 0, count: Component.allCases.count)

    public init() {}

    /// Allocates a tensor of `n` bytes (none for 0: torch allocates nothing for an empty tensor).
    @discardableResult
    public mutating func alloc(_ n: Int, _ c: Component) -> Tensor {
        let id = bytes.count
        bytes.append(n)
        component.append(c)
        isLive.append(true)
        live[c.rawValue] += n
        if n > 0 { events.append(.alloc(id: id, bytes: n)) }
        return Tensor(id: id)
    }

    /// Allocates one tensor per size, in order.
    public mutating func alloc(_ sizes: [Int], _ c: Component) -> [Tensor] { sizes.map { alloc($0, c) } }

    public mutating func free(_ t: Tensor) {
        precondition(isLive[t.id], "a tensor freed twice")
        isLive[t.id] = false
        live[component[t.id].rawValue] -= bytes[t.id]
        if bytes[t.id] > 0 { events.append(.free(id: t.id)) }
    }

    public mutating func free(_ ts: [Tensor]) { ts.forEach { free($0) } }

    /// Reads the live bytes by component: a point of the timeline.
    public mutating func mark(_ phase: String) {
        events.append(.mark(index: points.count))
        points.append(StepTimeline.Point(phase: phase, components: Dictionary(uniqueKeysWithValues: Component.allCases.map { ($0.name, live[$0.rawValue]) })))
    }

    /// `torch.cuda.empty_cache()`: changes no live bytes, only what the allocator reserves.
    public mutating func emptyCache() { events.append(.emptyCache) }

    /// Bytes live now.
    public var liveBytes: Int { live.reduce(0, +) }

    /// The trace replayed through PyTorch's caching allocator: allocated and reserved at each
    /// point and at their peaks; throws `CUDACachingAllocator.OutOfMemory` where the device runs out.
    public func replay(_ settings: CUDACachingAllocator.Settings) throws -> (allocator: CUDACachingAllocator, reservedAtPoints: [Int], allocatedAtPoints: [Int]) {
        var a = CUDACachingAllocator(settings)
        var handles = [CUDACachingAllocator.Allocation?](repeating: nil, count: bytes.count)
        var reserved = [Int](), allocated = [Int]()
        for e in events {
            switch e {
            case .alloc(let id, let n): handles[id] = try a.malloc(n)
            case .free(let id):
                a.free(handles[id]!)
                handles[id] = nil
            case .emptyCache: a.emptyCache()
            case .mark:
                reserved.append(a.reserved)
                allocated.append(a.allocated)
            }
        }
        return (a, reserved, allocated)
    }
}
