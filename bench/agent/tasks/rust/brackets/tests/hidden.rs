use brackets::is_balanced;

#[test]
fn balanced() {
    assert!(is_balanced(""));
    assert!(is_balanced("()"));
    assert!(is_balanced("{[a](b)}"));
    assert!(is_balanced("fn main() { let v = vec![1, 2]; }"));
    assert!(is_balanced("(((())))[]{}"));
}

#[test]
fn unbalanced() {
    assert!(!is_balanced("("));
    assert!(!is_balanced(")("));
    assert!(!is_balanced("([)]"));
    assert!(!is_balanced("{[}"));
    assert!(!is_balanced("())"));
    assert!(!is_balanced("]"));
}
