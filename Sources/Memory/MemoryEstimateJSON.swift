import Foundation

/// The `qlora memory --json` object: the estimate's model, method, parameters, options,
/// components (null where not measured), activation summary and totals, in snake_case.
public struct MemoryEstimateJSON: Encodable {
    public var estimate: MemoryEstimate
    /// How the measured figures were obtained (`MemoryMeasurement.scope`), or nil.
    public var measurementScope: String?
    /// With `qlora memory --timeline`: the step's memory over time.
    public var timeline: StepTimeline?

    public init(_ estimate: MemoryEstimate, measurementScope: String?) {
        self.estimate = estimate
        self.measurementScope = measurementScope
    }

    private struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(_ s: String) { stringValue = s }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    public func encode(to encoder: Encoder) throws {
        let m = estimate, o = m.options
        var c = encoder.container(keyedBy: Key.self)
        try c.encode(m.model, forKey: Key("model"))
        try c.encode(m.method.rawValue, forKey: Key("method"))
        var params = c.nestedContainer(keyedBy: Key.self, forKey: Key("params"))
        try params.encode(m.params.total, forKey: Key("total"))
        try params.encode(m.params.quantized, forKey: Key("quantized"))
        try params.encode(m.params.trainable, forKey: Key("trainable"))
        var options = c.nestedContainer(keyedBy: Key.self, forKey: Key("options"))
        try options.encode(o.rank, forKey: Key("rank"))
        try options.encode(o.alpha, forKey: Key("alpha"))
        try options.encode(o.targets, forKey: Key("targets"))
        try options.encode(o.seqLen, forKey: Key("seq_len"))
        try options.encode(o.batch, forKey: Key("batch"))
        try options.encode(o.gradientCheckpointing, forKey: Key("gradient_checkpointing"))
        try options.encode(o.doubleQuant, forKey: Key("double_quant"))
        try options.encode(o.optimizer.rawValue, forKey: Key("optimizer"))
        var components = c.nestedUnkeyedContainer(forKey: Key("components"))
        for component in m.components {
            var row = components.nestedContainer(keyedBy: Key.self)
            try row.encode(component.name, forKey: Key("name"))
            try row.encode(component.estimatedBytes, forKey: Key("estimated_bytes"))
            try row.encode(component.measuredBytes, forKey: Key("measured_bytes"))  // null when not measured
            try row.encode(component.basis, forKey: Key("basis"))
            try row.encode(!component.name.hasPrefix("("), forKey: Key("counted_in_total"))
            try row.encodeIfPresent(component.measuredBy, forKey: Key("measured_by"))
            try row.encodeIfPresent(component.measuredRSSBytes, forKey: Key("measured_rss_bytes"))
        }
        try c.encode(m.activationSummary, forKey: Key("activations"))
        try c.encode(m.totalEstimatedBytes, forKey: Key("total_estimated_bytes"))
        try c.encode(m.totalMeasuredBytes, forKey: Key("total_measured_bytes"))
        try c.encode(measurementScope, forKey: Key("measurement_scope"))
        try c.encode(MemoryEstimate.notModelledText, forKey: Key("not_modelled"))
        if let timeline {
            var t = c.nestedContainer(keyedBy: Key.self, forKey: Key("timeline"))
            try t.encode(timeline.peakBytes, forKey: Key("peak_bytes"))
            try t.encode(timeline.peak.phase, forKey: Key("peak_phase"))
            try t.encode(timeline.keptBytesPerToken, forKey: Key("kept_bytes_per_token"))
            var points = t.nestedUnkeyedContainer(forKey: Key("points"))
            for p in timeline.points {
                var row = points.nestedContainer(keyedBy: Key.self)
                try row.encode(p.phase, forKey: Key("phase"))
                try row.encode(p.bytes, forKey: Key("bytes"))
                try row.encode(p.components, forKey: Key("components"))
            }
        }
    }
}
