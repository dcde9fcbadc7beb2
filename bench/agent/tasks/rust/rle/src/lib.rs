/// Run-length encodes `s`: each run of one character becomes the run's length followed by
/// the character, the length left out when it is 1: `encode("aaabcc")` is `"3ab2c"`,
/// `encode("")` is `""`. The input never contains digits.
pub fn encode(s: &str) -> String {
    let _ = s;
    unimplemented!("encode is not written yet")
}

/// The inverse of `encode`: `decode("3ab2c")` is `"aaabcc"`; a count may have several
/// digits (`decode("12x")` is twelve `x`).
pub fn decode(s: &str) -> String {
    let _ = s;
    unimplemented!("decode is not written yet")
}
