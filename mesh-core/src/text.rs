//! String comparisons for the per-call path that never pass `bcmp` an empty slice.
//!
//! An empty `String`, `Box<str>` or literal points at a dangling address (1), and glibc's AVX-512 `bcmp`
//! compares short slices with masked loads, even at length zero. On AMD Zen 4 a masked load whose address
//! would fault takes a microcode assist: about 100 ns per comparison, measured on the benchmark machine, where
//! a non-empty one takes 2 ns. A catch-all route's empty prefix met that on every call (BENCHMARKS.md, issue
//! 18: "An empty string costs 100 ns"). These return the same answers as `==`, `starts_with` and `ends_with`.

/// `a == b`.
#[inline]
pub fn eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && (a.is_empty() || a.as_bytes() == b.as_bytes())
}

/// `s.starts_with(prefix)`.
#[inline]
pub fn starts_with(s: &str, prefix: &str) -> bool {
    prefix.is_empty() || s.as_bytes().starts_with(prefix.as_bytes())
}

/// `s.ends_with(suffix)`.
#[inline]
pub fn ends_with(s: &str, suffix: &str) -> bool {
    suffix.is_empty() || s.as_bytes().ends_with(suffix.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn they_answer_as_the_standard_comparisons() {
        let words = ["", "/", "/a", "/a/b", "/ab", "b", "a/b"];
        for a in words {
            for b in words {
                assert_eq!(eq(a, b), a == b, "eq({a:?}, {b:?})");
                assert_eq!(starts_with(a, b), a.starts_with(b), "starts_with({a:?}, {b:?})");
                assert_eq!(ends_with(a, b), a.ends_with(b), "ends_with({a:?}, {b:?})");
            }
        }
        assert!(eq(String::new().as_str(), &Box::<str>::from("")));
    }
}
