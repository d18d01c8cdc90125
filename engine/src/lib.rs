//! HotPrefix's inference engine. So far: reading model files ([`gguf`]) and tokenising
//! ([`tokenizer`]); the model, backends, scheduler and HTTP server follow (issue 3).

pub mod gguf;
pub mod tokenizer;
