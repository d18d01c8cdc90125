//! HotPrefix's inference engine. So far: reading model files ([`gguf`]), tokenising
//! ([`tokenizer`]), rendering chat templates ([`chat`]) and the dense reference decoder
//! ([`model`]); the paged backends, scheduler and HTTP server follow (issue 3).

pub mod api;
pub mod backend;
pub mod chat;
pub mod config;
pub mod decoder;
pub mod engine;
pub mod gguf;
pub mod hf;
pub mod launch;
pub mod metrics;
pub mod model;
pub mod prompt;
pub mod publish;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod source;
pub mod telemetry;
pub mod tokenizer;
