//! From an OpenAI request body to prompt token ids, exactly as the engine prefills them. The
//! router calls the same functions to hash a request's blocks, so its prefix lookups name the
//! blocks the engine will cache (a test in `router/` checks the hashes agree).

use crate::api::{ChatRequest, CompletionRequest, Content, Message, Prompt};
use crate::chat::{ChatMessage, ChatTemplate};
use crate::tokenizer::Tokenizer;

/// Why a request has no prompt: a client error naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PromptError {
    /// What is wrong, for the client.
    pub message: String,
    /// The request field at fault.
    pub param: &'static str,
}

impl PromptError {
    fn new(message: impl Into<String>, param: &'static str) -> Self {
        PromptError {
            message: message.into(),
            param,
        }
    }
}

/// Tokenizes a completion request's prompt (exactly one text or one token list).
pub fn completion_prompt(
    tokenizer: &Tokenizer,
    req: &CompletionRequest,
) -> Result<Vec<u32>, PromptError> {
    let text = |t: &str| {
        tokenizer.encode(t).map_err(|e| {
            tracing::warn!(error = %e, "tokenization failed");
            PromptError::new("the prompt could not be tokenized", "prompt")
        })
    };
    match &req.prompt {
        Prompt::Text(t) => text(t),
        Prompt::Tokens(ids) => Ok(ids.clone()),
        Prompt::Texts(v) if v.len() == 1 => text(&v[0]),
        Prompt::TokenLists(v) if v.len() == 1 => Ok(v[0].clone()),
        _ => Err(PromptError::new(
            "exactly one prompt per request is supported",
            "prompt",
        )),
    }
}

/// Renders a conversation with the model's chat template and tokenizes it.
pub fn chat_prompt(
    tokenizer: &Tokenizer,
    chat: &ChatTemplate,
    req: &ChatRequest,
) -> Result<Vec<u32>, PromptError> {
    let text = render_chat(chat, &req.messages)?;
    tokenizer.encode_chat(&text).map_err(|e| {
        tracing::warn!(error = %e, "tokenization failed");
        PromptError::new("the conversation could not be tokenized", "messages")
    })
}

/// Renders a conversation with the model's template.
pub fn render_chat(chat: &ChatTemplate, messages: &[Message]) -> Result<String, PromptError> {
    if messages.is_empty() {
        return Err(PromptError::new("messages must not be empty", "messages"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "user" | "assistant" => m.role.clone(),
            "developer" => "system".to_string(),
            other => {
                return Err(PromptError::new(
                    format!(
                        "messages[{i}].role {other:?} is not supported (system, developer, user, \
                         assistant)"
                    ),
                    "messages",
                ));
            }
        };
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(x)) => t.push_str(x),
                        (kind, _) => {
                            return Err(PromptError::new(
                                format!(
                                    "messages[{i}]: content parts of type {kind:?} are not \
                                     supported (text only)"
                                ),
                                "messages",
                            ));
                        }
                    }
                }
                t
            }
        };
        out.push(ChatMessage { role, content });
    }
    chat.render(&out, true)
        .map_err(|e| PromptError::new(e.to_string(), "messages"))
}
