use rle::{decode, encode};

#[test]
fn encodes_runs() {
    assert_eq!(encode(""), "");
    assert_eq!(encode("a"), "a");
    assert_eq!(encode("aaabcc"), "3ab2c");
    assert_eq!(encode("abc"), "abc");
    assert_eq!(encode("zzzzzzzzzzzz"), "12z");
    assert_eq!(encode("  hh"), "2 2h");
}

#[test]
fn decodes_runs() {
    assert_eq!(decode(""), "");
    assert_eq!(decode("3ab2c"), "aaabcc");
    assert_eq!(decode("12x"), "xxxxxxxxxxxx");
    assert_eq!(decode("abc"), "abc");
}

#[test]
fn round_trip() {
    for s in ["WWWWWWWWWWWWBWWWWWWWWWWWWBBBWWWWWWWWWWWWWWWWWWWWWWWWB", "ab", "aabbbcccc"] {
        assert_eq!(decode(&encode(s)), s);
    }
}
