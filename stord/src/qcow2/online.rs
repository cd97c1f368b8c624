//! Changes to a served image's header while clients use it: growing the
//! virtual size (`qemu-img resize`'s grow), and copying the backing chain
//! into the image, then dropping the backing file from its header (online
//! flatten, as QEMU's `block-stream`).
//!
//! # Order, and why a crash at any point is safe
//!
//! The header is rewritten in one write of less than 512 bytes (one sector)
//! and synced; what it names is durable before it:
//!
//! - Grow within the L1 table: the new size is the only change.
//! - Grow past the L1 table: the new, larger table is written at the end
//!   of the file and its clusters' refcounts are made durable (a flush)
//!   before the header names it; the old table's clusters are freed after.
//!   A crash in between leaks the new table or the old one, which the check
//!   at open frees (`alloc.rs`).
//! - Flatten: every cluster this image does not hold and the chain holds
//!   data for is copied in, as a write of the whole cluster would be (under
//!   the write lock, only if still unallocated: a guest write to the cluster
//!   meanwhile wins); a flush makes them durable before the header drops
//!   the backing name. Unallocated clusters left read zeroes in the chain
//!   too, so the image reads the same before and after. From then on the
//!   backing layer is not read (`Image::backing`), and a write that
//!   allocates copies nothing from it.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use super::header::{Header, MAX_L1_BYTES, MAX_VIRTUAL_SIZE};
use super::image::{Image, Meta, Run};
use super::table::{Cluster, COPIED};
use super::Qcow2Error;

impl Image {
    /// The header as it stands (size, L1 table, backing).
    fn header_now(&self, m: &Meta) -> Header {
        let detached = self.detached.load(Ordering::Acquire);
        Header {
            size: self.size(),
            l1_size: m.l1.len() as u32,
            l1_offset: m.l1_offset,
            reftable_offset: m.reftable_offset,
            reftable_clusters: (m.reftable.len() as u64 * 8).div_ceil(self.cs) as u32,
            backing: self.hdr.backing.clone().filter(|_| !detached),
            backing_format: self.hdr.backing_format.clone().filter(|_| !detached),
            ..self.hdr.clone()
        }
    }

    /// Writes the header as it stands and syncs it.
    pub(super) fn write_header(&self, m: &Meta) -> Result<(), Qcow2Error> {
        let b = self.header_now(m).emit();
        if b.len() > 512 {
            return Err(Qcow2Error::BadHeader(
                "the header does not fit one sector".into(),
            ));
        }
        self.file.write_all_at(&b, 0)?;
        Ok(self.file.sync_data()?)
    }

    /// Grows the virtual size to `new` bytes (see the module docs); a
    /// smaller size is refused.
    pub fn grow(&self, new: u64) -> Result<(), Qcow2Error> {
        if !self.writable {
            return Err(Qcow2Error::ReadOnly);
        }
        if new < self.size() {
            return Err(Qcow2Error::Unsupported(
                "shrinking a qcow2 image (only growing is supported)".into(),
            ));
        }
        let per = self.cs / 8;
        let need = new.div_ceil(self.cs * per);
        if new > MAX_VIRTUAL_SIZE || need * 8 > MAX_L1_BYTES {
            return Err(Qcow2Error::BadHeader(format!(
                "a virtual size of {new} bytes needs an L1 table above {MAX_L1_BYTES} bytes"
            )));
        }
        let mut m = self.write_meta();
        self.flush_locked(&mut m)?;
        let old_size = self.size();
        if need as usize <= m.l1.len() {
            self.size.store(new, Ordering::Release);
            return self
                .write_header(&m)
                .inspect_err(|_| self.size.store(old_size, Ordering::Release));
        }
        // The new table, contiguous at the end of the file: the range is
        // taken first, so refcount blocks its counts need go after it.
        let clusters = (need * 8).div_ceil(self.cs);
        let at = m.end;
        m.end += clusters * self.cs;
        for i in 0..clusters {
            let c = at + i * self.cs;
            self.set_refcount(&mut m, c, 1)?;
            m.metadata.insert(c);
        }
        let mut l1 = m.l1.clone();
        l1.resize(need as usize, 0);
        self.file
            .write_all_at(&super::table::encode_u64s(&l1), at)?;
        self.flush_locked(&mut m)?;
        let old = (m.l1_offset, (m.l1.len() as u64 * 8).div_ceil(self.cs));
        let old_len = m.l1.len();
        m.l1 = l1;
        m.l1_offset = at;
        self.size.store(new, Ordering::Release);
        if let Err(e) = self.write_header(&m) {
            // The old header may still be the durable one: keep serving
            // what it names (the new table stays allocated: a leak).
            self.size.store(old_size, Ordering::Release);
            m.l1.truncate(old_len);
            m.l1_offset = old.0;
            return Err(e);
        }
        for i in 0..old.1 {
            let c = old.0 + i * self.cs;
            m.metadata.remove(&c);
            m.freed.push(c);
        }
        self.flush_locked(&mut m)
    }

    /// Copies into this image every cluster the chain holds data for and
    /// this image does not (see the module docs); the chain is still named
    /// in the header until [`Image::detach`].
    pub fn stream(&self) -> Result<(), Qcow2Error> {
        if !self.writable {
            return Err(Qcow2Error::ReadOnly);
        }
        let Some(b) = self.backing() else {
            return Ok(());
        };
        let cs = self.cs;
        let end = b.size().min(self.size());
        let mut buf = vec![0u8; cs as usize];
        for gc in 0..end.div_ceil(cs) {
            if self.lookup(gc)? != Cluster::Unallocated {
                continue;
            }
            let n = cs.min(end - gc * cs);
            if b.status(gc * cs, n)? == (n, Run::Zero) {
                continue;
            }
            {
                let mut m = self.write_meta();
                let l2 = self.load_l2(&mut m, gc)?;
                let e = l2.map_or(0, |o| m.l2[&o].entries[(gc % (cs / 8)) as usize]);
                if self.checked(&m, e)? != Cluster::Unallocated {
                    continue; // a guest write allocated it meanwhile
                }
                b.read(gc * cs, &mut buf)?;
                if buf.iter().all(|&x| x == 0) {
                    continue;
                }
                let host = self.alloc_cluster(&mut m)?;
                self.file.write_all_at(&buf, host)?;
                self.set_l2(&mut m, gc, host | COPIED)?;
            }
            self.flush_if_dirty_over()?;
        }
        Ok(())
    }

    /// After [`Image::stream`]: makes every copied cluster durable, then
    /// drops the backing file from the header; the backing is not read
    /// from then on.
    pub fn detach(&self) -> Result<(), Qcow2Error> {
        if !self.writable {
            return Err(Qcow2Error::ReadOnly);
        }
        let mut m = self.write_meta();
        self.flush_locked(&mut m)?;
        self.detached.store(true, Ordering::Release);
        self.write_header(&m).inspect_err(|_| {
            self.detached.store(false, Ordering::Release);
        })
    }
}
