//! HotPrefix's inference engine. So far: reading model files ([`gguf`]), tokenising
//! ([`tokenizer`]) and rendering chat templates ([`chat`]); the model, backends, scheduler and HTTP server follow (issue 3).

pub mod chat;
pub mod gguf;
pub mod tokenizer;
