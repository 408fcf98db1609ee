//! Reader: packing with document indices, epoch coverage, cursor save/restore exactness,
//! blending ratios.

mod common;

use std::path::Path;

use vpmoe_data::build_synth::{build_synth, BuildOptions};
use vpmoe_data::reader::{check_vocabulary, dataset_tokenizer, Batch, Cursor, Dataset, Reader};
use vpmoe_data::tokenizer::EOD;

const EODI: i32 = EOD as i32;

fn dataset(name: &str, files: usize, rows: usize) -> common::TempDir {
    let dir = common::tmpdir(&format!("{name}-in"));
    common::write_fixture_dir(&dir, files, rows);
    let out = common::tmpdir(&format!("{name}-out"));
    let mut o = BuildOptions::new(vec![dir.to_path_buf()], out.clone());
    o.seq_len = 256;
    o.valid_fraction = "0.25".parse().unwrap();
    build_synth(&o).unwrap();
    out
}

fn check_batch(b: &Batch) {
    let s = b.seq_len;
    assert_eq!(b.tokens.len(), b.micro_batch * s);
    for v in [b.labels.len(), b.loss_mask.len(), b.span.len(), b.doc.len()] {
        assert_eq!(v, b.micro_batch * s);
    }
    for row in 0..b.micro_batch {
        let t = &b.tokens[row * s..(row + 1) * s];
        let l = &b.labels[row * s..(row + 1) * s];
        let m = &b.loss_mask[row * s..(row + 1) * s];
        let sp = &b.span[row * s..(row + 1) * s];
        let d = &b.doc[row * s..(row + 1) * s];
        assert_eq!(&t[1..], &l[..s - 1], "labels are the next tokens");
        assert_eq!(d[0], 0);
        for k in 1..s {
            assert_eq!(d[k], d[k - 1] + i32::from(t[k - 1] == EODI), "doc index at {k}");
        }
        for k in 0..s {
            if t[k] == EODI || l[k] == EODI {
                assert_eq!(m[k], 0, "no loss across a document boundary");
            }
            assert!(sp[k] == 0 || m[k] == 1);
        }
    }
}

#[test]
fn first_epoch_visits_every_document_once() {
    let root = dataset("epoch", 2, 60);
    let ds = Dataset::open(&root).unwrap();
    let seq = 64;
    let mut r = Reader::open(&[(&root, 1.0)], seq, 7).unwrap();
    let mut stream: Vec<i32> = Vec::new();
    while (stream.len() as u64) < ds.n_tokens {
        let b = r.next_batch(3);
        check_batch(&b);
        for row in 0..3 {
            stream.extend_from_slice(&b.tokens[row * seq..(row + 1) * seq]);
        }
    }
    stream.truncate(ds.n_tokens as usize);
    let mut got: Vec<Vec<i32>> = stream.split_inclusive(|&t| t == EODI).map(|d| d.to_vec()).collect();
    let mut want: Vec<Vec<i32>> = ds.shards.iter().flat_map(|s| (0..s.len()).map(|i| s.tokens.get::<i32>(i))).collect();
    assert_eq!(got.len() as u64, ds.n_docs());
    // Shuffled, not in storage order.
    assert_ne!(got, want);
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn masks_follow_the_stored_arrays() {
    let root = dataset("masks", 1, 40);
    let ds = Dataset::open(&root).unwrap();
    // seq_len larger than any document, one row: starts at a document boundary.
    let mut r = Reader::open(&[(&root, 1.0)], 300, 3).unwrap();
    let b = r.next_batch(1);
    check_batch(&b);
    let first_len = b.tokens.iter().position(|&t| t == EODI).unwrap() + 1;
    // Find that document in the dataset and compare its masks.
    let s = &ds.shards[0];
    let i = (0..s.len()).find(|&i| s.tokens.get::<i32>(i) == b.tokens[..first_len]).expect("first document found");
    assert_eq!(s.lossmask.get::<u8>(i), b.loss_mask[..first_len]);
    assert_eq!(s.span.get::<u8>(i), b.span[..first_len]);
    assert!(b.doc[first_len..].iter().all(|&d| d >= 1));
}

#[test]
fn cursor_restores_exactly() {
    let root = dataset("cursor", 2, 50);
    let open = || Reader::open(&[(&root.join("train"), 2.0), (&root.join("valid"), 1.0)], 96, 11).unwrap();
    let mut a = open();
    for _ in 0..5 {
        a.next_batch(2);
    }
    let saved = serde_json::to_string(&a.cursor()).unwrap();
    let cont: Vec<Batch> = (0..40).map(|_| a.next_batch(2)).collect();
    let mut b = open();
    b.restore(serde_json::from_str::<Cursor>(&saved).unwrap()).unwrap();
    let again: Vec<Batch> = (0..40).map(|_| b.next_batch(2)).collect();
    assert_eq!(cont, again);
    for x in &again {
        check_batch(x);
    }
    // Same seed, fresh reader: same data; other seed: different order, and the cursor is refused.
    let mut c = open();
    let mut d = Reader::open(&[(&root.join("train"), 2.0), (&root.join("valid"), 1.0)], 96, 12).unwrap();
    assert_eq!(c.next_batch(2), open().next_batch(2));
    assert_ne!(open().next_batch(4).tokens, d.next_batch(4).tokens);
    let err = d.restore(serde_json::from_str(&saved).unwrap()).unwrap_err();
    assert!(format!("{err}").contains("another data configuration"));
}

/// A data-parallel rank skips the other ranks' micro-batches: what it reads, and where it ends,
/// are what a reader that reads everything sees (across documents, epochs and a blend).
#[test]
fn skipping_a_batch_lands_where_reading_it_does() {
    let root = dataset("skip", 2, 30);
    let open = || Reader::open(&[(&root.join("train"), 2.0), (&root.join("valid"), 1.0)], 80, 5).unwrap();
    let mut all = open();
    let every: Vec<Batch> = (0..60).map(|_| all.next_batch(3)).collect();
    for (world, rank) in [(2, 0), (2, 1), (3, 2)] {
        let mut r = open();
        for (k, want) in every.iter().enumerate() {
            if k % world == rank {
                assert_eq!(&r.next_batch(3), want, "micro-batch {k} at rank {rank} of {world}");
            } else {
                r.skip_batch(3);
            }
        }
        assert_eq!(r.cursor(), all.cursor(), "rank {rank} of {world} ends where the full reader does");
    }
}

#[test]
fn blending_follows_the_weights() {
    let a = dataset("blend-a", 1, 40);
    let b = dataset("blend-b", 1, 30);
    let mut r = Reader::open(&[(&a, 3.0), (&b, 1.0)], 32, 5).unwrap();
    let mut counts = [0u64; 2];
    for i in 0..100 {
        let batch = r.next_batch(4);
        for &s in &batch.source {
            counts[usize::from(s)] += 1;
        }
        let n = (i + 1) as f64 * 4.0;
        assert!((counts[0] as f64 - 0.75 * n).abs() <= 1.0, "{counts:?} after {n}");
    }
    assert_eq!(counts, [300, 100]);
}

#[test]
fn reader_rejects_bad_inputs() {
    let root = dataset("bad", 1, 20);
    let e = Reader::open(&[(&root, 0.0)], 32, 1).err().unwrap();
    assert!(format!("{e}").contains("weight"));
    let missing = Path::new("/nonexistent/x_tokens");
    let e = Reader::open(&[(missing, 1.0)], 32, 1).err().unwrap();
    assert!(format!("{e:#}").contains("/nonexistent/x_tokens.idx"));
}

fn sample_build(name: &str, valid_fraction: &str) -> common::TempDir {
    let out = common::tmpdir(name);
    let mut o = BuildOptions::new(
        vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/synth_sample.parquet")],
        out.clone(),
    );
    o.valid_fraction = valid_fraction.parse().unwrap();
    build_synth(&o).unwrap();
    out
}

#[test]
fn an_empty_split_says_where_its_documents_went() {
    let all_valid = sample_build("all-valid", "1");
    let want = format!(
        "{}/train has no documents: all 9 documents of the build went to valid (--valid-fraction 1); \
         build with a smaller --valid-fraction",
        all_valid.display()
    );
    for p in [all_valid.to_path_buf(), all_valid.join("train")] {
        let e = format!("{:#}", Reader::open(&[(&p, 1.0)], 32, 1).err().unwrap());
        assert!(e.contains(&want), "{e}");
    }
    let all_train = sample_build("all-train", "0");
    let e = format!("{:#}", Reader::open(&[(&all_train.join("valid"), 1.0)], 32, 1).err().unwrap());
    assert!(
        e.contains("/valid has no documents: all 9 documents of the build went to train (--valid-fraction 0)"),
        "{e}"
    );
}

#[test]
fn check_vocabulary_compares_the_manifest_tokenizer_with_the_architecture() {
    let root = sample_build("vocab", "0.2");
    assert_eq!(dataset_tokenizer(&root).unwrap(), Some(("O200kHarmonyTokenizer".to_string(), 201_088)));
    let e = format!("{:#}", check_vocabulary(&root, 512).unwrap_err());
    let want = format!(
        "the dataset {} was built with O200kHarmonyTokenizer (201088 tokens); the architecture has 512",
        root.display()
    );
    assert!(e.contains(&want), "{e}");
    // A split directory and a shard prefix find the same manifest.
    for p in [root.join("train"), root.join("valid/synth_sample_tokens")] {
        assert_eq!(dataset_tokenizer(&p).unwrap(), Some(("O200kHarmonyTokenizer".to_string(), 201_088)));
        assert!(check_vocabulary(&p, 200_000).is_err());
    }
    check_vocabulary(&root, 201_088).unwrap();
    check_vocabulary(&root, 262_144).unwrap();
    // Shards without a manifest record no tokenizer.
    let bare = common::tmpdir("vocab-bare");
    for f in vpmoe_data::reader::shard_files(&root.join("train/synth_sample_tokens")) {
        std::fs::copy(&f, bare.join(f.file_name().unwrap())).unwrap();
    }
    assert_eq!(dataset_tokenizer(&bare).unwrap(), None);
    check_vocabulary(&bare, 512).unwrap();
    // A manifest without the tokenizer's vocabulary size is an error naming it.
    std::fs::write(root.join("manifest.json"), "{\"tokenizer\": {}}").unwrap();
    let e = format!("{:#}", check_vocabulary(&root, 512).unwrap_err());
    assert!(e.contains("manifest.json") && e.contains("tokenizer.vocab_size"), "{e}");
}
