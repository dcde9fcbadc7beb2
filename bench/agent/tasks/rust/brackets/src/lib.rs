/// Whether every bracket in `s` (`()`, `[]` and `{}`) is closed by the matching bracket
/// in the right order; other characters are ignored: `is_balanced("{[a](b)}")` is true,
/// `is_balanced("([)]")` and `is_balanced("(")` are false, `is_balanced("")` is true.
pub fn is_balanced(s: &str) -> bool {
    let _ = s;
    unimplemented!("is_balanced is not written yet")
}
