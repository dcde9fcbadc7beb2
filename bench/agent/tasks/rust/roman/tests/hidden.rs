use roman::to_roman;

#[test]
fn small_numbers() {
    assert_eq!(to_roman(1).as_deref(), Some("I"));
    assert_eq!(to_roman(3).as_deref(), Some("III"));
    assert_eq!(to_roman(4).as_deref(), Some("IV"));
    assert_eq!(to_roman(9).as_deref(), Some("IX"));
    assert_eq!(to_roman(14).as_deref(), Some("XIV"));
}

#[test]
fn large_numbers() {
    assert_eq!(to_roman(40).as_deref(), Some("XL"));
    assert_eq!(to_roman(90).as_deref(), Some("XC"));
    assert_eq!(to_roman(400).as_deref(), Some("CD"));
    assert_eq!(to_roman(1994).as_deref(), Some("MCMXCIV"));
    assert_eq!(to_roman(2024).as_deref(), Some("MMXXIV"));
    assert_eq!(to_roman(3999).as_deref(), Some("MMMCMXCIX"));
}

#[test]
fn out_of_range() {
    assert_eq!(to_roman(0), None);
    assert_eq!(to_roman(4000), None);
}
