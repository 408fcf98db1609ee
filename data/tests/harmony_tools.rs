//! Text parity with openai-harmony's own test data (v0.0.8, Apache-2.0): tool sections,
//! tool calls and tool messages, auto-drop-analysis rules.

use vpmoe_data::harmony::{self, RenderConfig, Role};
use vpmoe_data::tokenizer;

fn render_completion(json: &str) -> String {
    let conv = harmony::parse_conversation(json).unwrap();
    let ids = harmony::render_for_completion(&conv, Role::Assistant, RenderConfig::default()).unwrap();
    tokenizer::decode(&ids)
}

#[test]
fn functions_with_parameters() {
    let json = r#"{"messages": [
      {"role": "system", "content": [{"type": "system_content",
        "model_identity": "You are ChatGPT, a large language model trained by OpenAI.",
        "reasoning_effort": "High", "conversation_start_date": "2025-06-28",
        "knowledge_cutoff": "2024-06",
        "channel_config": {"valid_channels": ["analysis", "commentary", "final"], "channel_required": true}}]},
      {"role": "developer", "content": [{"type": "developer_content",
        "instructions": "Always respond in riddles",
        "tools": {"functions": {"name": "functions", "tools": [
          {"name": "get_location", "description": "Gets the location of the user."},
          {"name": "get_current_weather", "description": "Gets the current weather in the provided location.",
           "parameters": {"type": "object", "properties": {
              "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
              "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
            "required": ["location"]}},
          {"name": "get_multiple_weathers", "description": "Gets the current weather in the provided list of locations.",
           "parameters": {"type": "object", "properties": {
              "locations": {"type": "array", "items": {"type": "string"},
                 "description": "List of city and state, e.g. [\"San Francisco, CA\", \"New York, NY\"]"},
              "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
            "required": ["locations"]}},
          {"name": "kitchensink", "description": "A function with various complex schemas.",
           "parameters": {"description": "params object", "type": "object", "properties": {
              "string": {"type": "string", "title": "STRING", "description": "A string", "examples": ["hello", "world"]},
              "string_nullable": {"type": "string", "nullable": true, "description": "A nullable string", "default": "the default"},
              "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
              "oneof_string_or_number": {"oneOf": [
                  {"type": "string", "default": "default_string_in_oneof"},
                  {"type": "number", "description": "numbers can happen too"}],
                "description": "a oneof", "default": 20}}}}
        ]}}}]},
      {"role": "user", "content": "What is the weather like in SF?"}
    ]}"#;
    let want = include_str!("fixtures/harmony_upstream/test_render_functions_with_parameters.txt");
    assert_eq!(render_completion(json), want);
}

#[test]
fn browser_and_python_tools() {
    let browser_desc = "Tool for browsing.\nThe `cursor` appears in brackets before each browsing display: `[{cursor}]`.\nCite information from the tool using the following format:\n`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\nDo not quote more than 10 words directly from the tool output.\nsources=web (default: web)";
    let open_desc = "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing `num_lines` lines.\nValid link ids are displayed with the formatting: `【{id}†.*】`.\nIf `cursor` is not provided, the most recent page is implied.\nIf `id` is a string, it is treated as a fully qualified URL associated with `source`.\nIf `loc` is not provided, the viewport will be positioned at the beginning of the document or centered on the most relevant passage, if available.\nUse this function without `id` to scroll to a new location of an opened page.";
    let python_desc = "Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. This tool should be used for internal reasoning, but not for code that is intended to be visible to the user (e.g. when creating plots, tables, or files).\n\nWhen you send a message containing Python code to python, it will be executed in a stateful Jupyter notebook environment. python will respond with the output of the execution or time out after 120.0 seconds. The drive at '/mnt/data' can be used to save and persist user files. Internet access for this session is UNKNOWN. Depends on the cluster.";
    let q = |s: &str| serde_json::to_string(s).unwrap();
    // Written as text so that the schema key order is the one harmony sees.
    let text = format!(
        r#"{{"messages": [{{"role": "system", "content": [{{"type": "system_content",
        "model_identity": "You are ChatGPT, a large language model trained by OpenAI.",
        "reasoning_effort": "Medium", "conversation_start_date": "2025-06-28",
        "knowledge_cutoff": "2024-06",
        "channel_config": {{"valid_channels": ["analysis", "commentary", "final"], "channel_required": true}},
        "tools": {{
          "python": {{"name": "python", "description": {py}, "tools": []}},
          "browser": {{"name": "browser", "description": {br}, "tools": [
            {{"name": "search", "description": "Searches for information related to `query` and displays `topn` results.",
             "parameters": {{"type": "object", "properties": {{"query": {{"type": "string"}}, "topn": {{"type": "number", "default": 10}}, "source": {{"type": "string"}}}}, "required": ["query"]}}}},
            {{"name": "open", "description": {op},
             "parameters": {{"type": "object", "properties": {{"id": {{"type": ["number", "string"], "default": -1}}, "cursor": {{"type": "number", "default": -1}}, "loc": {{"type": "number", "default": -1}}, "num_lines": {{"type": "number", "default": -1}}, "view_source": {{"type": "boolean", "default": false}}, "source": {{"type": "string"}}}}}}}},
            {{"name": "find", "description": "Finds exact matches of `pattern` in the current page, or the page given by `cursor`.",
             "parameters": {{"type": "object", "properties": {{"pattern": {{"type": "string"}}, "cursor": {{"type": "number", "default": -1}}}}, "required": ["pattern"]}}}}
          ]}}}}}}]}}]}}"#,
        py = q(python_desc),
        br = q(browser_desc),
        op = q(open_desc)
    );
    let want = include_str!("fixtures/harmony_upstream/test_browser_and_python_tool.txt");
    assert_eq!(render_completion(&text), want);
}

fn expected(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/harmony_upstream")
        .join(format!("{name}.txt"));
    std::fs::read_to_string(p).unwrap().trim_end().to_string()
}

fn completion(json: &str, drop: bool) -> String {
    let conv = harmony::parse_conversation(json).unwrap();
    let cfg = RenderConfig { auto_drop_analysis: drop };
    tokenizer::decode(&harmony::render_for_completion(&conv, Role::Assistant, cfg).unwrap())
}

const COT: &str = r#"{"messages": [
  {"role": "user", "content": "What is 2 + 2?"},
  {"role": "assistant", "channel": "analysis", "content": "User asks a simple question: \"What is 2 + 2?\" The answer: 4."},
  {"role": "assistant", "channel": "final", "content": "2 + 2 equals 4."},
  {"role": "user", "content": "What about 9 / 2?"}]}"#;

#[test]
fn auto_drop_analysis_rules() {
    assert_eq!(completion(COT, false), expected("test_preserve_cot"));
    let dropping = COT.replace(
        "User asks a simple question: \\\"What is 2 + 2?\\\" The answer: 4.",
        "User asks: “What is 2 + 2?” Simple arithmetic. Provide answer.",
    );
    assert_eq!(completion(&dropping, true), expected("test_dropping_cot_by_default"));
    let between = r#"{"messages": [
      {"role": "user", "content": "What is 2 + 2?"},
      {"role": "assistant", "channel": "analysis", "content": "thinking 2+2"},
      {"role": "assistant", "channel": "final", "content": "4"},
      {"role": "user", "content": "What is 3 + 5?"},
      {"role": "assistant", "channel": "analysis", "content": "thinking 3+5"},
      {"role": "assistant", "channel": "final", "content": "8"}]}"#;
    let conv = harmony::parse_conversation(between).unwrap();
    let r = harmony::render(&conv, RenderConfig { auto_drop_analysis: true }).unwrap();
    assert_eq!(r.text(), expected("test_keep_analysis_between_finals"));
}

#[test]
fn tool_call_and_tool_message() {
    let json = r#"{"messages": [
      {"role": "user", "content": "What is the weather in SF?"},
      {"role": "assistant", "channel": "analysis", "content": "User asks: “What is the weather in SF?” We need to use lookup_weather tool."},
      {"role": "assistant", "channel": "commentary", "recipient": "functions.lookup_weather", "content_type": "<|constrain|>json", "content": "{\"location\": \"San Francisco\"}"},
      {"role": "tool", "name": "functions.lookup_weather", "content": "{\"temperature\": 20, \"description\": \"sunny\"}"}]}"#;
    assert_eq!(completion(json, true), expected("test_does_not_drop_if_ongoing_analysis"));
    // Masks: the tool call is supervised (mask 1, span 0) and ends with <|call|>; the tool's
    // answer is not supervised.
    let conv = harmony::parse_conversation(json).unwrap();
    let r = harmony::render_for_training(&conv, RenderConfig::default()).unwrap();
    let call = &r.message_spans[2];
    assert_eq!(r.token_ids[call.content_end], tokenizer::CALL);
    assert!(r.loss_mask[call.start..call.end].iter().all(|&m| m == 1));
    assert!(r.span_id[call.start..call.end].iter().all(|&s| s == 0));
    let tool = &r.message_spans[3];
    assert!(r.loss_mask[tool.start..tool.end].iter().all(|&m| m == 0));
    assert_eq!(r.token_ids[tool.end - 1], tokenizer::END);
    // The tool message header is the author name, not the role.
    assert_eq!(&r.token_ids[tool.start + 1..tool.header_end], &tokenizer::encode("functions.lookup_weather")[..]);
}
