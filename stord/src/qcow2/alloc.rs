//! Cluster allocation and refcounts, the ordered flush of metadata, and the
//! check (and leak repair) when an image is opened writable. The order and
//! why it is safe are in the module docs of `qcow2`.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;

use super::image::{Image, Meta, L2};
use super::table::{self, Cluster, COPIED};
use super::Qcow2Error;
use crate::sys;

impl Image {
    /// Allocates one host cluster at the end of the file, refcount 1.
    pub(super) fn alloc_cluster(&self, m: &mut Meta) -> Result<u64, Qcow2Error> {
        let host = m.end;
        m.end += self.cs;
        self.set_refcount(m, host, 1)?;
        Ok(host)
    }

    /// The refcount of the host cluster at `host` (0 where no block is).
    pub(super) fn refcount(&self, m: &mut Meta, host: u64) -> Result<u16, Qcow2Error> {
        let per = self.cs / 2;
        let idx = host / self.cs;
        let rb = match m.reftable.get((idx / per) as usize) {
            Some(e) => e & table::OFFSET_MASK,
            None => 0,
        };
        if rb == 0 {
            return Ok(0);
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = m.refblocks.entry(rb) {
            slot.insert((table::read_u16s(&self.file, rb, per as usize)?, false));
        }
        Ok(m.refblocks
            .get(&rb)
            .map_or(0, |r| r.0[(idx % per) as usize]))
    }

    /// Sets the refcount of the host cluster at `host`, allocating its
    /// refcount block if it has none (that block counts itself), and growing
    /// the refcount table first if it does not reach `host` or that block.
    pub(super) fn set_refcount(&self, m: &mut Meta, host: u64, v: u16) -> Result<(), Qcow2Error> {
        let per = self.cs / 2;
        let idx = host / self.cs;
        let ri = (idx / per) as usize;
        if ri >= m.reftable.len() {
            self.grow_reftable(m, ri)?;
        }
        let mut rb = m.reftable[ri] & table::OFFSET_MASK;
        if rb == 0 {
            if (m.end / self.cs / per) as usize >= m.reftable.len() {
                self.grow_reftable(m, ri)?;
            }
            rb = m.end;
            m.end += self.cs;
            m.fresh.insert(rb);
            m.metadata.insert(rb);
            m.refblocks.insert(rb, (vec![0; per as usize], true));
            m.reftable[ri] = rb;
            m.reftable_dirty.insert(ri);
            self.set_refcount(m, rb, 1)?;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = m.refblocks.entry(rb) {
            slot.insert((table::read_u16s(&self.file, rb, per as usize)?, false));
        }
        if let Some((counts, dirty)) = m.refblocks.get_mut(&rb) {
            counts[(idx % per) as usize] = v;
            *dirty = true;
        }
        Ok(())
    }

    /// Grows the refcount table (entry `ri` needed): a table of at least
    /// twice the entries, covering itself and the refcount blocks it needs,
    /// at the end of the file. Order (see the module docs of `qcow2`):
    /// every changed refcount block (the new ones count the new table and
    /// themselves) is written and synced, then the new table whole, synced,
    /// and only then the header names it (one sector, synced); the old
    /// table's clusters are freed at the next flush. A crash before the
    /// header leaks the new table (or nothing: clusters past the old table's
    /// reach have no count), one after it leaks the old table: the check at
    /// open frees either.
    pub(super) fn grow_reftable(&self, m: &mut Meta, ri: usize) -> Result<(), Qcow2Error> {
        let cs = self.cs;
        let (per_block, per_cluster) = (cs / 2, cs / 8);
        let mut want = (m.reftable.len() as u64 * 2).max(ri as u64 + 1);
        let (entries, clusters) = loop {
            let e = want.next_multiple_of(per_cluster);
            let c = e / per_cluster;
            // The file's clusters, the table's, a block per `per_block`
            // of them and a spare for the next allocation.
            let reach = m.end / cs + c + c.div_ceil(per_block) + 2;
            if e * per_block >= reach {
                break (e, c);
            }
            want = e * 2;
        };
        if entries * 8 > super::header::MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::Full);
        }
        let old = (m.reftable_offset, m.reftable.len());
        let at = m.end;
        m.end += clusters * cs;
        m.reftable.resize(entries as usize, 0);
        for i in 0..clusters {
            let c = at + i * cs;
            m.metadata.insert(c);
            self.set_refcount(m, c, 1)?;
        }
        let f = &self.file;
        for (&off, (counts, dirty)) in m.refblocks.iter_mut() {
            if *dirty {
                f.write_all_at(&table::encode_u16s(counts), off)?;
                *dirty = false;
            }
        }
        f.sync_data()?;
        f.write_all_at(&table::encode_u64s(&m.reftable), at)?;
        f.sync_data()?;
        m.reftable_offset = at;
        if let Err(e) = self.write_header(m) {
            // The old header may still be the durable one: keep its table
            // (what was allocated for the new one stays a leak).
            m.reftable_offset = old.0;
            m.reftable.truncate(old.1);
            m.reftable_dirty.retain(|&i| i < old.1);
            return Err(e);
        }
        // Every entry is in the new table, durable.
        m.reftable_dirty.clear();
        for i in 0..(old.1 as u64 * 8).div_ceil(cs) {
            let c = old.0 + i * cs;
            m.metadata.remove(&c);
            m.freed.push(c);
        }
        tracing::info!(image = %self.path.display(), entries, "grew the refcount table");
        Ok(())
    }

    /// The L2 table of guest cluster `gc`, allocated (and named by the L1
    /// table) if it has none; its offset.
    pub(super) fn l2_for_write(&self, m: &mut Meta, gc: u64) -> Result<u64, Qcow2Error> {
        if let Some(off) = self.load_l2(m, gc)? {
            return Ok(off);
        }
        let t = self.alloc_cluster(m)?;
        m.fresh.insert(t);
        m.metadata.insert(t);
        let per = (self.cs / 8) as usize;
        m.l2.insert(
            t,
            L2 {
                entries: vec![0; per],
                dirty: true,
            },
        );
        let l1i = gc as usize / per;
        m.l1[l1i] = t | COPIED;
        m.l1_dirty.insert(l1i);
        Ok(t)
    }

    /// Sets the L2 entry of guest cluster `gc` (in memory; written at flush).
    pub(super) fn set_l2(&self, m: &mut Meta, gc: u64, e: u64) -> Result<(), Qcow2Error> {
        let off = self.l2_for_write(m, gc)?;
        let per = self.cs / 8;
        if let Some(t) = m.l2.get_mut(&off) {
            t.entries[(gc % per) as usize] = e;
            t.dirty = true;
        }
        Ok(())
    }

    /// Flushes once more than `DIRTY_MAX` bytes of tables wait.
    pub(super) fn flush_if_dirty_over(&self) -> Result<(), Qcow2Error> {
        let dirty = {
            let m = self.read_meta();
            (m.l2.values().filter(|t| t.dirty).count()
                + m.refblocks.values().filter(|r| r.1).count()) as u64
                * self.cs
        };
        if dirty > super::image::DIRTY_MAX {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every completed write durable, data and metadata, in the order
    /// of the module docs.
    pub fn flush(&self) -> Result<(), Qcow2Error> {
        let pending = {
            let m = self.read_meta();
            !m.l1_dirty.is_empty()
                || !m.reftable_dirty.is_empty()
                || !m.freed.is_empty()
                || m.refblocks.values().any(|r| r.1)
                || m.l2.values().any(|t| t.dirty)
        };
        if !self.writable || !pending {
            return Ok(self.file.sync_data()?);
        }
        self.flush_locked(&mut self.write_meta())
    }

    /// The flush's metadata phases, the write lock held.
    pub(super) fn flush_locked(&self, m: &mut Meta) -> Result<(), Qcow2Error> {
        let f = &self.file;
        // 1: new tables whole, changed refcounts.
        for (&off, (counts, dirty)) in m.refblocks.iter_mut() {
            if *dirty {
                f.write_all_at(&table::encode_u16s(counts), off)?;
                *dirty = false;
            }
        }
        for &off in &m.fresh {
            if let Some(t) = m.l2.get(&off) {
                f.write_all_at(&table::encode_u64s(&t.entries), off)?;
            }
        }
        f.sync_data()?;
        // 2: the refcount table's new blocks.
        if !m.reftable_dirty.is_empty() {
            for &ri in &m.reftable_dirty {
                let at = m.reftable_offset + ri as u64 * 8;
                f.write_all_at(&m.reftable[ri].to_be_bytes(), at)?;
            }
            f.sync_data()?;
            m.reftable_dirty.clear();
        }
        // 3: L2 entries and the L1 entries of new tables.
        let meta = m;
        for (off, t) in meta.l2.iter_mut() {
            if t.dirty && !meta.fresh.contains(off) {
                f.write_all_at(&table::encode_u64s(&t.entries), *off)?;
            }
            t.dirty = false;
        }
        for &i in &meta.l1_dirty {
            f.write_all_at(&meta.l1[i].to_be_bytes(), meta.l1_offset + i as u64 * 8)?;
        }
        f.sync_data()?;
        meta.l1_dirty.clear();
        meta.fresh.clear();
        // 4: freed clusters: one reference fewer each (clusters that
        // compressed clusters share keep the others'); punched at 0.
        if !meta.freed.is_empty() {
            let freed = std::mem::take(&mut meta.freed);
            for &o in &freed {
                let left = self.refcount(meta, o)?.saturating_sub(1);
                self.set_refcount(meta, o, left)?;
                if left == 0 {
                    let _ = sys::fallocate(f, sys::FALLOC_PUNCH, o, self.cs);
                }
            }
            for (&off, (counts, dirty)) in meta.refblocks.iter_mut() {
                if *dirty {
                    f.write_all_at(&table::encode_u16s(counts), off)?;
                    *dirty = false;
                }
            }
            f.sync_data()?;
        }
        Ok(())
    }

    /// Counts every reference to every host cluster and compares with the
    /// refcounts: a cluster referenced twice (other than by compressed
    /// clusters, which share host clusters) or above its refcount refuses
    /// the open (corrupt); refcounts above the references (leaks a crash
    /// left, see the module docs) are set right and their blocks punched.
    pub(super) fn check_and_repair(&self) -> Result<(), Qcow2Error> {
        let mut m = self.write_meta();
        let cs = self.cs;
        let mut refs: HashMap<u64, u32> = HashMap::new();
        // Host clusters compressed clusters lie in (shared between them).
        let mut shared: HashSet<u64> = HashSet::new();
        let add = |refs: &mut HashMap<u64, u32>, o: u64| *refs.entry(o).or_insert(0) += 1;
        add(&mut refs, 0);
        let tables = [
            (m.l1_offset, m.l1.len() as u64 * 8),
            (m.reftable_offset, m.reftable.len() as u64 * 8),
        ];
        for (off, len) in tables {
            for i in 0..len.div_ceil(cs) {
                add(&mut refs, off + i * cs);
            }
        }
        for &e in &m.reftable {
            if let Some(o) = table::decode_l1(e & !COPIED, cs)? {
                add(&mut refs, o);
            }
        }
        let per = (cs / 8) as usize;
        for &e in &m.l1.clone() {
            let Some(off) = table::decode_l1(e, cs)? else {
                continue;
            };
            add(&mut refs, off);
            for le in table::read_u64s(&self.file, off, per)? {
                match self.checked(&m, le)? {
                    Cluster::Data(o) | Cluster::Zero(Some(o)) => add(&mut refs, o),
                    Cluster::Compressed { off, len } => {
                        for c in table::compressed_clusters(off, len, cs) {
                            add(&mut refs, c);
                            shared.insert(c);
                        }
                    }
                    _ => {}
                }
            }
        }
        if let Some((o, n)) = refs.iter().find(|(o, &n)| n > 1 && !shared.contains(o)) {
            return Err(Qcow2Error::Corrupt(format!(
                "host cluster {o} is referenced {n} times"
            )));
        }
        let rper = cs / 2;
        for &o in refs.keys() {
            let ri = (o / cs / rper) as usize;
            if m.reftable
                .get(ri)
                .is_none_or(|&e| e & table::OFFSET_MASK == 0)
            {
                return Err(Qcow2Error::Corrupt(format!(
                    "host cluster {o} in use has no refcount"
                )));
            }
        }
        let mut leaks = 0u64;
        let reftable = m.reftable.clone();
        for (ri, &e) in reftable.iter().enumerate() {
            let rb = e & table::OFFSET_MASK;
            if rb == 0 {
                continue;
            }
            let mut counts = table::read_u16s(&self.file, rb, rper as usize)?;
            let mut changed = false;
            for (j, c) in counts.iter_mut().enumerate() {
                let host = (ri as u64 * rper + j as u64) * cs;
                let r = refs.get(&host).copied().unwrap_or(0) as u16;
                if *c < r {
                    return Err(Qcow2Error::Corrupt(format!(
                        "host cluster {host} is used but its refcount is {c}"
                    )));
                }
                if *c > r {
                    *c = r;
                    changed = true;
                    leaks += 1;
                    let _ = sys::fallocate(&self.file, sys::FALLOC_PUNCH, host, cs);
                }
            }
            if changed {
                self.file.write_all_at(&table::encode_u16s(&counts), rb)?;
            }
            m.refblocks.insert(rb, (counts, false));
        }
        if leaks > 0 {
            self.file.sync_data()?;
            tracing::warn!(image = %self.path.display(), leaks, "freed clusters a crash had left allocated");
        }
        Ok(())
    }
}
