//! Key/value caches of the attention layers, per sequence slot. K is stored after its QK-norm and
//! GRAPE rotation and V after the value-residual mix, exactly as attention reads them, so no
//! position is ever recomputed. ALiBi and sinks need nothing cached; the value residual mixes a
//! token's V with the first layer's V of the *same* token, which the step computes anyway.
//!
//! - Window layers keep a ring of the last `W` positions per slot: memory and the cost of a
//!   step do not grow with the context.
//! - Global layers keep every position in fixed-size blocks from one pool shared by all slots
//!   (one block table per slot, used by every global layer), so sequences of any lengths share
//!   the pool without fragmentation; a finished sequence's blocks return to the pool at once.

use anyhow::{bail, Result};
use vpmoe_ir::reference::KvStore;

/// Positions per block of the global layers' pool (the kernels' `KV_BLOCK`).
pub const BLOCK: usize = vpmoe_codegen::consts::KV_BLOCK as usize;

/// The global layers' block pool: which blocks hold each slot's positions, and the free ones.
/// One table per slot serves every global layer.
pub struct Blocks {
    /// Per slot: its blocks, in position order.
    tables: Vec<Vec<usize>>,
    free: Vec<usize>,
    max_len: usize,
    /// Whether any layer is paged (else nothing is allocated).
    paged: bool,
}

impl Blocks {
    /// Room for `slots` sequences of up to `max_len` positions each.
    pub fn new(slots: usize, max_len: usize, paged: bool) -> Blocks {
        let blocks = slots * max_len.div_ceil(BLOCK);
        Blocks {
            tables: vec![Vec::new(); slots],
            free: if paged { (0..blocks).rev().collect() } else { Vec::new() },
            max_len,
            paged,
        }
    }

    pub fn slots(&self) -> usize {
        self.tables.len()
    }

    /// Whether any layer is paged (slots hold blocks).
    pub fn paged(&self) -> bool {
        self.paged
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.slots() * self.per_slot()
    }

    /// The most blocks a slot holds: its row of a block table.
    pub fn per_slot(&self) -> usize {
        self.max_len.div_ceil(BLOCK)
    }

    /// Makes room in `slot` for positions `..len`.
    pub fn reserve(&mut self, slot: usize, len: usize) -> Result<()> {
        if len > self.max_len {
            bail!("position {} is past the context of {} tokens", len - 1, self.max_len);
        }
        while self.paged && self.tables[slot].len() * BLOCK < len {
            let Some(b) = self.free.pop() else { bail!("the key/value block pool is exhausted") };
            self.tables[slot].push(b);
        }
        Ok(())
    }

    /// Returns `slot`'s blocks to the pool (its sequence finished).
    pub fn release(&mut self, slot: usize) {
        let t = std::mem::take(&mut self.tables[slot]);
        self.free.extend(t.into_iter().rev());
    }

    /// Blocks not held by any slot.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// `slot`'s blocks in position order.
    pub fn table(&self, slot: usize) -> &[usize] {
        &self.tables[slot]
    }
}

enum Layer {
    /// `k`, `v`: `[slots][window][width]`.
    Ring { window: usize, k: Vec<f32>, v: Vec<f32> },
    /// `k`, `v`: `[blocks][BLOCK][width]`.
    Paged { k: Vec<f32>, v: Vec<f32> },
}

/// The caches of every attention layer for `slots` sequences of up to `max_len` positions.
pub struct KvCache {
    /// Floats per position and layer: groups × head_dim.
    width: usize,
    layers: Vec<Layer>,
    blocks: Blocks,
}

impl KvCache {
    /// `windows[i]` is layer `i`'s window (None: a global layer).
    pub fn new(windows: &[Option<usize>], width: usize, slots: usize, max_len: usize) -> KvCache {
        let blocks = Blocks::new(slots, max_len, windows.iter().any(Option::is_none));
        let layers = windows
            .iter()
            .map(|w| match *w {
                Some(window) => {
                    let n = slots * window.min(max_len) * width;
                    Layer::Ring { window: window.min(max_len), k: vec![0.0; n], v: vec![0.0; n] }
                }
                None => {
                    let n = blocks.total() * BLOCK * width;
                    Layer::Paged { k: vec![0.0; n], v: vec![0.0; n] }
                }
            })
            .collect();
        KvCache { width, layers, blocks }
    }

    pub fn slots(&self) -> usize {
        self.blocks.slots()
    }

    /// Makes room in `slot` for positions `..len` (blocks for the global layers).
    pub fn reserve(&mut self, slot: usize, len: usize) -> Result<()> {
        self.blocks.reserve(slot, len)
    }

    /// Returns `slot`'s blocks to the pool (its sequence finished).
    pub fn release(&mut self, slot: usize) {
        self.blocks.release(slot)
    }

    /// Blocks in the pool not held by any slot.
    pub fn free_blocks(&self) -> usize {
        self.blocks.free_blocks()
    }

    fn offset(&self, layer: usize, slot: usize, pos: usize) -> usize {
        match &self.layers[layer] {
            Layer::Ring { window, .. } => (slot * window + pos % window) * self.width,
            Layer::Paged { .. } => (self.blocks.table(slot)[pos / BLOCK] * BLOCK + pos % BLOCK) * self.width,
        }
    }
}

impl KvStore for KvCache {
    /// Stores position `pos` of `slot` (reserved) in `layer`.
    fn write(&mut self, layer: usize, slot: usize, pos: usize, k: &[f32], v: &[f32]) {
        let o = self.offset(layer, slot, pos);
        let w = self.width;
        let (kc, vc) = match &mut self.layers[layer] {
            Layer::Ring { k, v, .. } | Layer::Paged { k, v } => (k, v),
        };
        kc[o..o + w].copy_from_slice(k);
        vc[o..o + w].copy_from_slice(v);
    }

    /// Key and value of position `pos` of `slot` in `layer` (written, and still inside a ring's
    /// window).
    fn read(&self, layer: usize, slot: usize, pos: usize) -> (&[f32], &[f32]) {
        let o = self.offset(layer, slot, pos);
        let (k, v) = match &self.layers[layer] {
            Layer::Ring { k, v, .. } | Layer::Paged { k, v } => (k, v),
        };
        (&k[o..o + self.width], &v[o..o + self.width])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_keep_the_window_and_pages_return_to_the_pool() {
        let mut c = KvCache::new(&[Some(3), None], 2, 2, 40);
        let total = c.free_blocks();
        assert_eq!(total, 2 * 40usize.div_ceil(BLOCK));
        for pos in 0..20 {
            for slot in 0..2 {
                c.reserve(slot, pos + 1).unwrap();
                let x = [(slot * 100 + pos) as f32; 2];
                c.write(0, slot, pos, &x, &x);
                c.write(1, slot, pos, &x, &x);
            }
        }
        for slot in 0..2 {
            for pos in 17..20 {
                assert_eq!(c.read(0, slot, pos).0[0], (slot * 100 + pos) as f32, "ring");
            }
            for pos in 0..20 {
                assert_eq!(c.read(1, slot, pos).1[1], (slot * 100 + pos) as f32, "pages");
            }
        }
        assert_eq!(c.free_blocks(), total - 4);
        c.release(0);
        assert_eq!(c.free_blocks(), total - 2);
        assert!(c.reserve(1, 41).is_err(), "past the context");
    }
}
