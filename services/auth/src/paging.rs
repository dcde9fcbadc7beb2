//! List paging: page sizes and opaque keyset page tokens.
//!
//! A page token is the sort key of the last item of the previous page, base64url
//! encoded: keyset paging stays correct while rows are added and costs one index seek.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::{AuthError, Result};

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

/// The page size of a request: 0 means the default, values over the maximum are capped,
/// negative values are refused.
pub fn page_size(requested: i32) -> Result<u32> {
    match u32::try_from(requested) {
        Err(_) => Err(AuthError::invalid("page_size", "must not be negative")),
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

/// Encodes the cursor parts (joined with NUL, which no key contains) as a token.
pub fn encode_token(parts: &[&str]) -> String {
    URL_SAFE_NO_PAD.encode(parts.join("\0"))
}

/// Decodes a token made by [`encode_token`] with `n` parts; `None` for an empty token.
pub fn decode_token(token: &str, n: usize) -> Result<Option<Vec<String>>> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || AuthError::invalid("page_token", "is not a token from a previous page");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let parts: Vec<String> = text.split('\0').map(str::to_owned).collect();
    if parts.len() != n {
        return Err(invalid());
    }
    Ok(Some(parts))
}

/// The next page token: set when the query returned one row more than the page size
/// (that row is dropped).
pub fn next_token<T>(rows: &mut Vec<T>, size: u32, key: impl Fn(&T) -> String) -> String {
    let size = size as usize;
    if rows.len() <= size {
        return String::new();
    }
    rows.truncate(size);
    rows.last().map(key).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_tokens() {
        assert_eq!(page_size(0).expect("ok"), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(5000).expect("ok"), MAX_PAGE_SIZE);
        assert!(page_size(-1).is_err());
        let token = encode_token(&["12", "abc"]);
        assert_eq!(
            decode_token(&token, 2).expect("ok"),
            Some(vec!["12".to_owned(), "abc".to_owned()])
        );
        assert!(decode_token("!!", 2).is_err());
        assert!(decode_token(&token, 1).is_err());
        assert_eq!(decode_token("", 2).expect("ok"), None);
    }
}
