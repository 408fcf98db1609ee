//! Training reader: memory-mapped datasets, GPT-style packing into `seq_len + 1`-token windows
//! with per-token document indices (D5), seeded per-epoch shuffling, an exactly restorable
//! cursor, and weighted blending of several datasets.
//!
//! ```no_run
//! use vpmoe_data::reader::Reader;
//! let mut r = Reader::open(&[("data/synth/train", 0.7), ("data/rescored/train", 0.3)], 2048, 1234)?;
//! let batch = r.next_batch(4); // tokens/labels/loss_mask/span/doc, each [4 * 2048], t = b*S + s
//! let saved = serde_json::to_string(&r.cursor())?; // store in the checkpoint
//! r.restore(serde_json::from_str(&saved)?)?;        // continue exactly where it was
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! **Packing.** Each dataset is an endless stream: epoch e visits every document once, in an
//! order given by a seeded bijection of `[0, n_docs)` (a Feistel network keyed by seed, dataset
//! index and epoch; no per-document memory). Documents are concatenated and cut into windows of
//! `S + 1` tokens, consecutive windows sharing one token (Megatron GPTDataset style), crossing
//! document and epoch boundaries. `tokens = w[0..S]`, `labels = w[1..S+1]`,
//! `loss_mask`/`span` = the stored (already label-aligned, D7) arrays at `w[0..S]`, and
//! `doc[s]` = index (0, 1, …) of the document that `tokens[s]` belongs to within its row, so that
//! attention is restricted to `doc[i] == doc[j]`. Positions whose label lies in another document
//! (an EOD) already carry loss mask 0.
//!
//! **Blending.** Sample i of the blend comes from the dataset d that maximises
//! `w_d·(i+1) − count_d` (Megatron BlendedDataset rule; ties → lowest index), so the realised
//! ratios track the weights exactly and deterministically.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::indexed::{self, IndexedDataset};

/// The arrays of one shard, checked against each other: tokens, loss mask, span and, for a
/// teacher-scored dataset, the `teacher_logp` sidecar (float32, label-aligned like the mask).
#[derive(Debug)]
pub struct Shard {
    pub tokens: IndexedDataset,
    pub lossmask: IndexedDataset,
    pub span: IndexedDataset,
    pub teacher_logp: Option<IndexedDataset>,
}

/// Check that a sidecar has the tokens' sequence count, lengths (times `per_token`) and
/// document indices.
pub fn check_sidecar(side: &IndexedDataset, tokens: &IndexedDataset, per_token: usize) -> Result<()> {
    let name = side.prefix().display();
    ensure!(
        side.len() == tokens.len(),
        "{name}: {} sequences but {} has {}",
        side.len(),
        tokens.prefix().display(),
        tokens.len()
    );
    if let Some(i) = (0..tokens.len()).find(|&i| side.lengths()[i] as usize != tokens.lengths()[i] as usize * per_token)
    {
        bail!(
            "{name}: sequence {i} has {} elements but {} has {} tokens{}",
            side.lengths()[i],
            tokens.prefix().display(),
            tokens.lengths()[i],
            if per_token == 1 { String::new() } else { format!(" (× {per_token} expected)") }
        );
    }
    ensure!(
        side.document_indices() == tokens.document_indices(),
        "{name}: document indices differ from {}",
        tokens.prefix().display()
    );
    Ok(())
}

impl Shard {
    /// Open `{base}_tokens`, `{base}_lossmask`, `{base}_span` given the tokens prefix
    /// (`…/shard_tokens`, with or without `.idx`/`.bin`).
    pub fn open(tokens_prefix: &Path) -> Result<Shard> {
        let s = tokens_prefix.to_string_lossy();
        let s = s.strip_suffix(".idx").or_else(|| s.strip_suffix(".bin")).unwrap_or(&s);
        let Some(base) = s.strip_suffix("_tokens") else {
            bail!("{s}: a dataset prefix must end in _tokens");
        };
        let tokens = IndexedDataset::open(Path::new(&format!("{base}_tokens")))?;
        let lossmask = IndexedDataset::open(Path::new(&format!("{base}_lossmask")))?;
        let span = IndexedDataset::open(Path::new(&format!("{base}_span")))?;
        for (ds, code, what) in [(&tokens, 4, "int32"), (&lossmask, 1, "uint8"), (&span, 1, "uint8")] {
            ensure!(
                ds.dtype_code() == code,
                "{}.idx: dtype code {} but {what} (code {code}) is required",
                ds.prefix().display(),
                ds.dtype_code()
            );
        }
        for side in [&lossmask, &span] {
            check_sidecar(side, &tokens, 1)?;
        }
        let tl = PathBuf::from(format!("{base}_teacher_logp"));
        let teacher_logp = if indexed::idx_path(&tl).exists() {
            let side = IndexedDataset::open(&tl)?;
            ensure!(
                side.dtype_code() == 7,
                "{}.idx: dtype code {} but float32 (code 7) is required",
                side.prefix().display(),
                side.dtype_code()
            );
            check_sidecar(&side, &tokens, 1)?;
            Some(side)
        } else {
            None
        };
        Ok(Shard { tokens, lossmask, span, teacher_logp })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// All shards of one dataset, addressed by a global document number.
#[derive(Debug)]
pub struct Dataset {
    pub path: PathBuf,
    pub shards: Vec<Shard>,
    /// Cumulative document counts: shard k holds documents `starts[k]..starts[k+1]`.
    starts: Vec<u64>,
    pub n_tokens: u64,
}

/// The `…_tokens` prefixes a path designates: a prefix itself, a split directory, or a dataset
/// root with `manifest.json` (its `train` split). Shards of a split come from the manifest when
/// there is one, else from the `*_tokens.idx` files in file-name order.
pub fn resolve_prefixes(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let (root, split) = if path.join("manifest.json").is_file() {
        (path.to_path_buf(), "train".to_string())
    } else {
        let split = path.file_name().and_then(|s| s.to_str()).unwrap_or("").to_string();
        (path.parent().map(Path::to_path_buf).unwrap_or_default(), split)
    };
    let manifest = root.join("manifest.json");
    if manifest.is_file() {
        let v = read_manifest(&manifest)?;
        let shards = v["splits"][&split]["shards"]
            .as_array()
            .with_context(|| format!("{}: no split {split:?}", manifest.display()))?;
        return shards
            .iter()
            .map(|s| {
                let rel = s["paths"]["tokens_idx"]
                    .as_str()
                    .with_context(|| format!("{}: shard without paths.tokens_idx", manifest.display()))?;
                Ok(root.join(rel.strip_suffix(".idx").unwrap_or(rel)))
            })
            .collect();
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
        let p = e?.path();
        if let Some(name) = p.file_name().and_then(|s| s.to_str()) {
            if let Some(base) = name.strip_suffix("_tokens.idx") {
                out.push(path.join(format!("{base}_tokens")));
            }
        }
    }
    out.sort();
    ensure!(!out.is_empty(), "{}: no *_tokens.idx datasets", path.display());
    Ok(out)
}

/// The build manifest of the dataset a path designates (a root, one of its split directories or
/// a shard prefix in one), if it has one.
fn manifest_of(path: &Path) -> Option<PathBuf> {
    let root = if path.join("manifest.json").is_file() {
        path
    } else if path.is_dir() {
        path.parent()?
    } else {
        path.parent()?.parent()?
    };
    Some(root.join("manifest.json")).filter(|m| m.is_file())
}

fn read_manifest(manifest: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(manifest).with_context(|| format!("reading {}", manifest.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", manifest.display()))
}

/// The error for a dataset without tokens: where a build's split is empty because the split
/// rule sent every document to the other one, it says so and what to change.
fn empty_dataset(path: &Path) -> anyhow::Error {
    let plain = anyhow::anyhow!("{}: dataset has no tokens", path.display());
    let (root, split) = if path.join("manifest.json").is_file() {
        (path, "train")
    } else if path.is_dir() {
        match (path.parent(), path.file_name().and_then(|s| s.to_str())) {
            (Some(root), Some(split)) => (root, split),
            _ => return plain,
        }
    } else {
        return plain;
    };
    let Ok(m) = read_manifest(&root.join("manifest.json")) else {
        return plain;
    };
    let (other, change) = match split {
        "train" => ("valid", "smaller"),
        "valid" => ("train", "larger"),
        _ => return plain,
    };
    match (m["splits"][other]["rows"].as_u64(), m["config"]["valid_fraction"].as_str()) {
        (Some(n), Some(f)) if n > 0 => anyhow::anyhow!(
            "{}/{split} has no documents: all {n} documents of the build went to {other} (--valid-fraction {f}); \
             build with a {change} --valid-fraction",
            root.display()
        ),
        _ => plain,
    }
}

/// The tokenizer a dataset was built with, as its manifest records it: its name (the
/// manifest's `tokenizer.type`) and vocabulary size. `path` is anything [`Reader::open`]
/// takes; shards without a manifest record none (`None`).
pub fn dataset_tokenizer(path: &Path) -> Result<Option<(String, u64)>> {
    let Some(manifest) = manifest_of(path) else {
        return Ok(None);
    };
    let m = read_manifest(&manifest)?;
    let t = &m["tokenizer"];
    let size = t["vocab_size"].as_u64().with_context(|| format!("{}: no tokenizer.vocab_size", manifest.display()))?;
    Ok(Some((t["type"].as_str().unwrap_or("an unnamed tokenizer").to_string(), size)))
}

/// Refuse a dataset whose token ids may lie outside an architecture's vocabulary of `vocab`
/// ids: its manifest's tokenizer has more. Checked before training, so the mismatch is
/// reported as such instead of as an out-of-range token at the first step. Shards without a
/// manifest pass (nothing is recorded to check).
pub fn check_vocabulary(path: &Path, vocab: u64) -> Result<()> {
    if let Some((name, size)) = dataset_tokenizer(path)? {
        ensure!(
            size <= vocab,
            "the dataset {} was built with {name} ({size} tokens); the architecture has {vocab}",
            path.display()
        );
    }
    Ok(())
}

impl Dataset {
    /// Open every shard the path designates (see [`resolve_prefixes`]).
    pub fn open(path: &Path) -> Result<Dataset> {
        let prefixes = resolve_prefixes(path)?;
        let mut shards = Vec::with_capacity(prefixes.len());
        for p in &prefixes {
            shards.push(Shard::open(p)?);
        }
        if let Some(i) = shards.iter().position(|s| s.teacher_logp.is_some() != shards[0].teacher_logp.is_some()) {
            bail!(
                "{}: shard {} {} a teacher_logp sidecar but {} {} (a dataset is scored whole or not at all)",
                path.display(),
                shards[i].tokens.prefix().display(),
                if shards[i].teacher_logp.is_some() { "has" } else { "lacks" },
                shards[0].tokens.prefix().display(),
                if shards[0].teacher_logp.is_some() { "does not" } else { "does" },
            );
        }
        let mut starts = vec![0u64];
        let mut n_tokens = 0;
        for s in &shards {
            starts.push(starts.last().unwrap() + s.len() as u64);
            n_tokens += s.tokens.total_elements();
        }
        Ok(Dataset { path: path.to_path_buf(), shards, starts, n_tokens })
    }

    /// Whether the dataset carries teacher log-probabilities.
    pub fn has_teacher(&self) -> bool {
        self.shards.first().is_some_and(|s| s.teacher_logp.is_some())
    }

    /// Number of documents.
    pub fn n_docs(&self) -> u64 {
        *self.starts.last().unwrap()
    }

    /// (shard, local index) of a global document number.
    pub fn locate(&self, doc: u64) -> (usize, usize) {
        let k = self.starts.partition_point(|&s| s <= doc) - 1;
        (k, (doc - self.starts[k]) as usize)
    }

    pub fn doc_len(&self, doc: u64) -> usize {
        let (k, i) = self.locate(doc);
        self.shards[k].tokens.lengths()[i] as usize
    }
}

use vpmoe_ir::rng::splitmix64;

/// A seeded bijection of `[0, n)` (4-round Feistel network with cycle walking).
#[derive(Debug, Clone)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl Permutation {
    pub fn new(n: u64, seed: u64) -> Self {
        let mut half_bits = 1;
        while half_bits < 32 && (1u64 << (2 * half_bits)) < n {
            half_bits += 1;
        }
        let mut keys = [0u64; 4];
        let mut s = seed;
        for k in &mut keys {
            s = splitmix64(s);
            *k = s;
        }
        Permutation { n, half_bits, keys }
    }

    fn round_trip(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            let f = splitmix64(r ^ k) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << self.half_bits) | r
    }

    /// The image of `i < n`.
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let mut x = self.round_trip(i);
        while x >= self.n {
            x = self.round_trip(x);
        }
        x
    }
}

/// Position of one dataset stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StreamPos {
    pub epoch: u64,
    /// Position in the epoch's document order.
    pub doc_pos: u64,
    /// Token offset inside that document where the next window starts.
    pub offset: u64,
    /// Windows taken from this dataset so far.
    pub samples: u64,
}

/// Serialisable reader state; [`Reader::restore`] continues exactly where it was saved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub version: u32,
    pub seq_len: usize,
    pub seed: u64,
    /// Identity of the datasets and weights this cursor belongs to.
    pub fingerprint: String,
    pub samples: u64,
    pub streams: Vec<StreamPos>,
}

/// One micro-batch, batch-major (`t = b * seq_len + s`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    pub micro_batch: usize,
    pub seq_len: usize,
    /// Input ids `w[0..S]` per row.
    pub tokens: Vec<i32>,
    /// Next-token labels `w[1..S+1]` per row.
    pub labels: Vec<i32>,
    /// Loss mask of each position's label (D7).
    pub loss_mask: Vec<u8>,
    /// Span id of each position's label (0 ignore, 1 analysis, 2 final).
    pub span: Vec<u8>,
    /// Document index within the row of each input token (attend only within equal values).
    pub doc: Vec<i32>,
    /// Teacher `log p(label | context)` of each position (D7 alignment); 0 where the row's
    /// dataset has no teacher sidecar or the loss mask is 0.
    pub teacher_logp: Vec<f32>,
    /// 1 where `teacher_logp` holds a teacher value (row from a scored dataset, loss mask 1).
    pub teacher: Vec<u8>,
    /// Which dataset each row came from.
    pub source: Vec<u16>,
}

struct Stream {
    ds: Dataset,
    seed: u64,
    index: u64,
    pos: StreamPos,
    perm: Permutation,
    perm_epoch: u64,
}

impl Stream {
    fn perm_for(&mut self, epoch: u64) -> &Permutation {
        if self.perm_epoch != epoch {
            let s = splitmix64(self.seed ^ splitmix64(self.index ^ splitmix64(epoch)));
            self.perm = Permutation::new(self.ds.n_docs(), s);
            self.perm_epoch = epoch;
        }
        &self.perm
    }

    /// Skip to a position that is inside a document (crossing documents and epochs).
    fn normalise(&mut self) -> u64 {
        loop {
            let epoch = self.pos.epoch;
            let doc_pos = self.pos.doc_pos;
            let doc = self.perm_for(epoch).apply(doc_pos);
            if (self.pos.offset as usize) < self.ds.doc_len(doc) {
                return doc;
            }
            self.pos.offset = 0;
            self.pos.doc_pos += 1;
            if self.pos.doc_pos == self.ds.n_docs() {
                self.pos.doc_pos = 0;
                self.pos.epoch += 1;
            }
        }
    }

    /// Advance past one row as [`Stream::take_window`] does, reading only document lengths.
    fn skip_window(&mut self, seq_len: usize) {
        let mut taken = 0;
        while taken < seq_len {
            let doc = self.normalise();
            let n = (self.ds.doc_len(doc) - self.pos.offset as usize).min(seq_len - taken);
            taken += n;
            self.pos.offset += n as u64;
        }
        self.normalise();
        self.pos.samples += 1;
    }

    /// Append one `seq_len`-position row to the batch.
    fn take_window(&mut self, seq_len: usize, b: &mut Batch) {
        let mut toks: Vec<i32> = Vec::with_capacity(seq_len + 1);
        let mut doc_no = 0i32;
        let mut first = true;
        while toks.len() < seq_len {
            let doc = self.normalise();
            if !first && self.pos.offset == 0 {
                doc_no += 1;
            }
            first = false;
            let len = self.ds.doc_len(doc);
            let off = self.pos.offset as usize;
            let n = (len - off).min(seq_len - toks.len());
            let (k, i) = self.ds.locate(doc);
            let sh = &self.ds.shards[k];
            sh.tokens.read_into(i, off, n, &mut toks);
            sh.lossmask.read_into(i, off, n, &mut b.loss_mask);
            sh.span.read_into(i, off, n, &mut b.span);
            let at = b.teacher.len();
            match &sh.teacher_logp {
                Some(tl) => {
                    tl.read_into(i, off, n, &mut b.teacher_logp);
                    b.teacher.extend_from_slice(&b.loss_mask[at..at + n]);
                }
                None => {
                    b.teacher_logp.extend(std::iter::repeat_n(0.0, n));
                    b.teacher.extend(std::iter::repeat_n(0, n));
                }
            }
            b.doc.extend(std::iter::repeat_n(doc_no, n));
            self.pos.offset += n as u64;
        }
        // The label of the last position: the next token, which starts the next window.
        let doc = self.normalise();
        let (k, i) = self.ds.locate(doc);
        self.ds.shards[k].tokens.read_into(i, self.pos.offset as usize, 1, &mut toks);
        b.tokens.extend_from_slice(&toks[..seq_len]);
        b.labels.extend_from_slice(&toks[1..]);
        self.pos.samples += 1;
    }
}

/// Packs, shuffles and blends datasets into training micro-batches.
pub struct Reader {
    seq_len: usize,
    seed: u64,
    weights: Vec<f64>,
    streams: Vec<Stream>,
    samples: u64,
    fingerprint: String,
}

impl Reader {
    /// Open datasets with blending weights (need not sum to 1). Each path is a dataset root
    /// (its `train` split), a split directory or a `…_tokens` prefix.
    pub fn open<P: AsRef<Path>>(sources: &[(P, f64)], seq_len: usize, seed: u64) -> Result<Reader> {
        ensure!(!sources.is_empty(), "no datasets given");
        ensure!(seq_len >= 1, "seq_len must be positive");
        let total: f64 = sources.iter().map(|s| s.1).sum();
        let mut streams = Vec::new();
        let mut fp = format!("seq_len={seq_len};seed={seed}");
        for (i, (p, w)) in sources.iter().enumerate() {
            let p = p.as_ref();
            ensure!(w.is_finite() && *w > 0.0, "{}: weight must be positive, got {w}", p.display());
            let ds = Dataset::open(p)?;
            if ds.n_tokens == 0 {
                return Err(empty_dataset(p));
            }
            fp.push_str(&format!(";{}:{}docs:{}tok:w{}", i, ds.n_docs(), ds.n_tokens, w / total));
            let perm = Permutation::new(ds.n_docs(), 0);
            let mut s = Stream { ds, seed, index: i as u64, pos: StreamPos::default(), perm, perm_epoch: u64::MAX };
            s.perm_for(0);
            streams.push(s);
        }
        let fingerprint = vpmoe_ir::hex(&{
            use sha2::Digest;
            sha2::Sha256::digest(fp.as_bytes())
        })[..16]
            .to_string();
        Ok(Reader {
            seq_len,
            seed,
            weights: sources.iter().map(|s| s.1 / total).collect(),
            streams,
            samples: 0,
            fingerprint,
        })
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Datasets in blend order.
    pub fn datasets(&self) -> impl Iterator<Item = &Dataset> {
        self.streams.iter().map(|s| &s.ds)
    }

    fn pick(&self) -> usize {
        let i = self.samples as f64;
        let mut best = 0;
        let mut best_err = f64::NEG_INFINITY;
        for (d, s) in self.streams.iter().enumerate() {
            let err = self.weights[d] * (i + 1.0) - s.pos.samples as f64;
            if err > best_err {
                best = d;
                best_err = err;
            }
        }
        best
    }

    /// The next micro-batch of `micro_batch` rows.
    pub fn next_batch(&mut self, micro_batch: usize) -> Batch {
        let n = micro_batch * self.seq_len;
        let mut b = Batch {
            micro_batch,
            seq_len: self.seq_len,
            tokens: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
            loss_mask: Vec::with_capacity(n),
            span: Vec::with_capacity(n),
            doc: Vec::with_capacity(n),
            teacher_logp: Vec::with_capacity(n),
            teacher: Vec::with_capacity(n),
            source: Vec::with_capacity(micro_batch),
        };
        for _ in 0..micro_batch {
            let d = self.pick();
            self.streams[d].take_window(self.seq_len, &mut b);
            b.source.push(d as u16);
            self.samples += 1;
        }
        b
    }

    /// Moves past the next micro-batch of `micro_batch` rows without reading it: the position
    /// afterwards is [`Reader::next_batch`]'s (a data-parallel rank skips the other ranks' rows).
    pub fn skip_batch(&mut self, micro_batch: usize) {
        for _ in 0..micro_batch {
            let d = self.pick();
            self.streams[d].skip_window(self.seq_len);
            self.samples += 1;
        }
    }

    /// The current position (save it with a checkpoint).
    pub fn cursor(&self) -> Cursor {
        Cursor {
            version: 1,
            seq_len: self.seq_len,
            seed: self.seed,
            fingerprint: self.fingerprint.clone(),
            samples: self.samples,
            streams: self.streams.iter().map(|s| s.pos).collect(),
        }
    }

    /// Continue from a saved cursor. Refuses a cursor of other datasets, weights, seed or
    /// sequence length.
    pub fn restore(&mut self, c: Cursor) -> Result<()> {
        ensure!(c.version == 1, "unsupported cursor version {}", c.version);
        ensure!(
            c.seq_len == self.seq_len && c.seed == self.seed && c.fingerprint == self.fingerprint,
            "cursor belongs to another data configuration (seq_len {}, seed {}, fingerprint {}; this reader: {}, {}, {})",
            c.seq_len,
            c.seed,
            c.fingerprint,
            self.seq_len,
            self.seed,
            self.fingerprint
        );
        ensure!(c.streams.len() == self.streams.len(), "cursor has a different number of datasets");
        for (s, p) in self.streams.iter().zip(&c.streams) {
            ensure!(
                p.doc_pos < s.ds.n_docs(),
                "cursor position {} is past the {} documents of {}",
                p.doc_pos,
                s.ds.n_docs(),
                s.ds.path.display()
            );
        }
        for (s, p) in self.streams.iter_mut().zip(c.streams) {
            s.pos = p;
        }
        self.samples = c.samples;
        Ok(())
    }
}

/// Paths of the six files of a shard given its tokens prefix (used by tools and tests).
/// Sidecars (`_docs.jsonl`, `_teacher_*`) are not included.
pub fn shard_files(tokens_prefix: &Path) -> Vec<PathBuf> {
    let s = tokens_prefix.to_string_lossy();
    let base = s.strip_suffix("_tokens").unwrap_or(&s).to_string();
    let mut v = Vec::new();
    for k in ["tokens", "lossmask", "span"] {
        let p = PathBuf::from(format!("{base}_{k}"));
        v.push(indexed::bin_path(&p));
        v.push(indexed::idx_path(&p));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1u64, 2, 3, 7, 100, 1000, 4097] {
            let p = Permutation::new(n, 42);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = p.apply(i);
                assert!(j < n && !seen[j as usize]);
                seen[j as usize] = true;
            }
        }
        let a: Vec<u64> = (0..50).map(|i| Permutation::new(50, 1).apply(i)).collect();
        let b: Vec<u64> = (0..50).map(|i| Permutation::new(50, 2).apply(i)).collect();
        assert_ne!(a, b);
    }
}
