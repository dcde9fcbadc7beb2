//! Random secrets and their stored digests.
//!
//! Refresh tokens and API-key secrets are 256-bit random values, so a plain SHA-256
//! digest is enough to store them: nobody can brute-force 2^256 candidates, and unlike a
//! password hash it costs nothing per request. Digests are compared in constant time.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};

/// `bytes` random bytes from the OS generator, base64url without padding (32 bytes give
/// 43 characters).
pub fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The OS generator fails only if the kernel has none; that is not recoverable.
    SystemRandom::new()
        .fill(&mut buf)
        .expect("the operating system's random number generator failed");
    URL_SAFE_NO_PAD.encode(buf)
}

/// Lower-case hex SHA-256 of `secret`.
pub fn digest(secret: &str) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    hash.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Equality that takes the same time wherever the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = random_token(32);
        assert_eq!(a.len(), 43);
        assert_ne!(a, random_token(32));
        assert_eq!(digest("abc").len(), 64);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
