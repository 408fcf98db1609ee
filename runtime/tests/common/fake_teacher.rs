//! A local stand-in teacher that speaks the documented vLLM `/v1/completions`
//! (prompt_logprobs) and SGLang `/generate` shapes (DATA.md §4), with the faults real servers
//! have: 5xx, dropped connections, slow answers, 4xx, wrong echoes, NaN. Its distribution is
//! the test's function.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use vpmoe_runtime::teacher::wire::Api;

pub const MODEL: &str = "openai/gpt-oss-120b";

/// The teacher's distribution at position t ≥ 1 of `ids` with k candidates: (top-k candidates
/// best first, the prompt token's log-probability as sent on the wire, −9999 meaning −inf).
pub type TeacherFn = fn(&[i64], usize, usize) -> (Vec<(i64, f64)>, f64);

/// Faults, each applied to the first scoring requests that arrive.
#[derive(Default, Clone)]
pub struct Faults {
    /// Answer this status to the first n scoring requests.
    pub status_first: Option<(u16, usize)>,
    /// Close the connection without an answer for the next n requests (after the statuses).
    pub drop_next: usize,
    /// Sleep this long before answering the next n requests (after the drops).
    pub slow_next: Option<(Duration, usize)>,
    /// Sleep before every answer.
    pub delay: Duration,
    /// Corrupt the echo of prompts whose first differing content matches this token length.
    pub bad_echo_len: Option<usize>,
    /// Write NaN into the answer for prompts of this length.
    pub nan_len: Option<usize>,
    /// Write NaN into every answer.
    pub nan_always: bool,
}

pub struct Server {
    pub url: String,
    pub requests: Arc<AtomicUsize>,
    /// Times each prompt (by length and checksum) was asked for.
    pub per_prompt: Arc<Mutex<HashMap<(usize, i64), usize>>>,
}

pub fn start(api: Api, faults: Faults, teacher: TeacherFn) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let per_prompt = Arc::new(Mutex::new(HashMap::new()));
    let (rq, pp) = (requests.clone(), per_prompt.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            let (rq, pp, f) = (rq.clone(), pp.clone(), faults.clone());
            std::thread::spawn(move || handle(conn, api, &f, &rq, &pp, teacher));
        }
    });
    Server { url, requests, per_prompt }
}

type Counts = Mutex<HashMap<(usize, i64), usize>>;

fn handle(conn: TcpStream, api: Api, f: &Faults, rq: &AtomicUsize, pp: &Counts, teacher: TeacherFn) {
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut len = 0;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    let reply = |status: u16, v: String| {
        let mut c = conn.try_clone().unwrap();
        let _ = write!(
            c,
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{v}",
            v.len()
        );
    };
    match (method.as_str(), path.as_str(), api) {
        ("GET", "/v1/models", Api::Vllm) => {
            reply(200, json!({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).to_string())
        }
        ("GET", "/version", Api::Vllm) => reply(200, json!({"version": "0.11.0-fake"}).to_string()),
        ("GET", "/get_model_info", Api::Sglang) => {
            reply(200, json!({"model_path": MODEL, "is_generation": true}).to_string())
        }
        ("GET", "/get_server_info", Api::Sglang) => reply(200, json!({"version": "0.5.3-fake"}).to_string()),
        ("POST", "/v1/completions", Api::Vllm) | ("POST", "/generate", Api::Sglang) => {
            let n = rq.fetch_add(1, Ordering::SeqCst);
            let req: Value = serde_json::from_slice(&body).unwrap();
            let (prompts, k) = match api {
                Api::Vllm => {
                    assert_eq!(req["model"], MODEL);
                    assert_eq!(req["max_tokens"], 1);
                    assert_eq!(req["return_token_ids"], true);
                    assert_eq!(req["temperature"], 1.0);
                    (req["prompt"].clone(), req["prompt_logprobs"].as_u64().unwrap() as usize)
                }
                Api::Sglang => {
                    assert_eq!(req["return_logprob"], true);
                    assert_eq!(req["logprob_start_len"], 0);
                    assert_eq!(req["sampling_params"]["max_new_tokens"], 0);
                    (req["input_ids"].clone(), req["top_logprobs_num"].as_u64().unwrap() as usize)
                }
            };
            let prompts: Vec<Vec<i64>> = if prompts[0].is_array() {
                serde_json::from_value(prompts).unwrap()
            } else {
                vec![serde_json::from_value(prompts).unwrap()]
            };
            let mut skip = n;
            if let Some((status, count)) = f.status_first {
                if skip < count {
                    return reply(status, json!({"error": "fault"}).to_string());
                }
                skip -= count;
            }
            if skip < f.drop_next {
                return; // connection closed without an answer
            }
            skip -= f.drop_next;
            if let Some((d, count)) = f.slow_next {
                if skip < count {
                    std::thread::sleep(d);
                }
            }
            std::thread::sleep(f.delay);
            for p in &prompts {
                *pp.lock().unwrap().entry((p.len(), p.iter().sum())).or_default() += 1;
            }
            let mut text = answer(api, &prompts, k, f, teacher).to_string();
            if f.nan_always || prompts.iter().any(|p| Some(p.len()) == f.nan_len) {
                text = text.replacen("-1.", "NaN", 1);
            }
            reply(200, text)
        }
        _ => reply(404, json!({"detail": "Not Found"}).to_string()),
    }
}

fn answer(api: Api, prompts: &[Vec<i64>], k: usize, f: &Faults, teacher: TeacherFn) -> Value {
    let echo = |p: &Vec<i64>| -> Vec<i64> {
        let mut e = p.clone();
        if Some(p.len()) == f.bad_echo_len {
            e[5] += 1;
        }
        e
    };
    match api {
        Api::Vllm => {
            let choices: Vec<Value> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let mut lps = vec![Value::Null];
                    for t in 1..p.len() {
                        let (top, actual) = teacher(p, t, k);
                        let mut d = serde_json::Map::new();
                        for (r, (id, lp)) in top.iter().enumerate() {
                            d.insert(id.to_string(), json!({"logprob": lp, "rank": r + 1, "decoded_token": "x"}));
                        }
                        d.entry(p[t].to_string())
                            .or_insert(json!({"logprob": actual, "rank": 5000, "decoded_token": "y"}));
                        lps.push(Value::Object(d));
                    }
                    json!({"index": i, "text": "!", "finish_reason": "length", "token_ids": [0],
                           "prompt_token_ids": echo(p), "prompt_logprobs": lps})
                })
                .collect();
            // Answers may come in any order; the index says which prompt.
            let mut choices = choices;
            choices.reverse();
            json!({"id": "cmpl-1", "object": "text_completion", "model": MODEL, "choices": choices,
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        }
        Api::Sglang => {
            let items: Vec<Value> = prompts
                .iter()
                .map(|p| {
                    let e = echo(p);
                    let mut tl = vec![json!([null, e[0], null])];
                    let mut top = vec![Value::Null];
                    for (t, echoed) in e.iter().enumerate().skip(1) {
                        let (cands, actual) = teacher(p, t, k);
                        tl.push(json!([actual, echoed, null]));
                        top.push(Value::Array(cands.iter().map(|(id, lp)| json!([lp, id, null])).collect()));
                    }
                    let mut meta = json!({"prompt_tokens": p.len(), "completion_tokens": 0, "cached_tokens": 0,
                        "finish_reason": {"type": "length", "length": 0}, "input_token_logprobs": tl,
                        "output_token_logprobs": [], "output_top_logprobs": []});
                    if k > 0 {
                        meta["input_top_logprobs"] = Value::Array(top);
                    }
                    json!({"text": "", "meta_info": meta})
                })
                .collect();
            if items.len() == 1 {
                items[0].clone()
            } else {
                Value::Array(items)
            }
        }
    }
}
