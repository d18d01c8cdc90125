//! HotPrefix's inference engine. So far: reading model files ([`gguf`]); the model, backends,
//! scheduler and HTTP server follow (issue 3).

pub mod gguf;
