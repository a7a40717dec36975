/// Size arithmetic on numbers from files and the command line, which may be anything up to
/// `Int.max`: every product and sum is checked (nil on overflow), and `ceilingDivision` never
/// forms `n + d - 1`.
public enum CheckedSize {
    /// ceil(n / d) for n ≥ 0, d > 0, without the overflow of `(n + d - 1) / d` near `Int.max`.
    @inlinable
    public static func ceilingDivision(_ n: Int, _ d: Int) -> Int {
        precondition(n >= 0 && d > 0, "ceilingDivision needs n ≥ 0 and d > 0")
        return n / d + (n % d == 0 ? 0 : 1)
    }

    /// The product of `factors`, or nil when it overflows `Int`.
    @inlinable
    public static func product(_ factors: Int...) -> Int? { product(factors) }

    /// The product of `factors`, or nil when it overflows `Int`.
    @inlinable
    public static func product<S: Sequence>(_ factors: S) -> Int? where S.Element == Int {
        var p = 1
        for f in factors {
            let (r, o) = p.multipliedReportingOverflow(by: f)
            if o { return nil }
            p = r
        }
        return p
    }

    /// The sum of `terms`, or nil when it overflows `Int`.
    @inlinable
    public static func sum(_ terms: Int...) -> Int? { sum(terms) }

    /// The sum of `terms`, or nil when it overflows `Int`.
    @inlinable
    public static func sum<S: Sequence>(_ terms: S) -> Int? where S.Element == Int {
        var s = 0
        for t in terms {
            let (r, o) = s.addingReportingOverflow(t)
            if o { return nil }
            s = r
        }
        return s
    }
}
