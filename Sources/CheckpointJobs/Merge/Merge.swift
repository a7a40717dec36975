import CheckpointFormats
import Foundation
import GGUF
import QLoRA
import SafeTensors

/// Merges one PEFT LoRA adapter; see `mergeCheckpoint(base:adapters:output:options:progress:)`.
@discardableResult
public func mergeCheckpoint(base: String, adapter: String, output: String, options: MergeOptions, overwrite: Bool = false,
                            progress: ProgressHandler? = nil) throws -> MergeSummary {
    try mergeCheckpoint(base: base, adapters: [MergeAdapter(adapter)], output: output, options: options, overwrite: overwrite, progress: progress)
}

/// Merges PEFT LoRA adapters, in order, into a base checkpoint (a .safetensors file or a
/// directory, dense or bitsandbytes-4bit) with PEFT's numerics (`LoRAMerge`), streaming tensor
/// by tensor on `CheckpointRewrite`.
///
/// Several adapters on one weight are merged one after another as PEFT does: the weight is
/// rounded to its type (re-quantized, for `requantize`) after each. Every adapter module must
/// match a base weight of the right shape, and a merged value that is not finite stops the merge
/// (PEFT's safe_merge check); nothing is written then.
///
/// Memory: the tensor at hand, its merged form and the delta (with a report or comparison, a few
/// fp32 copies of it), plus the adapters. With `requantize` and double quantization each merged
/// weight is computed twice: its quant-state JSON length (in the header, written first) depends
/// on the new offset.
@discardableResult
public func mergeCheckpoint(base: String, adapters specs: [MergeAdapter], output: String, options: MergeOptions, overwrite: Bool = false,
                            progress: ProgressHandler? = nil) throws -> MergeSummary {
    precondition(!specs.isEmpty, "mergeCheckpoint needs at least one adapter")
    if let m = options.maxShardSize, m <= 0 { throw CheckpointError.invalidPath(path: output, problem: "max shard size must be positive") }
    _ = try describedModel(checkpoint: base)
    let job = try CheckpointRewrite(input: base, otherInputs: specs.map(\.directory) + [options.compareOriginal].compactMap { $0 })
    let plan = try MergePlan(reader: job.reader, base: base, adapters: specs)
    let original = try options.compareOriginal.map { try plan.original($0, base: base) }
    let context = MergeContext(reader: job.reader, original: original, options: options)
    // With a report, and a base llama.cpp runs: what each serving format keeps, per merged weight.
    let serving = options.report ? ServingPlan.forMerge(job.reader, plan, mergedDType: options.dtype) : nil
    let requantizing = options.requantize && plan.weights.values.contains { $0.quantized != nil }
    var summary = MergeSummary()
    summary.bytesWritten = try job.run(output: output, layout: options.maxShardSize.map { .shards(maxBytes: $0) } ?? .input, overwrite: overwrite, progress: progress,
                                       planningCost: { e in requantizing && plan.weights[e.name] != nil ? e.info.byteCount : 0 }, plan: { e in
        if plan.isRegenerated(e.name) { return .drop }
        if let r = plan.replacements[e.name] {
            let dtype = r.whole?.dtype ?? e.info.dtype, shape = r.whole?.shape ?? e.info.shape
            return TensorPlan(outputs: [OutputTensor(name: e.name, dtype: dtype, shape: shape)]) { sink in
                try sink.write(r.bytes(dtype: dtype) { job.reader.withBytes(of: e.name) { Array($0) } })
                summary.replaced.append(MergeSummary.Replacement(name: e.name, how: r.how.joined(separator: "; then ")))
            }
        }
        guard let weight = plan.weights[e.name] else {
            summary.copied += 1
            return .copy(e.info)
        }
        let file = job.file(of: e)
        var outputs = [OutputTensor(name: e.name, dtype: e.info.dtype, shape: e.info.shape)]
        if let q = weight.quantized {
            if options.requantize {
                // Merged once here to learn its quant-state JSON length, then dropped.
                let json = try context.merge(e, weight, file: file, sizingOnly: true).payloads.last!.count
                outputs = BnB4BitFormat.declarations(name: e.name, quantType: q.type, blocksize: q.blocksize, elementCount: weight.out * weight.in,
                                                     doubleQuant: q.doubleQuant, jsonByteCount: json, quantStorage: q.storage).map { OutputTensor(name: $0.name, dtype: $0.dtype, shape: $0.shape) }
            } else {
                outputs = [OutputTensor(name: e.name, dtype: DType(options.dtype), shape: [weight.out, weight.in])]
            }
        }
        // A fan_in_fan_out weight is stored [in, out]: its rows are not the GGUF's, so no serving row.
        let servingTypes = weight.fanInFanOut ? nil : serving.flatMap { s in s.types[e.name].map { ($0, s.convertedAs[e.name]!) } }
        return TensorPlan(outputs: outputs) { sink in
            let merged = try context.merge(e, weight, file: file, sizingOnly: false, keepingBase: servingTypes != nil)
            for bytes in merged.payloads { try sink.write(bytes) }
            if let row = merged.report {
                summary.report.append(row)
                summary.total.add(row)
            }
            // A weight llama-quantize would refuse (a 16-bit read-back past f16's range) has no row.
            if let (types, convertedAs) = servingTypes, let row = try? servingRow(e, weight, merged, types: types, convertedAs: convertedAs, options: options) {
                summary.serving.append(row)
                summary.servingTotal.add(row)
            }
            if let row = merged.comparison {
                summary.comparison.append(row)
                summary.comparisonTotal.add(row)
            }
            summary.merged += 1
        }
    }, quantization: { try? plan.outputQuantization(requantize: options.requantize) },
       sidecars: SidecarEdits(config: plan.configEdits, files: plan.tokenizerFiles))
    summary.tokenizerFiles = plan.tokenizerFiles.keys.sorted()
    return summary
}

/// The serving-format row of one merged weight: the base and ΔW the merge used (`keepingBase`),
/// and the merged checkpoint's values (the written dense weight, or with `requantize` the fp32
/// sum rounded to `options.dtype`, the 16-bit merge).
private func servingRow(_ e: CheckpointReader.Entry, _ weight: WeightPlan, _ merged: MergedWeight,
                        types: [LlamaQuantizeMixture: GGMLType], convertedAs: GGMLType, options: MergeOptions) throws -> ServingReportRow {
    let (base, delta) = (merged.base!, merged.delta!)
    let values: [Float]
    if weight.quantized != nil && options.requantize {
        values = (0..<base.count).map { ServingReportRow.rounded(base[$0] + delta[$0], to: options.dtype) }
    } else {
        values = merged.payloads[0].withUnsafeBytes { loadFloats($0, as: weight.quantized != nil ? options.dtype : ElementType(e.info.dtype)!) }
    }
    return try ServingReportRow.of(name: e.name, base: base, delta: delta, merged: values, rows: weight.out, columns: weight.in,
                                   convertedAs: convertedAs, types: types, threads: options.threads)
}
