//! HTTP client of a teacher server: server identification, and scoring requests with
//! per-request timeouts and retries (exponential backoff) on transport errors, 429 and 5xx.
//! Other 4xx answers and invalid responses fail at once: repeating them cannot help.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::wire::{self, Api, Scores};

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` (no path; TLS is not supported).
    pub url: String,
    pub api: Api,
    /// Model name to request (vLLM `model`); default: the one model the server lists.
    pub model: Option<String>,
    /// Limit for one request, response body included.
    pub timeout: Duration,
    /// Extra attempts after a retryable failure.
    pub retries: u32,
    /// First backoff; doubled after each failure, at most 30 s.
    pub backoff: Duration,
    /// Vocabulary size (token ids are checked against it).
    pub vocab: usize,
}

/// What the server says about itself (recorded in the manifest).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerInfo {
    pub model: String,
    pub version: String,
}

/// A connected client.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    cfg: ClientConfig,
    pub info: ServerInfo,
}

/// Sequences per request of [`Client::completion_logprobs`].
pub const COMPLETIONS_PER_REQUEST: usize = 8;

/// Largest accepted response body (top-20 vLLM answers for 8k tokens are several MB).
const MAX_BODY: u64 = 1 << 30;

enum Failure {
    /// Worth another attempt (transport error, timeout, 429, 5xx).
    Retry(String),
    Fatal(anyhow::Error),
}

impl Client {
    /// Check the URL, identify the server and the model.
    pub fn connect(cfg: ClientConfig) -> Result<Client> {
        let base = cfg.url.trim_end_matches('/').to_string();
        if base.starts_with("https://") {
            bail!("--server {base}: https is not supported; reach the teacher over plain http (e.g. an ssh tunnel)");
        }
        ensure!(base.starts_with("http://"), "--server {base}: expected http://HOST:PORT");
        let path = base["http://".len()..].split_once('/').map(|x| x.1);
        ensure!(
            path.is_none(),
            "--server {base}: give the server's root, http://HOST:PORT, without a path (/{}): the client adds \
             the API's own paths",
            path.unwrap_or_default()
        );
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(cfg.timeout)).http_status_as_error(false).build().into();
        let mut c = Client { agent, base, cfg, info: ServerInfo { model: String::new(), version: String::new() } };
        c.info = c.identify()?;
        Ok(c)
    }

    fn get_json(&self, path: &str) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let body = self.with_retries(&format!("GET {url}"), || {
            let resp = self.agent.get(&url).call();
            read(resp)
        })?;
        serde_json::from_slice(&body).with_context(|| format!("GET {url}: response is not JSON"))
    }

    fn identify(&self) -> Result<ServerInfo> {
        let version = |v: Result<Value>| -> String {
            v.ok().and_then(|v| v["version"].as_str().map(str::to_string)).unwrap_or_else(|| "unknown".into())
        };
        match self.cfg.api {
            Api::Vllm => {
                let models = self.get_json("/v1/models")?;
                let served: Vec<String> = models["data"]
                    .as_array()
                    .context("GET /v1/models: no \"data\" list (is this a vLLM server?)")?
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_string))
                    .collect();
                let model = match &self.cfg.model {
                    Some(m) => {
                        ensure!(served.contains(m), "--model {m} is not served; the server has {served:?}");
                        m.clone()
                    }
                    None => match served.as_slice() {
                        [one] => one.clone(),
                        _ => bail!("the server lists {served:?}; choose one with --model"),
                    },
                };
                Ok(ServerInfo { model, version: version(self.get_json("/version")) })
            }
            Api::Sglang => {
                let info = self.get_json("/get_model_info")?;
                let path = info["model_path"]
                    .as_str()
                    .context("GET /get_model_info: no \"model_path\" (is this an SGLang server?)")?
                    .to_string();
                if let Some(m) = &self.cfg.model {
                    ensure!(m == &path, "--model {m} is not served; the server has {path:?}");
                }
                Ok(ServerInfo { model: path, version: version(self.get_json("/get_server_info")) })
            }
        }
    }

    fn with_retries(&self, what: &str, mut f: impl FnMut() -> Result<Vec<u8>, Failure>) -> Result<Vec<u8>> {
        let mut wait = self.cfg.backoff;
        for attempt in 0..=self.cfg.retries {
            match f() {
                Ok(b) => return Ok(b),
                Err(Failure::Fatal(e)) => return Err(e.context(what.to_string())),
                Err(Failure::Retry(e)) if attempt == self.cfg.retries => {
                    bail!("{what}: failed after {} attempts; last error: {e}", attempt + 1)
                }
                Err(Failure::Retry(_)) => {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    /// The teacher's log-probability of every completion token of `seqs` (prompt, completion) in
    /// exactly its context, the sequences sent [`COMPLETIONS_PER_REQUEST`] a request: what stage 3
    /// trains on and what `eval --teacher` averages. The wire parser has checked each answer's
    /// count and length against what was sent.
    pub fn completion_logprobs(&self, seqs: &[(&[u32], &[u32])]) -> Result<Vec<Vec<f32>>> {
        ensure!(seqs.iter().all(|(p, _)| !p.is_empty()), "a completion needs a prompt before it");
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(COMPLETIONS_PER_REQUEST) {
            let ids: Vec<Vec<i32>> =
                chunk.iter().map(|(p, c)| p.iter().chain(c.iter()).map(|&t| t as i32).collect()).collect();
            let refs: Vec<&[i32]> = ids.iter().map(|s| s.as_slice()).collect();
            for ((p, _), s) in chunk.iter().zip(self.score(&refs, 0)?) {
                out.push(s.logp[p.len()..].to_vec());
            }
        }
        Ok(out)
    }

    /// Score prompts (one request); see [`wire::parse_response`].
    pub fn score(&self, prompts: &[&[i32]], top_k: usize) -> Result<Vec<Scores>> {
        let url = format!("{}{}", self.base, self.cfg.api.endpoint());
        let body = serde_json::to_vec(&wire::request_body(self.cfg.api, &self.info.model, prompts, top_k))?;
        let resp = self.with_retries(&format!("POST {url}"), || {
            read(self.agent.post(&url).header("content-type", "application/json").send(&body[..]))
        })?;
        wire::parse_response(self.cfg.api, &resp, prompts, top_k, self.cfg.vocab)
    }
}

fn read(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Vec<u8>, Failure> {
    let mut resp = resp.map_err(|e| Failure::Retry(e.to_string()))?;
    let status = resp.status().as_u16();
    let body =
        resp.body_mut().with_config().limit(MAX_BODY).read_to_vec().map_err(|e| Failure::Retry(e.to_string()))?;
    let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    match status {
        200..=299 => Ok(body),
        429 | 500..=599 => Err(Failure::Retry(format!("HTTP {status}: {}", text()))),
        _ => Err(Failure::Fatal(anyhow::anyhow!("HTTP {status}: {}", text()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server URL is checked before anything is sent: plain http, a root without a path.
    #[test]
    fn server_urls_are_checked_before_connecting() {
        let cfg = |url: &str| ClientConfig {
            url: url.into(),
            api: Api::Vllm,
            model: None,
            timeout: Duration::from_millis(10),
            retries: 0,
            backoff: Duration::from_millis(1),
            vocab: 16,
        };
        let err = |url: &str| Client::connect(cfg(url)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err("http://127.0.0.1:9/v1").contains("without a path (/v1)"));
        assert!(err("https://teacher:8000").contains("https is not supported"));
        assert!(err("teacher:8000").contains("expected http://HOST:PORT"));
    }
}
