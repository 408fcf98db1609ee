//! Teacher scoring against a served GPT-OSS-120B (DISTILL.md stage 2A, DATA.md §4):
//! [`wire`] — request bodies and strict response parsing for vLLM and SGLang; [`client`] —
//! the HTTP client with timeouts and retries; [`score`] — the resumable `teacher score`
//! command that writes a scored dataset.
pub mod client;
pub mod score;
pub mod wire;
