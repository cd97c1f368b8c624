//! A qcow2 image from the fuzzer, as stord meets one at import or open: the
//! header parsed on its own, then the file opened read-only (header, L1 and
//! refcount tables checked) and, if it opens, every cluster of the first
//! 64 MiB read and its block status asked, and opened writable (the
//! refcount check and leak repair at open). Nothing may panic, loop or
//! allocate without bound; refusals are errors. Backing files resolve in an
//! empty directory of the fuzzer's own, so none is ever found.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use stord::qcow2::{header::Header, Image, Root};

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("stord-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz directory");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = Header::parse(data, data.len() as u64);
    let path = dir().join("image.img");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(root) = Root::import_dir(dir()) else {
        return;
    };
    if let Ok(img) = Image::open(&path, false, &root) {
        let cs = img.cluster_size();
        let end = img.size().min(64 << 20);
        let mut buf = vec![0u8; cs as usize];
        let mut pos = 0;
        while pos < end {
            let n = cs.min(end - pos) as usize;
            let _ = img.read(pos, &mut buf[..n]);
            let _ = img.status(pos, n as u64);
            pos += cs;
        }
        drop(img);
        if let Ok(w) = Image::open(&path, true, &root) {
            let _ = w.write(0, &[0x5a; 512]);
            let _ = w.zero(0, cs, false, false);
            let _ = w.flush();
        }
    }
});
