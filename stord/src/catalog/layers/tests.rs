//! Unit tests of layered disks in the catalog (qemu-img judges the files in
//! `integration-tests/tests/stord_qcow2.rs`).

use super::*;
use crate::catalog::Catalog;

fn read(c: &Catalog, name: &str, off: u64, len: usize) -> Vec<u8> {
    c.get(name).unwrap().read(off, len).unwrap()
}

#[test]
fn import_clone_snapshot_revert_flatten_delete() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("golden.raw");
    std::fs::write(&src, vec![0x5au8; 3 << 20]).unwrap();
    let state = dir.path().join("state");
    let c = Catalog::open(&state, &[]).unwrap();
    c.import("golden", &src, Some(Format::Raw)).unwrap();
    assert!(matches!(
        c.import("golden", &src, None),
        Err(CatalogError::Exists(_))
    ));
    c.create("rw", 1 << 20, Alloc::Dynamic, false).unwrap();
    assert!(matches!(
        c.clone_disk("rw", "x"),
        Err(CatalogError::Refused(_))
    ));
    c.clone_disk("golden", "vm").unwrap();
    let vm = c.get("vm").unwrap();
    assert_eq!(vm.format(), Format::Qcow2);
    assert_eq!(vm.size(), 3 << 20);
    vm.write(4096, &[1; 4096], true).unwrap();
    assert_eq!(read(&c, "vm", 0, 4096), vec![0x5a; 4096]);
    assert_eq!(read(&c, "vm", 4096, 4096), vec![1; 4096]);
    drop(vm);
    let e = c.delete("golden").unwrap_err();
    assert!(e.to_string().contains("vm"), "{e}");

    c.snapshot("vm", "vm-s1").unwrap();
    c.get("vm").unwrap().write(4096, &[2; 4096], false).unwrap();
    assert_eq!(read(&c, "vm", 4096, 4096), vec![2; 4096]);
    assert_eq!(read(&c, "vm-s1", 4096, 4096), vec![1; 4096]);
    let snaps = c.snapshots("vm").unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].name, "vm-s1");
    let att = c.attach("vm").unwrap();
    assert!(matches!(
        c.revert("vm", "vm-s1"),
        Err(CatalogError::Busy { .. })
    ));
    drop(att);
    assert!(matches!(
        c.revert("vm", "golden"),
        Err(CatalogError::Refused(_))
    ));
    c.revert("vm", "vm-s1").unwrap();
    assert_eq!(read(&c, "vm", 4096, 4096), vec![1; 4096]);
    let l = c.list();
    let vm = l.iter().find(|d| d.name == "vm").unwrap();
    assert_eq!(vm.chain, ["vm-s1", "golden"]);
    drop(c);

    // The layering survives a restart.
    let c = Catalog::open(&state, &[]).unwrap();
    assert_eq!(read(&c, "vm", 4096, 8), vec![1; 8]);
    c.flatten("vm").unwrap();
    assert!(c
        .list()
        .iter()
        .find(|d| d.name == "vm")
        .unwrap()
        .chain
        .is_empty());
    assert_eq!(read(&c, "vm", 0, 8), vec![0x5a; 8]);
    assert_eq!(read(&c, "vm", 4096, 8), vec![1; 8]);
    c.delete("vm-s1").unwrap();
    c.delete("golden").unwrap();
}

#[test]
fn a_configured_clone_is_made_once() {
    let dir = tempfile::tempdir().unwrap();
    let conf = |name: &str, base: Option<&str>, ro: bool| crate::config::DiskConfig {
        name: name.into(),
        size: crate::config::Size(if base.is_some() { 0 } else { 1 << 20 }),
        alloc: Alloc::Dynamic,
        read_only: ro,
        allow: None,
        base: base.map(Into::into),
    };
    let cfg = [conf("vm", Some("base"), false), conf("base", None, true)];
    let c = Catalog::open(dir.path(), &cfg).unwrap();
    c.get("vm").unwrap().write(0, b"hello", true).unwrap();
    drop(c);
    let c = Catalog::open(dir.path(), &cfg).unwrap();
    assert_eq!(read(&c, "vm", 0, 5), b"hello");
    assert_eq!(c.list()[1].base.as_deref(), Some("base"));
}
