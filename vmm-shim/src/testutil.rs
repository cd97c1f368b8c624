//! Helpers the unit tests of several modules share (compiled for tests only).

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;

/// A scripted peer of one connection: a unix socket `name` in a new directory
/// (removed when the returned guard drops), whose first client `serve` answers on a
/// thread; what `serve` returns comes back through the handle.
pub(crate) fn serve_one<T: Send + 'static>(
    name: &str,
    serve: impl FnOnce(UnixStream) -> T + Send + 'static,
) -> (tempfile::TempDir, PathBuf, JoinHandle<T>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let l = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || serve(l.accept().unwrap().0));
    (dir, path, t)
}
