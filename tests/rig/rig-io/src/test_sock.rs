//! For tests only, of the library and of the binary alike (each declares this module): a
//! Unix socket path in a fresh directory of its own.

use std::path::PathBuf;

/// `name` in a new temporary directory, which is removed when the returned guard drops.
pub fn sock_path(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("rig-io-")
        .tempdir()
        .unwrap();
    let p = dir.path().join(name);
    (dir, p)
}
