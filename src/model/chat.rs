//! Chat templates: the Jinja program an instruct model ships (`tokenizer_config.json`'s
//! `chat_template`, a `chat_template.jinja` file, or a GGUF file's `tokenizer.chat_template`)
//! that turns a list of messages into the prompt text it was fine-tuned on. Rendered with
//! minijinja as transformers' `apply_chat_template` renders it (trim_blocks, lstrip_blocks, loop
//! controls, Python string methods, `raise_exception`, `strftime_now`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{tokenizer, ModelError};

/// A chat template beside a checkpoint, as transformers ≥ 4.43 saves it.
pub const TEMPLATE_FILE: &str = "chat_template.jinja";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(content: &str) -> Self {
        Message {
            role: "user".into(),
            content: content.into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

/// `bos_token` / `eos_token` in tokenizer_config.json: a string, or an AddedToken object.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// A template from its Jinja source; fails on a syntax error.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, ModelError> {
        let t = ChatTemplate {
            source,
            bos_token,
            eos_token,
        };
        t.render(&[Message::user("check")], true)?;
        Ok(t)
    }

    /// The template of a Hugging Face model directory, if it has one: `chat_template.jinja`, else
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of which
    /// `default` is used).
    pub fn for_checkpoint(dir: &Path) -> Result<Option<Self>, ModelError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
                path: config_path.clone(),
                reason: format!("not JSON: {e}"),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        let jinja = dir.join(TEMPLATE_FILE);
        let source = if jinja.is_file() {
            Some(
                std::fs::read_to_string(&jinja).map_err(|source| ModelError::Io {
                    path: jinja.clone(),
                    source,
                })?,
            )
        } else {
            match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        let Some(source) = source else {
            return Ok(None);
        };
        // A chat stage's checkpoint names the template's tokens in phigen.json (see
        // `ChatTemplate::save`); else they are the tokenizer's, as transformers passes them.
        let (bos, eos) = match tokenizer::read_phigen_file(dir).ok().and_then(|f| f.chat) {
            Some(t) => (t.bos_token, t.eos_token),
            None => (
                token_text(config.get("bos_token")),
                token_text(config.get("eos_token")),
            ),
        };
        ChatTemplate::new(source, bos, eos)
            .map(Some)
            .map_err(|e| ModelError::BadFile {
                path: if jinja.is_file() { jinja } else { config_path },
                reason: format!("the chat template does not render: {e}"),
            })
    }

    /// Writes the template into checkpoint `dir` (which already has its `phigen.json`):
    /// `chat_template.jinja`, as transformers saves one, and its bos/eos texts in `phigen.json`,
    /// so [`ChatTemplate::for_checkpoint`] reads back the same template and `phigen serve` ends
    /// answers at its end of turn.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        let jinja = dir.join(TEMPLATE_FILE);
        std::fs::write(&jinja, &self.source).map_err(io(&jinja))?;
        let mut file = tokenizer::read_phigen_file(dir)?;
        file.chat = Some(tokenizer::ChatTokens {
            bos_token: self.bos_token.clone(),
            eos_token: self.eos_token.clone(),
        });
        let path = dir.join(tokenizer::PHIGEN_FILE);
        crate::artifact::atomic::write_json(&path, &file).map_err(io(&path))
    }

    /// The text of the end-of-sequence token the template writes after each turn (may be empty).
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The prompt text for `messages`; with `add_generation_prompt` it ends where the assistant's
    /// answer begins.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let mut env = minijinja::Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, _> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        });
        env.add_function("strftime_now", |format: String| {
            chrono::Local::now().format(&format).to_string()
        });
        let template = env
            .template_from_str(&self.source)
            .map_err(|e| ModelError::Tokenizer(format!("chat template: {e}")))?;
        template
            .render(minijinja::context! {
                messages => minijinja::value::Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| ModelError::Tokenizer(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template (from its tokenizer_config.json); the expected text is what
    /// transformers' `apply_chat_template(..., add_generation_prompt=True, tokenize=False)` prints
    /// for one user message.
    #[test]
    fn smollm2_template_renders_as_transformers_does() {
        let source = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = ChatTemplate::new(source.into(), String::new(), "<|im_end|>".into()).unwrap();
        assert_eq!(
            t.render(&[Message::user("Hi")], true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// Block tags on their own lines leave no blank lines behind (trim_blocks + lstrip_blocks, as
    /// transformers sets them), `.strip()` works, and `raise_exception` fails the render.
    #[test]
    fn whitespace_control_python_methods_and_exceptions() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content.strip() }}]\n    {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(source.into(), String::new(), String::new()).unwrap();
        assert_eq!(
            t.render(&[Message::user("  a  "), Message::user("b")], false)
                .unwrap(),
            "[a]\n[b]\n"
        );
        let failing = "{{ raise_exception('only user messages') }}";
        let err = ChatTemplate::new(failing.into(), String::new(), String::new()).unwrap_err();
        assert!(err.to_string().contains("only user messages"), "{err}");
    }

    /// tokenizer_config.json with the template and an AddedToken-style eos (as TinyLlama ships).
    #[test]
    fn reads_the_template_and_special_tokens_from_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false},
                "chat_template": "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"}"#,
        )
        .unwrap();
        let t = ChatTemplate::for_checkpoint(dir.path()).unwrap().unwrap();
        assert_eq!(
            t.render(&[Message::user("Hi")], true).unwrap(),
            "<s><|user|>\nHi</s>\n<|assistant|>\n"
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::for_checkpoint(empty.path())
            .unwrap()
            .is_none());
    }
}
