import Foundation

/// Typed reads of `JSONSerialization` values for config files, so an error can say what a field
/// holds instead of calling it missing: `lora_alpha is "8" (a string), not a number`.
public enum JSONField {
    /// Whether `v` is a JSON `true`/`false` (Foundation boxes them as NSNumber, objCType "c";
    /// JSON integers come back as "i", "q" or "Q").
    public static func isBoolean(_ v: Any) -> Bool {
        guard let n = v as? NSNumber else { return false }
        return String(cString: n.objCType) == "c"
    }

    /// A JSON number that is a whole number fitting `Int` (`8` or `8.0`); nil for anything else,
    /// booleans included.
    public static func integer(_ v: Any) -> Int? {
        guard v is NSNumber, !isBoolean(v) else { return nil }
        return v as? Int
    }

    /// A JSON number as a Double (finite: JSON has no NaN or infinity); nil for anything else,
    /// booleans included.
    public static func number(_ v: Any) -> Double? {
        guard let n = v as? NSNumber, !isBoolean(v) else { return nil }
        return n.doubleValue
    }

    /// A JSON boolean; nil for anything else (0 and 1 included).
    public static func boolean(_ v: Any) -> Bool? { isBoolean(v) ? (v as? Bool) : nil }

    /// A JSON value as an error message shows it: `"8" (a string)`, `true (a boolean)`, `8.5`,
    /// `a list`, `an object`, `null`.
    public static func describe(_ v: Any) -> String {
        if v is NSNull { return "null" }
        if let b = boolean(v) { return "\(b) (a boolean)" }
        if let n = v as? NSNumber { return n.stringValue }
        if let s = v as? String {
            let shown = s.count > 40 ? String(s.prefix(40)) + "…" : s
            return "\"\(shown)\" (a string)"
        }
        if v is [Any] { return "a list" }
        if v is [String: Any] { return "an object" }
        return "\(type(of: v))"
    }
}
