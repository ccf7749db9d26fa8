//! ts2021 control protocol.

pub mod backoff;
pub mod client;
pub mod dial;
