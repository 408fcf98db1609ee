//! Sampled assistant turns: tokens → Harmony messages, a format-validity verdict and per-token
//! span ids. One implementation for `sample`, evaluation and on-policy distillation.
//!
//! A completion continues a prompt that ends `<|start|>assistant` (`render_for_completion`), so
//! its first message's role is already given. A completion is **valid** when it is an optional
//! `analysis` message closed by `<|end|>`, then a `final` message closed by `<|return|>`, and
//! nothing else: no other roles, channels or recipients, no `<|call|>`, no stray special token,
//! nothing after `<|return|>`. Otherwise the verdict names the first violation and its position.

use std::fmt;

use serde::Serialize;

use crate::tokenizer::{self, CALL, CHANNEL, CONSTRAIN, END, MESSAGE, N_ORDINARY, RETURN, START};

/// One message of a completion. Positions index the completion's tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SampledMessage {
    pub role: String,
    pub channel: Option<String>,
    /// What follows the channel in the header (a content type), if anything.
    pub header_rest: Option<String>,
    /// A tool call's recipient (" to=…" in the header).
    pub recipient: Option<String>,
    /// Decoded content (lossy UTF-8).
    pub content: String,
    /// First token of the message (`<|start|>`, or 0 for the first message).
    pub start: usize,
    pub content_start: usize,
    /// Position of the end token, or the completion's length when it has none.
    pub content_end: usize,
    /// `<|end|>`, `<|return|>` or `<|call|>`; `None` when the completion stops inside the message.
    pub end_token: Option<u32>,
}

/// Why a completion is not a valid Harmony answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Violation {
    /// The completion stops inside a message (the token budget ran out).
    Truncated { inside: String },
    /// A special token where the format has none (`<|start|>` inside content, `<|endoftext|>`,
    /// a reserved id, ...).
    StrayToken { token: u32, name: String, inside: String },
    /// A message that is not the assistant's.
    Role { role: String },
    /// A header without `<|channel|>`.
    NoChannel,
    /// A channel other than `analysis` or `final`.
    Channel { channel: String },
    /// A tool call (a recipient, or `<|call|>`).
    ToolCall,
    /// `analysis` not first, or twice.
    MisplacedAnalysis,
    /// An `analysis` message closed by something other than `<|end|>`.
    AnalysisEnd { token: String },
    /// The `final` message closed by `<|end|>` (or `<|call|>`) instead of `<|return|>`.
    FinalEnd { token: String },
    /// Every message closed, none of them `final`.
    MissingFinal,
    /// Tokens after the `final` message's `<|return|>`.
    AfterReturn,
    /// Text between a message's end and the next `<|start|>`.
    BetweenMessages,
}

impl Violation {
    /// The kind's name (the `kind` of its JSON form).
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::Truncated { .. } => "truncated",
            Violation::StrayToken { .. } => "stray_token",
            Violation::Role { .. } => "role",
            Violation::NoChannel => "no_channel",
            Violation::Channel { .. } => "channel",
            Violation::ToolCall => "tool_call",
            Violation::MisplacedAnalysis => "misplaced_analysis",
            Violation::AnalysisEnd { .. } => "analysis_end",
            Violation::FinalEnd { .. } => "final_end",
            Violation::MissingFinal => "missing_final",
            Violation::AfterReturn => "after_return",
            Violation::BetweenMessages => "between_messages",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Truncated { inside } => write!(f, "truncated inside the {inside}"),
            Violation::StrayToken { name, inside, .. } => write!(f, "stray {name} in the {inside}"),
            Violation::Role { role } => write!(f, "a {role:?} message (only the assistant speaks)"),
            Violation::NoChannel => write!(f, "a message without a channel"),
            Violation::Channel { channel } => write!(f, "channel {channel:?} (only analysis, then final)"),
            Violation::ToolCall => write!(f, "a tool call"),
            Violation::MisplacedAnalysis => write!(f, "an analysis message after another message"),
            Violation::AnalysisEnd { token } => write!(f, "analysis closed by {token} instead of <|end|>"),
            Violation::FinalEnd { token } => write!(f, "final closed by {token} instead of <|return|>"),
            Violation::MissingFinal => write!(f, "no final message"),
            Violation::AfterReturn => write!(f, "tokens after <|return|>"),
            Violation::BetweenMessages => write!(f, "text between messages"),
        }
    }
}

/// The verdict on a completion: valid, or the first violation and the token position where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub violation: Option<Violation>,
    /// The violation in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

impl Verdict {
    fn valid() -> Verdict {
        Verdict { valid: true, at: None, violation: None, why: None }
    }
    fn invalid(at: usize, v: Violation) -> Verdict {
        Verdict { valid: false, at: Some(at), why: Some(v.to_string()), violation: Some(v) }
    }
}

/// A parsed completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Completion {
    pub messages: Vec<SampledMessage>,
    /// Per token: 1 inside an assistant `analysis` message, 2 inside `final`, 0 elsewhere
    /// (wrappers included, as in the training render's `span_id`).
    pub span_id: Vec<u8>,
    pub verdict: Verdict,
}

/// The name of a special token (`<|end|>`, `<|reserved_200013|>`, ...).
pub fn special_name(t: u32) -> String {
    if t < N_ORDINARY {
        return format!("token {t}");
    }
    tokenizer::decode(&[t])
}

/// A token where `<|start|>` should be: a stray special token, or text.
fn stray_or_text(t: u32) -> Violation {
    if t < N_ORDINARY {
        Violation::BetweenMessages
    } else {
        Violation::StrayToken { token: t, name: special_name(t), inside: "space between messages".into() }
    }
}

fn is_end(t: u32) -> bool {
    t == END || t == RETURN || t == CALL
}

/// Parses `tokens`, a completion of a prompt that ends `<|start|>assistant`.
pub fn parse(tokens: &[u32]) -> Completion {
    let n = tokens.len();
    let ordinary_end = |mut p: usize| {
        while p < n && tokens[p] < N_ORDINARY {
            p += 1;
        }
        p
    };
    let text = |a: usize, b: usize| tokenizer::decode(&tokens[a..b]);
    let stray =
        |p: usize, inside: String| Violation::StrayToken { token: tokens[p], name: special_name(tokens[p]), inside };
    let mut messages: Vec<SampledMessage> = Vec::new();
    let mut error: Option<(usize, Violation)> = None;
    let mut pos = 0;
    while pos < n {
        let start = pos;
        // The role: given by the prompt for the first message, else `<|start|>` ROLE.
        let role = if messages.is_empty() {
            let b = ordinary_end(0);
            pos = b;
            format!("assistant{}", text(0, b))
        } else if tokens[pos] == START {
            let b = ordinary_end(pos + 1);
            let r = text(pos + 1, b);
            pos = b;
            r
        } else {
            let after_return = messages.last().is_some_and(|m| m.end_token == Some(RETURN));
            error = Some((pos, if after_return { Violation::AfterReturn } else { stray_or_text(tokens[pos]) }));
            break;
        };
        // " to=RECIPIENT" after the role or the channel is a tool call.
        let (role, mut recipient) = match role.split_once(" to=") {
            Some((r, to)) => (r.to_string(), Some(to.to_string())),
            None => (role, None),
        };
        let (mut channel, mut header_rest) = (None, None);
        if pos < n && tokens[pos] == CHANNEL {
            let b = ordinary_end(pos + 1);
            let c = text(pos + 1, b);
            match c.split_once(' ') {
                Some((ch, rest)) => {
                    channel = Some(ch.to_string());
                    if let Some(to) = rest.strip_prefix("to=") {
                        recipient = Some(to.to_string());
                    } else {
                        header_rest = Some(rest.to_string());
                    }
                }
                None => channel = Some(c),
            }
            pos = b;
        }
        while pos < n && tokens[pos] == CONSTRAIN {
            pos = ordinary_end(pos + 1);
        }
        let part = |what: &str| match &channel {
            Some(c) => format!("{c} message's {what}"),
            None => format!("message's {what}"),
        };
        let mut m = SampledMessage {
            role,
            channel: channel.clone(),
            header_rest,
            recipient,
            content: String::new(),
            start,
            content_start: pos.min(n),
            content_end: n,
            end_token: None,
        };
        if pos >= n {
            error = Some((n, Violation::Truncated { inside: part("header") }));
        } else if tokens[pos] != MESSAGE {
            error = Some((pos, stray(pos, part("header"))));
        } else {
            m.content_start = pos + 1;
            m.content_end = ordinary_end(pos + 1);
            m.content = text(m.content_start, m.content_end);
            match tokens.get(m.content_end) {
                None => error = Some((n, Violation::Truncated { inside: part("content") })),
                Some(&t) if is_end(t) => m.end_token = Some(t),
                Some(_) => error = Some((m.content_end, stray(m.content_end, part("content")))),
            }
        }
        let closed = m.end_token.is_some();
        pos = m.content_end + 1;
        messages.push(m);
        if !closed {
            break;
        }
    }

    // The structure: [analysis <|end|>] final <|return|>, nothing after.
    let mut seen_final = false;
    for (i, m) in messages.iter().enumerate() {
        if error.as_ref().is_some_and(|(at, _)| *at <= m.start) {
            break;
        }
        let v = if seen_final {
            Some(Violation::AfterReturn)
        } else if m.role != "assistant" {
            Some(Violation::Role { role: m.role.clone() })
        } else if m.end_token == Some(CALL) || m.recipient.is_some() {
            Some(Violation::ToolCall)
        } else {
            match m.channel.as_deref() {
                None => Some(Violation::NoChannel),
                Some("analysis") if i > 0 => Some(Violation::MisplacedAnalysis),
                Some("analysis") => match m.end_token {
                    Some(t) if t != END => Some(Violation::AnalysisEnd { token: special_name(t) }),
                    _ => None,
                },
                Some("final") => {
                    seen_final = true;
                    match m.end_token {
                        Some(t) if t != RETURN => Some(Violation::FinalEnd { token: special_name(t) }),
                        _ => None,
                    }
                }
                Some(c) => Some(Violation::Channel { channel: c.to_string() }),
            }
        };
        if let Some(v) = v {
            let at = if matches!(v, Violation::AnalysisEnd { .. } | Violation::FinalEnd { .. }) {
                m.content_end
            } else {
                m.start
            };
            match &error {
                Some((e, _)) if *e <= at => {}
                _ => error = Some((at, v)),
            }
            break;
        }
    }
    if error.is_none() && !seen_final {
        error = Some((n, Violation::MissingFinal));
    }

    let mut span_id = vec![0u8; n];
    for m in &messages {
        let span = match (m.role.as_str(), m.channel.as_deref()) {
            ("assistant", Some("analysis")) => 1,
            ("assistant", Some("final")) => 2,
            _ => 0,
        };
        let end = (m.content_end + usize::from(m.end_token.is_some())).min(n);
        span_id[m.start..end].fill(span);
    }
    let verdict = match error {
        None => Verdict::valid(),
        Some((at, v)) => Verdict::invalid(at, v),
    };
    Completion { messages, span_id, verdict }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{encode, EOD};

    /// `<|channel|>CH<|message|>TEXT` + end, as the model would sample it.
    fn msg(first: bool, channel: &str, text: &str, end: u32) -> Vec<u32> {
        let mut v = Vec::new();
        if !first {
            v.push(START);
            v.extend(encode("assistant"));
        }
        v.push(CHANNEL);
        v.extend(encode(channel));
        v.push(MESSAGE);
        v.extend(encode(text));
        v.push(end);
        v
    }
    fn valid() -> Vec<u32> {
        let mut v = msg(true, "analysis", "Two plus two is four.", END);
        v.extend(msg(false, "final", "4", RETURN));
        v
    }

    #[test]
    fn a_reasoned_answer_is_valid_with_its_spans() {
        let t = valid();
        let c = parse(&t);
        assert!(c.verdict.valid, "{:?}", c.verdict);
        assert_eq!(c.messages.len(), 2);
        assert_eq!(c.messages[0].channel.as_deref(), Some("analysis"));
        assert_eq!(c.messages[0].content, "Two plus two is four.");
        assert_eq!(c.messages[1].content, "4");
        assert_eq!(c.messages[1].end_token, Some(RETURN));
        let a_end = c.messages[0].content_end;
        assert!(c.span_id[..=a_end].iter().all(|&s| s == 1));
        assert!(c.span_id[a_end + 1..].iter().all(|&s| s == 2));
        // The final message alone is valid too.
        assert!(parse(&msg(true, "final", "4", RETURN)).verdict.valid);
    }

    fn violation(t: &[u32]) -> (usize, Violation) {
        let v = parse(t).verdict;
        assert!(!v.valid);
        (v.at.unwrap(), v.violation.unwrap())
    }

    #[test]
    fn each_broken_completion_names_its_first_violation() {
        // Missing final: the analysis closes and nothing follows.
        let t = msg(true, "analysis", "hmm", END);
        assert_eq!(violation(&t), (t.len(), Violation::MissingFinal));
        // <|end|> instead of <|return|>.
        let mut t = msg(true, "analysis", "hmm", END);
        t.extend(msg(false, "final", "4", END));
        assert_eq!(violation(&t), (t.len() - 1, Violation::FinalEnd { token: "<|end|>".into() }));
        // A stray <|start|> inside the analysis content.
        let mut t = msg(true, "analysis", "hmm", END);
        let at = t.len() - 1;
        t.insert(at, START);
        t.extend(msg(false, "final", "4", RETURN));
        let (p, v) = violation(&t);
        assert_eq!(p, at);
        assert!(matches!(v, Violation::StrayToken { token: START, .. }), "{v:?}");
        assert_eq!(v.to_string(), "stray <|start|> in the analysis message's content");
        // Truncated by the token budget inside the final content.
        let t = valid();
        let cut = &t[..t.len() - 1];
        assert_eq!(violation(cut), (cut.len(), Violation::Truncated { inside: "final message's content".into() }));
        // Truncated inside a header.
        let cut = &t[..2];
        assert!(matches!(violation(cut).1, Violation::Truncated { .. }));
        // An analysis closed by <|return|>.
        let t = msg(true, "analysis", "hmm", RETURN);
        assert_eq!(violation(&t).1, Violation::AnalysisEnd { token: "<|return|>".into() });
        // A tool call.
        let mut t = msg(true, "analysis", "hmm", END);
        t.push(START);
        t.extend(encode("assistant to=functions.f"));
        t.push(CHANNEL);
        t.extend(encode("commentary json"));
        t.push(MESSAGE);
        t.extend(encode("{}"));
        t.push(CALL);
        assert_eq!(violation(&t).1, Violation::ToolCall);
        // A commentary channel, two analyses, text after <|return|>, an end-of-text token.
        assert_eq!(
            violation(&msg(true, "commentary", "x", END)).1,
            Violation::Channel { channel: "commentary".into() }
        );
        let mut t = msg(true, "analysis", "a", END);
        t.extend(msg(false, "analysis", "b", END));
        assert_eq!(violation(&t).1, Violation::MisplacedAnalysis);
        let mut t = valid();
        t.extend(encode("more"));
        assert_eq!(violation(&t), (valid().len(), Violation::AfterReturn));
        let mut t = valid();
        t.insert(3, EOD);
        assert!(matches!(violation(&t).1, Violation::StrayToken { token: EOD, .. }));
        // A user turn inside the completion.
        let mut t = msg(true, "analysis", "a", END);
        t.push(START);
        t.extend(encode("user"));
        t.push(MESSAGE);
        t.extend(encode("hi"));
        t.push(END);
        assert_eq!(violation(&t).1, Violation::Role { role: "user".into() });
        // Nothing at all.
        assert_eq!(violation(&[]), (0, Violation::MissingFinal));
    }

    #[test]
    fn each_kind_is_its_json_tag() {
        let all = [
            Violation::Truncated { inside: String::new() },
            Violation::StrayToken { token: 0, name: String::new(), inside: String::new() },
            Violation::Role { role: String::new() },
            Violation::NoChannel,
            Violation::Channel { channel: String::new() },
            Violation::ToolCall,
            Violation::MisplacedAnalysis,
            Violation::AnalysisEnd { token: String::new() },
            Violation::FinalEnd { token: String::new() },
            Violation::MissingFinal,
            Violation::AfterReturn,
            Violation::BetweenMessages,
        ];
        for v in all {
            assert_eq!(serde_json::to_value(&v).unwrap()["kind"], v.kind());
        }
    }

    #[test]
    fn the_verdict_serialises_for_jsonl() {
        let v = parse(&msg(true, "analysis", "hmm", END)).verdict;
        let j = serde_json::to_string(&v).unwrap();
        assert_eq!(
            j,
            r#"{"valid":false,"at":6,"violation":{"kind":"missing_final"},"why":"no final message"}"#
                .replace("6", &msg(true, "analysis", "hmm", END).len().to_string())
        );
        assert_eq!(serde_json::to_string(&parse(&valid()).verdict).unwrap(), r#"{"valid":true}"#);
    }
}
