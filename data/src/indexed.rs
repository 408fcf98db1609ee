//! Megatron `IndexedDataset` (`.bin` + `.idx`), byte-compatible with Megatron-LM's
//! `IndexedDatasetBuilder` / `MMapIndexedDataset` (MODEL.md §8.1).
//!
//! `.bin`: the elements of every sequence, little-endian, concatenated, no header.
//! `.idx` (little-endian):
//!
//! | offset | size | content |
//! |---|---|---|
//! | 0 | 9 B | magic `MMIDIDX\0\0` |
//! | 9 | u64 | version = 1 |
//! | 17 | u8 | dtype code (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16) |
//! | 18 | u64 | N sequences |
//! | 26 | u64 | D document-index entries (#documents + 1) |
//! | 34 | i32 × N | sequence lengths (elements) |
//! | 34+4N | i64 × N | byte offsets of each sequence in `.bin` |
//! | 34+12N | i64 × D | document indices `[0, …, N]` |
//!
//! vpmoe writes one sequence per document (one conversation), so the document indices are
//! `0, 1, …, N`. Files are written under temporary names and renamed into place by
//! [`IndexedWriter::finish`], so a crash never leaves a complete-looking pair.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;

/// Magic bytes at the start of every `.idx`.
pub const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
/// Header size of `.idx` in bytes.
pub const HEADER_LEN: usize = 34;

/// Element types that can be stored.
pub trait Element: Copy + Default + PartialEq + std::fmt::Debug + Send + Sync + 'static {
    /// Megatron dtype code.
    const CODE: u8;
    /// Size in bytes.
    const SIZE: usize;
    fn write_le(self, out: &mut Vec<u8>);
    fn read_le(b: &[u8]) -> Self;
}

impl Element for u8 {
    const CODE: u8 = 1;
    const SIZE: usize = 1;
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(self);
    }
    fn read_le(b: &[u8]) -> Self {
        b[0]
    }
}

impl Element for i32 {
    const CODE: u8 = 4;
    const SIZE: usize = 4;
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(b: &[u8]) -> Self {
        i32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Element for f32 {
    const CODE: u8 = 7;
    const SIZE: usize = 4;
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Element for u16 {
    const CODE: u8 = 8;
    const SIZE: usize = 2;
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(b: &[u8]) -> Self {
        u16::from_le_bytes([b[0], b[1]])
    }
}

/// Item size of a Megatron dtype code.
pub fn dtype_size(code: u8) -> Option<usize> {
    Some(match code {
        1 | 2 => 1,
        3 | 8 => 2,
        4 | 7 => 4,
        5 | 6 => 8,
        _ => return None,
    })
}

/// `prefix.bin` / `prefix.idx`.
pub fn bin_path(prefix: &Path) -> PathBuf {
    with_suffix(prefix, ".bin")
}
/// `prefix.idx`.
pub fn idx_path(prefix: &Path) -> PathBuf {
    with_suffix(prefix, ".idx")
}
fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}
/// The temporary name a file is written under before it is renamed into place.
pub fn tmp_path(path: &Path) -> PathBuf {
    with_suffix(path, ".tmp")
}

/// Encode a complete `.idx` for the given sequence lengths (one document per sequence).
pub fn encode_index(code: u8, lengths: &[i32]) -> Vec<u8> {
    let size = dtype_size(code).expect("valid dtype code") as i64;
    let n = lengths.len();
    let mut out = Vec::with_capacity(HEADER_LEN + 12 * n + 8 * (n + 1));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&1u64.to_le_bytes());
    out.push(code);
    out.extend_from_slice(&(n as u64).to_le_bytes());
    out.extend_from_slice(&(n as u64 + 1).to_le_bytes());
    for l in lengths {
        out.extend_from_slice(&l.to_le_bytes());
    }
    let mut ptr = 0i64;
    for &l in lengths {
        out.extend_from_slice(&ptr.to_le_bytes());
        ptr += i64::from(l) * size;
    }
    for d in 0..=n as i64 {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out
}

/// Streaming writer of one `IndexedDataset` (one document per `add`).
pub struct IndexedWriter<T: Element> {
    prefix: PathBuf,
    bin: BufWriter<File>,
    lengths: Vec<i32>,
    scratch: Vec<u8>,
    elements: u64,
    _t: std::marker::PhantomData<T>,
}

impl<T: Element> IndexedWriter<T> {
    /// Start writing `prefix.bin`/`prefix.idx` (under temporary names until `finish`).
    pub fn create(prefix: &Path) -> Result<Self> {
        let tmp = tmp_path(&bin_path(prefix));
        let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(IndexedWriter {
            prefix: prefix.to_path_buf(),
            bin: BufWriter::with_capacity(1 << 20, f),
            lengths: Vec::new(),
            scratch: Vec::new(),
            elements: 0,
            _t: std::marker::PhantomData,
        })
    }

    /// Append one sequence (= one document).
    pub fn add(&mut self, items: &[T]) -> Result<()> {
        ensure!(
            items.len() <= i32::MAX as usize,
            "sequence of {} elements is too long for an IndexedDataset",
            items.len()
        );
        self.scratch.clear();
        self.scratch.reserve(items.len() * T::SIZE);
        for &x in items {
            x.write_le(&mut self.scratch);
        }
        self.bin.write_all(&self.scratch).with_context(|| format!("writing {}", bin_path(&self.prefix).display()))?;
        self.lengths.push(items.len() as i32);
        self.elements += items.len() as u64;
        Ok(())
    }

    /// Number of sequences written so far.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Flush `.bin`, write `.idx`, fsync both and rename them into place.
    /// Returns the sizes in bytes of (`.bin`, `.idx`).
    pub fn finish(self) -> Result<(u64, u64)> {
        let bin = bin_path(&self.prefix);
        let idx = idx_path(&self.prefix);
        let f = self.bin.into_inner().map_err(|e| anyhow::anyhow!("flushing {}: {}", bin.display(), e.error()))?;
        f.sync_all()?;
        drop(f);
        // `.bin` first: an `.idx` in place always describes a complete `.bin`.
        std::fs::rename(tmp_path(&bin), &bin).with_context(|| format!("renaming into {}", bin.display()))?;
        let index = encode_index(T::CODE, &self.lengths);
        write_atomic(&idx, &index)?;
        Ok((self.elements * T::SIZE as u64, index.len() as u64))
    }

    /// Remove the temporary files (after an error).
    pub fn abandon(self) {
        let bin = bin_path(&self.prefix);
        drop(self.bin);
        let _ = std::fs::remove_file(tmp_path(&bin));
    }
}

/// Write `bytes` to `path` via a temporary file, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// A memory-mapped, validated `IndexedDataset`.
pub struct IndexedDataset {
    prefix: PathBuf,
    code: u8,
    lengths: Vec<i32>,
    pointers: Vec<i64>,
    doc_index: Vec<i64>,
    bin: Option<Mmap>,
}

impl std::fmt::Debug for IndexedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexedDataset")
            .field("prefix", &self.prefix)
            .field("dtype", &self.code)
            .field("sequences", &self.lengths.len())
            .finish()
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

impl IndexedDataset {
    /// Open `prefix.idx` + `prefix.bin` and check that they are consistent: magic, version,
    /// dtype, file sizes, contiguous pointers, document indices. Errors name the file.
    pub fn open(prefix: &Path) -> Result<Self> {
        let idx = idx_path(prefix);
        let bin = bin_path(prefix);
        let raw = std::fs::read(&idx).with_context(|| format!("reading {}", idx.display()))?;
        let bad = |msg: String| anyhow::anyhow!("{}: {msg}", idx.display());
        if raw.len() < HEADER_LEN {
            return Err(bad(format!("truncated index ({} bytes, header needs {HEADER_LEN})", raw.len())));
        }
        if &raw[..9] != MAGIC {
            return Err(bad("not a Megatron IndexedDataset index (bad magic)".into()));
        }
        let version = u64_at(&raw, 9);
        if version != 1 {
            return Err(bad(format!("unsupported version {version}")));
        }
        let code = raw[17];
        let size = dtype_size(code).ok_or_else(|| bad(format!("unknown dtype code {code}")))?;
        let n = u64_at(&raw, 18) as usize;
        let d = u64_at(&raw, 26) as usize;
        let want = (HEADER_LEN as u128) + 12 * n as u128 + 8 * d as u128;
        if raw.len() as u128 != want && raw.len() as u128 != want + n as u128 {
            return Err(bad(format!("size {} bytes does not match N={n}, D={d} (expected {want})", raw.len())));
        }
        let mut off = HEADER_LEN;
        let lengths: Vec<i32> =
            raw[off..off + 4 * n].chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
        off += 4 * n;
        let pointers: Vec<i64> =
            raw[off..off + 8 * n].chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        off += 8 * n;
        let doc_index: Vec<i64> =
            raw[off..off + 8 * d].chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        let mut expect = 0i64;
        for (i, (&l, &p)) in lengths.iter().zip(&pointers).enumerate() {
            if l < 0 {
                return Err(bad(format!("sequence {i} has negative length {l}")));
            }
            if p != expect {
                return Err(bad(format!("sequence {i} pointer {p} is not contiguous (expected {expect})")));
            }
            expect += i64::from(l) * size as i64;
        }
        if d == 0 || doc_index[0] != 0 || doc_index[d - 1] != n as i64 {
            return Err(bad("document index must start at 0 and end at N".into()));
        }
        if doc_index.windows(2).any(|w| w[1] < w[0]) {
            return Err(bad("document index is not non-decreasing".into()));
        }
        let bin_len = std::fs::metadata(&bin).with_context(|| format!("reading {}", bin.display()))?.len();
        if bin_len != expect as u64 {
            bail!(
                "{}: {} bytes, but {} says the sequences take {} bytes (truncated or mismatched pair)",
                bin.display(),
                bin_len,
                idx.display(),
                expect
            );
        }
        let map = if bin_len == 0 {
            None
        } else {
            let f = File::open(&bin).with_context(|| format!("opening {}", bin.display()))?;
            // SAFETY: the file is opened read-only; datasets are immutable once renamed into
            // place (writers only ever create new files under temporary names).
            Some(unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", bin.display()))?)
        };
        Ok(IndexedDataset { prefix: prefix.to_path_buf(), code, lengths, pointers, doc_index, bin: map })
    }

    pub fn prefix(&self) -> &Path {
        &self.prefix
    }
    /// Megatron dtype code.
    pub fn dtype_code(&self) -> u8 {
        self.code
    }
    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }
    pub fn lengths(&self) -> &[i32] {
        &self.lengths
    }
    pub fn pointers(&self) -> &[i64] {
        &self.pointers
    }
    pub fn document_indices(&self) -> &[i64] {
        &self.doc_index
    }
    /// Total number of elements.
    pub fn total_elements(&self) -> u64 {
        self.lengths.iter().map(|&l| l as u64).sum()
    }

    /// Raw bytes of sequence `i`, elements `[start, start+count)`.
    pub fn bytes(&self, i: usize, start: usize, count: usize) -> &[u8] {
        let size = dtype_size(self.code).unwrap();
        assert!(start + count <= self.lengths[i] as usize, "read past sequence {i}");
        if count == 0 {
            return &[];
        }
        let p = self.pointers[i] as usize + start * size;
        &self.bin.as_ref().expect("non-empty")[p..p + count * size]
    }

    /// Append elements `[start, start+count)` of sequence `i` to `out`.
    pub fn read_into<T: Element>(&self, i: usize, start: usize, count: usize, out: &mut Vec<T>) {
        assert_eq!(T::CODE, self.code, "dtype mismatch for {}", self.prefix.display());
        out.extend(self.bytes(i, start, count).chunks_exact(T::SIZE).map(T::read_le));
    }

    /// Sequence `i` as a vector.
    pub fn get<T: Element>(&self, i: usize) -> Vec<T> {
        let mut v = Vec::with_capacity(self.lengths[i] as usize);
        self.read_into(i, 0, self.lengths[i] as usize, &mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_layout() {
        let b = encode_index(4, &[3, 1]);
        assert_eq!(b.len(), 34 + 12 * 2 + 8 * 3);
        assert_eq!(&b[..9], MAGIC);
        assert_eq!(b[17], 4);
        assert_eq!(u64_at(&b, 18), 2);
        assert_eq!(u64_at(&b, 26), 3);
        assert_eq!(&b[34..42], &[3, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(u64_at(&b, 42), 0);
        assert_eq!(u64_at(&b, 50), 12);
        assert_eq!((u64_at(&b, 58), u64_at(&b, 66), u64_at(&b, 74)), (0, 1, 2));
    }
}
