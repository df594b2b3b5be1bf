//! The GGUF's own chat template reproduces the ChatML prompts llama.cpp was given, byte for byte.

use meswitch_server::chat::{ChatMessage, ChatTemplate};
use meswitch_server::gguf::GgufFile;
use meswitch_server::testdata;

const USER_OPEN: &str = "<|im_start|>user\n";
const TURN_END: &str = "<|im_end|>";

#[test]
fn smollm2_chatml_prompts_are_reproduced() {
    let Some(path) = testdata::require("SmolLM2 GGUF", testdata::smollm2_gguf()) else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let tmpl = ChatTemplate::from_gguf(&f)
        .unwrap()
        .expect("SmolLM2 has a chat template");
    let dir = testdata::smollm2_dir().expect("goldens");
    let text = std::fs::read_to_string(dir.join("generation_goldens.jsonl")).unwrap();
    let mut n = 0;
    for line in text.lines() {
        let g: serde_json::Value = serde_json::from_str(line).unwrap();
        if g["kind"] != "chatml" {
            continue;
        }
        let prompt = g["prompt"].as_str().unwrap();
        // The golden was rendered from one user message and the template's default system prompt.
        let start = prompt.find(USER_OPEN).unwrap() + USER_OPEN.len();
        let user = &prompt[start..start + prompt[start..].find(TURN_END).unwrap()];
        let rendered = tmpl
            .render(&[ChatMessage::new("user", user)], true)
            .unwrap();
        assert_eq!(rendered, prompt);
        n += 1;
    }
    assert_eq!(n, 3);
}
