/// How far `actual` lies from `reference`, accumulated in Float64.
public struct ErrorStatistics: Sendable, Codable, Equatable {
    public var count = 0
    /// max |actual - reference|
    public var maxAbsError = 0.0
    /// sqrt(mean((actual - reference)^2))
    public var rmsError = 0.0
    /// ‖actual - reference‖₂ / ‖reference‖₂ (0 when both are zero)
    public var relativeError = 0.0

    public init() {}

    /// - Parameters: both in the same order, any float format (16-bit ones converted exactly).
    public init(reference: FloatElements, actual: FloatElements) {
        precondition(reference.count == actual.count, "element counts differ")
        var sumSq = 0.0, refSq = 0.0, maxAbs = 0.0
        for i in 0..<reference.count {
            let r = Double(reference[i]), d = Double(actual[i]) - r
            sumSq += d * d
            refSq += r * r
            maxAbs = max(maxAbs, abs(d))
        }
        count = reference.count
        maxAbsError = maxAbs
        rmsError = count == 0 ? 0 : (sumSq / Double(count)).squareRoot()
        relativeError = refSq == 0 ? (sumSq == 0 ? 0 : .infinity) : (sumSq / refSq).squareRoot()
    }
}
