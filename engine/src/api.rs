//! OpenAI-compatible request and response bodies for `/v1/completions`,
//! `/v1/chat/completions` and `/v1/models`, and the OpenAI-shaped error body. Requests are
//! parsed leniently where OpenAI clients vary (unknown fields are ignored, `prompt` may be text
//! or token ids, message content may be a list of text parts) and strictly where a wrong value
//! would change the answer (unsupported features are refused, not ignored).

use serde::{Deserialize, Serialize};

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum StringOrList {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl StringOrList {
    /// The strings.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

/// `prompt` of a completion: text, token ids, or a one-element batch of either.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A batch of texts (only one is supported: n=1, one prompt).
    Texts(Vec<String>),
    /// A batch of token lists.
    TokenLists(Vec<Vec<u32>>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Sampling {
    /// Tokens to generate at most.
    pub max_tokens: Option<u64>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    /// 0 to 2; 0 is greedy.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1].
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (extension; -1 or absent: all).
    pub top_k: Option<i64>,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
    /// Up to 4 stop strings.
    pub stop: Option<StringOrList>,
    /// Extra token ids that end the answer (extension).
    pub stop_token_ids: Option<Vec<u32>>,
    /// Keep generating past the end-of-sequence token (extension).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Choices to generate; only 1 is supported.
    pub n: Option<u64>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Must be 0 or absent (not supported).
    pub presence_penalty: Option<f32>,
    /// Must be 0 or absent (not supported).
    pub frequency_penalty: Option<f32>,
    /// Must be absent, null or false (not supported).
    pub logprobs: Option<serde_json::Value>,
    /// Ignored (end-user id).
    pub user: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct CompletionRequest {
    /// Model id (must be the served one).
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Must be false or absent (not supported).
    #[serde(default)]
    pub echo: bool,
    /// Must be absent (not supported).
    pub suffix: Option<String>,
    /// Sampling and streaming.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// One part of a message's content list.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ContentPart {
    /// Only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    pub text: Option<String>,
}

/// Message content: text or a list of parts.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Content {
    /// Text.
    Text(String),
    /// Parts.
    Parts(Vec<ContentPart>),
}

/// One chat message.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Message {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The content (absent or null only for assistant tool calls, which are not supported).
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ChatRequest {
    /// Model id (must be the served one).
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Sampling and streaming.
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `usage.prompt_tokens_details`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// Token counts of a response.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
    /// Cache detail.
    pub prompt_tokens_details: PromptTokensDetails,
}

impl Usage {
    /// Usage from counts.
    pub fn new(prompt: usize, completion: usize, cached: usize) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: cached,
            },
        }
    }
}

/// One choice of a completion.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CompletionChoice {
    /// Always 0 (n=1).
    pub index: u32,
    /// Generated text (a delta when streaming).
    pub text: String,
    /// `stop` or `length`; null while streaming.
    pub finish_reason: Option<&'static str>,
    /// Always null.
    pub logprobs: Option<()>,
}

/// A completion response or stream chunk.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CompletionResponse {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Model id.
    pub model: String,
    /// One choice (none in a usage-only chunk).
    pub choices: Vec<CompletionChoice>,
    /// Token counts (null in stream chunks except the usage chunk).
    pub usage: Option<Usage>,
}

/// An assistant message.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChatMessageOut {
    /// `assistant`.
    pub role: &'static str,
    /// The text.
    pub content: String,
}

/// One choice of a chat completion.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChatChoice {
    /// Always 0.
    pub index: u32,
    /// The answer.
    pub message: ChatMessageOut,
    /// `stop` or `length`.
    pub finish_reason: Option<&'static str>,
    /// Always null.
    pub logprobs: Option<()>,
}

/// A chat completion response.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChatResponse {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Model id.
    pub model: String,
    /// One choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// The changed part of a streamed chat message.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Delta {
    /// `assistant` in the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a chat stream chunk.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChatChunkChoice {
    /// Always 0.
    pub index: u32,
    /// What changed.
    pub delta: Delta,
    /// Set in the last chunk.
    pub finish_reason: Option<&'static str>,
    /// Always null.
    pub logprobs: Option<()>,
}

/// A chat stream chunk.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChatChunk {
    /// Same for every chunk of a response.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Model id.
    pub model: String,
    /// One choice (none in the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Set only in the usage chunk.
    pub usage: Option<Usage>,
}

/// One served model.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelCard {
    /// The id requests name.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds when the engine started.
    pub created: u64,
    /// `hotprefix`.
    pub owned_by: &'static str,
    /// Longest prompt plus answer.
    pub max_model_len: usize,
}

/// `GET /v1/models`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The served model.
    pub data: Vec<ModelCard>,
}

/// The body of an error response, as OpenAI sends it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    /// Human-readable message.
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `rate_limit_error`, `server_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code, if any.
    pub code: Option<String>,
}
