import Foundation

/// The software a training step runs on, as far as it decides the step's memory: whose recipe
/// wraps the model (which tensors exist, in which dtype, when). Every answer of `qlora memory`,
/// `qlora fit`, `qlora claims` and `qlora report` names the stack it is for.
public struct Stack: Sendable, Codable, Equatable {
    /// Whose step: the recipe decides what is kept, where and when.
    public enum Recipe: String, Sendable, Codable, CaseIterable {
        /// transformers + PEFT's `get_peft_model` + bitsandbytes: measured
        /// (Vectors/memory/peaks.json).
        case peft
        /// Unsloth's QLoRA step as its source lays it out (`StepTimeline+Unsloth.swift`): not
        /// measured, Unsloth runs only on CUDA with Triton.
        case unsloth
    }

    public var recipe: Recipe = .peft

    public init(recipe: Recipe = .peft) {
        self.recipe = recipe
    }

    /// What `qlora fit`, `qlora memory` and the claims answer for unless told otherwise.
    public static let `default` = Stack()

    /// The stack in words, for every answer's heading.
    public var description: String {
        switch recipe {
        case .peft: return "recipe peft: transformers 5.x + PEFT get_peft_model + bitsandbytes, SDPA attention, live tensor bytes"
        case .unsloth: return "recipe unsloth: Unsloth's step from its source (not measured)"
        }
    }
}
