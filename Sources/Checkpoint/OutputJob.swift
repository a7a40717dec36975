import Foundation
import QLoRA
import SafeTensors

/// Where a job's output goes, staged so nothing appears until it is complete.
///
/// A file output is written by `SafeTensorsWriter` to a temporary file beside it and
/// renamed. A directory output is built in a temporary directory beside the target and
/// renamed into place by `commit()`; `abort()` removes everything staged.
final class OutputJob {
    let output: URL
    let isDirectory: Bool
    let stagingDirectory: URL?
    var committed = false

    init(input: String, output: String, isDirectory: Bool) throws {
        let fm = FileManager.default
        let inURL = URL(fileURLWithPath: input).standardizedFileURL.resolvingSymlinksInPath()
        let outURL = URL(fileURLWithPath: output).standardizedFileURL
        let outResolved = outURL.deletingLastPathComponent().resolvingSymlinksInPath().appendingPathComponent(outURL.lastPathComponent)
        guard inURL.path != outResolved.path else {
            throw CheckpointError.invalidPath(path: output, problem: "OUTPUT is the same as INPUT; write to a new path")
        }
        if isDirectory && outResolved.path.hasPrefix(inURL.path + "/") {
            throw CheckpointError.invalidPath(path: output, problem: "OUTPUT is inside the INPUT directory")
        }
        let parent = outURL.deletingLastPathComponent()
        guard OutputJob.isDir(parent.path) else {
            throw CheckpointError.invalidPath(path: output, problem: "directory \(parent.path) does not exist")
        }
        self.output = outURL
        self.isDirectory = isDirectory
        if isDirectory {
            if fm.fileExists(atPath: outURL.path) {
                let contents = (try? fm.contentsOfDirectory(atPath: outURL.path)) ?? ["?"]
                guard OutputJob.isDir(outURL.path), contents.isEmpty else {
                    throw CheckpointError.invalidPath(path: output, problem: "already exists; remove it or choose a new directory")
                }
            }
            let staging = parent.appendingPathComponent(".\(outURL.lastPathComponent).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
            do { try fm.createDirectory(at: staging, withIntermediateDirectories: false) } catch {
                throw CheckpointError.invalidPath(path: staging.path, problem: "cannot create: \(error.localizedDescription)")
            }
            stagingDirectory = staging
        } else {
            if OutputJob.isDir(outURL.path) {
                throw CheckpointError.invalidPath(path: output, problem: "is a directory; INPUT is a single file, so OUTPUT must be a file path")
            }
            stagingDirectory = nil
        }
    }

    static func isDir(_ p: String) -> Bool {
        var d: ObjCBool = false
        return FileManager.default.fileExists(atPath: p, isDirectory: &d) && d.boolValue
    }

    /// The output file name when the output is a single file.
    var outputFileName: String { output.lastPathComponent }

    /// Where to write a shard or the single file.
    func stagingURL(for fileName: String) -> URL {
        if let s = stagingDirectory { return s.appendingPathComponent(fileName) }
        return output
    }

    func writeIndex(_ index: ShardIndex) throws {
        guard let s = stagingDirectory else { return }
        try Data(index.encoded()).write(to: s.appendingPathComponent(ShardIndex.fileName))
    }

    /// Copies config.json, tokenizer files etc. from a directory checkpoint; records the
    /// quantization in config.json's `quantization_config` (or removes it when nil).
    func copySidecarFiles(from reader: CheckpointReader, quantization: QuantizeOptions?) throws {
        guard let s = stagingDirectory, OutputJob.isDir(reader.path) else { return }
        let fm = FileManager.default
        let skip = Set(reader.shardFileNames + [ShardIndex.fileName])
        for name in try fm.contentsOfDirectory(atPath: reader.directory).sorted() where !skip.contains(name) && !name.hasPrefix(".") {
            let src = URL(fileURLWithPath: reader.directory).appendingPathComponent(name)
            guard !OutputJob.isDir(src.path), !name.hasSuffix(".safetensors") else { continue }
            if name == "config.json", var config = try? JSONSerialization.jsonObject(with: Data(contentsOf: src)) as? [String: Any] {
                if let q = quantization {
                    config["quantization_config"] = [
                        "quant_method": "bitsandbytes", "load_in_4bit": true, "load_in_8bit": false,
                        "bnb_4bit_quant_type": q.quantType.rawValue, "bnb_4bit_use_double_quant": q.doubleQuant,
                        "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
                        "llm_int8_skip_modules": NSNull(), "llm_int8_has_fp16_weight": false,
                        "llm_int8_threshold": 6.0, "llm_int8_enable_fp32_cpu_offload": false,
                    ] as [String: Any]
                } else {
                    config.removeValue(forKey: "quantization_config")
                }
                let data = try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys])
                try data.write(to: s.appendingPathComponent(name))
            } else {
                try fm.copyItem(at: src, to: s.appendingPathComponent(name))
            }
        }
    }

    /// The last steps of a job: the shard index (when given), the copied sidecar files, then
    /// the rename into place.
    func complete(reader: CheckpointReader, index: ShardIndex?, quantization: QuantizeOptions?) throws {
        if let index { try writeIndex(index) }
        try copySidecarFiles(from: reader, quantization: quantization)
        try commit()
    }

    func commit() throws {
        guard let s = stagingDirectory else { committed = true; return }
        let fm = FileManager.default
        if fm.fileExists(atPath: output.path) { try fm.removeItem(at: output) }  // an empty directory (checked in init)
        guard rename(s.path, output.path) == 0 else {
            throw CheckpointError.invalidPath(path: output.path, problem: "cannot rename staged output into place: \(String(cString: strerror(errno)))")
        }
        committed = true
    }

    func abort() {
        if !committed, let s = stagingDirectory { try? FileManager.default.removeItem(at: s) }
    }
}
