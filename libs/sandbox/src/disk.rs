//! Workspace disk use, measured like `du`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes allocated under `root` (st_blocks, so sparse files count what they use), not
/// following symlinks and not crossing into other filesystems.
pub(crate) fn usage(root: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(root) else {
        return 0;
    };
    let dev = meta.dev();
    let mut total = meta.blocks() * 512;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.dev() != dev {
                continue;
            }
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}
