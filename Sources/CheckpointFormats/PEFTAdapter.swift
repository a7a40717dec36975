import FileOutput
import Foundation
import QLoRA
import SafeTensors

/// A LoRA adapter in PEFT's file format: a directory with `adapter_config.json` and
/// `adapter_model.safetensors` holding `base_model.model.<module path>.lora_A.weight` [r, in] and
/// `.lora_B.weight` [out, r] for each adapted module (what `PeftModel.save_pretrained` writes and
/// `PeftModel.from_pretrained` reads).
public struct PEFTAdapter: Sendable {
    public struct Module: Sendable, Equatable {
        /// Module path in the base model, e.g. `model.layers.0.self_attn.q_proj`.
        public var path: String
        public var rank: Int
        public var inFeatures: Int
        public var outFeatures: Int
        /// A: [rank, in], fp32.
        public var loraA: [Float]
        /// B: [out, rank], fp32.
        public var loraB: [Float]
        /// The dtype A and B were stored in (their values are exact in fp32). PEFT's merge casts
        /// the delta back to it when it is 16-bit.
        public var storedType: ElementType = .float32
        /// DoRA's magnitude vector m [out] (`lora_magnitude_vector`, fp32 values), for an adapter
        /// with `use_dora`.
        public var magnitude: [Float]? = nil

        public init(path: String, rank: Int, inFeatures: Int, outFeatures: Int, loraA: [Float], loraB: [Float],
                    storedType: ElementType = .float32) {
            self.path = path
            self.rank = rank
            self.inFeatures = inFeatures
            self.outFeatures = outFeatures
            self.loraA = loraA
            self.loraB = loraB
            self.storedType = storedType
        }
    }

    public var rank: Int
    public var loraAlpha: Double
    public var useRSLoRA = false
    /// The base layers store W as [in, out] (GPT-2's Conv1D); A and B keep their usual shapes.
    public var fanInFanOut = false
    public var loraDropout = 0.0
    public var targetModules: [String]
    /// What adapter_config.json selects (`target_modules` as read, `layers_to_transform`,
    /// `layers_pattern`, `exclude_modules`); nil: `targetModules` as a list, nothing else.
    public var targetSpec: PEFTTargets? = nil
    /// The modules the config adapts, by PEFT's rules.
    public var targets: PEFTTargets { targetSpec ?? PEFTTargets(modules: .names(targetModules)) }
    public var rankPattern: [String: Int] = [:]
    public var alphaPattern: [String: Double] = [:]
    public var baseModelNameOrPath: String? = nil
    /// PEFT's `task_type`: `CAUSAL_LM` (every model qlora trains is one) makes
    /// `PeftModel.from_pretrained` build a `PeftModelForCausalLM`; nil (null) a plain `PeftModel`.
    public var taskType: String? = "CAUSAL_LM"
    /// Adapted modules by path.
    public var modules: [String: Module] = [:]
    /// `use_dora`: every module carries a magnitude vector, and merging rescales each row of
    /// W + ΔW to it (Liu et al. 2024; peft/tuners/lora/variants.py `DoraLinearVariant`).
    public var useDora = false
    /// `modules_to_save`: module names (a path or its last components) trained whole; the
    /// adapter holds their weights, which replace the base's.
    public var modulesToSave: [String] = []
    /// `trainable_token_indices`: per module name (`embed_tokens`, `lm_head`), the rows of the
    /// embedding trained (PEFT's TrainableTokens).
    public var trainableTokenIndices: [String: [Int]] = [:]
    /// Whole tensors the adapter holds for the base's, by base tensor name: a `modules_to_save`
    /// module's weights, and embedding layers saved with `save_embedding_layers` (a resized
    /// vocabulary's, `token_adapter.base_layer.weight`).
    public var savedTensors: [String: SavedTensor] = [:]
    /// Trainable-token rows by base tensor name (`token_adapter.trainable_tokens_delta`: despite
    /// the name, the rows' new values).
    public var tokenRows: [String: TokenRows] = [:]

    /// A tensor the adapter stores whole.
    public struct SavedTensor: Sendable, Equatable {
        public var dtype: DType
        public var shape: [Int]
        public var bytes: [UInt8]
        public init(dtype: DType, shape: [Int], bytes: [UInt8]) { (self.dtype, self.shape, self.bytes) = (dtype, shape, bytes) }
    }

    /// Rows of an embedding (or lm_head) the adapter trained: `values` [indices.count, columns].
    public struct TokenRows: Sendable, Equatable {
        public var indices: [Int]
        public var columns: Int
        public var values: [Float]
    }

    /// PEFT's `target_parameters`: LoRA on a mixture of experts' fused expert weights.
    public var targetParameters: [String] = []
    /// Whether adapter_config.json writes `target_parameters` as a list when it is empty: PEFT
    /// 0.21.2's conversion for a mixture of experts (`_convert_peft_config_moe`) leaves `[]`
    /// where a dense model's config has null.
    public var listsTargetParameters = false
    /// The fused parameters a mixture of experts' experts modules define, in definition order
    /// (Qwen3-MoE, Mixtral, gpt-oss and Llama 4 alike): PEFT nests one ParamWrapper per targeted
    /// parameter in this order, the first innermost (`….experts.base_layer`), the last outermost.
    public static let expertParameters = ["gate_up_proj", "down_proj"]

    /// LoRA on one fused expert parameter (PEFT's ParamWrapper): A [rank·experts, in] holds
    /// expert e's A in rows e·rank ..< (e+1)·rank; B [out, rank·experts] holds its column j of B
    /// at j·experts + e (peft/tuners/lora/layer.py `ParamWrapper.get_delta_weight`'s reshapes).
    public struct ParameterAdapter: Sendable, Equatable {
        /// The experts module in memory (`model.layers.1.mlp.experts`) and the parameter.
        public var module: String, parameter: String
        public var rank, experts, inFeatures, outFeatures: Int
        public var loraA: [Float], loraB: [Float]

        /// Expert `e`'s A [rank, in] and the rows `rows` of its B [rows.count, rank].
        public func expert(_ e: Int, rows: Range<Int>) -> (a: [Float], b: [Float]) {
            let a = Array(loraA[(e * rank * inFeatures)..<((e + 1) * rank * inFeatures)])
            let b = rows.flatMap { o in (0..<rank).map { j in loraB[o * rank * experts + j * experts + e] } }
            return (a, b)
        }
    }

    /// The router module a target_parameters entry names (`gate.weight`, `mlp.gate.weight`,
    /// `router.weight`), or nil.
    static func routerModule(_ name: String) -> String? {
        guard name.hasSuffix(".weight") else { return nil }
        let module = String(name.dropLast(".weight".count))
        return ["gate", "router"].contains(module.split(separator: ".").last.map(String.init) ?? "") ? module : nil
    }

    /// Adapters on fused expert parameters (and routers), by `<module>.<parameter>`.
    public var parameterAdapters: [String: ParameterAdapter] = [:]

    /// The module and parameter a ParamWrapper's tensors belong to, or nil: `….experts` is the
    /// last targeted parameter in definition order, each `.base_layer` one earlier.
    func wrappedParameter(_ path: String) -> (module: String, parameter: String)? {
        guard !targetParameters.isEmpty else { return nil }
        // A router's weight (PEFT's all-linear adds `gate.weight`): one ParamWrapper on its module.
        if targetParameters.compactMap(Self.routerModule).contains(where: { path == $0 || path.hasSuffix("." + $0) }) { return (path, "weight") }
        var module = Substring(path), depth = 0
        while module.hasSuffix(".base_layer") { module = module.dropLast(".base_layer".count); depth += 1 }
        guard module.hasSuffix(".experts") || module == "experts" else { return nil }
        let targeted = Self.expertParameters.filter { p in targetParameters.contains { $0 == "experts." + p || $0 == p || $0.hasSuffix(".experts." + p) } }
        guard depth < targeted.count else { return nil }
        return (String(module), targeted[targeted.count - 1 - depth])
    }

    /// A fused parameter's rank and alpha: rank_pattern and alpha_pattern keys are regular
    /// expressions matched against `<module>.<parameter>` as PEFT's `get_pattern_key` does,
    /// `(.*\.)?(key)$`.
    public func config(forParameter key: String) -> LoRAConfig {
        func find<T>(_ pattern: [String: T]) -> T? {
            pattern.first { k, _ in
                (try? NSRegularExpression(pattern: "^(.*\\.)?(" + k + ")$")).map { $0.firstMatch(in: key, range: NSRange(key.startIndex..., in: key)) != nil } ?? false
            }?.value
        }
        return LoRAConfig(rank: find(rankPattern) ?? rank, alpha: find(alphaPattern) ?? loraAlpha, useRSLoRA: useRSLoRA, dropout: loraDropout)
    }

    /// Whether the adapter is LoRA on linear layers alone (no DoRA, whole modules or token rows):
    /// what PEFT's oldest readers and llama.cpp's converter take.
    public var isPlainLoRA: Bool { !useDora && savedTensors.isEmpty && tokenRows.isEmpty && parameterAdapters.isEmpty }

    /// What makes the adapter more than LoRA on linear layers, in words ("DoRA", "modules_to_save
    /// (lm_head)", …), for a refusal.
    public var extraKinds: [String] {
        var kinds: [String] = []
        if useDora { kinds.append("DoRA (use_dora)") }
        let whole = savedTensors.keys.filter { n in !tokenRows.keys.contains(n) }.sorted()
        if !whole.isEmpty { kinds.append("whole modules (\(whole.joined(separator: ", ")))") }
        if !tokenRows.isEmpty { kinds.append("trainable tokens (\(tokenRows.keys.sorted().joined(separator: ", ")))") }
        if !parameterAdapters.isEmpty { kinds.append("LoRA on experts (target_parameters)") }
        return kinds
    }

    public static let configFile = "adapter_config.json"
    public static let weightsFile = "adapter_model.safetensors"
    /// PEFT's pickle format (`save_pretrained(safe_serialization=False)`), which qlora does not read.
    public static let pickleWeightsFile = "adapter_model.bin"
    static let prefix = "base_model.model."

    public init(rank: Int, loraAlpha: Double, targetModules: [String]) {
        self.rank = rank
        self.loraAlpha = loraAlpha
        self.targetModules = targetModules
    }

    /// PEFT's per-module override: a pattern applies when the path equals it or ends with
    /// "." + it (PEFT matches `(.*\.)?<key>$`).
    static func lookup<T>(_ pattern: [String: T], _ path: String) -> T? {
        pattern.first { path == $0.key || path.hasSuffix("." + $0.key) }?.value
    }

    /// The LoRA hyper-parameters for one module, rank_pattern and alpha_pattern applied.
    public func config(for path: String) -> LoRAConfig {
        LoRAConfig(rank: Self.lookup(rankPattern, path) ?? rank, alpha: Self.lookup(alphaPattern, path) ?? loraAlpha,
                   useRSLoRA: useRSLoRA, dropout: loraDropout)
    }

    /// Reads and checks an adapter directory. Errors name the file and the problem.
    public static func load(directory: String) throws -> PEFTAdapter {
        let dir = URL(fileURLWithPath: directory)
        let configURL = dir.appendingPathComponent(configFile)
        guard FileManager.default.fileExists(atPath: configURL.path) else {
            throw CheckpointError.invalidPath(path: configURL.path, problem: "missing (not a PEFT adapter directory)")
        }
        let data = try InputFile.read(configURL.path)
        guard let c = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw CheckpointError.invalidPath(path: configURL.path, problem: "is not a JSON object")
        }
        func bad(_ p: String) -> CheckpointError { .invalidPath(path: configURL.path, problem: p) }
        // Typed fields: a field of the wrong JSON type is named with what it holds; JSON null
        // is an absent optional field (PEFT writes null for unset options).
        func present(_ k: String) -> Any? { c[k].flatMap { $0 is NSNull ? nil : $0 } }
        func typed<T>(_ k: String, _ kind: String, _ read: (Any) -> T?) throws -> T? {
            guard let v = present(k) else { return nil }
            guard let t = read(v) else { throw bad("\(k) is \(JSONField.describe(v)), not \(kind)") }
            return t
        }
        func string(_ v: Any) -> String? { v as? String }
        if let t = try typed("peft_type", "a string", string), t != "LORA" { throw bad("peft_type is \(t); only LORA adapters are supported") }
        guard let r = try typed("r", "an integer", JSONField.integer) else { throw bad("r is missing") }
        guard r > 0 else { throw bad("r is \(r); it must be a positive integer") }
        guard let alpha = try typed("lora_alpha", "a number", JSONField.number) else { throw bad("lora_alpha is missing") }
        // LoRA on parameters (PEFT's target_parameters): a mixture of experts' fused expert weights.
        var targetParameters: [String] = []
        if let v = present("target_parameters") {
            guard let list = v as? [Any], let names = list.map({ $0 as? String }) as? [String] else {
                throw bad("target_parameters is \(JSONField.describe(v)), not a list of parameter names")
            }
            for n in names where !Self.expertParameters.contains(where: { n == "experts." + $0 || n == $0 || n.hasSuffix(".experts." + $0) }) && Self.routerModule(n) == nil {
                throw bad("target_parameters names \(n); qlora reads LoRA on a mixture of experts' experts.gate_up_proj, experts.down_proj and router (gate.weight)")
            }
            targetParameters = names
        }
        let targets: PEFTTargets
        do {
            var config = c
            if targetParameters.count > 0 && config["target_modules"].map({ $0 is NSNull }) ?? true { config["target_modules"] = [String]() }
            targets = try PEFTTargets.read(config)
        } catch let e as PEFTTargetsError { throw bad(e.description) }
        var names: [String] = []
        if case .names(let list) = targets.modules { names = list }
        var a = PEFTAdapter(rank: r, loraAlpha: alpha, targetModules: names)
        a.targetSpec = targets
        a.targetParameters = targetParameters
        a.useRSLoRA = try typed("use_rslora", "true or false", JSONField.boolean) ?? false
        a.fanInFanOut = try typed("fan_in_fan_out", "true or false", JSONField.boolean) ?? false
        a.loraDropout = try typed("lora_dropout", "a number", JSONField.number) ?? 0
        func map<T>(_ k: String, _ kind: String, _ read: (Any) -> T?) throws -> [String: T] {
            guard let v = present(k) else { return [:] }
            guard let o = v as? [String: Any] else { throw bad("\(k) is \(JSONField.describe(v)), not an object") }
            return try o.mapValues { e in
                guard let t = read(e) else { throw bad("\(k) holds \(JSONField.describe(e)), not \(kind)") }
                return t
            }
        }
        a.rankPattern = try map("rank_pattern", "an integer", JSONField.integer)
        if let (k, v) = a.rankPattern.first(where: { $0.value <= 0 }) { throw bad("rank_pattern gives \(k) rank \(v); ranks must be positive") }
        a.alphaPattern = try map("alpha_pattern", "a number", JSONField.number)
        a.baseModelNameOrPath = try typed("base_model_name_or_path", "a string", string)
        a.taskType = try typed("task_type", "a string", string)
        a.useDora = try typed("use_dora", "true or false", JSONField.boolean) ?? false
        if let v = present("modules_to_save") {
            guard let list = v as? [Any], let names = list.map({ $0 as? String }) as? [String] else {
                throw bad("modules_to_save is \(JSONField.describe(v)), not a list of module names")
            }
            a.modulesToSave = names
        }
        if let v = present("trainable_token_indices") {
            // A list names rows of the input embedding; an object maps module names to rows.
            func rows(_ e: Any, _ what: String) throws -> [Int] {
                guard let list = e as? [Any] else { throw bad("trainable_token_indices\(what) is \(JSONField.describe(e)), not a list of token ids") }
                return try list.map { x in
                    guard let i = JSONField.integer(x), i >= 0 else { throw bad("trainable_token_indices\(what) holds \(JSONField.describe(x)), not a token id") }
                    return i
                }
            }
            if let o = v as? [String: Any] {
                a.trainableTokenIndices = try o.mapValues { try rows($0, "") }
            } else {
                a.trainableTokenIndices = ["embed_tokens": try rows(v, "")]
            }
        }

        let weightsPath = dir.appendingPathComponent(weightsFile).path
        let picklePath = dir.appendingPathComponent(pickleWeightsFile).path
        if !FileManager.default.fileExists(atPath: weightsPath), FileManager.default.fileExists(atPath: picklePath) {
            throw CheckpointError.invalidPath(path: picklePath, problem: "is a PyTorch pickle, which qlora does not read (loading one runs code from the file); "
                                              + "save the adapter as \(weightsFile) (PEFT's save_pretrained does by default)")
        }
        let file = try SafeTensorsFile(path: weightsPath)
        func badTensor(_ t: String, _ p: String) -> CheckpointError { .invalidTensor(file: weightsPath, tensor: t, problem: p) }
        var halves: [String: (a: TensorInfo?, b: TensorInfo?)] = [:]
        var magnitudes: [String: TensorInfo] = [:]
        var deltas: [String: TensorInfo] = [:]
        func named(_ path: Substring, in names: [String]) -> String? {
            names.first { path == $0 || path.hasSuffix("." + $0) }
        }
        for t in file.tensors {
            guard t.name.hasPrefix(prefix) else { throw badTensor(t.name, "not a PEFT adapter tensor (expected base_model.model.<module>…)") }
            let rest = t.name.dropFirst(prefix.count)
            func strip(_ suffix: String) -> String? { rest.hasSuffix(suffix) ? String(rest.dropLast(suffix.count)) : nil }
            if let path = strip(".lora_A.weight") ?? strip(".lora_B.weight") {
                var h = halves[path] ?? (nil, nil)
                if rest.hasSuffix(".lora_A.weight") { h.a = t } else { h.b = t }
                halves[path] = h
            } else if let path = strip(".lora_magnitude_vector") {
                guard a.useDora else { throw badTensor(t.name, "a DoRA magnitude vector, but \(configFile) does not set use_dora") }
                magnitudes[path] = t
            } else if let path = strip(".token_adapter.trainable_tokens_delta") {
                deltas[path] = t
            } else if let path = strip(".token_adapter.base_layer.weight") {
                // An embedding layer saved whole under its trainable-token wrapper (save_embedding_layers).
                a.savedTensors[path + ".weight"] = try saved(file, t, weightsPath)
            } else if strip(".modules_to_save.weight") != nil || strip(".original_module.weight") != nil
                        || strip(".modules_to_save.bias") != nil || strip(".original_module.bias") != nil {
                // Copies PEFT writes beside a saved module's own key and ignores on load.
                continue
            } else if let path = strip(".weight") ?? strip(".bias"),
                      named(Substring(path), in: a.modulesToSave) != nil || named(Substring(path), in: embeddingLayerNames) != nil {
                // A modules_to_save module's weights, or an embedding layer saved whole.
                a.savedTensors[String(rest)] = try saved(file, t, weightsPath)
            } else {
                throw badTensor(t.name, "not a tensor of a PEFT LoRA adapter (lora_A/lora_B, lora_magnitude_vector, a modules_to_save module, "
                                + "a saved embedding layer or trainable_tokens_delta)")
            }
        }
        for (path, t) in deltas.sorted(by: { $0.key < $1.key }) {
            guard let key = named(Substring(path), in: Array(a.trainableTokenIndices.keys)), let indices = a.trainableTokenIndices[key] else {
                throw badTensor(t.name, "trainable token rows for \(path), which \(configFile)'s trainable_token_indices does not name")
            }
            guard t.shape.count == 2, t.shape[0] == indices.count else {
                throw badTensor(t.name, "shape \(t.shape) does not hold \(indices.count) rows (trainable_token_indices[\"\(key)\"])")
            }
            a.tokenRows[path + ".weight"] = TokenRows(indices: indices, columns: t.shape[1], values: try floats(file, t, weightsPath))
        }
        for (path, h) in halves.sorted(by: { $0.key < $1.key }) {
            guard let ta = h.a, let tb = h.b else { throw badTensor(prefix + path, "has only one of lora_A / lora_B") }
            if let (module, parameter) = a.wrappedParameter(path) {
                // PEFT's ParamWrapper: A [rank·experts, in], B [out, rank·experts].
                let key = module + "." + parameter, r = a.config(forParameter: key).rank
                guard ta.shape.count == 2, tb.shape.count == 2, ta.shape[0] % r == 0, tb.shape[1] == ta.shape[0] else {
                    throw badTensor(ta.name, "lora_A \(ta.shape) and lora_B \(tb.shape) are not PEFT's [rank·experts, in] and [out, rank·experts] at rank \(r)")
                }
                a.parameterAdapters[key] = ParameterAdapter(module: module, parameter: parameter, rank: r, experts: ta.shape[0] / r,
                                                            inFeatures: ta.shape[1], outFeatures: tb.shape[0],
                                                            loraA: try floats(file, ta, weightsPath), loraB: try floats(file, tb, weightsPath))
                continue
            }
            // PEFT adapts only the modules its config selects and drops the weights of any other
            // module on load without a word; merging them would not be what PEFT applies.
            let selected: Bool
            do { selected = try targets.selects(path) } catch let e as PEFTTargetsError { throw bad(e.description) }
            guard selected else {
                throw badTensor(ta.name, "module \(path) is not one that \(configFile) targets (\(targets.summary)); PEFT would ignore its weights")
            }
            guard ta.shape.count == 2, tb.shape.count == 2 else { throw badTensor(ta.name, "lora_A and lora_B must be 2-D") }
            let expected = a.config(for: path).rank
            guard ta.shape[0] == expected, tb.shape[1] == expected else {
                throw badTensor(ta.name, "rank \(ta.shape[0]) (lora_B \(tb.shape[1])) disagrees with the config's r = \(expected)")
            }
            let stored = ElementType(ta.dtype) ?? .float32
            var m = Module(path: path, rank: expected, inFeatures: ta.shape[1], outFeatures: tb.shape[0],
                           loraA: try floats(file, ta, weightsPath), loraB: try floats(file, tb, weightsPath), storedType: stored)
            if a.useDora {
                guard let tm = magnitudes.removeValue(forKey: path) else { throw badTensor(ta.name, "use_dora is set but \(path) has no lora_magnitude_vector") }
                guard tm.shape == [m.outFeatures] else {
                    throw badTensor(tm.name, "shape \(tm.shape); a DoRA magnitude vector has one value per output feature, [\(m.outFeatures)]")
                }
                m.magnitude = try floats(file, tm, weightsPath)
            }
            a.modules[path] = m
        }
        if let (path, t) = magnitudes.first { throw badTensor(t.name, "a DoRA magnitude vector for \(path), which has no lora_A / lora_B") }
        guard !a.modules.isEmpty || !a.parameterAdapters.isEmpty || !a.savedTensors.isEmpty || !a.tokenRows.isEmpty else {
            throw CheckpointError.invalidPath(path: weightsPath, problem: "holds no LoRA weights")
        }
        return a
    }

    /// PEFT's embedding layers (peft/utils/constants.py `EMBEDDING_LAYER_NAMES`), which
    /// `save_embedding_layers` saves whole.
    public static let embeddingLayerNames = ["embed_tokens", "lm_head"]
    var embeddingLayerNames: [String] { Self.embeddingLayerNames }

    static func saved(_ f: SafeTensorsFile, _ t: TensorInfo, _ path: String) throws -> SavedTensor {
        guard ElementType(t.dtype) != nil else {
            throw CheckpointError.invalidTensor(file: path, tensor: t.name, problem: "dtype \(t.dtype.rawValue) is not a float type")
        }
        return SavedTensor(dtype: t.dtype, shape: t.shape, bytes: f.withBytes(of: t.name) { Array($0) })
    }

    static func floats(_ f: SafeTensorsFile, _ t: TensorInfo, _ path: String) throws -> [Float] {
        guard let type = ElementType(t.dtype) else {
            throw CheckpointError.invalidTensor(file: path, tensor: t.name, problem: "dtype \(t.dtype.rawValue) is not a float type")
        }
        return f.withBytes(of: t.name) { loadFloats($0, as: type) }
    }

    /// Checks every module against the base's linear shapes ([out, in] by module path, whatever
    /// the layout the base stores).
    public func validate(againstBase shapes: [String: (out: Int, in: Int)], baseName: String) throws {
        for m in modules.values.sorted(by: { $0.path < $1.path }) {
            guard let s = shapes[m.path] else {
                throw CheckpointError.invalidTensor(file: baseName, tensor: m.path + ".weight", problem: "the adapter targets this module but the base has no such weight")
            }
            guard s.out == m.outFeatures, s.in == m.inFeatures else {
                throw CheckpointError.invalidTensor(file: baseName, tensor: m.path + ".weight",
                                                   problem: "base shape [\(s.out), \(s.in)] does not match the adapter's [\(m.outFeatures), \(m.inFeatures)]")
            }
        }
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (each module in its
    /// `storedType`) into a new directory, staged beside it and renamed into place when complete.
    public func save(directory: String) throws {
        let out = try StagedOutput(directory, kind: .directory)
        try write(into: out.url)
        try out.commit()
    }

    /// PEFT's version whose adapter_config.json `write(into:)` reproduces (Vectors/interop/).
    public static let peftVersion = "0.21.2"

    /// adapter_config.json as PEFT 0.21.2's `LoraConfig.save_pretrained` writes it: every key
    /// of its `to_dict()`, with its JSON types (`r` an int, `lora_alpha` an int when integral as
    /// `LoraConfig(lora_alpha=16)` gives, `lora_dropout` a float, unset options null), sorted,
    /// indent 2, no trailing newline. `auto_mapping` is null: PEFT writes the base model's class
    /// there only for an adapter without a task type, and `PeftModel.from_pretrained` does not
    /// read it.
    public var configJSON: JSONValue {
        func number(_ x: Double) -> JSONValue {
            x.rounded() == x && x.magnitude < 1e15 ? ConfigJSON.int(Int(x)) : ConfigJSON.float(x)
        }
        func object(_ members: [(String, JSONValue)]) -> JSONValue { .object(members.map { JSONMember(key: $0.0, value: $0.1) }) }
        return object([
            ("alora_invocation_tokens", .null),
            ("alpha_pattern", object(alphaPattern.sorted { $0.key < $1.key }.map { ($0.key, number($0.value)) })),
            ("arrow_config", .null), ("auto_mapping", .null),
            ("base_model_name_or_path", baseModelNameOrPath.map { .string($0) } ?? .null),
            ("bias", .string("none")), ("corda_config", .null), ("ensure_weight_tying", .bool(false)), ("eva_config", .null),
            ("exclude_modules", .null), ("fan_in_fan_out", .bool(fanInFanOut)), ("inference_mode", .bool(true)),
            ("init_lora_weights", .bool(true)), ("kasa_config", .null), ("layer_replication", .null), ("layers_pattern", .null),
            ("layers_to_transform", .null), ("loftq_config", .object([])),
            ("lora_alpha", number(loraAlpha)), ("lora_bias", .bool(false)), ("lora_dropout", ConfigJSON.float(loraDropout)),
            ("lora_ga_config", .null), ("megatron_config", .null), ("megatron_core", .string("megatron.core")),
            ("modules_to_save", modulesToSave.isEmpty ? .null : .array(modulesToSave.map { .string($0) })), ("monteclora_config", .null), ("peft_type", .string("LORA")),
            ("peft_version", .string(Self.peftVersion)), ("qalora_group_size", ConfigJSON.int(16)), ("r", ConfigJSON.int(rank)),
            ("rank_pattern", object(rankPattern.sorted { $0.key < $1.key }.map { ($0.key, ConfigJSON.int($0.value)) })),
            ("revision", .null), ("target_modules", .array(targetModules.map { .string($0) })), ("target_parameters", targetParameters.isEmpty && !listsTargetParameters ? .null : .array(targetParameters.map { .string($0) })),
            ("task_type", taskType.map { .string($0) } ?? .null), ("trainable_token_indices", .null), ("use_bdlora", .null),
            ("use_dora", .bool(useDora)), ("use_qalora", .bool(false)), ("use_rslora", .bool(useRSLoRA)), ("velora_config", .null),
        ])
    }

    /// Writes the two files into `directory` (an output being staged).
    public func write(into directory: URL) throws {
        try ConfigJSON.peftFile(configJSON).write(to: directory.appendingPathComponent(Self.configFile))
        var tensors: [(name: String, dtype: DType, shape: [Int], bytes: [UInt8])] = []
        for m in modules.values.sorted(by: { $0.path < $1.path }) {
            tensors.append((Self.prefix + m.path + ".lora_A.weight", DType(m.storedType), [m.rank, m.inFeatures], encode(m.loraA, as: m.storedType)))
            tensors.append((Self.prefix + m.path + ".lora_B.weight", DType(m.storedType), [m.outFeatures, m.rank], encode(m.loraB, as: m.storedType)))
            if let mag = m.magnitude {
                // PEFT strips `.weight` from the magnitude's key (LoraModel._get_adapter_state_dict).
                tensors.append((Self.prefix + m.path + ".lora_magnitude_vector", .f32, [m.outFeatures], encode(mag, as: .float32)))
            }
        }
        for (name, t) in savedTensors.sorted(by: { $0.key < $1.key }) { tensors.append((Self.prefix + name, t.dtype, t.shape, t.bytes)) }
        try SafeTensorsWriter.write(url: directory.appendingPathComponent(Self.weightsFile), tensors: tensors, metadata: ["format": "pt"])
    }
}
