//! Kubernetes resource quantities (`500m`, `16Gi`, `1.5e3`): parsed with the API server's
//! grammar so that a spec holding something else is reported before any object is applied,
//! and converted to whole bytes where the engine takes bytes.

use std::fmt;

/// A string that is not a Kubernetes quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityError(pub String);

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a Kubernetes quantity (a number with an optional suffix: \
             m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei, or an exponent e3)",
            self.0
        )
    }
}

impl std::error::Error for QuantityError {}

/// The value of a quantity, following
/// `<quantity> ::= <signedNumber><suffix>` of `k8s.io/apimachinery/pkg/api/resource`.
pub fn parse(s: &str) -> Result<f64, QuantityError> {
    let bad = || QuantityError(s.to_string());
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1.0, &s[1..]),
        Some(b'-') => (-1.0, &s[1..]),
        _ => (1.0, s),
    };
    // The number: digits, optionally a '.' and more digits; at least one digit in all.
    let number_len = rest
        .bytes()
        .position(|b| !(b.is_ascii_digit() || b == b'.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_len);
    if number.is_empty()
        || number == "."
        || number.bytes().filter(|b| *b == b'.').count() > 1
        || number.len() > 64
    {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let multiplier = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let digits = &exp[1..];
            let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
            if unsigned.is_empty()
                || unsigned.len() > 3
                || !unsigned.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(bad());
            }
            let e: i32 = digits.parse().map_err(|_| bad())?;
            10f64.powi(e)
        }
        _ => return Err(bad()),
    };
    let v = sign * value * multiplier;
    if v.is_finite() { Ok(v) } else { Err(bad()) }
}

/// A quantity of bytes as a whole number: refused when negative, fractional (`1.5` bytes,
/// `100m`) or beyond 2^53 (where f64 stops being exact).
pub fn bytes(s: &str) -> Result<u64, QuantityError> {
    let v = parse(s)?;
    if v < 0.0 || v.fract() != 0.0 || v > 9_007_199_254_740_992.0 {
        return Err(QuantityError(s.to_string()));
    }
    // Exact: a non-negative integer below 2^53.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_with_every_suffix() {
        for (s, want) in [
            ("0", 0.0),
            ("1", 1.0),
            ("500m", 0.5),
            ("1.5", 1.5),
            (".5", 0.5),
            ("2.", 2.0),
            ("+3", 3.0),
            ("-1k", -1000.0),
            ("16Gi", 16.0 * 1024.0 * 1024.0 * 1024.0),
            ("256Mi", 256.0 * 1024.0 * 1024.0),
            ("1Ki", 1024.0),
            ("1M", 1e6),
            ("1e3", 1000.0),
            ("1E-3", 0.001),
            ("2e+2", 200.0),
        ] {
            assert_eq!(parse(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn non_quantities_are_refused_with_the_text_named() {
        for s in [
            "", "lots", "1 Gi", "1gi", "1KB", "Gi", ".", "1.2.3", "--1", "1e", "1e1000", "0x10",
            " 1", "1Gi ",
        ] {
            let e = parse(s).expect_err(s);
            assert!(e.to_string().contains(&format!("{s:?}")), "{e}");
        }
    }

    #[test]
    fn byte_counts_are_whole_and_non_negative() {
        assert_eq!(bytes("64Mi"), Ok(64 << 20));
        assert_eq!(bytes("0"), Ok(0));
        assert_eq!(bytes("1k"), Ok(1000));
        for s in ["-1", "100m", "1.5", "16Ei"] {
            assert!(bytes(s).is_err(), "{s}");
        }
    }
}
