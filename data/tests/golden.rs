//! Golden parity with the official openai-harmony renderer (fixtures/harmony_golden.jsonl).

use serde_json::Value;
use vpmoe_data::harmony::{self, Conversation, RenderConfig, Role};

fn golden() -> Vec<Value> {
    let text = include_str!("fixtures/harmony_golden.jsonl");
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn u8s(v: &Value) -> Vec<u8> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u8).collect()
}

#[test]
fn every_golden_vector_matches() {
    let cases = golden();
    assert!(cases.len() >= 20);
    for case in &cases {
        let id = case["id"].as_str().unwrap();
        let conv: Conversation = harmony::parse_conversation(&case["conversation"].to_string()).unwrap();
        let cfg: RenderConfig = serde_json::from_value(case["render_config"].clone()).unwrap();
        let r = harmony::render_for_training(&conv, cfg).unwrap();
        assert_eq!(r.token_ids, u32s(&case["token_ids"]), "{id}: token_ids");
        assert_eq!(r.token_ids.len() as u64, case["num_tokens"].as_u64().unwrap());
        assert_eq!(r.loss_mask, u8s(&case["loss_mask"]), "{id}: loss_mask");
        assert_eq!(r.loss_mask_gen, u8s(&case["loss_mask_gen"]), "{id}: loss_mask_gen");
        assert_eq!(r.span_id, u8s(&case["span_id"]), "{id}: span_id");
        assert_eq!(r.text(), case["text"].as_str().unwrap(), "{id}: text");
        let spans = serde_json::to_value(&r.message_spans).unwrap();
        for (got, want) in spans.as_array().unwrap().iter().zip(case["message_spans"].as_array().unwrap()) {
            for (k, v) in want.as_object().unwrap() {
                assert_eq!(&got[k], v, "{id}: message_spans.{k}");
            }
        }
        assert_eq!(r.message_spans.len(), case["message_spans"].as_array().unwrap().len());
        // The completion prefill of the messages before the trailing assistant block is a
        // prefix of the training ids, and its length is `prompt_ids_len`.
        if let Some(p) = case["prompt_ids_len"].as_u64() {
            let mut k = conv.messages.len();
            while k > 0 && conv.messages[k - 1].role == Role::Assistant {
                k -= 1;
            }
            let prompt = Conversation { messages: conv.messages[..k].to_vec() };
            let ids = harmony::render_for_completion(&prompt, Role::Assistant, cfg).unwrap();
            assert_eq!(ids.len() as u64, p, "{id}: prompt_ids_len");
            assert_eq!(&r.token_ids[..ids.len()], &ids[..], "{id}: prompt prefix");
            assert_eq!(r.loss_mask_gen[p as usize], 1);
            assert_eq!(r.loss_mask_gen[p as usize - 1], 0);
        }
    }
}
