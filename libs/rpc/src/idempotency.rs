//! Idempotency keys: a retried create (same `request_id`) must get the first result back,
//! and the same `request_id` with different parameters is an error. Services compare
//! this digest of the request to tell the two apart.

use std::collections::HashMap;

/// A digest of everything that defines a request, for idempotency: map entries are
/// sorted so that the same request always hashes the same.
pub fn request_hash(parts: &[&[u8]], maps: &[&HashMap<String, String>]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut feed = |b: &[u8]| {
        ctx.update(&(b.len() as u64).to_le_bytes());
        ctx.update(b);
    };
    for p in parts {
        feed(p);
    }
    for m in maps {
        let mut entries: Vec<_> = m.iter().collect();
        entries.sort();
        feed(&(entries.len() as u64).to_le_bytes());
        for (k, v) in entries {
            feed(k.as_bytes());
            feed(v.as_bytes());
        }
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
