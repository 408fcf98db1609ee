//! Request bodies and strict response parsing for teacher scoring (DATA.md §4).
//!
//! * vLLM: `POST /v1/completions` with token-id prompts and `prompt_logprobs` (Option A);
//!   `prompt_logprobs[0]` is null, entry t is a dict keyed by token-id strings that always
//!   contains the prompt token, plus the top-k.
//! * SGLang: `POST /generate` with `input_ids`, `return_logprob`, `logprob_start_len: 0`;
//!   `meta_info.input_token_logprobs[t] = [logprob, id, text]` (null logprob at t = 0) and
//!   `input_top_logprobs[t]` = k such triples.
//!
//! Both servers clamp −inf to −9999.0; it is read back as −inf. NaN, positive or missing
//! log-probabilities, a wrong echo of the prompt ids, a missing prompt token or a wrong number
//! of entries are errors. Several prompts may share one request; answers are matched to
//! prompts by index.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};

/// The serving engine's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// vLLM's OpenAI-compatible `/v1/completions` with `prompt_logprobs`.
    Vllm,
    /// SGLang's native `/generate`.
    Sglang,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Vllm => "vllm",
            Api::Sglang => "sglang",
        }
    }

    /// The scoring endpoint.
    pub fn endpoint(self) -> &'static str {
        match self {
            Api::Vllm => "/v1/completions",
            Api::Sglang => "/generate",
        }
    }
}

/// The clamped value both servers send for −inf.
pub const CLAMPED_NEG_INF: f64 = -9999.0;

/// Token-aligned teacher scores of one prompt of n ids: `logp[t] = log p(ids[t] | ids[..t])`
/// for t ≥ 1 (`logp[0]` = 0, unused); `topk_*[t·k..(t+1)·k]` the k best candidates at
/// position t, best first (row 0: id −1, logp 0).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scores {
    pub logp: Vec<f32>,
    pub topk_ids: Vec<i32>,
    pub topk_logp: Vec<f32>,
}

/// The JSON body that scores `prompts` with `top_k` candidates per position.
pub fn request_body(api: Api, model: &str, prompts: &[&[i32]], top_k: usize) -> Value {
    match api {
        Api::Vllm => json!({
            "model": model,
            "prompt": if prompts.len() == 1 { json!(prompts[0]) } else { json!(prompts) },
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": top_k,
            "return_token_ids": true,
            "skip_special_tokens": false,
        }),
        Api::Sglang => json!({
            "input_ids": if prompts.len() == 1 { json!(prompts[0]) } else { json!(prompts) },
            "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, "skip_special_tokens": false},
            "return_logprob": true,
            "logprob_start_len": 0,
            "top_logprobs_num": top_k,
            "token_ids_logprob": null,
            "return_text_in_logprobs": false,
        }),
    }
}

/// Parse a log-probability: a finite number ≤ 0, or the clamped −9999 (→ −inf).
fn logprob(v: &Value, what: &dyn Fn() -> String) -> Result<f32> {
    let Some(x) = v.as_f64() else {
        bail!("{}: log-probability {v} is not a number", what());
    };
    if x == CLAMPED_NEG_INF {
        return Ok(f32::NEG_INFINITY);
    }
    ensure!(x.is_finite(), "{}: log-probability {x} is not finite", what());
    ensure!(x <= 0.0, "{}: log-probability {x} is positive", what());
    Ok(x as f32)
}

fn token_id(v: &Value, vocab: usize, what: &dyn Fn() -> String) -> Result<i32> {
    match v.as_i64() {
        Some(id) if (0..vocab as i64).contains(&id) => Ok(id as i32),
        _ => bail!("{}: token id {v} is not in [0, {vocab})", what()),
    }
}

/// Keep the best `k` (logprob descending, then id) of `cands` into the top-k rows of `s`.
fn push_topk(s: &mut Scores, mut cands: Vec<(i32, f32)>, k: usize) {
    cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    for &(id, lp) in cands.iter().take(k) {
        s.topk_ids.push(id);
        s.topk_logp.push(lp);
    }
}

/// Parse a response body for `prompts`. Errors say which prompt (by position in the request)
/// and which position failed.
pub fn parse_response(api: Api, body: &[u8], prompts: &[&[i32]], top_k: usize, vocab: usize) -> Result<Vec<Scores>> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        let hint = if text.contains("NaN") || String::from_utf8_lossy(body).contains("NaN") {
            " (it contains NaN, which is neither valid JSON nor a log-probability)"
        } else {
            ""
        };
        anyhow::anyhow!("response is not valid JSON{hint}: {e}; starts with {text:?}")
    })?;
    match api {
        Api::Vllm => parse_vllm(&v, prompts, top_k, vocab),
        Api::Sglang => parse_sglang(&v, prompts, top_k, vocab),
    }
}

fn parse_vllm(v: &Value, prompts: &[&[i32]], k: usize, vocab: usize) -> Result<Vec<Scores>> {
    let choices = v["choices"].as_array().context("response has no \"choices\" array")?;
    ensure!(choices.len() == prompts.len(), "{} choices for {} prompts", choices.len(), prompts.len());
    let mut out: Vec<Option<Scores>> = vec![None; prompts.len()];
    for (ci, c) in choices.iter().enumerate() {
        let p = c["index"].as_u64().map(|i| i as usize).unwrap_or(ci);
        ensure!(p < prompts.len() && out[p].is_none(), "choice {ci} has an invalid or repeated index {}", c["index"]);
        let ids = prompts[p];
        let n = ids.len();
        let where_ = |t: usize| format!("prompt {p} position {t}");
        let echo = c["prompt_token_ids"]
            .as_array()
            .with_context(|| format!("prompt {p}: no prompt_token_ids echo (the request sets return_token_ids)"))?;
        ensure!(echo.len() == n, "prompt {p}: the server echoed {} prompt ids, {n} were sent", echo.len());
        if let Some(t) = (0..n).find(|&t| echo[t].as_i64() != Some(i64::from(ids[t]))) {
            bail!("prompt {p}: echoed prompt id at position {t} is {} but {} was sent", echo[t], ids[t]);
        }
        let lps = c["prompt_logprobs"].as_array().with_context(|| format!("prompt {p}: no prompt_logprobs array"))?;
        ensure!(lps.len() == n, "prompt {p}: {} prompt_logprobs entries for {n} prompt tokens", lps.len());
        ensure!(n == 0 || lps[0].is_null(), "prompt {p}: prompt_logprobs[0] must be null");
        let mut s = Scores { logp: vec![0.0; n], ..Default::default() };
        s.topk_ids.resize(k.min(n * k), -1);
        s.topk_logp.resize(k.min(n * k), 0.0);
        for t in 1..n {
            let obj: &Map<String, Value> =
                lps[t].as_object().with_context(|| format!("{}: entry is not an object", where_(t)))?;
            let mut cands = Vec::with_capacity(obj.len());
            for (key, e) in obj {
                let id: i64 =
                    key.parse().map_err(|_| anyhow::anyhow!("{}: key {key:?} is not a token id", where_(t)))?;
                let id = token_id(&json!(id), vocab, &|| where_(t))?;
                cands.push((id, logprob(&e["logprob"], &|| format!("{} token {id}", where_(t)))?));
            }
            let actual = cands.iter().find(|c| c.0 == ids[t]).with_context(|| {
                format!("{}: the prompt token {} is not among the {} returned entries", where_(t), ids[t], obj.len())
            })?;
            s.logp[t] = actual.1;
            let ok = if k == 0 { obj.len() == 1 } else { obj.len() == k || obj.len() == k + 1 };
            ensure!(ok, "{}: {} entries, expected {} (top-{k} plus the prompt token)", where_(t), obj.len(), k.max(1));
            if k > 0 {
                let before = s.topk_ids.len();
                push_topk(&mut s, cands, k);
                ensure!(s.topk_ids.len() - before == k, "{}: fewer than {k} candidates", where_(t));
            }
        }
        out[p] = Some(s);
    }
    Ok(out.into_iter().map(|s| s.expect("every index filled")).collect())
}

fn parse_sglang(v: &Value, prompts: &[&[i32]], k: usize, vocab: usize) -> Result<Vec<Scores>> {
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Object(_) if prompts.len() == 1 => vec![v],
        _ => bail!("response is neither an object nor an array of objects"),
    };
    ensure!(items.len() == prompts.len(), "{} results for {} prompts", items.len(), prompts.len());
    let mut out = Vec::with_capacity(prompts.len());
    for (p, (item, ids)) in items.iter().zip(prompts).enumerate() {
        let n = ids.len();
        let where_ = |t: usize| format!("prompt {p} position {t}");
        let meta = item.get("meta_info").with_context(|| format!("prompt {p}: no meta_info"))?;
        if let Some(pt) = meta.get("prompt_tokens").and_then(Value::as_u64) {
            ensure!(pt as usize == n, "prompt {p}: server counted {pt} prompt tokens, {n} were sent");
        }
        let tl = meta["input_token_logprobs"].as_array().with_context(|| {
            format!("prompt {p}: no meta_info.input_token_logprobs (return_logprob, logprob_start_len 0)")
        })?;
        ensure!(tl.len() == n, "prompt {p}: {} input_token_logprobs entries for {n} prompt tokens", tl.len());
        let mut s = Scores { logp: vec![0.0; n], ..Default::default() };
        for (t, e) in tl.iter().enumerate() {
            let tri = e
                .as_array()
                .filter(|a| a.len() >= 2)
                .with_context(|| format!("{}: entry is not a triple", where_(t)))?;
            let id = token_id(&tri[1], vocab, &|| where_(t))?;
            ensure!(id == ids[t], "prompt {p}: echoed prompt id at position {t} is {id} but {} was sent", ids[t]);
            if t == 0 {
                ensure!(tri[0].is_null(), "{}: the first entry's log-probability must be null", where_(t));
            } else {
                s.logp[t] = logprob(&tri[0], &|| where_(t))?;
            }
        }
        if k > 0 {
            let top = meta["input_top_logprobs"]
                .as_array()
                .with_context(|| format!("prompt {p}: no meta_info.input_top_logprobs (top_logprobs_num {k})"))?;
            ensure!(top.len() == n, "prompt {p}: {} input_top_logprobs entries for {n} prompt tokens", top.len());
            if n > 0 {
                s.topk_ids.resize(k, -1);
                s.topk_logp.resize(k, 0.0);
            }
            for (t, e) in top.iter().enumerate().skip(1) {
                let list = e.as_array().with_context(|| format!("{}: top-k entry is not a list", where_(t)))?;
                ensure!(list.len() == k, "{}: {} top-k candidates, expected {k}", where_(t), list.len());
                let mut cands = Vec::with_capacity(k);
                for c in list {
                    let tri = c
                        .as_array()
                        .filter(|a| a.len() >= 2)
                        .with_context(|| format!("{}: candidate is not a triple", where_(t)))?;
                    let id = token_id(&tri[1], vocab, &|| where_(t))?;
                    let lp = logprob(&tri[0], &|| format!("{} candidate {id}", where_(t)))?;
                    if id == ids[t] {
                        ensure!(
                            lp == s.logp[t] || (lp - s.logp[t]).abs() <= 1e-4 * lp.abs().max(1.0),
                            "{}: the prompt token's log-probability differs between input_token_logprobs ({}) and input_top_logprobs ({lp})",
                            where_(t),
                            s.logp[t]
                        );
                    }
                    cands.push((id, lp));
                }
                ensure!(
                    cands.iter().enumerate().all(|(i, a)| cands[..i].iter().all(|b| b.0 != a.0)),
                    "{}: repeated candidate ids",
                    where_(t)
                );
                push_topk(&mut s, cands, k);
            }
        }
        out.push(s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_round_trip_and_rejections() {
        let ids = [5, 7, 9];
        let good = json!({"choices": [{"index": 0, "prompt_token_ids": [5, 7, 9], "prompt_logprobs": [null,
            {"7": {"logprob": -0.5, "rank": 2}, "3": {"logprob": -0.2, "rank": 1}},
            {"9": {"logprob": -9999.0, "rank": 90}, "3": {"logprob": -0.1, "rank": 1}, "4": {"logprob": -0.3, "rank": 2}}]}]});
        let s = &parse_response(Api::Vllm, good.to_string().as_bytes(), &[&ids], 2, 10).unwrap()[0];
        assert_eq!(s.logp, vec![0.0, -0.5, f32::NEG_INFINITY]);
        assert_eq!(s.topk_ids, vec![-1, -1, 3, 7, 3, 4]);
        let bad = |f: &dyn Fn(&mut Value)| {
            let mut v = good.clone();
            f(&mut v);
            parse_response(Api::Vllm, v.to_string().as_bytes(), &[&ids], 2, 10).unwrap_err().to_string()
        };
        assert!(bad(&|v| v["choices"][0]["prompt_token_ids"][1] = json!(8)).contains("echoed prompt id at position 1"));
        assert!(bad(&|v| v["choices"][0]["prompt_logprobs"][1]["7"]["logprob"] = json!(0.5)).contains("positive"));
        assert!(bad(&|v| {
            v["choices"][0]["prompt_logprobs"][1].as_object_mut().unwrap().remove("7");
        })
        .contains("prompt token 7 is not among"));
        assert!(bad(&|v| v["choices"][0]["prompt_logprobs"][0] = json!({})).contains("must be null"));
        assert!(bad(&|v| v["choices"][0]["prompt_logprobs"].as_array_mut().unwrap().truncate(2))
            .contains("2 prompt_logprobs entries"));
        let nan = good.to_string().replace("-0.5", "NaN");
        assert!(parse_response(Api::Vllm, nan.as_bytes(), &[&ids], 2, 10).unwrap_err().to_string().contains("NaN"));
    }

    #[test]
    fn sglang_round_trip_and_rejections() {
        let ids = [5, 7];
        let good = json!({"text": "", "meta_info": {"prompt_tokens": 2,
            "input_token_logprobs": [[null, 5, null], [-0.25, 7, null]],
            "input_top_logprobs": [null, [[-0.25, 7, null], [-1.5, 2, null]]]}});
        let s = &parse_response(Api::Sglang, good.to_string().as_bytes(), &[&ids], 2, 10).unwrap()[0];
        assert_eq!(s.logp, vec![0.0, -0.25]);
        assert_eq!((s.topk_ids.clone(), s.topk_logp.clone()), (vec![-1, -1, 7, 2], vec![0.0, 0.0, -0.25, -1.5]));
        let mut v = good.clone();
        v["meta_info"]["input_token_logprobs"][1][1] = json!(8);
        assert!(parse_response(Api::Sglang, v.to_string().as_bytes(), &[&ids], 2, 10).is_err());
        let mut v = good.clone();
        v["meta_info"]["input_top_logprobs"][1][0][0] = json!(-0.3);
        assert!(parse_response(Api::Sglang, v.to_string().as_bytes(), &[&ids], 2, 10)
            .unwrap_err()
            .to_string()
            .contains("differs"));
    }
}
