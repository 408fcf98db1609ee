//! The o200k Harmony tokenizer (tiktoken-rs `o200k_harmony`) and its special token ids.
//!
//! Text is always encoded with `encode_ordinary` (special-looking text stays plain text);
//! special tokens are inserted by id. The vocabulary is embedded in tiktoken-rs, so no
//! file or network access is needed.

use sha2::{Digest, Sha256};
use tiktoken_rs::CoreBPE;

/// `<|startoftext|>` (never emitted by the renderer).
pub const STARTOFTEXT: u32 = 199_998;
/// `<|endoftext|>`, the end-of-document token appended by the packer (mask 0, span 0).
pub const EOD: u32 = 199_999;
/// `<|return|>`: ends a trailing assistant `final` message in the training render.
pub const RETURN: u32 = 200_002;
/// `<|constrain|>`.
pub const CONSTRAIN: u32 = 200_003;
/// `<|channel|>`.
pub const CHANNEL: u32 = 200_005;
/// `<|start|>`.
pub const START: u32 = 200_006;
/// `<|end|>`.
pub const END: u32 = 200_007;
/// `<|message|>`.
pub const MESSAGE: u32 = 200_008;
/// `<|call|>`: ends an assistant message that has a recipient.
pub const CALL: u32 = 200_012;
/// Model vocabulary size (ids `0..VOCAB_SIZE`).
pub const VOCAB_SIZE: u32 = 201_088;
/// Number of ordinary (BPE) ranks in o200k_base.
pub const N_ORDINARY: u32 = 199_998;
/// SHA-256 of `o200k_base.tiktoken` as embedded in tiktoken-rs 0.12 (checked by a test that
/// re-serialises the loaded vocabulary, see [`vocabulary_sha256`]).
pub const O200K_BASE_SHA256: &str = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d";

/// The process-wide tokenizer (loaded once, ~0.1 s in release); used for decoding. Encoding
/// goes through [`encode_into`], which uses a per-thread instance.
pub fn bpe() -> &'static CoreBPE {
    tiktoken_rs::o200k_harmony_singleton()
}

thread_local! {
    /// One tokenizer per encoding thread. The regex crates behind tiktoken-rs keep their
    /// scratch space in pools with a lock-free fast path only for the pool's first (owner)
    /// thread; every other thread takes a mutex per regex match. With a shared tokenizer,
    /// rayon workers ran at about two thirds of single-thread `encode_ordinary` speed, so
    /// each thread builds its own (~0.1 s once per thread in release).
    static LOCAL_BPE: CoreBPE = tiktoken_rs::o200k_harmony().expect("embedded o200k_harmony vocabulary");
}

/// Encode plain text with `encode_ordinary` (the calling thread's tokenizer); short fixed
/// header strings come from a table.
pub fn encode(text: &str) -> Vec<u32> {
    let mut out = Vec::new();
    encode_into(text, &mut out);
    out
}

/// Append the encoding of `text` to `out`.
pub fn encode_into(text: &str, out: &mut Vec<u32>) {
    if let Some(ids) = fixed_piece(text) {
        out.extend_from_slice(ids);
    } else if !text.is_empty() {
        LOCAL_BPE.with(|b| out.extend(b.encode_ordinary(text)));
    }
}

/// Header pieces that every message needs; verified against the tokenizer by a unit test.
fn fixed_piece(text: &str) -> Option<&'static [u32]> {
    Some(match text {
        "" => &[],
        "system" => &[17360],
        "user" => &[1428],
        "assistant" => &[173781],
        "developer" => &[77944],
        "analysis" => &[35644],
        "final" => &[17196],
        "commentary" => &[12606, 815],
        _ => return None,
    })
}

/// Decode ids to text; specials are shown as their names, invalid UTF-8 is replaced.
pub fn decode(ids: &[u32]) -> String {
    let mut bytes = Vec::with_capacity(ids.len() * 4);
    for &id in ids {
        match bpe().decode_bytes(&[id]) {
            Ok(b) => bytes.extend_from_slice(&b),
            Err(_) => bytes.extend_from_slice(format!("<|invalid_{id}|>").as_bytes()),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// SHA-256 of the loaded BPE vocabulary serialised in the `.tiktoken` format
/// (`base64(bytes) rank\n` for every ordinary rank). Equals [`O200K_BASE_SHA256`] for the
/// vocabulary shipped with tiktoken-rs 0.12; recorded in dataset manifests.
pub fn vocabulary_sha256() -> String {
    let bpe = bpe();
    let mut h = Sha256::new();
    let mut line = String::with_capacity(64);
    for rank in 0..N_ORDINARY {
        let bytes = bpe.decode_bytes(&[rank]).expect("o200k_base has contiguous ranks");
        line.clear();
        base64_into(&bytes, &mut line);
        line.push(' ');
        line.push_str(&rank.to_string());
        line.push('\n');
        h.update(line.as_bytes());
    }
    vpmoe_ir::hex(&h.finalize())
}

fn base64_into(bytes: &[u8], out: &mut String) {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_pieces_match_tokenizer() {
        for p in ["system", "user", "assistant", "developer", "analysis", "final", "commentary"] {
            assert_eq!(fixed_piece(p).unwrap(), &bpe().encode_ordinary(p)[..], "{p}");
        }
    }

    #[test]
    fn specials() {
        let sp = bpe().encode_with_special_tokens(
            "<|start|><|end|><|message|><|channel|><|return|><|call|><|constrain|><|endoftext|>",
        );
        assert_eq!(sp, vec![START, END, MESSAGE, CHANNEL, RETURN, CALL, CONSTRAIN, EOD]);
        assert_eq!(encode("<|end|>"), vec![27, 91, 419, 91, 29]);
    }

    #[test]
    fn base64_matches_reference() {
        let mut s = String::new();
        base64_into(b"Ma", &mut s);
        assert_eq!(s, "TWE=");
        s.clear();
        base64_into(b"Man", &mut s);
        assert_eq!(s, "TWFu");
        s.clear();
        base64_into(b"M", &mut s);
        assert_eq!(s, "TQ==");
    }

    #[test]
    fn vocabulary_hash_is_the_known_file() {
        assert_eq!(vocabulary_sha256(), O200K_BASE_SHA256);
    }
}
