//! Megatron IndexedDataset interop on a hand-built case: header, dtype codes, pointers and
//! document indices checked byte by byte (the layout Megatron-LM's `_IndexReader` parses:
//! magic, `<Q` version, `<B` dtype, `<Q` N, `<Q` D, int32[N] lengths, int64[N] pointers,
//! int64[D] document indices).

mod common;

use vpmoe_data::indexed::{self, IndexedDataset, IndexedWriter};
use vpmoe_data::reader::Shard;

fn le32(v: i32) -> [u8; 4] {
    v.to_le_bytes()
}
fn le64(v: i64) -> [u8; 8] {
    v.to_le_bytes()
}

#[test]
fn int32_and_uint8_files_are_byte_exact() {
    let dir = common::tmpdir("interop");
    let p = dir.join("x_tokens");
    let seqs: Vec<Vec<i32>> = vec![vec![1, 2, 3], vec![200_006], vec![-1, 199_999]];
    let mut w = IndexedWriter::<i32>::create(&p).unwrap();
    for s in &seqs {
        w.add(s).unwrap();
    }
    let (bin_bytes, idx_bytes) = w.finish().unwrap();
    assert_eq!((bin_bytes, idx_bytes), (24, 34 + 12 * 3 + 8 * 4));

    let mut want = Vec::new();
    want.extend_from_slice(b"MMIDIDX\x00\x00");
    want.extend_from_slice(&1u64.to_le_bytes()); // version
    want.push(4); // int32
    want.extend_from_slice(&3u64.to_le_bytes()); // N
    want.extend_from_slice(&4u64.to_le_bytes()); // D = N + 1
    for l in [3, 1, 2] {
        want.extend_from_slice(&le32(l));
    }
    for ptr in [0, 12, 16] {
        want.extend_from_slice(&le64(ptr));
    }
    for d in [0, 1, 2, 3] {
        want.extend_from_slice(&le64(d));
    }
    assert_eq!(std::fs::read(indexed::idx_path(&p)).unwrap(), want);
    let mut bin = Vec::new();
    for s in &seqs {
        for &v in s {
            bin.extend_from_slice(&le32(v));
        }
    }
    assert_eq!(std::fs::read(indexed::bin_path(&p)).unwrap(), bin);
    assert!(!indexed::tmp_path(&indexed::bin_path(&p)).exists());

    // uint8 sidecar: same lengths and document indices, pointers scaled by itemsize 1.
    let q = dir.join("x_lossmask");
    let mut w = IndexedWriter::<u8>::create(&q).unwrap();
    for s in [vec![0u8, 1, 1], vec![1], vec![0, 0]] {
        w.add(&s).unwrap();
    }
    w.finish().unwrap();
    let idx = std::fs::read(indexed::idx_path(&q)).unwrap();
    assert_eq!(idx[17], 1, "uint8 dtype code");
    assert_eq!(&idx[34..46], &[3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0]);
    assert_eq!(&idx[46..70], &[&le64(0)[..], &le64(3)[..], &le64(4)[..]].concat()[..]);
    assert_eq!(&idx[70..102], &want[70..102]);
    assert_eq!(std::fs::read(indexed::bin_path(&q)).unwrap(), vec![0, 1, 1, 1, 0, 0]);

    // And they read back.
    let ds = IndexedDataset::open(&p).unwrap();
    assert_eq!(ds.dtype_code(), 4);
    assert_eq!(ds.pointers(), &[0, 12, 16]);
    assert_eq!(ds.document_indices(), &[0, 1, 2, 3]);
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(&ds.get::<i32>(i), s);
    }
}

#[test]
fn empty_dataset_layout() {
    let dir = common::tmpdir("interop-empty");
    let p = dir.join("e_tokens");
    IndexedWriter::<i32>::create(&p).unwrap().finish().unwrap();
    let idx = std::fs::read(indexed::idx_path(&p)).unwrap();
    assert_eq!(idx.len(), 34 + 8);
    assert_eq!(&idx[18..26], &0u64.to_le_bytes());
    assert_eq!(&idx[26..34], &1u64.to_le_bytes());
    assert_eq!(IndexedDataset::open(&p).unwrap().len(), 0);
}

#[test]
fn mismatched_sidecars_fail_naming_the_file() {
    let dir = common::tmpdir("interop-mismatch");
    let write = |name: &str, lens: &[usize]| {
        let p = dir.join(name);
        if name.ends_with("tokens") {
            let mut w = IndexedWriter::<i32>::create(&p).unwrap();
            for &l in lens {
                w.add(&vec![7; l]).unwrap();
            }
            w.finish().unwrap();
        } else {
            let mut w = IndexedWriter::<u8>::create(&p).unwrap();
            for &l in lens {
                w.add(&vec![0; l]).unwrap();
            }
            w.finish().unwrap();
        }
    };
    write("a_tokens", &[3, 4]);
    write("a_lossmask", &[3, 5]);
    write("a_span", &[3, 4]);
    let err = format!("{:#}", Shard::open(&dir.join("a_tokens")).unwrap_err());
    assert!(err.contains("a_lossmask") && err.contains("sequence 1"), "{err}");
    write("b_tokens", &[3, 4]);
    write("b_lossmask", &[3, 4]);
    write("b_span", &[3]);
    let err = format!("{:#}", Shard::open(&dir.join("b_tokens")).unwrap_err());
    assert!(err.contains("b_span") && err.contains("1 sequences"), "{err}");
    // Wrong dtype for tokens.
    write("c_lossmask", &[1]);
    write("c_span", &[1]);
    let mut w = IndexedWriter::<u8>::create(&dir.join("c_tokens")).unwrap();
    w.add(&[1]).unwrap();
    w.finish().unwrap();
    let err = format!("{:#}", Shard::open(&dir.join("c_tokens")).unwrap_err());
    assert!(err.contains("c_tokens.idx") && err.contains("int32"), "{err}");
    // Bad magic.
    std::fs::write(dir.join("d_tokens.idx"), b"NOTANIDX\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0")
        .unwrap();
    std::fs::write(dir.join("d_tokens.bin"), b"").unwrap();
    let err = format!("{:#}", IndexedDataset::open(&dir.join("d_tokens")).unwrap_err());
    assert!(err.contains("d_tokens.idx") && err.contains("magic"), "{err}");
}
