//! Chat templates: the model's own Jinja template (GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`), rendered with `minijinja` exactly as Hugging Face's
//! `apply_chat_template` does, so a conversation becomes the prompt text the model was trained on.

use minijinja::{Environment, ErrorKind, context};
use thiserror::Error;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or whatever the template knows).
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A template that does not compile or fails to render (including `raise_exception` calls the
/// template makes on invalid conversations, such as roles out of order).
#[derive(Debug, Error)]
#[error("chat template: {0}")]
pub struct ChatError(String);

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are the strings templates may print.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        // Hugging Face templates call this to reject malformed conversations.
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ChatError(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Another template `source`, compiled, printing the same BOS and EOS strings as this one:
    /// how a `--chat-template` file replaces a model's own template while keeping its special
    /// tokens.
    pub fn with_source(&self, source: &str) -> Result<Self, ChatError> {
        ChatTemplate::new(source, &self.bos_token, &self.eos_token)
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// answer starts.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ChatError(e.to_string()))?;
        tmpl.render(context! {
            messages => messages
                .iter()
                .map(|m| {
                    minijinja::Value::from(std::collections::BTreeMap::from([
                        ("role", m.role.clone()),
                        ("content", m.content.clone()),
                    ]))
                })
                .collect::<Vec<_>>(),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| ChatError(e.to_string()))
    }
}

/// The ChatML template (`<|im_start|>role\ncontent<|im_end|>\n` per message), used for models
/// that carry no template of their own: GGUF files without `tokenizer.chat_template`, Hugging
/// Face directories without one, and the `random:` presets.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

impl ChatTemplate {
    /// The default [`CHATML_TEMPLATE`], whose EOS is `<|im_end|>`.
    pub fn chatml() -> Result<Self, ChatError> {
        ChatTemplate::new(CHATML_TEMPLATE, "", "<|im_end|>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_chatml_template_and_reports_template_errors() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
             {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "",
            "<|im_end|>",
        )
        .unwrap();
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let strict = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
            "",
            "",
        )
        .unwrap();
        let err = strict
            .render(&[ChatMessage::new("assistant", "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
    }

    #[test]
    fn the_default_chatml_template_renders_each_turn() {
        let out = ChatTemplate::chatml()
            .unwrap()
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "Hi"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }
}
