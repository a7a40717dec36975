import ArgumentParser
import FileOutput
import Foundation
import QLoRA
import SafeTensors

@main
struct QLoRACommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qlora",
        abstract: "QLoRA numerics on CPU: 4-bit quantization bit for bit with bitsandbytes.",
        subcommands: [Quantize.self, Dequantize.self, Inspect.self, Sample.self, Compare.self, Bench.self, Merge.self, Export.self, MemoryCommand.self, FitCommand.self, ClaimsCommand.self, ReportCommand.self, Train.self])

    /// Bad arguments get one line on stderr (not the usage text); help and version as usual.
    static func main() {
        selectBLASKernels()
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            if exitCode(for: error) == .success { exit(withError: error) }
            // One line: ArgumentParser lists a long enum's values on lines of their own.
            let lines = self.message(for: error).split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            let message = lines.isEmpty ? "\(error)" : lines.joined(separator: " ")
            fail(message + " (see 'qlora help')")
        }
    }
}

/// Re-executes this program with `OPENBLAS_CORETYPE` set when the CPU has OpenBLAS's AVX-512
/// kernels and the user set neither it nor `QLORA_KEEP_BLAS_CORE`; OpenBLAS reads the variable
/// only when it loads, which has already happened. If exec fails, carries on as is.
func selectBLASKernels() {
    let env = ProcessInfo.processInfo.environment
    guard env["OPENBLAS_CORETYPE"] == nil, env["QLORA_KEEP_BLAS_CORE"] == nil, let core = BLAS.preferredCoreType else { return }
    setenv("OPENBLAS_CORETYPE", core, 1)
    execv("/proc/self/exe", CommandLine.unsafeArgv)
}

/// Prints one clear line on stderr and exits non-zero: the contract for bad input. Control
/// characters in the message (a tensor name from a hostile file) are escaped, so it stays one
/// line and cannot drive the terminal.
func fail(_ message: String) -> Never {
    // A cleanup signal is removing the staged output under us: die of the signal, not of this.
    while StagedOutput.isDyingOfSignal { pause() }
    FileHandle.standardError.write(Data("qlora: error: \(escapingControlCharacters(message))\n".utf8))
    exit(1)
}

/// Runs `body`, turning any library error into one line on stderr.
func runReportingErrors(_ body: () throws -> Void) {
    do { try body() } catch let e as ExitCode { exit(e.rawValue) } catch { fail("\(error)") }
}

/// A 16- or 32-bit float output type, by its short name.
enum OutputDType: String, ExpressibleByArgument, CaseIterable {
    case f32, bf16, f16
    var elementType: ElementType {
        switch self {
        case .f32: return .float32
        case .bf16: return .bfloat16
        case .f16: return .float16
        }
    }
}

/// Prints `value` as pretty JSON with sorted keys (snake_case keys unless told otherwise).
func printJSON<T: Encodable>(_ value: T, snakeCase: Bool = true) throws {
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    if snakeCase { enc.keyEncodingStrategy = .convertToSnakeCase }
    print(String(decoding: try enc.encode(value), as: UTF8.self))
}

/// A progress line on stderr, only when stderr is a terminal, at most ~10 times a second.
final class ProgressLine {
    let enabled = isatty(2) != 0
    var last = Date.distantPast
    let start = Date()
    let label: String

    init(_ label: String) { self.label = label }

    func update(done: Int, total: Int, tensor: String) {
        guard enabled, Date().timeIntervalSince(last) > 0.1 || done == total else { return }
        last = Date()
        let pct = total == 0 ? 100.0 : 100.0 * Double(done) / Double(total)
        let rate = Double(done) / max(Date().timeIntervalSince(start), 1e-9) / 1e6
        let name = tensor.count > 48 ? "…" + tensor.suffix(47) : tensor
        FileHandle.standardError.write(Data(String(format: "\r\u{1B}[K%@ %5.1f%%  %.0f MB/s  %@", label, pct, rate, name).utf8))
    }

    /// A step of a job measured in steps, not bytes.
    func note(_ step: String) {
        guard enabled else { return }
        FileHandle.standardError.write(Data(String(format: "\r\u{1B}[K%@ %.0f s  %@", label, Date().timeIntervalSince(start), step).utf8))
    }

    func finish() {
        if enabled { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
    }
}
