import FileOutput
import Foundation
import QLoRA
import SafeTensors

// The JSON files qlora writes for the Python stack to read: config.json's `quantization_config`
// (transformers) and, through `ConfigJSON`, adapter_config.json (PEFT).
//
// Why not JSONSerialization: it reads `6.0` as the number 6 and writes it back as `6`, which
// transformers refuses (`llm_int8_threshold must be a float`), and it does so to every float of
// the file (`rope_theta: 10000.0` → `10000`). Here config files are parsed with SafeTensors'
// exact-number parser (a number stays its source text) and written in Python's layout.

/// Python's `json.dumps` layout for the config files qlora writes, numbers kept as text.
public enum ConfigJSON {
    /// What transformers' `PretrainedConfig.to_json_file` writes:
    /// `json.dumps(d, indent=2, sort_keys=True) + "\n"` (ASCII only, `\uXXXX` escapes).
    public static func transformersFile(_ value: JSONValue) -> Data { Data(value.pythonJSON() + [UInt8(ascii: "\n")]) }

    /// What PEFT's `PeftConfigMixin.save_pretrained` writes: `json.dumps(d, indent=2,
    /// sort_keys=True)`, with no trailing newline.
    public static func peftFile(_ value: JSONValue) -> Data { Data(value.pythonJSON()) }

    /// A JSON file as qlora reads every one: a regular file (`InputFile`), numbers kept as text;
    /// a problem names the file.
    public static func read(_ path: String) throws -> JSONValue {
        let data = try InputFile.read(path)
        do { return try JSONValue.parse(document: [UInt8](data)) } catch {
            throw CheckpointError.invalidPath(path: path, problem: "is not valid JSON (\(error))")
        }
    }

    /// A Python `int`'s JSON text.
    public static func int(_ x: Int) -> JSONValue { .number(String(x)) }

    /// A Python `float`'s JSON text: `repr(x)` (`6.0`, `0.05`, `1e-05`, `1e+16`), for finite `x`.
    public static func float(_ x: Double) -> JSONValue { .number(pythonRepr(x)) }

    /// Python's `float.__repr__`: the shortest digits that round-trip (Swift's `description`
    /// finds the same ones), written in fixed notation when the decimal exponent `e` of
    /// `0.d₁d₂… × 10^e` is in -3...16, otherwise as `d.ddde±XX`; fixed notation always has a
    /// fraction (`6.0`). CPython: `float_repr_style 'short'`, `format_float_short(x, 'r', …)`.
    static func pythonRepr(_ x: Double) -> String {
        precondition(x.isFinite, "JSON has no text for \(x)")
        if x == 0 { return x.sign == .minus ? "-0.0" : "0.0" }
        // Digits and exponent from Swift's shortest round-trip text ("1.5e-05", "123.25", "1e+16").
        let text = x.magnitude.description
        let parts = text.split(separator: "e", maxSplits: 1)
        var mantissa = String(parts[0])
        var exponent = parts.count == 2 ? Int(parts[1])! : 0
        if let dot = mantissa.firstIndex(of: ".") {
            exponent += mantissa.distance(from: mantissa.startIndex, to: dot)
            mantissa.remove(at: dot)
        } else {
            exponent += mantissa.count
        }
        // Now x = 0.mantissa × 10^exponent; strip leading and trailing zeros of the digits.
        while mantissa.hasPrefix("0") && mantissa.count > 1 { mantissa.removeFirst(); exponent -= 1 }
        while mantissa.hasSuffix("0") && mantissa.count > 1 { mantissa.removeLast() }
        let digits = Array(mantissa)
        let sign = x.sign == .minus ? "-" : ""
        if exponent > -4 && exponent <= 16 {
            if exponent <= 0 { return sign + "0." + String(repeating: "0", count: -exponent) + mantissa }
            if digits.count <= exponent { return sign + mantissa + String(repeating: "0", count: exponent - digits.count) + ".0" }
            return sign + String(digits[..<exponent]) + "." + String(digits[exponent...])
        }
        let e = exponent - 1
        let body = digits.count == 1 ? mantissa : String(digits[0]) + "." + String(digits[1...])
        return sign + body + "e" + (e < 0 ? "-" : "+") + (abs(e) < 10 ? "0" : "") + String(abs(e))
    }
}

/// The `quantization_config` transformers writes into config.json for a bitsandbytes 4-bit
/// checkpoint (`BitsAndBytesConfig.to_dict()`, transformers 5.23: Vectors/interop/).
public struct BnBQuantizationConfig: Sendable, Equatable {
    public var quantType: QuantType
    public var doubleQuant: Bool
    /// `bnb_4bit_compute_dtype`: what the 4-bit matmul computes in.
    public var computeDtype: ElementType = .bfloat16
    /// `bnb_4bit_quant_storage`: the dtype the packed 4-bit bytes are stored as (uint8 by
    /// default; FSDP and DeepSpeed QLoRA need bfloat16 or float32).
    public var quantStorage: DType = .u8

    public init(quantType: QuantType, doubleQuant: Bool, computeDtype: ElementType = .bfloat16, quantStorage: DType = .u8) {
        self.quantType = quantType
        self.doubleQuant = doubleQuant
        self.computeDtype = computeDtype
        self.quantStorage = quantStorage
    }

    /// The 4-bit format of a loaded weight.
    public init(_ state: QuantState) { self.init(quantType: state.quantType, doubleQuant: state.isDoubleQuantized) }

    /// torch's name of a dtype (`uint8`, `bfloat16`, ...).
    static func torchName(_ d: DType) -> String {
        switch d {
        case .u8: return "uint8"
        case .i8: return "int8"
        case .bf16: return "bfloat16"
        case .f16: return "float16"
        case .f32: return "float32"
        default: return d.rawValue.lowercased()
        }
    }

    /// The object, with transformers' key set and JSON types: `llm_int8_threshold` a float
    /// (`6.0`, which `BitsAndBytesConfig.post_init` insists on), `llm_int8_skip_modules` null, and
    /// the private `_load_in_4bit` / `_load_in_8bit` that `to_dict()` also emits.
    public var jsonValue: JSONValue {
        let members: [(String, JSONValue)] = [
            ("_load_in_4bit", .bool(true)), ("_load_in_8bit", .bool(false)),
            ("bnb_4bit_compute_dtype", .string(computeDtype.rawValue)),
            ("bnb_4bit_quant_storage", .string(Self.torchName(quantStorage))),
            ("bnb_4bit_quant_type", .string(quantType.rawValue)),
            ("bnb_4bit_use_double_quant", .bool(doubleQuant)),
            ("llm_int8_enable_fp32_cpu_offload", .bool(false)),
            ("llm_int8_has_fp16_weight", .bool(false)),
            ("llm_int8_skip_modules", .null),
            ("llm_int8_threshold", ConfigJSON.float(6.0)),
            ("load_in_4bit", .bool(true)), ("load_in_8bit", .bool(false)),
            ("quant_method", .string("bitsandbytes")),
        ]
        return .object(members.map { JSONMember(key: $0.0, value: $0.1) })
    }

    /// The `bnb_4bit_compute_dtype` a config.json records, if any.
    public static func computeDtype(inConfig config: Data) -> ElementType? {
        guard case .object(let members)? = try? JSONValue.parse(document: [UInt8](config)),
              case .object(let q)? = members.first(where: { $0.key == "quantization_config" })?.value,
              case .string(let name)? = q.first(where: { $0.key == "bnb_4bit_compute_dtype" })?.value else { return nil }
        return ElementType(rawValue: name)
    }

    /// config.json's bytes with `quantization_config` set to `quantization`, or removed when nil,
    /// written as transformers writes config.json; every other member (and every number's text)
    /// is kept. Nil when `config` is not a JSON object (then it is copied as it is).
    public static func rewrite(config: Data, quantization: BnBQuantizationConfig?) -> Data? {
        guard case .object(var members)? = try? JSONValue.parse(document: [UInt8](config)) else { return nil }
        members.removeAll { $0.key == "quantization_config" }
        if let quantization { members.append(JSONMember(key: "quantization_config", value: quantization.jsonValue)) }
        return ConfigJSON.transformersFile(.object(members))
    }
}
