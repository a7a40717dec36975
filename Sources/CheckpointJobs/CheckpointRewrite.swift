import CheckpointFormats
import FileOutput
import Foundation
import QLoRA
import SafeTensors

/// Progress of a long job: bytes of work done of the total, and the tensor at hand.
public typealias ProgressHandler = (_ done: Int, _ total: Int, _ tensor: String) -> Void

/// One tensor of the output, declared before any byte is written.
struct OutputTensor {
    var name: String
    var dtype: DType
    var shape: [Int]
    var byteCount: Int { shape.reduce(1, *) * dtype.byteSize }
}

/// What a job makes of one input tensor.
struct TensorPlan {
    /// The output tensors it becomes, in order (none: dropped, e.g. a 4-bit weight's constant
    /// that its weight regenerates).
    var outputs: [OutputTensor]
    /// Writes each output's bytes in order, one `TensorSink.write` per output; nil copies the
    /// input tensor's bytes unchanged (then `outputs` is the input tensor itself).
    var produce: ((TensorSink) throws -> Void)?

    static func copy(_ info: TensorInfo) -> TensorPlan { TensorPlan(outputs: [OutputTensor(name: info.name, dtype: info.dtype, shape: info.shape)]) }
    static var drop: TensorPlan { TensorPlan(outputs: [], produce: { _ in }) }
}

/// What a job changes among a directory checkpoint's sidecar files besides
/// `quantization_config`: config.json keys to set (e.g. a resized vocabulary's `vocab_size`), and
/// files to take from elsewhere instead of the input's (an adapter's tokenizer files).
struct SidecarEdits {
    var config: [(key: String, value: JSONValue)] = []
    /// Output file name → the file to copy there.
    var files: [String: String] = [:]
}

/// How output tensors are laid out in files.
enum OutputLayout {
    /// One output file per input shard, with the input's file names (a single-file input gives
    /// the OUTPUT file) and, for an indexed input, an index.
    case input
    /// transformers' shards of at most this many data bytes, with an index; OUTPUT is a directory.
    case shards(maxBytes: Int)
}

/// The streaming checkpoint engine under quantize, dequantize and merge: it opens an input
/// checkpoint (a .safetensors file, or a directory with one file or shards and an index), has
/// the job plan every output tensor before anything is written (so bad input is refused with no
/// output), then streams each input tensor through the job's transform into staged shard files,
/// writes the index and the sidecar files (config.json with its `quantization_config` kept,
/// rewritten or removed; tokenizer files copied), and commits the output with one rename
/// (`StagedOutput`), or removes everything staged on any error.
///
/// Memory: one input tensor and what the job makes of it. Input pages are released from the
/// resident set after each tensor; copied tensors are written in 8 MiB chunks, each released once
/// written, so a large copied tensor (embeddings, lm_head) never sits whole in memory.
final class CheckpointRewrite {
    let reader: CheckpointReader
    /// The INPUT as given.
    let input: String
    /// The input is a directory (its output is then a directory, and its sidecars are copied).
    let inputIsDirectory: Bool

    /// Every other path the job reads (adapters, an original base): OUTPUT may be none of them.
    let otherInputs: [String]

    init(input: String, otherInputs: [String] = []) throws {
        reader = try CheckpointReader(path: input)
        self.input = input
        self.otherInputs = otherInputs
        inputIsDirectory = StagedOutput.isDirectory(input)
    }

    /// The file a tensor is read from, for error messages.
    func file(of e: CheckpointReader.Entry) -> String {
        reader.index != nil || inputIsDirectory ? reader.directory + "/" + e.shard : reader.path
    }

    /// Bytes per write of a copied tensor, each chunk's input pages released once written.
    static let chunkSize = 8 << 20

    /// Runs a job: plans every input tensor, then writes.
    /// - Parameters:
    ///   - planningCost: progress units (bytes) the job's `plan` spends on a tensor (a read-only
    ///     pass over it), counted in the progress total.
    ///   - plan: the transform of one input tensor, computed before any output is written.
    ///   - quantization: config.json's `quantization_config` for the output (nil removes it),
    ///     asked once everything is written.
    ///   - overwrite: replace an existing OUTPUT (never an input), once the new one is complete.
    /// - Returns: the bytes written (every output file).
    @discardableResult
    func run(output: String, layout: OutputLayout, overwrite: Bool, progress: ProgressHandler?, planningCost: (CheckpointReader.Entry) -> Int = { _ in 0 },
             plan: (CheckpointReader.Entry) throws -> TensorPlan, quantization: () -> BnBQuantizationConfig?,
             sidecars: SidecarEdits = SidecarEdits()) throws -> Int {
        var isDirectory = reader.index != nil || inputIsDirectory
        if case .shards(let m) = layout {
            guard m > 0 else { throw CheckpointError.invalidPath(path: output, problem: "max shard size must be positive") }
            isDirectory = true
        }
        let staged = try StagedOutput(output, kind: isDirectory ? .directory : .file, overwrite: overwrite, inputs: [input] + otherInputs)
        do {
            let entries = reader.entries
            let total = entries.reduce(0) { $0 + $1.info.byteCount + planningCost($1) }
            var done = 0
            var plans: [TensorPlan] = []
            for e in entries {
                plans.append(try plan(e))
                let cost = planningCost(e)
                if cost > 0 { done += cost; progress?(done, total, e.name) }
            }
            let sink = try TensorSink(rewrite: self, staged: staged, layout: layout, plans: plans)
            for (i, (e, p)) in zip(entries, plans).enumerated() {
                try sink.begin(e.shardIndex)
                if let produce = p.produce {
                    try produce(sink)
                } else {
                    try reader.withBytes(of: e.name) { raw in
                        var start = 0
                        repeat {
                            let end = min(raw.count, start + Self.chunkSize)
                            try sink.write(UnsafeRawBufferPointer(rebasing: raw[start..<end]), partial: end < raw.count)
                            reader.releasePages(of: e.name, bytes: start..<end)
                            start = end
                        } while start < raw.count
                    }
                }
                try sink.end(i)
                reader.releasePages(of: e.name)
                done += e.info.byteCount
                progress?(done, total, e.name)
            }
            let bytes = try sink.finish()
            try copySidecars(into: staged, quantization: quantization(), edits: sidecars)
            try staged.commit()
            return bytes
        } catch {
            staged.abort()
            throw error
        }
    }

    /// Copies config.json, tokenizer files etc. from a directory checkpoint (not its shards, index,
    /// subdirectories or hidden files), with config.json's `quantization_config` rewritten; a
    /// symbolic link is copied as the file it points to.
    func copySidecars(into staged: StagedOutput, quantization: BnBQuantizationConfig?, edits: SidecarEdits = SidecarEdits()) throws {
        guard staged.kind == .directory, inputIsDirectory else { return }
        let fm = FileManager.default
        let skip = Set(reader.shardFileNames + [ShardIndex.fileName])
        for name in try fm.contentsOfDirectory(atPath: reader.directory).sorted() where !skip.contains(name) && !name.hasPrefix(".") {
            let src = URL(fileURLWithPath: reader.directory).appendingPathComponent(name)
            guard !StagedOutput.isDirectory(src.path), !name.hasSuffix(".safetensors"), edits.files[name] == nil else { continue }
            let dst = staged.url(for: name)
            if name == "config.json", let data = try? InputFile.read(src.path),
               let rewritten = BnBQuantizationConfig.rewrite(config: data, quantization: quantization) {
                try Self.setting(edits.config, in: rewritten).write(to: dst)
            } else {
                try copyContent(of: src.path, to: dst)
            }
        }
        for (name, src) in edits.files.sorted(by: { $0.key < $1.key }) { try copyContent(of: src, to: staged.url(for: name)) }
    }

    /// config.json with `values` set (replaced where present, appended otherwise).
    static func setting(_ values: [(key: String, value: JSONValue)], in config: Data) -> Data {
        guard !values.isEmpty, case .object(var members)? = try? JSONValue.parse(document: [UInt8](config)) else { return config }
        for (k, v) in values {
            if let i = members.firstIndex(where: { $0.key == k }) { members[i].value = v } else { members.append(JSONMember(key: k, value: v)) }
        }
        return ConfigJSON.transformersFile(.object(members))
    }

    /// Copies the file at `path`, or the file a chain of symbolic links there ends at, as a
    /// regular file. A Hugging Face cache snapshot holds relative links
    /// (`snapshots/<rev>/tokenizer.json -> ../../blobs/<sha>`), which copied as links would
    /// dangle in the output.
    func copyContent(of path: String, to dst: URL) throws {
        guard let resolved = realpath(path, nil) else {
            throw CheckpointError.invalidPath(path: path, problem: "cannot be read (\(String(cString: strerror(errno))); a dangling link?)")
        }
        let target = String(cString: resolved)
        free(resolved)
        try InputFile.requireRegular(target)  // a FIFO or device sidecar would block or never end
        do {
            try FileManager.default.copyItem(atPath: target, toPath: dst.path)
        } catch {
            throw CheckpointError.invalidPath(path: path, problem: "cannot be copied to the output: \(error.localizedDescription)")
        }
    }
}

/// Receives the planned output tensors' bytes in order and writes them into the staged files of
/// the layout; checks that every tensor gets exactly its declared bytes.
final class TensorSink {
    private let rewrite: CheckpointRewrite
    private let staged: StagedOutput
    private let outputs: [OutputTensor]
    /// Input shard of each output tensor.
    private let outputShard: [Int]
    private var sharded: ShardedWriter?
    private var writer: SafeTensorsWriter?
    private var writerShard = -1
    /// Outputs planned through each input tensor (a running count).
    private let ends: [Int]
    private var next = 0
    private var written = 0
    private var weightMap: [String: String] = [:]
    private var totalSize = 0
    private var bytesWritten = 0

    init(rewrite: CheckpointRewrite, staged: StagedOutput, layout: OutputLayout, plans: [TensorPlan]) throws {
        self.rewrite = rewrite
        self.staged = staged
        var outputs: [OutputTensor] = [], shard: [Int] = [], ends: [Int] = []
        for (e, p) in zip(rewrite.reader.entries, plans) {
            outputs += p.outputs
            shard += Array(repeating: e.shardIndex, count: p.outputs.count)
            ends.append(outputs.count)
        }
        self.outputs = outputs
        self.ends = ends
        outputShard = shard
        if case .shards(let maxBytes) = layout {
            sharded = try ShardedWriter(directory: staged.url, tensors: outputs.map { ($0.name, $0.dtype, $0.shape) }, maxShardSize: maxBytes,
                                        metadata: rewrite.reader.shards.first?.metadata ?? ["format": "pt"])
        }
    }

    /// The output file name of input shard `s` in the input layout.
    private func fileName(_ s: Int) -> String {
        staged.kind == .directory ? rewrite.reader.shardFileNames[s] : staged.destination.lastPathComponent
    }

    /// Starts input shard `s`'s file (input layout), finishing the ones before it.
    fileprivate func begin(_ s: Int) throws {
        guard sharded == nil else { return }
        while writerShard < s {
            try finishShard()
            writerShard += 1
            let mine = outputs.indices.filter { outputShard[$0] == writerShard }.map { (outputs[$0].name, outputs[$0].dtype, outputs[$0].shape) }
            writer = try SafeTensorsWriter(url: staged.kind == .directory ? staged.url(for: fileName(writerShard)) : staged.url,
                                           tensors: mine, metadata: rewrite.reader.shards[writerShard].metadata)
        }
    }

    private func finishShard() throws {
        if let w = writer {
            try w.finish()
            bytesWritten += w.fileSize
            writer = nil
        }
    }

    /// The next output tensor's bytes (`partial`: more bytes of the same tensor follow).
    func write(_ bytes: UnsafeRawBufferPointer, partial: Bool = false) throws {
        guard next < outputs.count else { throw internalError("more tensors produced than planned") }
        let t = outputs[next]
        guard written + bytes.count <= t.byteCount, partial || written + bytes.count == t.byteCount else {
            throw internalError("tensor '\(t.name)': planned \(t.byteCount) bytes, produced \(written + bytes.count)")
        }
        if let sharded {
            try sharded.write(t.name, bytes: bytes)
        } else {
            try writer!.write(t.name, bytes: bytes)
            weightMap[t.name] = fileName(outputShard[next])
        }
        totalSize += bytes.count
        written += bytes.count
        if !partial {
            next += 1
            written = 0
        }
    }

    /// `write` for an array.
    func write(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try write($0) } }

    /// Checks that input tensor number `i` had every planned output written whole.
    fileprivate func end(_ i: Int) throws {
        guard next == ends[i], written == 0 else {
            throw internalError("tensor '\(rewrite.reader.entries[i].name)': not every planned output was written")
        }
    }

    /// Completes the files and the index; returns the bytes written.
    fileprivate func finish() throws -> Int {
        if let sharded {
            try sharded.finish()
            return sharded.shards.reduce(0) { total, s in
                total + ((try? FileManager.default.attributesOfItem(atPath: staged.url(for: s.fileName).path)[.size] as? Int) ?? 0)
            }
        }
        try begin(rewrite.reader.shardFileNames.count - 1)  // every input shard has its file, even with nothing in it
        try finishShard()
        if rewrite.reader.index != nil {
            try Data(ShardIndex(totalSize: totalSize, weightMap: weightMap).encoded()).write(to: staged.url(for: ShardIndex.fileName))
        }
        return bytesWritten
    }

    private func internalError(_ problem: String) -> CheckpointError {
        .invalidPath(path: rewrite.input, problem: "internal error: \(problem)")
    }
}
