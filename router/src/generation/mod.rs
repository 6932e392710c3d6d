//! The one generation core behind every public API. OpenAI HTTP, Triton's
//! HTTP generate extension, KServe v2 gRPC and the native
//! `GenerateService` only translate wire shapes into a
//! [`GenerationRequest`] and pieces back into their responses; everything
//! else happens here, once:
//!
//! - [`auth`]: API keys (`--api-key`);
//! - [`guide`]: structured outputs (JSON schemas, regular expressions,
//!   choices, grammars), compiled by llguidance into per-request matchers;
//! - [`request`]: the model name, prompt building (text, token ids, the chat
//!   template), sampling, stop strings and every limit;
//! - [`stream`]: queueing on the engine, `--request-timeout`, detokenized
//!   streaming with stop strings and the reasoning split, stream-or-collect,
//!   finish reasons and usage, and the request metrics;
//! - [`tools`]: tool calls parsed out of the text (`--tool-call-parser`),
//!   and the grammars that force a call (`tool_choice`);
//! - [`error`]: why a request was refused, rendered by each API in its form.

pub mod auth;
pub mod error;
pub mod guide;
pub mod request;
pub mod stream;
pub mod text;
pub mod tools;

pub use error::GenerationError;
pub use request::{GenerationRequest, Prompt, Sampling, Stop};
pub use stream::{Completion, Generation, Piece, TokenOut, start};
