//! Harmony conversations and their token-exact rendering (parity with openai-harmony 0.0.8).
//!
//! The JSON form is the official one (`Message.to_dict()` / the Rust serde form): a message is
//! `{"role", "name"?, "recipient"?, "channel"?, "content_type"?, "content"}` where `content` is a
//! string or a list of `{"type": "text" | "system_content" | "developer_content", ...}` items.
//! A missing optional field means *absent* (as in the Rust serde form), not the Python default.
//!
//! Each message renders as
//! `<|start|> ROLE [":"NAME] [" to="RECIPIENT] [<|channel|> CHANNEL] [CONTENT_TYPE] <|message|>
//! CONTENT... END`, every text piece encoded separately with `encode_ordinary`.
//! Per token, [`Rendered`] carries the loss mask (1 for every token of an assistant message,
//! wrappers included), the span id (1 assistant `analysis`, 2 assistant `final`, 0 otherwise)
//! and the inference-time mask `loss_mask_gen` (the `<|start|>assistant` pair opening an
//! assistant block is 0).

use std::fmt;

use anyhow::{bail, ensure, Result};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::tokenizer::{self, CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START};
use crate::tools::ToolMap;

/// Author role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
    System,
    Developer,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::System => "system",
            Role::Developer => "developer",
            Role::Tool => "tool",
        }
    }
}

/// `Reasoning: low|medium|high` in the system message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
pub enum ReasoningEffort {
    #[serde(alias = "low")]
    #[value(name = "low")]
    Low,
    #[default]
    #[serde(alias = "medium")]
    #[value(name = "medium")]
    Medium,
    #[serde(alias = "high")]
    #[value(name = "high")]
    High,
}

impl ReasoningEffort {
    pub fn as_str(self) -> &'static str {
        match self {
            ReasoningEffort::Low => "low",
            ReasoningEffort::Medium => "medium",
            ReasoningEffort::High => "high",
        }
    }
}

/// Valid channels announced in the system message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub valid_channels: Vec<String>,
    pub channel_required: bool,
}

/// System message content. Absent fields render nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemContent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<ReasoningEffort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<ToolMap>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_start_date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knowledge_cutoff: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_config: Option<ChannelConfig>,
}

impl Default for SystemContent {
    /// The pinned vpmoe system message: harmony's default (identity, cutoff 2024-06, no date,
    /// `Reasoning: medium`, channels analysis/commentary/final required).
    fn default() -> Self {
        SystemContent {
            model_identity: Some("You are ChatGPT, a large language model trained by OpenAI.".to_string()),
            reasoning_effort: Some(ReasoningEffort::Medium),
            tools: None,
            conversation_start_date: None,
            knowledge_cutoff: Some("2024-06".to_string()),
            channel_config: Some(ChannelConfig {
                valid_channels: vec!["analysis".into(), "commentary".into(), "final".into()],
                channel_required: true,
            }),
        }
    }
}

/// Developer message content: `# Instructions\n\n{instructions}` plus tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DeveloperContent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<ToolMap>,
}

/// Plain text content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextContent {
    pub text: String,
}

/// One content item of a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Content {
    Text(TextContent),
    SystemContent(SystemContent),
    DeveloperContent(DeveloperContent),
}

impl Content {
    pub fn text(s: impl Into<String>) -> Content {
        Content::Text(TextContent { text: s.into() })
    }
}

/// One Harmony message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(deserialize_with = "de_content")]
    pub content: Vec<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

impl Message {
    /// A message with one text item.
    pub fn new(role: Role, text: impl Into<String>) -> Message {
        Message {
            role,
            name: None,
            content: vec![Content::text(text)],
            channel: None,
            recipient: None,
            content_type: None,
        }
    }
    /// The system message with the given content.
    pub fn system(content: SystemContent) -> Message {
        Message {
            role: Role::System,
            name: None,
            content: vec![Content::SystemContent(content)],
            channel: None,
            recipient: None,
            content_type: None,
        }
    }
    pub fn with_channel(mut self, channel: &str) -> Message {
        self.channel = Some(channel.to_string());
        self
    }
}

/// A conversation: `{"messages": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

fn de_content<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Content>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<Content>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or a list of content items")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![Content::text(v)])
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))
        }
    }
    d.deserialize_any(V)
}

/// Rendering options. vpmoe always trains with `auto_drop_analysis = false` (the default here,
/// unlike openai-harmony's default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderConfig {
    #[serde(default)]
    pub auto_drop_analysis: bool,
}

/// Token boundaries of one rendered message (all indices into the conversation's ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MessageSpan {
    pub index: usize,
    pub role: Role,
    pub channel: Option<String>,
    pub recipient: Option<String>,
    pub content_type: Option<String>,
    /// Position of `<|start|>`.
    pub start: usize,
    /// Position of `<|message|>`.
    pub header_end: usize,
    pub content_start: usize,
    /// Position of the end token.
    pub content_end: usize,
    /// One past the end token.
    pub end: usize,
    pub end_token: u32,
}

/// One message rendered into its three parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageTokens {
    /// Index of the message in the conversation.
    pub index: usize,
    pub role: Role,
    pub channel: Option<String>,
    pub recipient: Option<String>,
    pub content_type: Option<String>,
    /// `<|start|>` … `<|message|>` inclusive.
    pub header: Vec<u32>,
    pub content: Vec<u32>,
    /// `<|end|>`, `<|call|>` or `<|return|>`.
    pub end: u32,
}

impl MessageTokens {
    pub fn len(&self) -> usize {
        self.header.len() + self.content.len() + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Loss mask of every token of this message (1 for assistant messages).
    pub fn loss(&self) -> u8 {
        u8::from(self.role == Role::Assistant)
    }
    /// Span id of this message: 1 assistant analysis, 2 assistant final, else 0.
    pub fn span(&self) -> u8 {
        if self.role != Role::Assistant {
            return 0;
        }
        match self.channel.as_deref() {
            Some("analysis") => 1,
            Some("final") => 2,
            _ => 0,
        }
    }
}

/// A rendered conversation with per-token annotations (token-aligned, not label-shifted).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Rendered {
    pub token_ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
    pub loss_mask_gen: Vec<u8>,
    pub span_id: Vec<u8>,
    pub message_spans: Vec<MessageSpan>,
}

impl Rendered {
    /// Concatenate rendered messages.
    pub fn from_messages(msgs: &[MessageTokens]) -> Rendered {
        let n: usize = msgs.iter().map(MessageTokens::len).sum();
        let mut r = Rendered {
            token_ids: Vec::with_capacity(n),
            loss_mask: Vec::with_capacity(n),
            loss_mask_gen: Vec::with_capacity(n),
            span_id: Vec::with_capacity(n),
            message_spans: Vec::with_capacity(msgs.len()),
        };
        let mut prev_assistant = false;
        for m in msgs {
            let start = r.token_ids.len();
            r.token_ids.extend_from_slice(&m.header);
            r.token_ids.extend_from_slice(&m.content);
            r.token_ids.push(m.end);
            let len = m.len();
            let (loss, span) = (m.loss(), m.span());
            r.loss_mask.resize(start + len, loss);
            r.span_id.resize(start + len, span);
            r.loss_mask_gen.resize(start + len, loss);
            let is_assistant = m.role == Role::Assistant;
            if is_assistant && !prev_assistant {
                // `<|start|>assistant` opening an assistant block is the inference prefill.
                r.loss_mask_gen[start] = 0;
                r.loss_mask_gen[start + 1] = 0;
            }
            prev_assistant = is_assistant;
            let header_end = start + m.header.len() - 1;
            r.message_spans.push(MessageSpan {
                index: m.index,
                role: m.role,
                channel: m.channel.clone(),
                recipient: m.recipient.clone(),
                content_type: m.content_type.clone(),
                start,
                header_end,
                content_start: header_end + 1,
                content_end: start + len - 1,
                end: start + len,
                end_token: m.end,
            });
        }
        r
    }

    /// The rendered text (special tokens by name).
    pub fn text(&self) -> String {
        tokenizer::decode(&self.token_ids)
    }
}

/// Whether any developer message declares a non-empty `functions` tool namespace (this adds a
/// line to the system message's channel section).
pub fn has_function_tools(messages: &[Message]) -> bool {
    messages.iter().any(|m| {
        m.content.iter().any(|c| match c {
            Content::DeveloperContent(d) => {
                d.tools.as_ref().is_some_and(|t| t.get("functions").is_some_and(|ns| !ns.tools.is_empty()))
            }
            _ => false,
        })
    })
}

/// Check the structural rules the official renderer enforces.
pub fn validate_message(m: &Message) -> Result<()> {
    if m.role == Role::Tool {
        ensure!(m.name.is_some(), "a tool message needs an author name");
    }
    for c in &m.content {
        match c {
            Content::SystemContent(_) => ensure!(
                m.role == Role::System,
                "system_content may only appear in system messages, found in a {} message",
                m.role.as_str()
            ),
            Content::DeveloperContent(_) => ensure!(
                m.role == Role::Developer,
                "developer_content may only appear in developer messages, found in a {} message",
                m.role.as_str()
            ),
            Content::Text(_) => {}
        }
    }
    Ok(())
}

/// Render one message. `function_tools` is [`has_function_tools`] of the conversation.
pub fn render_message(index: usize, m: &Message, function_tools: bool) -> Result<MessageTokens> {
    validate_message(m)?;
    let mut header = Vec::with_capacity(8);
    header.push(START);
    if m.role == Role::Tool {
        match &m.name {
            Some(name) => tokenizer::encode_into(name, &mut header),
            None => bail!("a tool message needs an author name"),
        }
    } else {
        tokenizer::encode_into(m.role.as_str(), &mut header);
        if let Some(name) = &m.name {
            tokenizer::encode_into(&format!(":{name}"), &mut header);
        }
    }
    if let Some(r) = &m.recipient {
        if r != "all" {
            tokenizer::encode_into(&format!(" to={r}"), &mut header);
        }
    }
    if let Some(ch) = &m.channel {
        header.push(CHANNEL);
        tokenizer::encode_into(ch, &mut header);
    }
    if let Some(ct) = &m.content_type {
        if let Some(rest) = ct.strip_prefix("<|constrain|>") {
            tokenizer::encode_into(" ", &mut header);
            header.push(CONSTRAIN);
            tokenizer::encode_into(rest, &mut header);
        } else {
            tokenizer::encode_into(&format!(" {ct}"), &mut header);
        }
    }
    header.push(MESSAGE);
    let mut content = Vec::new();
    for c in &m.content {
        match c {
            Content::Text(t) => tokenizer::encode_into(&t.text, &mut content),
            Content::SystemContent(s) => tokenizer::encode_into(&system_body(s, function_tools), &mut content),
            Content::DeveloperContent(d) => tokenizer::encode_into(&developer_body(d), &mut content),
        }
    }
    let end = if m.role == Role::Assistant && m.recipient.is_some() { CALL } else { END };
    Ok(MessageTokens {
        index,
        role: m.role,
        channel: m.channel.clone(),
        recipient: m.recipient.clone(),
        content_type: m.content_type.clone(),
        header,
        content,
        end,
    })
}

/// The system message body (one string, encoded with one call).
pub fn system_body(s: &SystemContent, function_tools: bool) -> String {
    let mut sections: Vec<String> = Vec::new();
    let mut top: Vec<String> = Vec::new();
    if let Some(id) = &s.model_identity {
        top.push(id.clone());
    }
    if let Some(kc) = &s.knowledge_cutoff {
        top.push(format!("Knowledge cutoff: {kc}"));
    }
    if let Some(d) = &s.conversation_start_date {
        top.push(format!("Current date: {d}"));
    }
    if !top.is_empty() {
        sections.push(top.join("\n"));
    }
    if let Some(e) = s.reasoning_effort {
        sections.push(format!("Reasoning: {}", e.as_str()));
    }
    if let Some(tools) = &s.tools {
        if !tools.is_empty() {
            sections.push(crate::tools::tools_section(tools));
        }
    }
    if let Some(cc) = &s.channel_config {
        if !cc.valid_channels.is_empty() {
            let mut h = format!("# Valid channels: {}.", cc.valid_channels.join(", "));
            if cc.channel_required {
                h.push_str(" Channel must be included for every message.");
            }
            if function_tools {
                h.push_str("\nCalls to these tools must go to the commentary channel: 'functions'.");
            }
            sections.push(h);
        }
    }
    sections.join("\n\n")
}

/// The developer message body.
pub fn developer_body(d: &DeveloperContent) -> String {
    let mut sections: Vec<String> = Vec::new();
    if let Some(i) = &d.instructions {
        sections.push("# Instructions".to_string());
        sections.push(i.clone());
    }
    if let Some(tools) = &d.tools {
        if !tools.is_empty() {
            sections.push(crate::tools::tools_section(tools));
        }
    }
    sections.join("\n\n")
}

/// Indices of the messages kept under `cfg` (the auto-drop-analysis rule of openai-harmony).
fn kept_messages(messages: &[Message], cfg: RenderConfig) -> Vec<usize> {
    let last_assistant_is_final = messages
        .iter()
        .rev()
        .find(|m| m.role == Role::Assistant)
        .is_some_and(|m| m.channel.as_deref() == Some("final"));
    let drop = cfg.auto_drop_analysis && last_assistant_is_final;
    let first_final = messages.iter().position(|m| m.channel.as_deref() == Some("final"));
    (0..messages.len())
        .filter(|&i| {
            !(drop && first_final.is_some_and(|f| i < f) && messages[i].channel.as_deref() == Some("analysis"))
        })
        .collect()
}

/// Render every kept message (plain render: every message ends `<|end|>` or `<|call|>`).
pub fn render_messages(conv: &Conversation, cfg: RenderConfig) -> Result<Vec<MessageTokens>> {
    let ft = has_function_tools(&conv.messages);
    kept_messages(&conv.messages, cfg)
        .into_iter()
        .map(|i| render_message(i, &conv.messages[i], ft).map_err(|e| e.context(format!("message {i}"))))
        .collect()
}

/// Apply the training rule: a trailing assistant `final` message ends with `<|return|>`.
pub fn apply_return_rule(conv: &Conversation, msgs: &mut [MessageTokens]) {
    if let (Some(last), Some(lt)) = (conv.messages.last(), msgs.last_mut()) {
        if last.role == Role::Assistant && last.channel.as_deref() == Some("final") {
            lt.end = RETURN;
        }
    }
}

/// `render_conversation`: concatenation of every message render.
pub fn render(conv: &Conversation, cfg: RenderConfig) -> Result<Rendered> {
    Ok(Rendered::from_messages(&render_messages(conv, cfg)?))
}

/// `render_conversation_for_training`: like [`render`], but a trailing assistant `final`
/// message ends with `<|return|>` instead of `<|end|>`.
pub fn render_for_training(conv: &Conversation, cfg: RenderConfig) -> Result<Rendered> {
    let mut msgs = render_messages(conv, cfg)?;
    apply_return_rule(conv, &mut msgs);
    Ok(Rendered::from_messages(&msgs))
}

/// `render_conversation_for_completion`: [`render`] + `<|start|>` + the next role.
pub fn render_for_completion(conv: &Conversation, next_role: Role, cfg: RenderConfig) -> Result<Vec<u32>> {
    let mut ids = render(conv, cfg)?.token_ids;
    ids.push(START);
    tokenizer::encode_into(next_role.as_str(), &mut ids);
    Ok(ids)
}

/// Parse one conversation from JSON text (`{"messages": [...]}`).
pub fn parse_conversation(json: &str) -> Result<Conversation> {
    let conv: Conversation = serde_json::from_str(json)?;
    for (i, m) in conv.messages.iter().enumerate() {
        validate_message(m).map_err(|e| e.context(format!("message {i}")))?;
    }
    Ok(conv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_system_message_is_pinned() {
        let r = render(
            &Conversation { messages: vec![Message::system(SystemContent::default())] },
            RenderConfig::default(),
        )
        .unwrap();
        assert_eq!(r.token_ids.len(), 50);
        assert_eq!(r.token_ids[29], 14093);
        for (e, id) in [(ReasoningEffort::Low, 4465), (ReasoningEffort::High, 1932)] {
            let s = SystemContent { reasoning_effort: Some(e), ..Default::default() };
            let r = render(&Conversation { messages: vec![Message::system(s)] }, RenderConfig::default()).unwrap();
            assert_eq!(r.token_ids[29], id);
        }
    }

    #[test]
    fn content_may_be_a_string() {
        let c = parse_conversation(r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(c.messages[0].content, vec![Content::text("hi")]);
    }

    #[test]
    fn structure_errors() {
        assert!(parse_conversation(r#"{"messages":[{"role":"tool","content":"x"}]}"#).is_err());
        assert!(parse_conversation(r#"{"messages":[{"role":"user","content":[{"type":"system_content"}]}]}"#).is_err());
        assert!(parse_conversation(r#"{"messages":[{"role":"robot","content":"x"}]}"#).is_err());
        assert!(parse_conversation(r#"{"messages":[{"role":"user","contnt":"x"}]}"#).is_err());
    }

    #[test]
    fn recipient_and_constrain() {
        let m = Message {
            role: Role::Assistant,
            name: None,
            content: vec![Content::text("{}")],
            channel: Some("commentary".into()),
            recipient: Some("functions.get_weather".into()),
            content_type: Some("<|constrain|>json".into()),
        };
        let t = render_message(0, &m, false).unwrap();
        let mut want = vec![START, 173781, 316, 28, 44580, 775, 170154, CHANNEL, 12606, 815];
        want.extend(tokenizer::encode(" "));
        want.push(CONSTRAIN);
        want.extend(tokenizer::encode("json"));
        want.push(MESSAGE);
        assert_eq!(t.header, want);
        assert_eq!(t.end, CALL);
    }
}
